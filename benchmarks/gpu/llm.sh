#!/usr/bin/env bash
# Issue 10, group 1 (LLM) inside a device lease:
#   prepare DATA_DIR   here: copy the offline text and the GPT-2 tokenizer into .gpu/llm (17 MB)
#   throughput         device: blueberry-88m and -151m training tokens/s, MFU and peak memory, with
#                      and without compile; with the full fp32 logits (--loss_chunk 0) for the
#                      memory comparison; with document masking (FlexAttention)        (~6 min)
#   speedrun [RUNS]    device: the 8M-token speedrun of blueberry-88m on the offline text with the
#                      GPT-2 tokenizer (the Hub's SmolLM2 tokenizer and Cosmopedia are unreachable
#                      there), RUNS seeds (default 2), as a record                     (~2 min a run)
#   overhead           device: issue 12's world-size-1 cost of the distributed path: blueberry-88m
#                      compiled, plain python vs torchrun --nproc_per_node 1 with DDP and FSDP2 (~3 min)
#   moe [RUNS]         device: issue 13's moe-24gb against blueberry-88m at 20M tokens on the offline
#                      text, RUNS seeds each (default 2), compared by the speedrun harness (~4 min a pair)
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
    moe=${MOE_OVERRIDES:-model.moe_experts=8 model.moe_top_k=2 model.moe_hidden=1024 model.moe_dense_layers=1 train.batch_size=8 train.grad_accum=2}
    $PY scripts/speedrun.py --preset "${DENSE_PRESET:-blueberry-88m}" --budget "${BUDGET:-20M}" --runs "${2:-2}" --label dense-offline-gpt2 \
        --records_dir "$OUT/records" --runs_dir "$G/runs" "${data[@]}" ${SPEEDRUN_OVERRIDES:-}
    base=$(ls -t "$OUT"/records/*-dense-offline-gpt2-*.json | head -1)
    $PY scripts/speedrun.py --preset "${DENSE_PRESET:-blueberry-88m}" --budget "${BUDGET:-20M}" --runs "${2:-2}" --label moe-offline-gpt2 \
        --records_dir "$OUT/records" --runs_dir "$G/runs" --compare "$base" "${data[@]}" $moe ${SPEEDRUN_OVERRIDES:-}
    ;;
*)
    echo "usage: benchmarks/gpu/llm.sh prepare DATA_DIR | throughput | overhead | speedrun [RUNS] | moe [RUNS]"; exit 2 ;;
esac
