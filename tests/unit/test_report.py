from __future__ import annotations

import os
from pathlib import Path

from repro.records import ResultRecord, append_records
from repro.report import generate

GOLDEN = Path(__file__).with_name("golden_report.md")


def records() -> list[ResultRecord]:
    out = []
    for seed, (k1, k2, lin) in enumerate([(40.0, 30.0, 50.0), (42.0, 31.0, 54.0)]):
        for method, knn in (("micl", k1), ("mae", k2)):
            common = dict(method=method, model="vit_tiny p4 @32", dataset="toy", budget="90s", seed=seed,
                          device="cpu", time=f"2026-01-0{seed + 1}T00:00:00")
            out.append(ResultRecord(eval="pretrain", metric="final_loss", value=0.5, steps=400, epochs=10.0,
                                    pretrain_seconds=90.0, images_per_second=500.0, device_hours=0.025, **common))
            out.append(ResultRecord(eval="knn", metric="top1", value=knn, **common))
            out.append(ResultRecord(eval="linear", metric="top1", value=lin, **common))
    out.append(ResultRecord(method="random-init", model="vit_tiny p4 @32", dataset="toy", budget="-", seed=0,
                            eval="knn", metric="top1", value=20.0, time="2026-01-01T00:00:00"))
    # a re-measurement of the same key: the latest counts
    out.append(ResultRecord(method="mae", model="vit_tiny p4 @32", dataset="toy", budget="90s", seed=1, eval="knn",
                            metric="top1", value=33.0, time="2026-01-05T00:00:00"))
    # a failed run never appears as a result
    out.append(ResultRecord(method="mae", model="vit_tiny p4 @32", dataset="toy", budget="1m", seed=0,
                            eval="pretrain", metric="final_loss", value=float("nan"), status="failed",
                            time="2026-01-05T00:00:00"))
    return out


def test_report_golden_and_idempotent(tmp_path):
    append_records(tmp_path / "records" / "toy.jsonl", records())
    written = generate(tmp_path)
    md = (tmp_path / "toy.md").read_text()
    assert "| micl | vit_tiny p4 @32 | 90s | 2 |" in md
    assert "41.00 ± 1.41" in md  # micl knn over two seeds
    assert "31.50 ± 2.12" in md  # mae knn: seed 1 re-measured as 33.0
    assert "| random-init |" in md and "| 1m |" not in md
    if os.environ.get("REPRO_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(md)
    assert md == GOLDEN.read_text()
    snapshot = {p: p.read_bytes() for p in written}
    generate(tmp_path)
    assert {p: p.read_bytes() for p in written} == snapshot  # running twice changes nothing


def test_report_survives_a_torn_line(tmp_path):
    path = tmp_path / "records" / "toy.jsonl"
    append_records(path, records()[:3])
    with open(path, "a") as f:
        f.write('{"method": "mi')
    generate(tmp_path)
    assert "truncated trailing line" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "toy.md").exists()
