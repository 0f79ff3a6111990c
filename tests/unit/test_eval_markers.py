"""An evaluation's done-marker is keyed by its own settings, and recording its numbers survives a kill anywhere."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

import repro.evaluate as run
from evals.registry import eval_settings
from repro.config import EvalValues
from repro.records import ResultRecord, append_records, read_records
from repro.report import generate


class Counted:
    """A stand-in evaluation that counts its calls and reports one number."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, ctx, export_dir, s):
        self.calls += 1
        return [ResultRecord(method="mae", model="vit_tiny", dataset=ctx.data.name, budget="2steps", eval="knn",
                             metric="top1", value=10.0 * s.knn_k, seed=ctx.seed, recipe="tiny",
                             steps=2, time="")]


def ctx(**eval_cfg):
    data = SimpleNamespace(name="toy", test_split_name="val", train=[0] * 50, test=[0] * 10)
    return SimpleNamespace(settings=eval_settings(EvalValues(tuple(eval_cfg.items()))), data=data, seed=0)


@pytest.fixture
def fake(monkeypatch):
    ev = Counted()
    monkeypatch.setitem(run.EVALS, "knn", replace(run.EVALS["knn"], run=ev))
    return ev


def test_changed_settings_evaluate_again_and_unchanged_ones_do_not(tmp_path, fake):
    export, records = tmp_path / "export", tmp_path / "records" / "toy.jsonl"
    export.mkdir()
    run.evaluate(export, ["knn"], ctx(knn_k=20), records)
    run.evaluate(export, ["knn"], ctx(knn_k=20), records)
    run.evaluate(export, ["knn"], ctx(knn_k=20, feature_batch_size=64), records)  # not a kNN setting
    assert fake.calls == 1
    run.evaluate(export, ["knn"], ctx(knn_k=10), records)  # a kNN setting: a new measurement
    assert fake.calls == 2
    recs, _ = read_records(records)
    assert [r.value for r in recs] == [200.0, 100.0] and len({r.eval_key for r in recs}) == 2
    assert all(r.eval_key for r in recs)
    assert run.eval_key("knn", ctx(knn_k=20)) != run.eval_key("linear", ctx(knn_k=20))
    other_data = ctx(knn_k=20)
    other_data.data.train = [0] * 49
    assert run.eval_key("knn", other_data) != run.eval_key("knn", ctx(knn_k=20))


@pytest.mark.parametrize("kill", ["before the append", "after the append"])
def test_a_kill_between_recording_and_marking_neither_loses_nor_duplicates(tmp_path, fake, monkeypatch, kill):
    export, records = tmp_path / "export", tmp_path / "records" / "toy.jsonl"
    export.mkdir()
    real_append, real_write = run.append_records, run.atomic_write_text
    writes = []

    def dying_append(path, recs):
        raise KeyboardInterrupt("killed")

    def dying_write(path, text):
        writes.append(path)
        if len(writes) == 2:  # the write that would say "appended"
            raise KeyboardInterrupt("killed")
        real_write(path, text)

    if kill == "before the append":
        monkeypatch.setattr(run, "append_records", dying_append)
    else:
        monkeypatch.setattr(run, "atomic_write_text", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run.evaluate(export, ["knn"], ctx(), records)
    monkeypatch.setattr(run, "append_records", real_append)
    monkeypatch.setattr(run, "atomic_write_text", real_write)
    recs, _ = read_records(records)
    assert len(recs) == (0 if kill == "before the append" else 1)
    run.evaluate(export, ["knn"], ctx(), records)  # the re-run
    run.evaluate(export, ["knn"], ctx(), records)
    recs, _ = read_records(records)
    assert fake.calls == 1  # the numbers were kept in the marker: not measured twice
    assert len(recs) == 1 and recs[0].value == 200.0


def test_a_cell_whose_seeds_used_different_settings_says_so(tmp_path):
    results = tmp_path / "results"
    base = ResultRecord(method="mae", model="vit_tiny", dataset="toy", budget="2steps", eval="knn", metric="top1",
                        value=30.0, seed=0, eval_key="aaaa", time="2026-01-01T00:00:00")
    lin = replace(base, eval="linear", eval_key="cccc")
    append_records(results / "records" / "toy.jsonl",
                   [base, replace(base, seed=1, value=32.0, eval_key="bbbb"), lin, replace(lin, seed=1)])
    generate(results)
    md = (results / "toy.md").read_text()
    assert "knn: seeds evaluated with different settings" in md
    assert "linear: seeds evaluated" not in md
