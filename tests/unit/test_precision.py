"""``train.precision``: what ``auto`` resolves to, a bf16 step on the CPU, and where the resolved precision is kept
(config hash, export metadata, result records)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import repro.precision
from repro.budget import parse_budget
from repro.config import ConfigError, apply_overrides
from repro.data import load_data
from repro.distributed import DistInfo
from repro.export import EXPORT_META, ExportMeta
from repro.method import Batch, StepInfo
from repro.plan import make_plan, resolve_hparams
from repro.precision import cpu_has_native_bf16, resolve_precision
from repro.pretrain import pretrain, pretrain_record
from repro.recipes import build_config
from repro.records import ResultRecord
from repro.trainer import build_optimizer, train_step
from repro.views import TensorAugment
from tests.conftest import tiny_config, tiny_method

CPU = torch.device("cpu")


@pytest.fixture
def cpu_auto_bf16(monkeypatch: pytest.MonkeyPatch):
    """``auto`` allowed to pick bf16 on a native-bf16 CPU (the switch the lead flips after the 3-seed evidence)."""
    monkeypatch.setattr(repro.precision, "CPU_AUTO_BF16", True)
    return monkeypatch


def test_auto_falls_back_to_fp32_without_native_bf16(cpu_auto_bf16: pytest.MonkeyPatch):
    cpu_auto_bf16.setenv("REPRO_CPU_BF16", "0")
    assert not cpu_has_native_bf16()
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # an explicit bf16 is honoured (emulated: slow, not wrong)
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"  # CUDA keeps what the trainer always did


def test_auto_picks_bf16_on_native_bf16_cpus_once_switched_on(cpu_auto_bf16: pytest.MonkeyPatch):
    cpu_auto_bf16.setenv("REPRO_CPU_BF16", "1")
    assert cpu_has_native_bf16()
    assert resolve_precision("auto", CPU) == "bf16"
    assert resolve_precision("fp32", CPU) == "fp32"
    cpu_auto_bf16.setattr(repro.precision, "CPU_AUTO_BF16", False)
    assert resolve_precision("auto", CPU) == "fp32"  # the default for now: CPU runs stay fp32


def test_precision_is_checked():
    with pytest.raises(ConfigError, match="auto|fp32|bf16"):
        build_config("micl", "tiny", {"train.precision": "fp16"})
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("half", CPU)
    with pytest.warns(DeprecationWarning, match="train.precision"):
        off = build_config("micl", "tiny", {"train.amp": "false"})
    assert off.train.precision == "fp32"
    with pytest.warns(DeprecationWarning):
        assert build_config("micl", "tiny", {"train.amp": "true"}).train.precision == "auto"


def test_config_hash_keeps_old_hashes_and_separates_bf16_on_cpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REPRO_CPU_BF16", "1")
    cpu = {"train.device": "cpu"}
    default = build_config("micl", "tiny", cpu)
    # computed by the code before train.precision existed (then the hash held train.amp): run directories stay
    assert default.config_hash() == "80a46599f0"
    assert build_config("micl", "tiny", {**cpu, "train.precision": "fp32"}).config_hash() == "80a46599f0"
    cuda_fp32 = build_config("micl", "tiny", {"train.device": "cuda", "train.precision": "fp32"})
    assert cuda_fp32.config_hash() == "caac4dd241"  # train.amp=false then
    assert build_config("micl", "tiny", {"train.device": "cuda"}).config_hash() == "80a46599f0"  # bf16 on CUDA
    bf16 = build_config("micl", "tiny", {**cpu, "train.precision": "bf16"})
    assert bf16.config_hash() != default.config_hash()
    assert bf16.hash_inputs()["train"]["precision"] == "bf16" and "precision" not in default.hash_inputs()["train"]
    # what the hash holds is the resolved precision: auto that resolves to bf16 is the bf16 run
    monkeypatch.setattr(repro.precision, "CPU_AUTO_BF16", True)
    assert default.config_hash() == bf16.config_hash()
    monkeypatch.setenv("REPRO_CPU_BF16", "0")
    assert default.config_hash() == "80a46599f0"


def _one_step(method_name: str, precision: str) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The loss of one trainer step of ``method_name`` (same init, batch and draws every call), the weights before
    and after it."""
    cfg, m = tiny_method(method_name)  # seeded: the same initial weights every call
    before = copy.deepcopy(m.state_dict())
    plan = make_plan(resolve_hparams(cfg), parse_budget("10steps"), steps_per_epoch=1, total_steps=10, warmup_steps=0)
    opt = build_optimizer(m, cfg, plan, CPU)
    images = (torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    torch.manual_seed(0)
    batch = Batch(TensorAugment(m.views, 32, (0.5,) * 3, (0.25,) * 3)(images))
    torch.manual_seed(1)
    out = train_step(m, m, batch, StepInfo(0, 10), opt, 1e-3, precision=precision)
    return float(out.loss.detach()), before, {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", ["micl", "mae", "mocov3"])
def test_bf16_step_on_cpu_is_finite_and_close_to_fp32(name: str):
    loss32, init, w32 = _one_step(name, "fp32")
    loss16, init16, w16 = _one_step(name, "bf16")
    assert all(torch.equal(init[k], init16[k]) for k in init)
    assert torch.isfinite(torch.tensor(loss16))
    assert loss16 != loss32  # autocast ran: bf16 rounding moves the loss...
    assert abs(loss16 - loss32) <= 0.01 * abs(loss32)  # ...by ~5e-4 here: bf16 keeps ~3 significant digits
    # the weights stay fp32 (autocast casts per op) and take a step
    moved = [k for k in w16 if w16[k].is_floating_point() and not torch.equal(w16[k], init[k])]
    assert moved and all(w16[k].dtype == torch.float32 for k in moved)


def test_resolved_precision_lands_in_the_export_and_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REPRO_CPU_BF16", "1")
    cfg = apply_overrides(tiny_config("micl"), {"budget.spec": "2steps", "train.device": "cpu",
                                                "train.precision": "bf16"})
    data = load_data(cfg.data)
    dist = DistInfo(0, 1, 0, CPU, None)
    meta = pretrain(cfg, data, dist, tmp_path / "run", False, tmp_path / "records.jsonl")
    assert meta.precision == "bf16" and meta.config_hash == cfg.config_hash()
    on_disk = ExportMeta.from_json(tmp_path / "run" / EXPORT_META)
    assert on_disk.precision == "bf16"
    rec = pretrain_record(on_disk, data)
    assert rec.precision == "bf16"
    assert json.loads(rec.to_json())["precision"] == "bf16"
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["precision"] == "bf16"
    # records and exports from before the field read back as '' (fp32 on CPU, bf16 on CUDA)
    old = {k: v for k, v in json.loads(rec.to_json()).items() if k != "precision"}
    assert ResultRecord.from_dict(old).precision == ""
    d = json.loads((tmp_path / "run" / EXPORT_META).read_text())
    d.pop("precision")
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert ExportMeta.from_json(tmp_path / "old.json").precision == ""
