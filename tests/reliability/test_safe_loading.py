"""Nothing we load can run code: every ``torch.load`` passes ``weights_only=True``; a checkpoint (or CIFAR pickle)
carrying a pickled code payload is refused with a one-line error and the payload never runs."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

from repro.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint
from tests.conftest import ROOT
from tests.reliability.conftest import call_main, error_line, sets

SCANNED = ("repro", "evals", "baselines")


def _unsafe_loads(tree: ast.AST) -> list[int]:
    """Lines of calls to ``torch.load`` (also ``torch.serialization.load`` or a ``load`` imported from torch) that
    do not pass ``weights_only=True`` literally, and of any direct ``pickle.load``/``pickle.loads``."""
    from_torch = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                  and n.module in ("torch", "torch.serialization") for a in n.names if a.name == "load"}
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = ast.unparse(f)
        if name in ("pickle.load", "pickle.loads"):
            bad.append(node.lineno)
        elif name in ("torch.load", "torch.serialization.load") or (isinstance(f, ast.Name) and f.id in from_torch):
            ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                     for k in node.keywords)
            if not ok:
                bad.append(node.lineno)
    return bad


# Reviewed exceptions: mmengine's own resume checkpoints (pickled numpy/mmengine objects), loaded with full
# unpickling only when the file lies inside the dense job's work directory (tests/dense checks the scoping).
ALLOWED = {"evals/dense/launch.py": "# safe-load: own work dir"}


def test_every_torch_load_is_weights_only():
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20
    offenders = []
    for p in files:
        rel, text = str(p.relative_to(ROOT)), p.read_text()
        lines = text.splitlines()
        for line in _unsafe_loads(ast.parse(text)):
            if rel in ALLOWED and ALLOWED[rel] in lines[line - 1]:
                continue
            offenders.append(f"{rel}:{line}")
    assert not offenders, f"torch.load without weights_only=True (or a bare pickle load): {offenders}"
    n_loads = sum(p.read_text().count("torch.load(") for p in files)
    assert n_loads >= 1  # the scan sees the real call in repro/checkpoint.py


def test_the_scan_catches_unsafe_calls():
    src = ("import torch, pickle\nfrom torch import load as L\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
           "L(p)\npickle.loads(b)\ntorch.load(p, map_location='cpu', weights_only=True)\n")
    assert _unsafe_loads(ast.parse(src)) == [3, 4, 5, 6]


class Payload:
    """Unpickling this calls ``Path.touch(marker)``: code that must never run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _poisoned(path: Path, marker: Path) -> None:
    torch.save({"model": {"w": torch.ones(2)}, "step": 1, "evil": Payload(marker)}, path)
    with pytest.raises(Exception):  # noqa: B017,PT011 - the file really does carry a payload: plain pickle runs it
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_checkpoint_with_code_payload_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    _poisoned(tmp_path / CHECKPOINT, marker)
    with pytest.raises(CheckpointError, match=rf"{CHECKPOINT}: unreadable checkpoint \(UnpicklingError"):
        load_checkpoint(tmp_path / CHECKPOINT)
    assert not marker.exists()
    torch.load(tmp_path / CHECKPOINT, weights_only=False)  # control: an unsafe load would have run it
    assert marker.exists()


def test_cli_refuses_a_poisoned_checkpoint_in_its_run_dir(tmp_path, capsys):
    from repro.run import build_parser, main, resolve_config, run_dir_for

    argv = ["micl", "--budget", "4steps", "--evals", "none", "--no-progress", "--no-report", "--out",
            str(tmp_path / "runs"), "--results", str(tmp_path / "results"), *sets()]
    args = build_parser().parse_args(argv)
    sets_ = dict(s.split("=", 1) for s in args.sets)
    run = run_dir_for(Path(args.out), "builtin-shapes", resolve_config("micl", args, {**sets_, "seed": "0"}))
    run.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    _poisoned(run / CHECKPOINT, marker)
    rc, err = call_main(main, argv, capsys)
    assert rc == 2
    assert f"repro: error: {run / CHECKPOINT}: unreadable checkpoint (UnpicklingError" in error_line(err)
    assert not marker.exists() and not (tmp_path / "results").exists()


def test_cifar_pickle_with_code_payload_is_refused(tmp_path):
    from repro.config import DataConfig
    from repro.data import DataError, load_data

    marker = tmp_path / "payload-ran"
    root = tmp_path / "cifar"
    root.mkdir()
    (root / "data_batch_1").write_bytes(pickle.dumps({"data": b"", "labels": [0]}))
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": Payload(marker)}))  # read first
    with pytest.raises(DataError, match=r"batches.meta: not a readable CIFAR pickle \(refusing to load"):
        load_data(DataConfig(path=str(root)))
    assert not marker.exists()
