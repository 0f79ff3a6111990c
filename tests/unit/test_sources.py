"""The streamed data path (``repro.sources``): the fast and GPU-decode pipelines give the plain pipeline's crops.

Tolerances (uint8 levels, 0-255), each measured here before it was set:
- same crop box, torch's antialiased bicubic vs PIL's: mean |diff| < 0.25, max <= 16 (measured 0.01 / 9);
- reduced-DCT decode vs full decode, same crops: mean |diff| < 2.5 (measured ~1.2 at 1/2 and 1/4 scale);
- over many random crops, per-channel mean and std of fast vs plain: within 2.5 levels (measured < 1);
- the evaluation view (resize + centre crop) vs torchvision's on PIL: mean |diff| < 0.25 at full decode (measured
  0.003, max 1), < 2.5 from a 1/4-scale decode (measured 0.7-0.8).
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro.bench.data_stages import synthetic_photo
from repro.config import DataConfig
from repro.data import IMAGENET_MEAN, IMAGENET_STD, DataError, FileImages, load_data
from repro.sources import (
    Encoded,
    StepSampler,
    StreamBatchSource,
    _BytesLoad,
    auto_workers,
    crop_count,
    dct_reduction,
    decode_for_crops,
    decode_on_device,
    fast_crops,
    plan_crops,
    random_resized_box,
    resize_crop,
)
from repro.views import BYOL_VIEW2, ViewSpec, pil_view_parts
from tests.conftest import SHARED_DATA

CPU = torch.device("cpu")
MAE_VIEW = ViewSpec()  # one view, scale (0.2, 1), bicubic
TWO_VIEWS = ViewSpec(count=2, scale=(0.08, 1.0), photometric=(BYOL_VIEW2, BYOL_VIEW2))


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """ImageNet-sized JPEGs (500x375 and 375x500) and two large ones (1600x1200) that allow reduced decoding."""
    sizes = [(500, 375), (375, 500), (500, 333), (1600, 1200), (1200, 1600)]
    return [_jpeg(synthetic_photo(w, h, i)) for i, (w, h) in enumerate(sizes)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, jpegs) -> Path:
    root = tmp_path_factory.mktemp("stream")
    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i, data in enumerate(jpegs):
                (d / f"{i}.jpg").write_bytes(data)
    return root


def test_crop_boxes_follow_torchvision_random_resized_crop():
    from torchvision import transforms as T

    n, (h, w) = 4000, (375, 500)
    rng = random.Random(0)
    ours = np.array([random_resized_box(rng, h, w, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
    torch.manual_seed(0)
    ref = []
    for _ in range(n):
        i, j, bh, bw = T.RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
        ref.append((j, i, bw, bh))
    theirs = np.array(ref, dtype=np.float64)

    def ks(a: np.ndarray, b: np.ndarray) -> float:
        grid = np.sort(np.concatenate([a, b]))
        return float(np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                            - np.searchsorted(np.sort(b), grid, "right") / len(b)).max())

    for name, f in [("area", lambda x: x[:, 2] * x[:, 3] / (h * w)), ("aspect", lambda x: x[:, 2] / x[:, 3]),
                    ("x centre", lambda x: x[:, 0] + x[:, 2] / 2), ("y centre", lambda x: x[:, 1] + x[:, 3] / 2)]:
        assert ks(f(ours), f(theirs)) < 0.05, name  # 5% critical value at n=4000 is 0.030; p(fail) ~ 1e-4
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= w).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= h).all()


def test_crop_plans_depend_on_the_seed_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a, b = plan_crops(TWO_VIEWS, 375, 500, 7), plan_crops(TWO_VIEWS, 375, 500, 7)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.flips, b.flips) and a.boxes.shape == (2, 4)
    assert not torch.equal(a.boxes, plan_crops(TWO_VIEWS, 375, 500, 8).boxes)
    assert torch.equal(before, torch.get_rng_state())  # the training RNG is untouched
    assert crop_count(ViewSpec(count=2, shared_crop=True)) == 1 and crop_count(TWO_VIEWS) == 2


def test_dct_reduction_keeps_every_crop_at_least_the_output_size():
    boxes = torch.tensor([[0, 0, 1000.0, 900.0], [0, 0, 460.0, 1200.0]])
    assert dct_reduction(boxes, 224) == 2  # 460 / 2 = 230 >= 224, 460 / 4 < 224
    assert dct_reduction(boxes[:1], 224) == 4
    assert dct_reduction(torch.tensor([[0, 0, 300.0, 300.0]]), 224) == 1
    assert dct_reduction(torch.tensor([[0, 0, 1800.0, 1800.0]]), 224) == 8


def test_fast_resize_matches_pil_on_the_same_box(jpegs):
    img = Image.open(io.BytesIO(jpegs[0])).convert("RGB")
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    diffs = []
    for box in [(50, 40, 300, 290), (0, 0, 500, 375), (100, 80, 150, 120), (13, 7, 401, 222)]:
        ours = resize_crop(x, tuple(map(float, box)), 224, False, "bicubic").permute(1, 2, 0).numpy().astype(int)
        x0, y0, w, h = box
        theirs = np.asarray(img.resize((224, 224), Image.BICUBIC, box=(x0, y0, x0 + w, y0 + h))).astype(int)
        diffs.append(np.abs(ours - theirs))
    d = np.stack(diffs)
    assert d.mean() < 0.25 and d.max() <= 16, (d.mean(), d.max())
    flipped = resize_crop(x, (0.0, 0.0, 500.0, 375.0), 64, True, "bicubic")
    assert torch.equal(flipped, resize_crop(x, (0.0, 0.0, 500.0, 375.0), 64, False, "bicubic").flip(-1))


def test_reduced_decode_gives_the_full_decode_crops(jpegs):
    big = jpegs[3]  # 1600x1200: most crops allow 1/2 or 1/4
    spec = ViewSpec(scale=(0.5, 1.0))
    reduced, seen = [], set()
    for seed in range(24):
        d = decode_for_crops(big, spec, 224, seed)
        seen.add(round(1 / d.sx))
        a = torch.stack(fast_crops(big, spec, 224, seed)).float()
        b = torch.stack(fast_crops(big, spec, 224, seed, reduce=False)).float()
        reduced.append((a - b).abs().mean().item())
    assert {2, 4} <= seen  # both reductions were exercised
    assert np.mean(reduced) < 2.5, np.mean(reduced)


def _channel_stats(crops: list[torch.Tensor]) -> np.ndarray:
    x = torch.stack(crops).float().permute(1, 0, 2, 3).reshape(3, -1)
    return np.stack([x.mean(1).numpy(), x.std(1).numpy()])


def _plain_crops(data: bytes, spec: ViewSpec, n: int, seed: int) -> list[torch.Tensor]:
    from torchvision.transforms.functional import pil_to_tensor

    crop, _ = pil_view_parts(spec, 224, IMAGENET_MEAN, IMAGENET_STD)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    torch.manual_seed(seed)
    return [pil_to_tensor(crop(img)) for _ in range(n)]


def _check_distribution(images: list[bytes], spec: ViewSpec) -> None:
    for k, data in enumerate(images):
        fast = [c for s in range(60) for c in fast_crops(data, spec, 224, 1000 * k + s)]
        plain = _plain_crops(data, spec, len(fast), k)
        a, b = _channel_stats(fast), _channel_stats(plain)
        assert np.abs(a - b).max() < 2.5, (k, a, b)


def test_fast_crops_have_the_plain_pipelines_pixel_statistics(jpegs):
    _check_distribution(jpegs, MAE_VIEW)


def test_fast_crops_on_real_imagenet_jpegs():
    root = SHARED_DATA / "imagenet-sample" / "train"
    if not root.is_dir():
        pytest.skip(f"{root} not present (real-data tests need ../shared/data)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))[:4]
    _check_distribution([p.read_bytes() for p in files], MAE_VIEW)


def _source(root: Path, spec: ViewSpec, decode: str, workers: int = 0, policy: str = "skip", batch: int = 5):
    d = load_data(DataConfig(path=str(root), in_memory="no"))
    return StreamBatchSource(d.train, spec, 224, d.mean, d.std, StepSampler(len(d.train), batch, seed=3), CPU,
                             workers, policy, decode)


def test_streamed_batches_do_not_depend_on_workers_or_where_a_run_starts(folder):
    one = [b.views[0] for b in _source(folder, MAE_VIEW, "fast").batches(0, 3)]
    two = [b.views[0] for b in _source(folder, MAE_VIEW, "fast", workers=2).batches(0, 3)]
    resumed = next(_source(folder, MAE_VIEW, "fast").batches(2, 3)).views[0]
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    assert torch.equal(resumed, one[2])
    assert not torch.equal(one[0], one[1])


def test_gpu_decode_path_on_the_cpu_gives_the_fast_paths_crops(folder):
    """decode=gpu run with device=cpu: torchvision's batched decode_jpeg, crops on the device, same seeds."""
    spec = ViewSpec(count=2, scale=(0.2, 1.0))  # two crops, no photometric: the views are the crops
    fast, gpu = _source(folder, spec, "fast"), _source(folder, spec, "gpu")
    for bf, bg in zip(fast.batches(0, 2), gpu.batches(0, 2), strict=True):
        for vf, vg in zip(bf.views, bg.views, strict=True):
            # fast reduces the DCT scale on the large images; gpu always decodes in full
            assert vf.shape == vg.shape == (5, 3, 224, 224)
            diff = (vf - vg).abs().mean().item() * 255 * 0.226
            assert diff < 2.5, diff
        assert torch.equal(bf.labels, bg.labels)
    items = [_BytesLoad(spec)(p, 11) for p in _source(folder, spec, "gpu").dataset.split.paths[:3]]
    for e in items:  # the full-scale fast decode of the same file and seed is the same crop, to rounding
        out = gpu._gpu_crops([e])
        ref = fast_crops(e.data.numpy().tobytes(), spec, 224, 11, reduce=False)
        for c in range(2):
            d = (out[c][0] - ref[c].float()).abs()  # float vs uint8 fixed-point filter weights
            assert d.mean() < 0.5 and d.max() <= 4, (d.mean(), d.max())


def test_gpu_decode_handles_other_formats_and_corrupt_files(tmp_path, jpegs, caplog):
    good = tmp_path / "good.jpg"
    good.write_bytes(jpegs[0])
    png = tmp_path / "x.png"
    synthetic_photo(300, 200, 9).save(png)
    bad = tmp_path / "bad.jpg"
    junk = b"\xff\xd8\xff" + bytes(200)  # a JPEG signature and nothing decodable
    bad.write_bytes(junk)
    load = _BytesLoad(MAE_VIEW)
    items = [load(str(good), 0), load(str(png), 1)]
    assert items[0].jpeg and not items[1].jpeg and items[1].data.shape == (3, 200, 300)
    out = decode_on_device(items, CPU, "skip")
    assert out[0].shape == (3, 375, 500) and torch.equal(out[1], items[1].data)
    with pytest.raises(OSError):  # the worker cannot even read its header: the dataset skips it
        load(str(bad), 2)
    broken = Encoded(str(bad), torch.frombuffer(bytearray(junk), dtype=torch.uint8), True, items[0].plan)
    with pytest.raises(DataError, match="bad.jpg"):
        decode_on_device([items[0], broken], CPU, "fail")
    with caplog.at_level(logging.WARNING):
        out = decode_on_device([items[0], broken], CPU, "skip")
    assert "bad.jpg" in caplog.text and torch.equal(out[1], out[0])


def test_pil_mode_is_the_plain_pipeline_and_streams_floats(folder):
    b = next(_source(folder, TWO_VIEWS, "pil").batches(0, 1))
    assert len(b.views) == 2 and b.views[0].dtype == torch.float32 and b.views[0].shape == (5, 3, 224, 224)
    f = next(_source(folder, TWO_VIEWS, "fast").batches(0, 1))
    assert len(f.views) == 2 and f.views[1].shape == (5, 3, 224, 224)
    for v in (*b.views, *f.views):  # normalised with ImageNet's statistics: roughly centred, unit-ish spread
        assert -1.5 < v.mean().item() < 1.5 and 0.3 < v.std().item() < 2.0


def test_unknown_decode_is_refused(folder):
    d = load_data(DataConfig(path=str(folder), in_memory="no"))
    assert isinstance(d.train, FileImages)
    with pytest.raises(DataError, match="data.decode"):
        StreamBatchSource(d.train, MAE_VIEW, 224, d.mean, d.std, StepSampler(len(d.train), 2, 0), CPU, 0, "skip",
                          "nvjpeg")


def test_auto_workers_share_the_cores_among_local_processes(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert auto_workers() == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert auto_workers() == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert auto_workers() == 1


def test_eval_view_is_the_plain_resize_and_centre_crop(jpegs):
    from torchvision import transforms as T
    from torchvision.transforms.functional import pil_to_tensor

    from repro.sources import eval_view

    plain = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    for data in jpegs:  # 500x375 ... 1600x1200 (decoded at 1/4: 400x300, still above 256)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        ours, ref = eval_view(data, 224), pil_to_tensor(plain(img))
        assert ours.shape == ref.shape == (3, 224, 224) and ours.dtype == torch.uint8
        d = (ours.float() - ref.float()).abs()
        limit = 2.5 if min(img.size) >= 512 else 0.25  # reduced decode vs full; same filter and geometry
        assert d.mean() < limit, (img.size, d.mean())


def test_streamed_eval_batches_are_normalised_in_order(folder):
    from repro.sources import eval_batches, eval_view

    d = load_data(DataConfig(path=str(folder), in_memory="no"))
    batches = list(eval_batches(d.test, 224, d.mean, d.std, 4, CPU, num_workers=0))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (len(d.test), 3, 224, 224) and torch.equal(y, d.test.labels)
    first = eval_view(Path(d.test.paths[0]).read_bytes(), 224).float()
    mean, std = torch.tensor(d.mean).view(3, 1, 1), torch.tensor(d.std).view(3, 1, 1)
    torch.testing.assert_close(x[0], (first / 255 - mean) / std, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_nvjpeg_decode_on_cuda_gives_the_cpu_paths_crops(folder):
    """decode=gpu on a CUDA device (nvJPEG) against the same path on the CPU (libjpeg-turbo): the same crops to
    within JPEG decoders' IDCT differences. Skipped without CUDA; scripts/gpu_session.sh runs it."""
    spec = ViewSpec(count=2, scale=(0.2, 1.0))
    d = load_data(DataConfig(path=str(folder), in_memory="no"))
    cuda = torch.device("cuda")
    on_gpu = StreamBatchSource(d.train, spec, 224, d.mean, d.std, StepSampler(len(d.train), 5, seed=3), cuda, 0,
                               "skip", "gpu")
    on_cpu = _source(folder, spec, "gpu")
    for bg, bc in zip(on_gpu.batches(0, 2), on_cpu.batches(0, 2), strict=True):
        for vg, vc in zip(bg.views, bc.views, strict=True):
            assert vg.device.type == "cuda"
            assert (vg.cpu() - vc).abs().mean().item() * 255 * 0.226 < 1.5
