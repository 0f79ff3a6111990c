"""``repro.store``: an ImageFolder re-encoded at a smaller size, resumable, checksummed, readable as a dataset."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from repro.bench.data_stages import write_jpeg_folder
from repro.config import DataConfig
from repro.data import DataError, load_data
from repro.store import MANIFEST, SUMS, build_store, main, verify_store


@pytest.fixture
def src(tmp_path):
    root = write_jpeg_folder(tmp_path / "src", 14, classes=2)  # 500x375 ... 1024x768; val gets 2
    Image.new("RGB", (200, 150), (9, 9, 9)).save(root / "train" / "c0" / "small.png")  # smaller than 256, not JPEG
    (root / "train" / "c1" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def test_store_resizes_verifies_resumes_and_reads_as_a_dataset(tmp_path, src):
    dst = tmp_path / "store"
    m = build_store(src, dst, short_side=256, workers=2, progress=False)
    assert m["complete"] and m["images"] == 14 + 2 + 1 and len(m["skipped"]) == 1 and "broken" in m["skipped"][0]
    for p in (dst / "train").rglob("*.jpg"):
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert min(im.size) == 256 or p.name == "small.jpg"
    with Image.open(dst / "train" / "c0" / "small.jpg") as im:
        assert im.size == (200, 150)  # never enlarged
    with Image.open(dst / "train" / "c0" / "000000.jpg") as im:  # 500x375 -> 341x256: the aspect is kept
        assert im.size == (341, 256)
    assert verify_store(dst) == []

    # resume: a lost output is the only one converted again; its digest is the same
    lost = dst / "train" / "c1" / "000001.jpg"
    before = (dst / SUMS).read_text()
    lost.unlink()
    assert verify_store(dst) == ["train/c1/000001.jpg: missing"]
    mtimes = {p: p.stat().st_mtime_ns for p in (dst / "train").rglob("*.jpg")}
    build_store(src, dst, short_side=256, workers=1, progress=False)
    assert lost.exists() and (dst / SUMS).read_text() == before
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())

    # a flipped byte is caught; other parameters for the same store are refused
    data = bytearray(lost.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lost.write_bytes(bytes(data))
    assert verify_store(dst) == ["train/c1/000001.jpg: checksum mismatch"]
    with pytest.raises(DataError, match="short_side"):
        build_store(src, dst, short_side=320, progress=False)
    assert json.loads((dst / MANIFEST).read_text())["short_side"] == 256

    d = load_data(DataConfig(path=str(dst)))
    assert len(d.train) == 14 + 1 and d.train.classes == ["c0", "c1"] and len(d.test) == 2


def test_store_cli_errors_are_one_line(tmp_path, src, capsys):
    assert main([str(tmp_path / "nothing"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "no train/ folder" in capsys.readouterr().err
    assert main([str(src), str(src / "inside"), "--no-progress"]) == 2
    assert "inside its source" in capsys.readouterr().err
    assert main(["--verify", str(tmp_path)]) == 2
    assert main([str(src), str(tmp_path / "ok"), "--no-progress", "--workers", "1"]) == 0
    assert main(["--verify", str(tmp_path / "ok")]) == 0
