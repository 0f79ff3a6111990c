from __future__ import annotations

import atexit
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from repro.config import RunConfig
from repro.recipes import build_config
from repro.registry import build_method, with_prerequisite

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# small enough for a 2-core CPU: 2 blocks, 64 tokens of width 192
SMALL = {"model.depth": 2, "train.batch_size": 16, "data.builtin_train": 64, "data.builtin_test": 32}


SLOW_DIRS = ("smoke", "reliability", "dense")
"""Test folders whose tests start processes (CLI runs, torchrun, spawn, SIGKILL trials, mm* launches): the slow tier
(``python -m pytest -m slow``). The default tier (``python -m pytest``) is unit, contract, parity, golden and the
step benchmarks, all in this process."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT).parts
        if len(parts) > 1 and parts[0] == "tests" and parts[1] in SLOW_DIRS:
            item.add_marker(pytest.mark.slow)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def tiny_config(method: str, **overrides) -> RunConfig:
    return build_config(method, "tiny", {**SMALL, **overrides})


_TEACHERS: dict[str, Path] = {}


def mimco_teacher() -> Path:
    """A small MoCo v3 export (backbone + projector) for MimCo's stage 2, made once per session."""
    if "t" not in _TEACHERS:
        import tempfile

        from repro.pretrain import random_teacher_export

        out = Path(tempfile.mkdtemp(prefix="mimco-teacher-"))
        atexit.register(shutil.rmtree, out, True)
        torch.manual_seed(123)
        _TEACHERS["t"] = random_teacher_export(tiny_config("mocov3"), out)
    return _TEACHERS["t"]


def float64_mimco_teacher() -> Path:
    """:func:`mimco_teacher` initialised in float64 (the cross-machine golden tests), made once per session."""
    if "t64" not in _TEACHERS:
        import tempfile

        from repro.pretrain import random_teacher_export

        out = Path(tempfile.mkdtemp(prefix="mimco-teacher64-"))
        atexit.register(shutil.rmtree, out, True)
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            torch.manual_seed(123)
            _TEACHERS["t64"] = random_teacher_export(tiny_config("mocov3"), out)
        finally:
            torch.set_default_dtype(before)
    return _TEACHERS["t64"]


def tiny_method(method: str, seed: int = 0, **overrides):
    """``(cfg, method)``: ``method`` built on the tiny recipe at the test size (:data:`SMALL`), weights seeded by
    ``seed``; a prerequisite export the overrides do not give is the session's (:func:`mimco_teacher`)."""
    cfg = with_prerequisite(tiny_config(method, **overrides), session_prerequisite)
    torch.manual_seed(seed)
    return cfg, build_method(cfg)


def session_prerequisite(method: str) -> Path:
    """The session's export of a prerequisite stage (MimCo's teacher: :func:`mimco_teacher`)."""
    assert method == "mocov3", "a new prerequisite needs its own session fixture"
    return mimco_teacher()


@pytest.fixture(scope="session")
def cifar_jpeg_subset(tmp_path_factory) -> Path:
    """A small ImageFolder cut from the real CIFAR-10 JPEG archive (20 train / 5 test per class)."""
    archive = SHARED_DATA / "cifar10-jpeg.tar.gz"
    if not archive.exists():
        pytest.skip(f"{archive} not present (real-data tests need ../shared/data)")
    out = tmp_path_factory.mktemp("cifar10")
    counts: dict[tuple[str, str], int] = {}
    limits = {"train": 20, "test": 5}
    with tarfile.open(archive, "r:gz") as tf:
        for m in tf:
            if not m.isfile() or not m.name.lower().endswith(".jpg"):
                continue
            parts = Path(m.name).parts
            split_i = next((i for i, p in enumerate(parts) if p in limits), None)
            if split_i is None or len(parts) < split_i + 3:
                continue
            split, cls = parts[split_i], parts[split_i + 1]
            if counts.get((split, cls), 0) >= limits[split]:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            dest = out / split / cls / parts[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tf.extractfile(m) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if not counts:
        pytest.skip("cifar10-jpeg.tar.gz holds no train/<class>/*.jpg entries")
    return out


@pytest.fixture
def cpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env
