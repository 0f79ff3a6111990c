#!/usr/bin/env bash
# The CPU CIFAR-10 comparison in results/cifar10-cpu (issue 16): six methods under one FLOP budget, and MiCL vs
# MAE at three budgets. Every phase is resumable: rerun the same line and finished runs and evals are skipped.
#
#   scripts/cifar10_cpu.sh pilot     # lr pilot: held-out 10% of train as the test split, kNN only   (~20 min)
#   scripts/cifar10_cpu.sh table     # six methods x seeds {0,1} at $F FLOPs, kNN + linear           (~60 min)
#   scripts/cifar10_cpu.sh curve     # MiCL and MAE at F/9 and F/3, seeds {0,1}                      (~20 min)
#   scripts/cifar10_cpu.sh finetune  # the table's exports + random-init fine-tuned, FT_SEEDS (0)   (~65 min)
#   scripts/cifar10_cpu.sh decoders  # issue 26: MAE's decoder (2x128, 4x128, 4x256) at 5e13 FLOPs, seed 0, chosen on
#                                    # held-out training images by the rule in results/cifar10-cpu/decoders/RULE.md
#   scripts/cifar10_cpu.sh claim     # issue 26: MiCL and MAE at F/9, F/3, F, 10F/3, 10F x seeds 0 1 2 (+ the floor)
#   scripts/cifar10_cpu.sh augment   # issue 26: MiCL without crop + flip (method.augment=none) at F and 10F x 3 seeds
#                                    # (METHODS=, BUDGETS= and EVALS= narrow claim and augment, e.g. EVALS=none)
#   scripts/cifar10_cpu.sh precision # fp32 vs bf16 training at $F: MiCL, MAE x 3 seeds (kNN + linear), the
#                                    # other four methods x 1 seed (loss, img/s) -> results/cifar10-cpu-precision
#
# Data: DATA=/path/to/cifar10 (ImageFolder train/ + test/); by default ../shared/data/cifar10-jpeg.tar.gz is
# unpacked to /tmp/cifar10. Budgets are FLOPs, so the runs are the same on any machine; only the wall time moves.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
F=${F:-1.5e13}
SEEDS=${SEEDS:-0 1}
RES=${RES:-results/cifar10-cpu}
RUNS=${RUNS:-runs/cifar10-cpu}
DATA=${DATA:-/tmp/cifar10}
RUN="$PY -m repro.run --recipe cifar10-cpu --no-progress"

if [ ! -d "$DATA/train" ]; then
    tarball=${TARBALL:-../shared/data/cifar10-jpeg.tar.gz}
    [ -f "$tarball" ] || { echo "cifar10_cpu.sh: no $DATA/train and no $tarball" >&2; exit 2; }
    mkdir -p "$DATA" && tar xzf "$tarball" -C "$DATA"
fi

# holdout_split DIR: DIR/train + DIR/val, symlinks to $DATA/train with the last 10% of each class as val/
holdout_split() {
    [ -d "$1/val" ] && return 0
    $PY - "$DATA" "$1" <<'EOF'
import os, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for cls in sorted(p.name for p in (src / "train").iterdir() if p.is_dir()):
    files = sorted((src / "train" / cls).iterdir())
    cut = len(files) - len(files) // 10
    for split, part in (("train", files[:cut]), ("val", files[cut:])):
        (dst / split / cls).mkdir(parents=True, exist_ok=True)
        for f in part:
            link = dst / split / cls / f.name
            if not link.exists():
                os.symlink(f.resolve(), link)
EOF
}

budget() { $PY -c "import sys; print(f'{float(sys.argv[1]) * float(sys.argv[2]):.3g}flop')" "$F" "$1"; }

case "${1:-}" in
pilot)
    # The pilot never sees the test images: 10% of each class of train/ becomes the pilot's val/ split.
    HOLD=${HOLD:-/tmp/cifar10-holdout}
    holdout_split "$HOLD"
    B=$(budget 0.3333)
    for lr in 1e-3 3e-3; do
        $RUN micl mae mocov3 mimco macrl --budget "$B" --evals knn --set train.base_lr=$lr --data "$HOLD" \
            --out "$RUNS/pilot" --results "$RES/pilot" --no-report
    done
    for lr in 5e-4 1.5e-3; do   # ConMIM's lr is absolute: the same two values x 128 / 256
        $RUN conmim --budget "$B" --evals knn --set train.base_lr=$lr --data "$HOLD" \
            --out "$RUNS/pilot" --results "$RES/pilot" --no-report
    done
    ;;
table)
    # shellcheck disable=SC2086
    $RUN micl mae mocov3 conmim mimco macrl --budget "$(budget 1)" --seeds $SEEDS --evals knn,linear \
        --data "$DATA" --out "$RUNS/main" --results "$RES"
    ;;
finetune)
    # the fine-tune column (and the supervised-from-scratch row: the random-init export fine-tuned), on the table's
    # exports: small32 shortened to FT_EPOCHS epochs of the 50k training images (~9 min per export at 1 epoch)
    # shellcheck disable=SC2086
    $RUN micl mae mocov3 conmim mimco macrl --budget "$(budget 1)" --seeds ${FT_SEEDS:-0} --evals finetune \
        --set eval.finetune_epochs=${FT_EPOCHS:-1} --data "$DATA" --out "$RUNS/main" --results "$RES"
    ;;
precision)
    # issue 30: does bf16 autocast on a native-bf16 CPU change what training reaches? The evaluations read both arms'
    # exports the same way (eval.feature_precision=auto), so the arms differ in training precision only.
    PRES=${PRES:-results/cifar10-cpu-precision}
    for p in fp32 bf16; do
        $RUN micl mae --budget "$(budget 1)" --seeds 0 1 2 --evals knn,linear --set train.precision=$p \
            --data "$DATA" --out "$RUNS/precision" --results "$PRES" --no-report
    done
    for p in fp32 bf16; do
        $RUN mocov3 conmim mimco macrl --budget "$(budget 1)" --seeds 0 --evals none --set train.precision=$p \
            --data "$DATA" --out "$RUNS/precision" --results "$PRES" --no-report
    done
    $PY -m repro.report --results "$PRES" --runs "$RUNS/precision"
    ;;
decoders)
    # the pilot's data: 10% of each class of train/ is its val/ split (the "test" images of the pilot); its test/ is
    # never read. One seed per decoder; the rule was committed before the runs (decoders/RULE.md).
    DHOLD=${DHOLD:-/tmp/cifar10-holdout}
    holdout_split "$DHOLD"
    for dec in "2 128 4" "4 128 4" "4 256 8"; do
        read -r depth dim heads <<<"$dec"
        $RUN mae --budget "$(budget 3.3333)" --seeds 0 --evals "${EVALS:-knn,linear}" --data "$DHOLD" \
            --set mae.decoder_depth="$depth" --set mae.decoder_dim="$dim" --set mae.decoder_heads="$heads" \
            --out "$RUNS/decoders" --results "$RES/decoders" --no-report
    done
    $PY -m repro.report --results "$RES/decoders" --runs "$RUNS/decoders"
    ;;
claim)
    # shellcheck disable=SC2086
    for f in ${BUDGETS:-0.1111 0.3333 1 3.3333 10}; do
        $RUN ${METHODS:-micl mae} --budget "$(budget "$f")" --seeds 0 1 2 --evals "${EVALS:-knn,linear}" \
            --data "$DATA" --out "$RUNS/claim" --results "$RES" --no-report
    done
    ;;
augment)
    # shellcheck disable=SC2086
    for f in ${BUDGETS:-1 10}; do
        $RUN micl --budget "$(budget "$f")" --seeds 0 1 2 --evals "${EVALS:-knn,linear}" --set method.augment=none \
            --data "$DATA" --out "$RUNS/claim" --results "$RES" --no-report
    done
    ;;
curve)
    for f in 0.3333 0.1111; do   # with F itself (the table): a factor of 9 from the smallest to the largest
        # shellcheck disable=SC2086
        $RUN micl mae --budget "$(budget $f)" --seeds $SEEDS --evals knn,linear --data "$DATA" \
            --out "$RUNS/main" --results "$RES"
    done
    ;;
*)
    sed -n 2,10p "$0" >&2
    exit 2
    ;;
esac
