"""Below-the-floor check: kNN on an export's cls token (the protocol's feature) vs its mean-pooled patch tokens.

    python scripts/pooling_probe.py --data /tmp/cifar10 EXPORT_DIR [EXPORT_DIR ...]

MAE-style objectives never put a loss on the cls token; if an export's kNN is below the random-init floor with
the cls token but above it with pooled patches, the protocol (not the pre-training) is what cannot see the
features. Prints one line per export; uses a fixed class-balanced 5k of train as the bank and the first 5k test
images (DINO's k=20, T=0.07).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.knn import knn_predict  # noqa: E402
from repro.config import DataConfig  # noqa: E402
from repro.data import balanced_subset, load_data  # noqa: E402
from repro.export import load_export  # noqa: E402
from repro.sources import eval_batches  # noqa: E402


@torch.inference_mode()
def features(model, split, meta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cls, avg, ys = [], [], []
    for x, y in eval_batches(split, meta.img_size, meta.mean, meta.std, 256, torch.device("cpu")):
        t = model.forward_features(x)  # (B, 1 + N, D) after the final norm
        cls.append(t[:, 0])
        avg.append(t[:, 1:].mean(1))
        ys.append(y)
    return torch.cat(cls), torch.cat(avg), torch.cat(ys)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("exports", nargs="+")
    a = p.parse_args()
    data = load_data(DataConfig(path=a.data))
    train = balanced_subset(data.train, 5000)
    test = balanced_subset(data.test, 5000)
    for e in a.exports:
        model, meta = load_export(Path(e))
        model.eval()
        tr_c, tr_a, tr_y = features(model, train, meta)
        te_c, te_a, te_y = features(model, test, meta)
        acc = {}
        for name, tr, te in (("cls", tr_c, te_c), ("avgpool", tr_a, te_a)):
            pred = knn_predict(tr, tr_y, te, data.num_classes, 20, 0.07)
            acc[name] = (pred == te_y).float().mean().item() * 100
        print(f"{meta.method:12s} {meta.budget:12s} seed {meta.seed}: kNN cls {acc['cls']:.2f}  "
              f"avgpool {acc['avgpool']:.2f}  ({e})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
