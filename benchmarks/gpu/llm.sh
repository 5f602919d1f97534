#!/usr/bin/env bash
# Issue 10, group 1 (LLM) inside a device lease:
#   prepare DATA_DIR   here: copy the offline text and the GPT-2 tokenizer into .gpu/llm (17 MB)
#   throughput         device: blueberry-88m and -151m training tokens/s, MFU and peak memory, with
#                      and without compile; with the full fp32 logits (--loss_chunk 0) for the
#                      memory comparison; with document masking (FlexAttention); the loss
#                      alone (--loss_report: kernels and memory per chunk)              (~7 min)
#   speedrun [RUNS]    device: the 8M-token speedrun of blueberry-88m on the offline text with the
#                      GPT-2 tokenizer (the Hub's SmolLM2 tokenizer and Cosmopedia are unreachable
#                      there), RUNS seeds (default 2), as a record                     (~2 min a run)
#   overhead           device: issue 12's world-size-1 cost of the distributed path: blueberry-88m
#                      compiled, plain python vs torchrun --nproc_per_node 1 with DDP and FSDP2 (~3 min)
#   window1            device, one command of at most 9 minutes (the GPU-measurements issue, run 1):
#                      the GPU smoke test (pytest -m gpu), blueberry-88m compiled throughput with the
#                      chunked loss and with the full logits, the loss report, then 8M-token
#                      speedruns of blueberry-88m on the offline text in the time left. Carry
#                      [".gpu/llm"]; 8 files at most come back, all under $OUT
#   moe [RUNS]         device: issue 13's moe-24gb against blueberry-88m at 20M tokens on the offline
#                      text, RUNS seeds each (default 2), compared by the speedrun harness (~4 min a pair)
#   recipe [RUNS]      device: issue 25's carry test: blueberry-88m at 8M tokens on the offline text
#                      with the recipe it had before 2026-12-03 (OLD_RECIPE, overrides), then with
#                      today's (carried from cpu-16m), RUNS seeds each (default 2), today's tested
#                      against the old one by the harness                              (~2 min a run)
# Carry [".gpu/llm"] in the speedrun call. Results go to $OUT (or .gpu/out elsewhere).
# Dry run on a CPU: benchmarks/gpu/README.md (PRESET=debug BUDGET=20k THROUGHPUT_PRESETS=debug)
set -euo pipefail
cd "$(dirname "$0")/../.."
G=.gpu
OUT=${OUT:-$G/out}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"

case "${1:-}" in
prepare)
    data=${2:?usage: benchmarks/gpu/llm.sh prepare DATA_DIR}
    [ -d "$data/text" ] && [ -f "$data/tokenizers/gpt2/merges.txt" ] || { echo "error: $data/text or $data/tokenizers/gpt2 missing"; exit 2; }
    rm -rf "$G/llm" && mkdir -p "$G/llm"
    cp -r "$data/text" "$G/llm/text" && cp -r "$data/tokenizers/gpt2" "$G/llm/gpt2"
    du -sh "$G/llm"
    ;;
throughput)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>/dev/null || true
    for preset in ${THROUGHPUT_PRESETS:-blueberry-88m blueberry-151m}; do
        for mode in compile eager; do
            flag=$([ $mode = compile ] && echo --compile || true)
            $PY benchmarks/llm_throughput.py --preset "$preset" $flag --steps 20 --warmup 5 \
                >"$OUT/throughput-$preset-$mode.json" || echo "benchmark $preset $mode failed"
        done
    done
    $PY benchmarks/llm_throughput.py --preset "${THROUGHPUT_PRESETS%% *}" --compile --loss_chunk 0 --steps 10 --warmup 3 \
        >"$OUT/throughput-full-logits.json" || echo "full-logits benchmark failed (out of memory?)"
    $PY benchmarks/llm_throughput.py --preset "${THROUGHPUT_PRESETS%% *}" --compile --doc_mask --steps 10 --warmup 3 \
        >"$OUT/throughput-doc-mask.json" || echo "document-mask benchmark failed"
    # the output layer + loss alone: old eager chunks, the compiled chunk body, the compiled full logits
    $PY benchmarks/llm_throughput.py --preset "${THROUGHPUT_PRESETS%% *}" --loss_report ${LOSS_REPORT_ARGS:---loss_chunk 4096} \
        >"$OUT/loss-report.json" || echo "loss report failed"
    grep -h '"preset"\|tokens_per_s\|"mfu"\|peak_' "$OUT"/throughput-*.json
    ;;
overhead)
    p=${THROUGHPUT_PRESETS:-blueberry-88m}; p=${p%% *}
    $PY benchmarks/llm_throughput.py --preset "$p" ${COMPILE---compile} --steps 20 --warmup 5 >"$OUT/overhead-none.json" || echo "plain run failed"
    for mode in ddp fsdp; do
        $PY -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/llm_throughput.py --preset "$p" ${COMPILE---compile} \
            --parallel $mode --steps 20 --warmup 5 >"$OUT/overhead-$mode.json" || echo "torchrun $mode failed"
    done
    grep -h '"parallel"\|tokens_per_s\|peak_' "$OUT"/overhead-*.json
    ;;
speedrun)
    [ -d "$G/llm/text" ] || { echo "error: $G/llm missing: run 'benchmarks/gpu/llm.sh prepare DATA_DIR' here and carry .gpu/llm"; exit 2; }
    export BLUEBERRY_CACHE="$G/cache"
    $PY scripts/speedrun.py --preset "${PRESET:-blueberry-88m}" --budget "${BUDGET:-8M}" --runs "${2:-2}" \
        --label offline-text-gpt2 --records_dir "$OUT/records" --runs_dir "$G/runs" \
        data.source="$G/llm/text" data.tokenizer="$G/llm/gpt2" ${SPEEDRUN_OVERRIDES:-}
    ;;
moe)
    [ -d "$G/llm/text" ] || { echo "error: $G/llm missing: run 'benchmarks/gpu/llm.sh prepare DATA_DIR' here and carry .gpu/llm"; exit 2; }
    export BLUEBERRY_CACHE="$G/cache"
    data=(data.source="$G/llm/text" data.tokenizer="$G/llm/gpt2")
    # the harness compares records of one preset, so the MoE is blueberry-88m with moe-24gb's settings
    # as overrides (the same model, schedule and 32,768-token step as configs/llm/moe-24gb.toml)
    moe=${MOE_OVERRIDES:-model.moe.experts=8 model.moe.top_k=2 model.moe.hidden=1024 model.moe.dense_layers=1 train.batch_size=8 train.grad_accum=2}
    $PY scripts/speedrun.py --preset "${DENSE_PRESET:-blueberry-88m}" --budget "${BUDGET:-20M}" --runs "${2:-2}" --label dense-offline-gpt2 \
        --records_dir "$OUT/records" --runs_dir "$G/runs" "${data[@]}" ${SPEEDRUN_OVERRIDES:-}
    base=$(ls -t "$OUT"/records/*-dense-offline-gpt2-*.json | head -1)
    $PY scripts/speedrun.py --preset "${DENSE_PRESET:-blueberry-88m}" --budget "${BUDGET:-20M}" --runs "${2:-2}" --label moe-offline-gpt2 \
        --records_dir "$OUT/records" --runs_dir "$G/runs" --compare "$base" "${data[@]}" $moe ${SPEEDRUN_OVERRIDES:-}
    ;;
recipe)
    [ -d "$G/llm/text" ] || { echo "error: $G/llm missing: run 'benchmarks/gpu/llm.sh prepare DATA_DIR' here and carry .gpu/llm"; exit 2; }
    export BLUEBERRY_CACHE="$G/cache"
    data=(data.source="$G/llm/text" data.tokenizer="$G/llm/gpt2")
    # exactly blueberry-88m's config before a63b159 (checked to resolve to it): benchmarks/results/llm_recipe.md
    old=${OLD_RECIPE:-model.embed_norm=false model.init="normal" model.residual_scalars=false model.residual_init="identity" model.smear=false model.logit_softcap=0 model.qk_scale=1 model.rope_theta=10000 optim.muon_beta2=0 optim.muon_cautious_wd=false optim.muon_weight_decay=0 optim.muon_momentum=0.95 optim.muon_momentum_warmup=0 optim.warmup_steps=50 optim.cooldown_frac=0.3 optim.min_lr_ratio=0}
    $PY scripts/speedrun.py --preset "${PRESET:-blueberry-88m}" --budget "${BUDGET:-8M}" --runs "${2:-2}" --label old-recipe-offline-gpt2 \
        --records_dir "$OUT/records" --runs_dir "$G/runs" "${data[@]}" $old ${SPEEDRUN_OVERRIDES:-}
    base=$(ls -t "$OUT"/records/*-old-recipe-offline-gpt2-*.json | head -1)
    $PY scripts/speedrun.py --preset "${PRESET:-blueberry-88m}" --budget "${BUDGET:-8M}" --runs "${2:-2}" --label offline-text-gpt2 \
        --records_dir "$OUT/records" --runs_dir "$G/runs" --compare "$base" "${data[@]}" ${SPEEDRUN_OVERRIDES:-}
    ;;
window1)
    [ -d "$G/llm/text" ] || { echo "error: $G/llm missing: run 'benchmarks/gpu/llm.sh prepare DATA_DIR' here and carry .gpu/llm"; exit 2; }
    limit=${WINDOW_S:-530}  # seconds this command may take; each part is cut off so the rest still runs
    left() { echo $((limit - SECONDS)); }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1 || true
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >>"$OUT/gpu.txt" 2>&1 || true
    # 1. the smoke test; its figures (peak memory, compile time, syncs) as JSON
    BLUEBERRY_GPU_REPORT="$OUT/gpu-tests.json" timeout "${SMOKE_S:-200}" $PY -m pytest -m gpu -q -p no:cacheprovider -rA \
        tests/ >"$OUT/gpu-tests.log" 2>&1 || echo "smoke test: failures or time-out (see gpu-tests.log)"
    tail -3 "$OUT/gpu-tests.log"
    # 2. throughput and MFU, the chunked loss (the default) and the full logits; the loss alone
    p=${THROUGHPUT_PRESETS:-blueberry-88m}; p=${p%% *}
    for args in "--compile" "--compile --loss_chunk 0"; do
        [ "$(left)" -gt 200 ] || break
        timeout 110 $PY benchmarks/llm_throughput.py --preset "$p" $args --steps ${STEPS:-15} --warmup 3 \
            >>"$OUT/throughput.jsonl" 2>>"$OUT/window.log" || echo "throughput $args failed" | tee -a "$OUT/window.log"
    done
    [ "$(left)" -gt 180 ] && { timeout 60 $PY benchmarks/llm_throughput.py --preset "$p" --loss_report ${LOSS_REPORT_ARGS:-} \
        >>"$OUT/throughput.jsonl" 2>>"$OUT/window.log" || echo "loss report failed" | tee -a "$OUT/window.log"; }
    cat "$OUT/throughput.jsonl" 2>/dev/null | grep -o '"tokens_per_s": [0-9.]*\|"mfu": [0-9.]*\|"peak_memory_gib": [0-9.]*' || true
    # 3. 8M-token speedruns, one record of the runs that fit (about 2 minutes a run, compile included)
    export BLUEBERRY_CACHE="$G/cache"
    runs=$(( ($(left) - 20) / ${RUN_S:-120} )); [ $runs -gt 2 ] && runs=2
    if [ $runs -ge 1 ]; then
        timeout $(( $(left) - 10 )) $PY scripts/speedrun.py --preset "${PRESET:-blueberry-88m}" --budget "${BUDGET:-8M}" \
            --runs $runs --label offline-text-gpt2 --records_dir "$OUT/records" --runs_dir "$G/runs" \
            data.source="$G/llm/text" data.tokenizer="$G/llm/gpt2" ${SPEEDRUN_OVERRIDES:-} >>"$OUT/window.log" 2>&1 \
            || echo "speedrun failed or cut off (see window.log)"
        tail -12 "$OUT/window.log"
    else
        echo "no time left for a speedrun"
    fi
    ;;
*)
    echo "usage: benchmarks/gpu/llm.sh prepare DATA_DIR | throughput | overhead | speedrun [RUNS] | moe [RUNS] | recipe [RUNS] | window1"; exit 2 ;;
esac
