"""Silent corruption is caught: checksummed checkpoints and exports, a previous checkpoint to fall back on, a disk
that fills mid-run, and records that name the export they measured (``repro.checkpoint``, ``repro.trainer``,
``repro.records``, ``repro.report.integrity``). All in-process; the subprocess versions (SIGTERM, a real full
tmpfs) are ``tests/reliability/test_corruption.py``."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

import repro.checkpoint as ck
import repro.export as ex
from repro.checkpoint import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    CheckpointError,
    ChecksumError,
    OutputError,
    checksum_path,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    verify_file,
)
from repro.export import (
    EXPORT_META,
    EXPORT_WEIGHTS,
    ExportMeta,
    export_backbone,
    export_extra,
    load_export,
    read_export,
    read_extra,
    record_from_export,
)
from repro.records import ResultRecord, append_records
from repro.report.integrity import export_checksum_conflicts


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def flip(path: Path, n: int = 64) -> None:
    """Invert ``n`` bytes in the middle of ``path`` in place (what the probe did to checkpoint.pt)."""
    data = bytearray(Path(path).read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    Path(path).write_bytes(bytes(data))


def temps(d: Path) -> list[Path]:
    return sorted(Path(d).glob(".*.tmp"))


def state(step: int) -> dict:
    return {"step": step, "w": torch.full((64, 64), float(step))}


# ------------------------------------------------------------------------------------------------ checkpoints


def test_a_checkpoint_is_written_with_the_sha256_of_its_bytes(tmp_path):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, state(1))
    line = checksum_path(path).read_text()
    assert line == f"{sha(path)}  {CHECKPOINT}\n"  # sha256sum -c format
    assert load_checkpoint(path)["step"] == 1 and not temps(tmp_path)


def test_a_flipped_checkpoint_is_refused_in_one_line_and_nothing_is_loaded(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, state(1))
    flip(path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a corrupted checkpoint reached torch.load"))
    with pytest.raises(ChecksumError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: unreadable checkpoint: its bytes changed after it was written")
    with pytest.raises(CheckpointError) as e2:  # and the resume: no previous one to fall back on
        resume_checkpoint(path)
    msg = str(e2.value)
    assert "\n" not in msg and str(path) in msg and "no previous checkpoint" in msg
    assert "delete the run directory" in msg


def test_the_replaced_checkpoint_becomes_the_previous_one(tmp_path):
    path, prev = tmp_path / CHECKPOINT, tmp_path / PREVIOUS_CHECKPOINT
    save_checkpoint(path, state(1))
    assert not prev.exists()
    save_checkpoint(path, state(2))
    save_checkpoint(path, state(3))
    assert load_checkpoint(path)["step"] == 3 and load_checkpoint(prev)["step"] == 2
    assert os.stat(path).st_ino != os.stat(prev).st_ino  # two files: flipping one leaves the other whole
    assert verify_file(prev) == (sha(prev), True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [CHECKPOINT, PREVIOUS_CHECKPOINT, f"{CHECKPOINT}.sha256", f"{PREVIOUS_CHECKPOINT}.sha256"])


def test_resume_falls_back_to_the_previous_checkpoint_and_says_why(tmp_path):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, state(1))
    save_checkpoint(path, state(2))
    flip(path)
    got, used, skipped = resume_checkpoint(path)
    assert got["step"] == 1 and used.name == PREVIOUS_CHECKPOINT
    assert len(skipped) == 1 and skipped[0].startswith(f"{path}: unreadable checkpoint") and "\n" not in skipped[0]
    flip(tmp_path / PREVIOUS_CHECKPOINT)
    with pytest.raises(CheckpointError, match="the previous checkpoint fails too"):
        resume_checkpoint(path)


def test_a_corrupted_newest_checkpoint_is_not_kept_as_the_previous_one(tmp_path):
    path, prev = tmp_path / CHECKPOINT, tmp_path / PREVIOUS_CHECKPOINT
    save_checkpoint(path, state(1))
    save_checkpoint(path, state(2))
    flip(path)
    save_checkpoint(path, state(3))  # the corrupted step 2 is dropped, the good step 1 stays the previous one
    assert load_checkpoint(path)["step"] == 3 and load_checkpoint(prev)["step"] == 1


def test_a_kill_between_sidecar_and_rename_leaves_a_checkpoint_that_verifies(tmp_path, monkeypatch):
    """The sidecar is written before the rename and lists the file in place and its successor: whatever instant
    a kill lands on, checkpoint.pt matches its sidecar."""
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, state(1))
    real = os.replace

    def killed(src, dst, *a, **k):
        if Path(dst).name == CHECKPOINT:
            raise KeyboardInterrupt
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, state(2))
    monkeypatch.undo()
    assert len(checksum_path(path).read_text().splitlines()) == 2  # the swap was under way
    assert load_checkpoint(path)["step"] == 1 and not temps(tmp_path)
    save_checkpoint(path, state(3))  # the next write settles it again: one digest
    assert checksum_path(path).read_text() == f"{sha(path)}  {CHECKPOINT}\n"


def test_a_checkpoint_from_before_checksums_loads_with_one_warning(tmp_path, caplog):
    path = tmp_path / CHECKPOINT
    torch.save(state(4), path)  # no sidecar, as every checkpoint written before this change
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(path)["step"] == 4
    lines = [r.getMessage() for r in caplog.records if "no checkpoint.pt.sha256" in r.getMessage()]
    assert len(lines) == 1 and "loaded unverified" in lines[0]
    save_checkpoint(path, state(5))  # kept as the previous one, now with its checksum
    assert verify_file(tmp_path / PREVIOUS_CHECKPOINT)[1]


# ------------------------------------------------------------------------------------------------ a full disk


def _enospc_after(n: int):
    """A ``torch.save`` that writes ``n`` bytes of the file, then finds the disk full."""

    def save(obj, p):
        with open(p, "wb") as f:
            f.write(b"\0" * n)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


def test_a_disk_that_fills_mid_write_fails_cleanly(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, state(1))
    save_checkpoint(path, state(2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(torch, "save", _enospc_after(1000))
    with pytest.raises(OutputError) as e:
        save_checkpoint(path, state(3))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path}: no space left on the device while writing {CHECKPOINT}")
    assert "it needs about 0.1 MB" in msg and "rerun the same command" in msg
    assert not temps(tmp_path)
    monkeypatch.undo()
    # both good checkpoints intact and verified (the previous one is now step 2: the newest, hard-linked)
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(tmp_path / PREVIOUS_CHECKPOINT)["step"] == 2
    assert (tmp_path / CHECKPOINT).read_bytes() == before[CHECKPOINT]
    save_checkpoint(path, state(3))  # room again: the same call succeeds
    assert load_checkpoint(path)["step"] == 3


def test_torch_saves_bare_runtime_error_on_a_full_disk_is_named_as_such(tmp_path, monkeypatch):
    """``torch.save`` to a path reports ENOSPC as 'RuntimeError: ... unexpected pos': the free space decides."""
    path = tmp_path / CHECKPOINT

    def save(obj, p):
        Path(p).write_bytes(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(ck, "free_bytes", lambda d: 1000)  # the file (0.1 MB) does not fit in 1 kB
    with pytest.raises(OutputError, match="no space left on the device"):
        save_checkpoint(path, state(1))
    monkeypatch.setattr(ck, "free_bytes", lambda d: 10**12)  # room enough: a plain error stays itself
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint(path, state(1))
    assert not temps(tmp_path) and not path.exists()


def _trainer(d: Path, dies_at: int | None = None):
    """A 6-step MiCL trainer that checkpoints at every logging step (2, 4, 6); ``dies_at``: killed at that step."""
    from repro.data import load_data
    from repro.trainer import Trainer
    from tests.conftest import tiny_method
    from tests.unit.test_trainer import CPU

    cfg, m = tiny_method("micl", **{"budget.spec": "6steps", "train.log_every": 2, "train.ckpt_every_s": 0.0})
    t = Trainer(cfg, m, load_data(cfg.data), CPU, d, progress=False)
    if dies_at is not None:
        real = t.source.batch

        def dying(step):
            if step == dies_at:
                raise KeyboardInterrupt("simulated kill")
            return real(step)

        t.source.batch = dying
    return t, m


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    t, m = _trainer(tmp_path_factory.mktemp("uninterrupted"))
    t.fit()
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_a_corrupted_newest_checkpoint_resumes_from_the_previous_one_bit_identically(tmp_path, caplog,
                                                                                     uninterrupted):
    crashed, _ = _trainer(tmp_path, dies_at=5)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 4
    flip(tmp_path / CHECKPOINT)
    resumed, m_res = _trainer(tmp_path)
    with caplog.at_level(logging.WARNING):
        result = resumed.fit()
    warned = [r.getMessage() for r in caplog.records if "resuming from the previous checkpoint" in r.getMessage()]
    assert len(warned) == 1 and f"{CHECKPOINT}: unreadable checkpoint" in warned[0]
    assert f"{PREVIOUS_CHECKPOINT} (step 2)" in warned[0]
    assert result.resumed and result.steps == 6
    for k, v in uninterrupted.items():
        assert torch.equal(v, m_res.state_dict()[k]), k


def test_a_disk_that_fills_mid_run_stops_it_cleanly_and_the_run_resumes_bit_identically(tmp_path, monkeypatch,
                                                                                         uninterrupted):
    real, saves = torch.save, []

    def fills_on_the_second(obj, p):
        saves.append(p)
        if len(saves) == 2:  # pre-flight passed long ago; another process has taken the space since
            return _enospc_after(4096)(obj, p)
        return real(obj, p)

    monkeypatch.setattr(torch, "save", fills_on_the_second)
    t, _ = _trainer(tmp_path)
    with pytest.raises(OutputError) as e:  # repro.run prints it as its one 'repro: error:' line, exit 2
        t.fit()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path}: no space left on the device while writing {CHECKPOINT}")
    assert not temps(tmp_path)
    # the last good checkpoint intact and verified (also as the previous one: the older one made room for the write)
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 2
    assert load_checkpoint(tmp_path / PREVIOUS_CHECKPOINT)["step"] == 2
    monkeypatch.setattr(torch, "save", real)  # room again: the same run resumes
    resumed, m_res = _trainer(tmp_path)
    assert resumed.fit().resumed
    for k, v in uninterrupted.items():
        assert torch.equal(v, m_res.state_dict()[k]), k


# ------------------------------------------------------------------------------------------------ exports


def _meta(**kw) -> ExportMeta:
    base = dict(timm_model="vit_tiny_patch16_224", timm_kwargs={"img_size": 32, "patch_size": 4, "depth": 1,
                                                                 "num_classes": 0},
                img_size=32, patch_size=4, mean=(0.5,) * 3, std=(0.25,) * 3, method="micl", steps=5, budget="5steps",
                budget_seconds=None, config_hash="abc", git_revision="")
    return ExportMeta(**{**base, **kw})


def _export(tmp_path: Path) -> tuple[Path, ExportMeta]:
    import timm

    torch.manual_seed(0)
    meta = _meta()
    model = timm.create_model(meta.timm_model, pretrained=False, **meta.timm_kwargs)
    out = tmp_path / "export"
    written = export_backbone(out, model.state_dict(), meta)
    assert written is not None
    return out, written


def test_an_export_carries_checksums_and_loading_returns_the_weights_digest(tmp_path):
    out, written = _export(tmp_path)
    for name in (EXPORT_WEIGHTS, EXPORT_META):
        assert checksum_path(out / name).read_text() == f"{sha(out / name)}  {name}\n"
    assert written.weights_sha256 == sha(out / EXPORT_WEIGHTS)
    assert "weights_sha256" not in (out / EXPORT_META).read_text()  # the sidecar is the record, not the json
    _, meta = load_export(out)
    assert meta.weights_sha256 == sha(out / EXPORT_WEIGHTS)
    assert read_export(out, weights=False)[0].weights_sha256 == meta.weights_sha256


@pytest.mark.parametrize("name,what", [(EXPORT_WEIGHTS, "safetensors"), (EXPORT_META, "export metadata")])
def test_a_changed_export_file_is_refused_in_one_line(tmp_path, name, what, monkeypatch):
    out, _ = _export(tmp_path)
    if name == EXPORT_META:  # a changed number that still parses
        p = out / EXPORT_META
        p.write_text(p.read_text().replace('"steps": 5', '"steps": 6'))
    else:
        flip(out / name, 16)
    monkeypatch.setattr(ex, "load_file", lambda *a, **k: pytest.fail("corrupted weights reached load_file"))
    for read in (lambda: load_export(out), lambda: read_export(out, weights=False)):
        with pytest.raises(ChecksumError) as e:
            read()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{out / name}: unreadable {what}: its bytes changed")
        assert msg.endswith("rerun the command that wrote the export (or restore a copy of it)")


def test_an_export_from_before_checksums_still_loads_with_one_warning(tmp_path, caplog):
    out, _ = _export(tmp_path)
    for name in (EXPORT_WEIGHTS, EXPORT_META):
        checksum_path(out / name).unlink()
    ck._WARNED.clear()
    with caplog.at_level(logging.WARNING):
        _, meta = load_export(out)
        load_export(out)  # warned once per file, not per load
    warned = [r.getMessage() for r in caplog.records if "written before checksums existed" in r.getMessage()]
    assert len(warned) == 2 and all("\n" not in w for w in warned)
    assert meta.weights_sha256 == sha(out / EXPORT_WEIGHTS)  # its records still name the weights they measured


def test_method_parts_beside_the_export_are_checksummed_too(tmp_path):
    p = export_extra(tmp_path, "projector", {"w": torch.ones(4)})
    assert torch.equal(read_extra(tmp_path, "projector")["w"], torch.ones(4))
    flip(p, 4)
    with pytest.raises(ChecksumError, match="projector.safetensors: unreadable safetensors"):
        read_extra(tmp_path, "projector")


def test_a_disk_that_fills_during_the_export_keeps_the_previous_export(tmp_path, monkeypatch):
    out, _ = _export(tmp_path)
    before = (out / EXPORT_WEIGHTS).read_bytes()

    def full(tensors, p, metadata=None):
        Path(p).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ex, "save_file", full)
    with pytest.raises(OutputError, match=f"{out}: no space left on the device while writing {EXPORT_WEIGHTS}"):
        export_backbone(out, {"w": torch.ones(4)}, None)
    assert (out / EXPORT_WEIGHTS).read_bytes() == before and not temps(out)
    read_export(out)  # still verified


def test_convert_writes_a_checksummed_export_and_verifies_it(tmp_path, caplog):
    from tests.unit.test_convert import PARITY, released

    if not PARITY.is_dir():
        pytest.skip(f"parity fixtures absent ({PARITY})")
    from repro.convert import main

    path, _ = released("mocov3-lincls", tmp_path)
    out = tmp_path / "export"
    caplog.set_level(logging.INFO)
    assert main(["mocov3", str(path), "--out", str(out), "--heads", "3"]) == 0
    assert f"weights sha256 {sha(out / EXPORT_WEIGHTS)}, checked" in caplog.text
    for name in (EXPORT_WEIGHTS, EXPORT_META, "head.safetensors"):
        assert verify_file(out / name) == (sha(out / name), True)


# ------------------------------------------------------------------------------------------------ records


def test_a_record_names_the_export_it_measured(tmp_path):
    out, _ = _export(tmp_path)
    _, meta = load_export(out)
    r = record_from_export(meta, "toy", "knn", "top1", 50.0, "fixed k")
    assert r.export_sha256 == sha(out / EXPORT_WEIGHTS)
    assert ResultRecord.from_dict({**r.__dict__}).export_sha256 == r.export_sha256  # round-trips through JSON
    assert record_from_export(_meta(), "toy", "pretrain", "final_loss", 1.0, "last").export_sha256 == ""


def _rec(sha256: str, eval_: str = "knn", **kw) -> dict:
    base = dict(method="micl", model="vit_tiny p4 @32 d2", dataset="toy", budget="400steps", eval=eval_,
                metric="top1", value=1.0, seed=0, config_hash="c0ffee", export_sha256=sha256)
    return ResultRecord(**{**base, **kw}).__dict__


def test_records_of_one_run_naming_two_exports_are_flagged():
    a, b = "a" * 64, "b" * 64
    df = pd.DataFrame([_rec(a), _rec(a, "linear"), _rec(b, "finetune"),
                       _rec(b, seed=1), _rec(b, "linear", seed=1)])  # seed 1: one export, no conflict
    lines = export_checksum_conflicts(df)
    assert len(lines) == 1 and "\n" not in lines[0]
    line = lines[0]
    assert "micl" in line and "seed 0" in line and "c0ffee" in line and "2 different exports" in line
    assert f"{a[:12]} in 2 records (knn/top1, linear/top1)" in line and f"{b[:12]} in 1 record (finetune/top1)" in line


def test_a_run_retrained_and_reevaluated_in_full_supersedes_its_old_export():
    # the demo's wall-clock run again over committed records: every evaluation re-measured on the new export
    a, b = "a" * 64, "b" * 64
    old = [_rec(a, time="2026-12-01T10:00:00+0000"), _rec(a, "linear", time="2026-12-01T10:01:00+0000")]
    new = [_rec(b, time="2026-12-04T10:00:00+0000"), _rec(b, "linear", time="2026-12-04T10:01:00+0000")]
    assert export_checksum_conflicts(pd.DataFrame(new + old)) == []
    # only kNN re-measured: the table's linear cell is still the old export's, so the run is flagged
    lines = export_checksum_conflicts(pd.DataFrame([*old, new[0]]))
    assert len(lines) == 1
    assert f"{a[:12]} in 1 record (linear/top1)" in lines[0] and f"{b[:12]} in 1 record (knn/top1)" in lines[0]
    # a failed re-measurement does not supersede the number the table shows
    failed = _rec(b, "linear", time="2026-12-04T10:02:00+0000", status="failed")
    assert len(export_checksum_conflicts(pd.DataFrame([*old, new[0], failed]))) == 1


def test_records_without_a_checksum_or_a_run_identity_are_no_conflict():
    a, b = "a" * 64, "b" * 64
    assert export_checksum_conflicts(pd.DataFrame([_rec(a), _rec("", "linear"), _rec("", "pretrain")])) == []
    # two official releases of one method and model converted to exports: no config hash, not one run
    assert export_checksum_conflicts(pd.DataFrame([_rec(a, config_hash=""), _rec(b, config_hash="")])) == []
    assert export_checksum_conflicts(pd.DataFrame([_rec(a), _rec(b, config_hash="other")])) == []
    assert export_checksum_conflicts(pd.DataFrame()) == []


def test_a_pretrain_row_is_recorded_once_per_export(tmp_path):
    from types import SimpleNamespace

    from repro.pretrain import has_pretrain_record
    from repro.recipes import build_config

    cfg = build_config("micl", "tiny")

    def export(sha: str, steps: int = 400, loss: float = 1.0):
        return SimpleNamespace(weights_sha256=sha, steps=steps, pretraining=SimpleNamespace(final_loss=loss))

    path = tmp_path / "records.jsonl"
    append_records(path, [ResultRecord(**{**_rec("a" * 64, "pretrain", steps=400), "config_hash": cfg.config_hash()})])
    assert has_pretrain_record(path, cfg, export("a" * 64))  # the same export re-run: no second row
    assert not has_pretrain_record(path, cfg, export("b" * 64))  # re-trained into a fresh directory: its own row
    # a row written before rows carried the checksum is this export's when its steps and final loss are
    old = tmp_path / "old.jsonl"
    append_records(old, [ResultRecord(**{**_rec("", "pretrain", steps=400), "config_hash": cfg.config_hash()})])
    assert has_pretrain_record(old, cfg, export("a" * 64))
    assert not has_pretrain_record(old, cfg, export("a" * 64, loss=0.5))
    assert not has_pretrain_record(old, cfg, export("a" * 64, steps=401))


def test_a_finished_run_found_again_names_its_export_by_checksum(tmp_path):
    """The skip path (a finished run re-run) returns the export's checksum as the training path does: without it a
    re-run appended a second pretrain row (CI, test_kill_after_final_checkpoint_loses_no_record)."""
    from repro.checkpoint import read_checksum
    from repro.export import EXPORT_WEIGHTS, export_meta_with_checksum, read_export
    from repro.pretrain import random_teacher_export
    from repro.recipes import build_config

    random_teacher_export(build_config("micl", "tiny", {"model.depth": "1"}), tmp_path)
    again = export_meta_with_checksum(tmp_path)
    assert len(again.weights_sha256) == 64
    assert again.weights_sha256 == (read_checksum(tmp_path / EXPORT_WEIGHTS) or [""])[-1]
    assert read_export(tmp_path)[0].weights_sha256 == again.weights_sha256  # the digest evaluations record
