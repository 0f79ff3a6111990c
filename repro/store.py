"""``python -m repro.store SRC DST``: an ImageFolder re-encoded once at a smaller size, for repeated runs.

A CPU worker spends most of its time decoding: an ImageNet JPEG (~500x375) takes ~1.1 ms, the same image with its
shorter side at 256 px ~0.33 ms (measured with ``torchvision.io.decode_jpeg`` on one core here). The store keeps
the ImageFolder layout (``train/<class>/*.jpg``, ``val/...``), so every reader — ``repro.run --data DST``, the
evaluations, torchvision — uses it unchanged; there is no new format to install.

What it changes: each image is resized (bicubic, antialiased) so its shorter side is ``--short-side`` (images
already that small are kept as they are) and re-encoded at ``--quality``. Crops then come from the smaller image:
RandomResizedCrop's small crops are upsampled where, from the full-size JPEG, they would be downsampled. The paper
recipes read full-size JPEGs; a store run is a different dataset (its path is in the run's config hash) and
should be reported as such.

Resumable and verified: each file is written to a temporary name and renamed, so an interrupted run leaves no
partial image and a rerun converts only what is missing; ``store.json`` records the parameters (a rerun with
others is refused) and ``SHA256SUMS`` the digest of every output, which ``--verify`` checks.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from repro.checkpoint import atomic_write_text
from repro.data import IMAGE_EXTENSIONS, DataError

MANIFEST = "store.json"
SUMS = "SHA256SUMS"


def _split_files(src: Path) -> list[Path]:
    if not (src / "train").is_dir():
        raise DataError(f"{src}: no train/ folder (expected an ImageFolder: train/<class>/*, val/ or test/)")
    out = []
    for split in ("train", "val", "test"):
        if (src / split).is_dir():
            out += sorted(p for p in (src / split).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not out:
        raise DataError(f"{src}: no images under train/")
    return out


def convert_one(data: bytes, short_side: int, quality: int) -> bytes:
    """One image: shorter side to ``short_side`` (if larger), RGB, JPEG at ``quality``; a small JPEG is kept as is."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if min(w, h) <= short_side and im.format == "JPEG" and im.mode == "RGB":
            return data
        if min(w, h) > short_side:
            s = short_side / min(w, h)
            size = (max(1, round(w * s)), max(1, round(h * s)))
            im.draft("RGB", size)  # a DCT-scaled decode no smaller than the target: the resize below stays a shrink
            img = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        else:
            img = im.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return buf.getvalue()


def _job(args: tuple[str, str, int, int]) -> tuple[str, str | None, str | None]:
    """(relative output path, sha256 or None, error or None) for one source file."""
    src, dst, short_side, quality = args
    try:
        out = convert_one(Path(src).read_bytes(), short_side, quality)
    except Exception as e:  # noqa: BLE001 - a corrupt source is reported, not fatal
        return dst, None, f"{type(e).__name__}: {e}"
    path = Path(dst)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(out)  # no fsync per image (slow on network disks): after a machine crash, run --verify
    os.replace(tmp, path)
    return dst, hashlib.sha256(out).hexdigest(), None


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_store(src: Path, dst: Path, short_side: int = 256, quality: int = 90, workers: int = 0,
                progress: bool = True) -> dict:
    """Convert ``src`` into ``dst`` (see the module docstring); returns the manifest."""
    if short_side < 16 or not 1 <= quality <= 100:
        raise DataError("--short-side must be >= 16 and --quality in 1..100")
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or src in dst.parents:
        raise DataError(f"{dst}: the store must not be inside its source {src}")
    params = {"source": str(src), "short_side": short_side, "quality": quality}
    manifest_path = dst / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if {k: old.get(k) for k in params} != params:
            raise DataError(f"{manifest_path}: this store was made with {({k: old.get(k) for k in params})}; "
                            f"use another DST for {params}")
    files = _split_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest_path, json.dumps({**params, "complete": False}, indent=2) + "\n")
    sums: dict[str, str] = {}
    if (dst / SUMS).exists():
        for line in (dst / SUMS).read_text().splitlines():
            digest, _, rel = line.partition("  ")
            sums[rel] = digest
    todo = []
    for f in files:
        rel = f.relative_to(src).with_suffix(".jpg").as_posix()
        if rel in sums and (dst / rel).exists():
            continue  # converted by an earlier run (its digest is checked by --verify)
        todo.append((str(f), str(dst / rel), short_side, quality))
    failed: list[str] = []
    from tqdm import tqdm

    n_workers = workers or max(1, (os.cpu_count() or 1))
    with tqdm(total=len(files), initial=len(files) - len(todo), unit="img", disable=not progress,
              desc="store") as bar, ProcessPoolExecutor(n_workers) as pool:
        for dst_file, written, err in pool.map(_job, todo, chunksize=16):
            rel = Path(dst_file).relative_to(dst).as_posix()
            if written is None:
                failed.append(f"{rel}: {err}")
            else:
                sums[rel] = written
            bar.update(1)
            if bar.n % 1000 == 0:  # an interrupted run keeps what it converted
                atomic_write_text(dst / SUMS, "".join(f"{d}  {r}\n" for r, d in sorted(sums.items())))
    atomic_write_text(dst / SUMS, "".join(f"{d}  {r}\n" for r, d in sorted(sums.items())))
    manifest = {**params, "complete": True, "images": len(sums), "skipped": failed}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_store(dst: Path) -> list[str]:
    """Files whose digest does not match ``SHA256SUMS`` (or that are missing); empty when the store is intact."""
    dst = Path(dst)
    if not (dst / SUMS).exists():
        raise DataError(f"{dst}: no {SUMS} (not a store made by repro.store)")
    bad = []
    for line in (dst / SUMS).read_text().splitlines():
        digest, _, rel = line.partition("  ")
        p = dst / rel
        if not p.exists():
            bad.append(f"{rel}: missing")
        elif _sha(p) != digest:
            bad.append(f"{rel}: checksum mismatch")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m repro.store", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("paths", nargs="+", metavar="SRC DST",
                   help="source ImageFolder (train/<class>/*, val/ or test/) and where the store goes (created; a "
                        "rerun resumes it); with --verify, just DST")
    p.add_argument("--short-side", type=int, default=256, help="shorter side of the stored images (default 256)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored images (default 90)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    p.add_argument("--verify", action="store_true", help="only check DST against its SHA256SUMS")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if len(args.paths) != (1 if args.verify else 2):
        p.error("expected SRC DST (or --verify DST)")
    args.dst = args.paths[-1]
    try:
        if args.verify:
            bad = verify_store(Path(args.dst))
            for b in bad[:20]:
                print(f"repro.store: {b}", file=sys.stderr)
            print(f"{args.dst}: {'OK' if not bad else f'{len(bad)} bad file(s)'}")
            return 1 if bad else 0
        m = build_store(Path(args.paths[0]), Path(args.dst), args.short_side, args.quality, args.workers,
                        progress=not args.no_progress)
    except DataError as e:
        print(f"repro.store: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.dst}: {m['images']} images (shorter side {m['short_side']}), {len(m['skipped'])} unreadable skipped")
    for s in m["skipped"][:5]:
        print(f"  skipped {s}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
