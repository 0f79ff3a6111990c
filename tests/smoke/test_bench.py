"""CPU smoke tests of ``python -m repro.bench`` (the GPU numbers come from the same code on the device)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from repro import bench

FAST = ["--steps", "1", "--warmup", "1", "--compile", "off", "--batch", "8", "--set", "model.depth=2"]


def test_bench_writes_table_and_csv_for_each_method(tmp_path):
    out = tmp_path / "tp"
    assert bench.main(["micl", "mimco", *FAST, "--out", str(out)]) == 0
    df = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(df["method"]) == ["micl", "mimco"]
    assert (df["img_per_s"] > 0).all() and (df["mfu"] > 0).all()
    assert (df["gflop_per_img"] > 0).all() and (df["peak_tflops"] > 0).all()
    # MFU is analytic FLOPs x img/s / peak, and img/s is batch / step time
    row = df.iloc[0]
    assert row["mfu"] == pytest.approx(row["gflop_per_img"] * 1e9 * row["img_per_s"] / (row["peak_tflops"] * 1e12))
    assert row["img_per_s"] == pytest.approx(8 / (row["ms_per_step"] / 1000))
    md = out.with_suffix(".md").read_text()
    assert "| current | tuned | tiny | 32 | micl | 8 |" in md and "| current | tuned | tiny | 32 | mimco | 8 |" in md
    assert bench.device_name(torch.device("cpu")) in md
    assert "No GPU rows yet" in md  # CPU-only tables say so


def test_rerun_replaces_its_rows_and_other_tags_stay(tmp_path):
    out = tmp_path / "tp"
    assert bench.main(["mae", *FAST, "--out", str(out), "--tag", "before"]) == 0
    assert bench.main(["mae", *FAST, "--out", str(out), "--tag", "after"]) == 0
    assert bench.main(["mae", *FAST, "--out", str(out), "--tag", "after"]) == 0
    df = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(df["tag"]) == ["after", "before"]
    md = out.with_suffix(".md").read_text()
    assert "| before | tuned | tiny |" in md and "| after | tuned | tiny |" in md


def test_time_steps_excludes_warmup():
    calls: list[int] = []
    times = bench.time_steps(calls.append, steps=3, warmup=2, device=torch.device("cpu"))
    assert calls == [0, 1, 2, 3, 4] and len(times) == 3 and all(t >= 0 for t in times)


def test_data_path_row_on_real_cifar_jpegs(tmp_path, cifar_jpeg_subset):
    out = tmp_path / "tp"
    assert bench.main(["micl", *FAST, "--out", str(out), "--data", str(cifar_jpeg_subset)]) == 0
    df = pd.read_csv(tmp_path / "tp_data.csv")
    assert list(df["source"]) == ["in-memory on cpu"]
    assert df["loader_img_per_s"].iloc[0] > 0 and 0 < df["ratio"].iloc[0] < 10
    assert "## Data path" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("argv, needle", [
    (["nosuch"], "unknown method 'nosuch'"),
    (["mae", "--batch", "mae=0"], "--batch 'mae=0'"),
    (["mae", "--model", "vit_xxl"], "--model 'vit_xxl'"),
    (["mae", "--set", "model.nosuch=1"], "model.nosuch"),
])
def test_bad_arguments_fail_with_one_line(tmp_path, capsys, argv, needle):
    assert bench.main([*argv, "--out", str(tmp_path / "tp")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "tp.csv").exists()


@pytest.mark.parametrize("method", ["mae", "mocov3"])
def test_naive_attention_computes_the_same_loss_and_gradients(method):
    """SDPA vs explicit softmax(QK^T)V: the optimisation changes speed, not what is computed.

    In float64: in float32 the two summation orders, amplified by MoCo v3's BatchNorm over 4 images, differ by up
    to 9e-4 of a gradient (default kernel set) and a zero-in-exact-arithmetic gradient (``norm.bias`` under the
    projector's BN) is pure noise; in float64 the worst measured difference is 1.2e-12 (ATEN_CPU_CAPABILITY
    default / avx2 / avx512), against a floor of 1e-3 of the largest gradient, so 1e-9 keeps a ~1000x margin.
    """
    from repro.flops import set_fused_attention
    from repro.method import StepInfo

    cfg = bench.model_config(method, "tiny", 4, compile=False, precision="fp32", sets={"model.depth": 2})
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        m = bench.build(cfg, torch.device("cpu"), scratch=None)  # type: ignore[arg-type]
        set_fused_attention(m, fused)
        m.double()
        batch = bench.synthetic_batch(m, 4, torch.device("cpu"))
        batch = batch._replace(views=tuple(v.double() for v in batch.views))
        torch.manual_seed(1)
        loss = m(batch, StepInfo(0, 10)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0.0)
    assert results[0][1].keys() == results[1][1].keys()
    floor = 1e-3 * max(g.abs().max().item() for g in results[0][1].values())
    for name, g in results[0][1].items():
        err = (g - results[1][1][name]).abs().max().item() / max(g.abs().max().item(), floor)
        assert err <= 1e-9, f"{name}: {err:.1e}"


def test_naive_variant_is_wired(monkeypatch):
    cfg = bench.model_config("mae", "tiny", 4, compile=False, precision="fp32", sets={"model.depth": 1})
    m = bench.build(cfg, torch.device("cpu"), scratch=None)  # type: ignore[arg-type]
    made = []
    real = torch.optim.AdamW

    def spy(*a, **k):
        made.append(k)
        return real(*a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    step = bench.make_step(cfg, m, torch.device("cpu"), bench.VARIANTS["naive"])
    assert made[-1]["foreach"] is False and made[-1]["fused"] is False
    assert not any(mod.fused_attn for mod in m.modules() if hasattr(mod, "fused_attn"))
    out = step(bench.synthetic_batch(m, 4, torch.device("cpu")), 0)
    assert torch.isfinite(out.loss)
    assert bench.VARIANTS["naive"].name == "attn=naive adamw=loop sync" and bench.VARIANTS["tuned"].name == "tuned"


def test_data_path_error_is_one_line(tmp_path, capsys):
    assert bench.main(["mae", *FAST, "--out", str(tmp_path / "tp"), "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing" in err and len(err.splitlines()) == 1


def test_micl_default_gpu_batch_is_whole_loss_groups():
    """MiCL's x8 batch must split into its default loss groups (1800): ViT-S's 256 x 8 = 2048 did not, and the
    bench exited on the H200 before measuring a size."""
    from repro.bench.cli import _batch_for
    from repro.micl import MiCLConfig

    group = MiCLConfig().loss_group_size
    assert group is not None
    cuda = torch.device("cuda")
    for model in ("tiny", "vit_s", "vit_b", "vit_l", "cifar10"):
        b = _batch_for("micl", model, cuda, {})
        assert b <= group or b % group == 0, (model, b)
        assert b >= min(group, 8 * 64)  # still MiCL's large batch, not the others'
    assert _batch_for("micl", "vit_s", cuda, {"micl": 2048}) == 2048  # an explicit --batch is the user's


def test_a_failing_measurement_keeps_the_others_and_exits_nonzero(tmp_path, monkeypatch):
    """One method's failure (on the H200: a compile error in ConMIM's mask copy) must not lose the rows measured
    before or after it."""
    from repro.bench import cli

    real = cli.bench_method

    def flaky(name, *a, **k):
        if name == "mae":
            raise RuntimeError("boom\nsecond line")
        return real(name, *a, **k)

    monkeypatch.setattr(cli, "bench_method", flaky)
    out = tmp_path / "tp"
    assert bench.main(["micl", "mae", "mimco", *FAST, "--out", str(out)]) == 1
    df = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(df["method"]) == ["micl", "mimco"]
