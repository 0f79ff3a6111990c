"""The method contract, run over every registered method."""

from __future__ import annotations

import pytest
import timm
import torch

from repro.config import ConfigError
from repro.export import export_backbone, load_export, load_strict, teacher_meta
from repro.method import Batch, StepInfo
from repro.registry import METHODS
from tests.conftest import tiny_method

ALL = sorted(METHODS)


def _batch(method, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = tuple(torch.randn(b, 3, 32, 32, generator=g) for _ in range(method.views.count))
    return Batch(views)


@pytest.mark.parametrize("name", ALL)
def test_finite_loss_and_logs(name):
    _, m = tiny_method(name)
    out = m(_batch(m), StepInfo(0, 10))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.logs and all(v.dim() == 0 and torch.isfinite(v) for v in out.logs.values())
    parts = [v for k, v in out.logs.items() if not k.startswith("aux/")]
    torch.testing.assert_close(sum(parts), out.loss.detach())


def _fixed_state(m) -> dict[str, torch.Tensor]:
    """Every parameter that takes no gradient (momentum copies, frozen teacher/patch projection, fixed positions)."""
    return {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}


MOMENTUM_PREFIXES = {"mocov3": ("momentum_backbone.", "momentum_projector."),
                     "conmim": ("teacher_backbone.", "teacher_projector."),
                     "macrl": ("key_backbone.", "key_projector.")}


@pytest.mark.parametrize("name", ALL)
def test_one_step_changes_online_weights_only(name):
    """A step moves the online encoder; momentum/teacher/frozen weights change only in after_optimizer_step."""
    _, m = tiny_method(name)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    fixed = _fixed_state(m)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m(_batch(m), StepInfo(0, 10)).loss.backward()
    opt.step()
    changed = [n for n, p in m.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("backbone.vit.blocks") for n in changed)
    for n, p in m.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, fixed[n]), f"{n} changed without after_optimizer_step"
    learned_pos = m.backbone.options.pos_embed == "learned"
    assert m.backbone.vit.pos_embed.requires_grad == learned_pos
    m.after_optimizer_step(StepInfo(0, 10))
    moved = {n for n, p in m.named_parameters() if not p.requires_grad and not torch.equal(p, fixed[n])}
    prefixes = MOMENTUM_PREFIXES.get(name, ())
    if prefixes:
        assert any(n.startswith(prefixes[0] + "vit.blocks") for n in moved)
        assert any(n.startswith(prefixes[1]) for n in moved)
    # everything else that is frozen stays frozen: fixed positions, MoCo's patch projection, MimCo's teacher
    assert all(n.startswith(prefixes) for n in moved), sorted(n for n in moved if not n.startswith(prefixes))
    assert not any(n.endswith("pos_embed") and not learned_pos for n in moved)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_under_seed_and_controlled_inputs(name):
    _, m = tiny_method(name)
    batch = _batch(m)
    kw = m.controlled_inputs(8, torch.Generator().manual_seed(1))
    kw2 = m.controlled_inputs(8, torch.Generator().manual_seed(1))
    a = m(batch, StepInfo(0, 10), **kw).loss
    b = m(batch, StepInfo(0, 10), **kw2).loss
    assert torch.equal(a, b)
    if kw:  # a different draw of the method's randomness gives a different loss
        kw3 = m.controlled_inputs(8, torch.Generator().manual_seed(2))
        assert not torch.equal(a, m(batch, StepInfo(0, 10), **kw3).loss)
    torch.manual_seed(5)
    c = m(batch, StepInfo(0, 10)).loss
    torch.manual_seed(5)
    assert torch.equal(c, m(batch, StepInfo(0, 10)).loss)


@pytest.mark.parametrize("name", ALL)
def test_export_loads_strictly_into_timm(name, tmp_path):
    cfg, m = tiny_method(name)
    bb = m.eval_backbone()
    plain = timm.create_model(bb.timm_name, pretrained=False, **bb.timm_kwargs)
    load_strict(plain, bb.export_state_dict(), name)
    # through the files every evaluation reads: backbone.safetensors + backbone.json and the export loader
    export_backbone(tmp_path, bb.export_state_dict(), teacher_meta(bb, name))
    loaded, read_meta = load_export(tmp_path)
    assert read_meta.method == name and type(loaded) is type(plain)
    x = torch.randn(2, 3, bb.img_size, bb.img_size)
    loaded.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), plain.forward_features(x))
        for k, v in bb.export_state_dict().items():  # the tensors the method trained, bit for bit
            assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("name", ALL)
def test_flops_per_image_positive(name):
    _, m = tiny_method(name)
    assert m.flops_per_image() > 0


def test_micl_matches_an_independent_implementation():
    """Re-derive MiCL's loss from the spec with plain timm calls and per-image loops."""
    _, m = tiny_method("micl")
    m.eval()
    batch = _batch(m, b=6)
    x = batch.views[0]
    noise = torch.rand(6, 64)
    vit = m.backbone.vit
    keep = m.len_keep
    assert keep == 16 and keep % 2 == 0
    cls_a, cls_b = [], []
    for i in range(6):
        tok = vit.patch_embed(x[i:i + 1])[0] + vit.pos_embed[0, 1:]
        order = torch.argsort(noise[i])[:keep]
        halves = (order[: keep // 2], order[keep // 2:])
        assert not set(halves[0].tolist()) & set(halves[1].tolist())  # disjoint views
        outs = []
        for h in halves:
            seq = torch.cat([vit.cls_token[0] + vit.pos_embed[0, :1], tok[h]])[None]
            outs.append(vit.norm(vit.blocks(seq))[0, 0])
        cls_a.append(outs[0])
        cls_b.append(outs[1])
    a = torch.nn.functional.normalize(torch.stack(cls_a), dim=1)
    b = torch.nn.functional.normalize(torch.stack(cls_b), dim=1)
    k, t = m.cfg.kappa, m.cfg.temperature

    def tsp(c):
        return 0.5 * (1 + c) / (1 + k * (1 - c)) / t

    lab = torch.arange(6)
    expected = 0.5 * (torch.nn.functional.cross_entropy(tsp(a @ b.t()), lab)
                      + torch.nn.functional.cross_entropy(tsp(b @ a.t()), lab))
    got = m(batch, StepInfo(0, 1), noise=noise).loss
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_micl_refuses_loss_groups_that_cannot_be_exact():
    _, m = tiny_method("micl", **{"method.loss_group_size": 3})
    with pytest.raises(ConfigError, match="loss_group_size=3"):
        m(_batch(m, b=8), StepInfo(0, 1))
    _, m = tiny_method("micl", **{"method.loss_group_size": 1800})
    assert (m.group_size(900, 8), m.group_size(3600, 2), m.group_size(1800, 4), m.group_size(64, 2)) == \
        (1800, 1800, 1800, 128)  # 2 devices a group; 2 groups a device; the official layout; below one group
    with pytest.raises(ConfigError):
        m.group_size(1000, 4)  # 4000 images do not split into groups of 1800


def test_micl_loss_groups_reproduce_per_device_negatives():
    _, m = tiny_method("micl", **{"method.loss_group_size": 4})
    batch = _batch(m, b=8)
    noise = torch.rand(8, 64)
    grouped = m(batch, StepInfo(0, 1), noise=noise).loss
    halves = [m(Batch((batch.views[0][i:i + 4],)), StepInfo(0, 1), noise=noise[i:i + 4]).loss for i in (0, 4)]
    torch.testing.assert_close(grouped, (halves[0] + halves[1]) / 2)


def test_mae_matches_an_independent_implementation():
    """MAE's loss from the spec: visible-only encoder, decoder unshuffle, norm-pix MSE on masked patches."""
    _, m = tiny_method("mae")
    m.eval()
    x = _batch(m, b=3).views[0]
    noise = torch.rand(3, 64)
    vit, dec, p = m.backbone.vit, m.decoder, 4
    losses, counts = [], []
    for i in range(3):
        order = torch.argsort(noise[i])
        keep = order[:16]
        tok = vit.patch_embed(x[i:i + 1])[0] + vit.pos_embed[0, 1:]
        seq = torch.cat([vit.cls_token[0] + vit.pos_embed[0, :1], tok[keep]])[None]
        lat = dec.embed(vit.norm(vit.blocks(seq)))[0]  # (17, E)
        full = dec.mask_token[0].repeat(64, 1).clone()
        full[keep] = lat[1:]  # put each visible token back at its own position
        z = torch.cat([lat[:1], full])[None] + dec.pos_embed
        pred = dec.pred(dec.norm(dec.blocks(z)))[0, 1:]
        img = x[i]
        target = torch.stack([img[:, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
                              for r in range(8) for c in range(8)])
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        masked = order[16:]
        losses.append(((pred[masked] - target[masked]) ** 2).mean(-1).sum())
        counts.append(len(masked))
    expected = sum(losses) / sum(counts)
    got = m(Batch((x,)), StepInfo(0, 1), noise=noise).loss
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_contract_refuses_a_method_that_leaves_out_a_part():
    from dataclasses import dataclass

    from repro.method import MAE_DECAY, MethodConfig, PretrainMethod
    from repro.views import ViewSpec

    class NoForward(PretrainMethod):  # views and FLOPs, but no loss
        name = "noforward"
        config_cls = METHODS["mae"].config_cls
        weight_decay_rule = MAE_DECAY

        @property
        def views(self):
            return ViewSpec()

        def flops_per_image(self) -> float:
            return 1.0

    _, mae = tiny_method("mae")
    with pytest.raises(TypeError, match="forward"):
        NoForward(mae.cfg, mae.backbone)

    @dataclass(frozen=True, kw_only=True)
    class HalfStated(MethodConfig):  # states its lr and batch, forgets the schedule and AdamW's values
        batch_size: int = 256
        base_lr: float = 1e-3

    with pytest.raises(TypeError, match="weight_decay"):
        HalfStated()
    for name, cls in METHODS.items():  # every registered method states all six from its paper
        cfg = cls.paper_config()
        assert cfg.batch_size > 0 and cfg.epochs > 0 and cfg.betas and cfg.weight_decay >= 0, name


def test_a_method_class_missing_name_config_or_decay_rule_is_refused_when_defined():
    from repro.method import MAE_DECAY, MethodConfig, PretrainMethod, WeightDecayRule

    cfg_cls = METHODS["mae"].config_cls
    with pytest.raises(TypeError, match=r"NoRule must define weight_decay_rule"):
        class NoRule(PretrainMethod):
            name = "norule"
            config_cls = cfg_cls

    with pytest.raises(TypeError, match=r"must define name .*; config_cls .*; weight_decay_rule"):
        class Nothing(PretrainMethod):
            pass

    with pytest.raises(TypeError, match=r"config_cls \(a MethodConfig subclass\)"):
        class PlainConfig(PretrainMethod):
            name = "plain"
            config_cls = dict
            weight_decay_rule = MAE_DECAY

    with pytest.raises(TypeError, match="weight_decay_rule"):
        class RuleNone(PretrainMethod):
            name = "rulenone"
            config_cls = cfg_cls
            weight_decay_rule = None

    class Complete(PretrainMethod):  # defining it is enough to pass; forward & co. are checked when one is built
        name = "complete"
        config_cls = cfg_cls
        weight_decay_rule = WeightDecayRule(False)

    class Inherits(Complete):  # a subclass of a complete method inherits what it declares
        pass

    assert Inherits.weight_decay_rule == WeightDecayRule(False)
    for name, cls in METHODS.items():  # every registered method was defined, so it declares all three
        assert cls.name == name and issubclass(cls.config_cls, MethodConfig) and cls.weight_decay_rule
