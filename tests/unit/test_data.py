from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from repro.config import DataConfig
from repro.data import DataError, load_data, make_shapes
from repro.sources import StepSampler
from repro.views import TensorAugment, ViewSpec, sample_crop_boxes


def test_builtin_is_deterministic_balanced_and_varied():
    a, b = make_shapes(200, seed=3), make_shapes(200, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.dtype == torch.uint8 and a.images.shape == (200, 3, 32, 32)
    assert torch.bincount(a.labels, minlength=10).tolist() == [20] * 10
    assert not torch.equal(make_shapes(200, seed=4).images, a.images)
    # class structure: per-class mean images differ more than noise would allow
    means = torch.stack([a.images[a.labels == c].float().mean(0) for c in range(10)])
    assert (means[7] - means[8]).abs().mean() > 1.0  # horizontal vs vertical stripes


def test_builtin_colours_come_from_a_shared_palette_and_do_not_identify_an_image_or_a_class():
    from repro.data import BUILTIN_PALETTE

    a = make_shapes(2000, seed=5)
    pal = torch.tensor(BUILTIN_PALETTE, dtype=torch.float32)
    px = a.images.float().permute(0, 2, 3, 1).reshape(2000, -1, 3)  # (n, S*S, 3)
    nearest = torch.cdist(px, pal.expand(2000, -1, -1)).argmin(-1)  # (n, S*S)
    counts = torch.stack([torch.bincount(x, minlength=len(pal)) for x in nearest])
    top2 = counts.topk(2, dim=1).indices.sort(dim=1).values  # unordered (colour, colour) pair per image
    pair = top2[:, 0] * len(pal) + top2[:, 1]
    # the colour of an image's dominant palette entry, measured from its pixels
    dom = counts.argmax(1)
    mean_rgb = torch.stack([px[i][nearest[i] == dom[i]].mean(0) for i in range(2000)])
    groups = {int(v): (pair == v).nonzero().flatten() for v in pair.unique()}
    assert len(groups) <= len(pal) * (len(pal) - 1) // 2
    # an image shares its colours with many others: the pair groups are large and their colours identical (up to
    # lighting and noise), not a continuum that singles an image out
    big = [ix for ix in groups.values() if len(ix) >= 20]
    assert sum(len(ix) for ix in big) > 0.9 * 2000
    for ix in big:
        same_dom = ix[dom[ix] == dom[ix][0]]
        assert mean_rgb[same_dom].std(0).max() < 12.0
    # and colour says nothing about the class: every class shows most colour pairs
    for c in range(10):
        assert len(pair[a.labels == c].unique()) >= 20


def _write_folder(root, classes=("cat", "dog"), n=3, size=(20, 20), mode="RGB"):
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new(mode, size, color=(10 * i,) * (1 if mode in ("L",) else len(mode))).save(d / f"{i}.png")


def test_imagefolder_in_memory_and_modes(tmp_path):
    _write_folder(tmp_path)
    # grayscale, RGBA and CMYK images are converted to RGB
    Image.new("L", (20, 20), 128).save(tmp_path / "train" / "cat" / "gray.png")
    Image.new("RGBA", (20, 20), (1, 2, 3, 4)).save(tmp_path / "train" / "dog" / "rgba.png")
    Image.new("CMYK", (20, 20), (0, 0, 0, 0)).save(tmp_path / "train" / "dog" / "cmyk.jpg")
    d = load_data(DataConfig(path=str(tmp_path)))
    assert d.in_memory and d.train.images.shape == (9, 3, 20, 20) and d.train.classes == ["cat", "dog"]
    assert d.test_split_name == "val" and len(d.test) == 6


def test_imagefolder_streams_large_images(tmp_path):
    _write_folder(tmp_path, size=(96, 80))
    d = load_data(DataConfig(path=str(tmp_path)))
    assert not d.in_memory and len(d.train) == 6


def test_corrupt_image_policy(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        d = load_data(DataConfig(path=str(tmp_path)))
    assert d.train.skipped == 1 and len(d.train) == 6
    with pytest.raises(DataError, match="broken.jpg"):
        load_data(DataConfig(path=str(tmp_path), bad_images="fail"))


@pytest.mark.parametrize(("setup", "match"), [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "empty"),
    (lambda p: (p / "val").mkdir(parents=True), "no train/"),
    (lambda p: ((p / "train" / "a").mkdir(parents=True), (p / "val").mkdir()), "empty class folder"),
])
def test_bad_data_paths(tmp_path, setup, match):
    root = tmp_path / "ds"
    setup(root)
    with pytest.raises(DataError, match=match):
        load_data(DataConfig(path=str(root)))


def test_cifar_pickles(tmp_path):
    rng = np.random.default_rng(0)

    def dump(name, n):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, n))}, f)

    for i in range(1, 6):
        dump(f"data_batch_{i}", 4)
    dump("test_batch", 3)
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    d = load_data(DataConfig(path=str(tmp_path)))
    assert d.name == "cifar10" and d.train.images.shape == (20, 3, 32, 32) and len(d.test) == 3
    assert d.train.classes[3] == "c3"


def test_cifar_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}))
    with pytest.raises(DataError, match="refusing"):
        load_data(DataConfig(path=str(tmp_path)))


def test_crop_boxes_in_bounds_and_scale():
    torch.manual_seed(0)
    boxes = sample_crop_boxes(2000, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), torch.device("cpu"))
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 32).all() and (y0 + h <= 32).all()
    area = w * h / 1024
    assert area.min() >= 0.15 and area.max() <= 1.0 and 0.5 < area.mean() < 0.7


def test_tensor_augment_views():
    spec = ViewSpec(count=2)
    imgs = make_shapes(8, seed=0).images
    torch.manual_seed(0)
    v = TensorAugment(spec, 32, (0.5,) * 3, (0.25,) * 3)(imgs)
    assert len(v) == 2 and v[0].shape == (8, 3, 32, 32) and not torch.equal(v[0], v[1])
    torch.manual_seed(0)
    assert torch.equal(TensorAugment(spec, 32, (0.5,) * 3, (0.25,) * 3)(imgs)[0], v[0])
    # a full-image crop without flip reproduces the image
    from repro.views import resized_crops

    full = torch.tensor([[0.0, 0.0, 32.0, 32.0]]).expand(8, 4)
    out = resized_crops(imgs.float(), full, 32, None, "bicubic")
    torch.testing.assert_close(out, imgs.float(), atol=1e-3, rtol=0)


def test_step_sampler_is_deterministic_and_shards_ranks():
    s0, s1 = StepSampler(100, 20, seed=1, rank=0, world_size=2), StepSampler(100, 20, seed=1, rank=1, world_size=2)
    a, b = s0.indices(7), s1.indices(7)
    assert len(a) == 10 and not set(a.tolist()) & set(b.tolist())
    assert torch.equal(StepSampler(100, 20, seed=1, rank=0, world_size=2).indices(7), a)
    epoch0 = torch.cat([torch.cat([s0.indices(s), s1.indices(s)]) for s in range(5)])
    assert sorted(epoch0.tolist()) == list(range(100))  # one epoch visits every image once
    with pytest.raises(DataError, match="larger than the training set"):
        StepSampler(10, 20, seed=0)


def test_real_cifar10_jpeg_folder(cifar_jpeg_subset):
    d = load_data(DataConfig(path=str(cifar_jpeg_subset)))
    assert d.in_memory and d.num_classes == 10 and d.train.images.shape[1:] == (3, 32, 32)
    assert d.train.classes[0] == "airplane" and d.train.classes[-1] == "truck"
