#!/usr/bin/env bash
# The GPU checks of issues 7 (speed) and 8 (CIFAR-10 result), prepared to run as one call on a lent GPU machine
# (see the README, "Speed and MFU"). Run from the repository root; writes under $OUT (default ./gpu-out).
#
#   scripts/gpu_session.sh bench             # ~11 min on an H100/H200: throughput + data paths -> $OUT/throughput*
#   scripts/gpu_session.sh rest              # ~7 min: the parts of bench the first H200 session did not reach
#   SEED=0 BUDGET=1m scripts/gpu_session.sh cifar10   # one seed of the six-method CIFAR-10 table (resumable)
#
# CIFAR-10: put cifar10-jpeg.tar.gz (../shared/data) in .data/ (git-ignored) and carry .data; it is unpacked to
# /tmp/cifar10. Needs torch, timm, pandas, matplotlib, tqdm, safetensors (all in the device image).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

cifar() {
    if [ ! -d /tmp/cifar10/train ]; then
        mkdir -p /tmp/cifar10 && tar xzf .data/cifar10-jpeg.tar.gz -C /tmp/cifar10
        # the archive may hold one top folder: find the directory that has train/
        root=$(dirname "$(find /tmp/cifar10 -maxdepth 3 -type d -name train | head -1)")
        [ "$root" = /tmp/cifar10 ] || { mv "$root"/* /tmp/cifar10/; }
    fi
}

case "${1:-bench}" in
bench)
    B="$PY -m repro.bench --out $OUT/throughput --steps 20 --warmup 5"
    # before/after on ViT-B/16: the official codes' habits (naive) vs the trainer (tuned), eager and compiled
    timeout 300 $B --model vit_b --variant naive tuned --compile off --tag vit_b 2>&1 | grep -v "^W" || true
    timeout 240 $B --model vit_b --variant tuned --compile on --tag vit_b 2>&1 | grep -v "^W" || true
    timeout 150 $B --model vit_s vit_l --variant tuned --compile off --tag sizes 2>&1 | grep -v "^W" || true
    # the GPU-only tests (no pytest-benchmark on the device: its addopts are dropped)
    timeout 120 $PY -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/unit 2>&1 | tail -5 || true
    # ImageNet-format streaming (issue 18): generated ImageNet-sized JPEGs; per-core stages and the real step fed by
    # each decode pipeline (pil = plain torchvision, fast = reduced DCT + uint8 crops, gpu = batched nvJPEG)
    [ -d /tmp/jpegs/train ] || $PY -m repro.bench.data_stages /tmp/jpegs 4000 >/dev/null
    timeout 240 $B micl mae mocov3 --model vit_b --compile off --data /tmp/jpegs --decode pil fast gpu \
        --tag imagenet-jpeg 2>&1 | grep -v "^W" || true
    if [ -f .data/cifar10-jpeg.tar.gz ]; then
        cifar
        timeout 150 $B micl mae mocov3 --model cifar10 --compile off --data /tmp/cifar10 --tag cifar10 2>&1 \
            | grep -v "^W" || true
    fi
    ;;
rest)
    # what the 2026-12-04 H200 session (15 device-minutes) left unmeasured: ViT-B compiled MimCo and MACRL (each
    # compile ~60 s), the ImageNet-JPEG streaming rows, the GPU-only tests; ~7 min
    B="$PY -m repro.bench --out $OUT/throughput --steps 20 --warmup 5"
    timeout 200 $B mimco macrl --model vit_b --variant tuned --compile on --tag vit_b 2>&1 | grep -v "^W" || true
    timeout 60 $PY -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/unit 2>&1 | tail -5 || true
    [ -d /tmp/jpegs/train ] || timeout 60 $PY -m repro.bench.data_stages /tmp/jpegs 4000 >/dev/null || true
    timeout 150 $B micl mae mocov3 --model vit_b --compile off --data /tmp/jpegs --decode pil fast gpu \
        --tag imagenet-jpeg 2>&1 | grep -v "^W" || true
    ;;
cifar10)
    cifar
    SEED=${SEED:-0} BUDGET=${BUDGET:-2m}
    timeout "${LIMIT:-570}" $PY -m repro.run micl mae mocov3 conmim mimco macrl --recipe cifar10 --budget "$BUDGET" \
        --seeds "$SEED" --evals knn,linear,finetune --data /tmp/cifar10 --out runs --results results/cifar10 \
        --no-progress 2>&1 | tee "$OUT/cifar10-s$SEED.log" | grep -v "^W" || true
    tar czf "$OUT/cifar10-results-s$SEED.tar.gz" results/cifar10
    ;;
*)
    echo "usage: $0 bench|rest|cifar10" >&2
    exit 2
    ;;
esac
ls -la "$OUT"
