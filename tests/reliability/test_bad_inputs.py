"""Bad input: a one-line ``repro: error: ...`` (``evals: error: ...``) naming the culprit, exit status 2, and nothing
written or damaged; or, where the input is usable (odd image modes, skipped bad images), a run that trains.

The cases are :data:`CASES`, which mirrors the table in ``bad_inputs.md`` row for row (a test checks both agree).
Commands run in this process through the CLIs' ``main`` (no interpreter start-up per case) with these arguments
added: ``repro.run`` gets ``--evals none --no-progress --no-report --out TMP/runs --results TMP/results`` and the
small ``--set`` values of :data:`tests.reliability.conftest.SMALL`; ``evals.knn`` gets ``--results TMP/results
--no-progress`` and a 64/32-image built-in dataset. ``DATA``, ``EXPORT`` and ``RUN`` stand for what ``setup`` builds.
Rows marked ``smoke`` run as subprocesses in tests/smoke/test_cli.py::test_bad_input_is_one_line_error instead.
"""

from __future__ import annotations

import io
import json
import re
import shlex
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro.checkpoint import CHECKPOINT
from repro.export import EXPORT_META, EXPORT_WEIGHTS, export_backbone, read_export
from tests.reliability.conftest import SMALL, call_main, sets, tree

HERE = Path(__file__).resolve().parent
SMOKE = "also tests/smoke/test_cli.py"
NOTHING = "exit 2, nothing written"
PENDING = "pending: dense evals"


@dataclass(frozen=True)
class Case:
    case: str
    command: str
    """As in the table; DATA / EXPORT / RUN are replaced by what ``setup`` builds."""
    expected: str
    """A substring of the one error line (or, for runs that train, of the log); DATA/EXPORT/RUN replaced."""
    behaviour: str
    setup: str = ""
    """Name of the builder in :data:`SETUPS` (not a table column)."""
    new_files: tuple[str, ...] = ()
    """Files a failing command may leave (not a table column): a streaming run finds a bad image mid-run."""

    @property
    def smoke(self) -> bool:
        return SMOKE in self.behaviour

    @property
    def pending(self) -> bool:
        return self.behaviour.startswith(PENDING)


RUN = "python -m repro.run micl --budget 2steps --recipe tiny --data DATA"
KNN = "python -m evals.knn --export EXPORT"
CASES: list[Case] = [
    Case("unknown-method", "python -m repro.run nosuch --budget 1m", "repro: error: unknown method 'nosuch'",
         f"{NOTHING}; {SMOKE}"),
    Case("budget-bad-unit", "python -m repro.run micl --budget 5x", "repro: error: --budget '5x': unknown unit 'x'",
         f"{NOTHING}; {SMOKE}"),
    Case("budget-negative", "python -m repro.run micl --budget=-3h", "repro: error: --budget '-3h': must be positive",
         f"{NOTHING}; {SMOKE}"),
    Case("budget-zero", "python -m repro.run micl --budget 0m", "repro: error: --budget '0m': must be positive",
         f"{NOTHING}; {SMOKE}"),
    Case("budget-no-unit", "python -m repro.run micl --budget 5", "repro: error: --budget '5': expected a number "
         "with a unit", f"{NOTHING}; {SMOKE}"),
    Case("budget-fractional-steps", "python -m repro.run micl --budget 2.5steps",
         "repro: error: --budget '2.5steps': steps must be a whole number", NOTHING),
    Case("set-unknown-key", "python -m repro.run micl --budget 1m --set train.nope=1",
         "repro: error: unknown key 'train.nope'", f"{NOTHING}; {SMOKE}"),
    Case("set-wrong-type", "python -m repro.run micl --budget 1m --set train.batch_size=x",
         "repro: error: train.batch_size: expected an integer, got 'x'", f"{NOTHING}; {SMOKE}"),
    Case("set-method-wrong-type", "python -m repro.run micl --budget 1m --set method.mask_ratio=high",
         "repro: error: method.mask_ratio: expected a number, got 'high' (method micl)", NOTHING),
    Case("set-out-of-range", "python -m repro.run micl --budget 1m --set method.mask_ratio=1.5",
         "repro: error: method.mask_ratio must be in (0, 1), got 1.5", NOTHING),
    Case("set-no-equals", "python -m repro.run micl --budget 1m --set train.batch_size",
         "repro: error: --set 'train.batch_size': expected key=value", NOTHING),
    Case("data-missing", "python -m repro.run micl --budget 1m --data /nonexistent/data",
         "repro: error: /nonexistent/data: data path does not exist", f"{NOTHING}; {SMOKE}"),
    Case("data-is-a-file", "python -m repro.run micl --budget 1m --data DATA",
         "repro: error: DATA: data path is not a directory", NOTHING, "data_file"),
    Case("data-empty", "python -m repro.run micl --budget 1m --data DATA",
         "repro: error: DATA: data directory is empty", NOTHING, "empty_dir"),
    Case("data-no-train-folder", "python -m repro.run micl --budget 1m --data DATA",
         "repro: error: DATA: no train/ folder", NOTHING, "no_train"),
    Case("data-empty-class-folder", "python -m repro.run micl --budget 1m --data DATA",
         "repro: error: DATA/train/b: empty class folder", NOTHING, "empty_class"),
    Case("image-corrupt-fail", f"{RUN} --set data.bad_images=fail",
         "repro: error: DATA/train/a/000-corrupt.jpg: cannot decode image (UnidentifiedImageError", NOTHING,
         "corrupt"),
    Case("image-corrupt-skip", f"{RUN} --set data.bad_images=skip",
         "skipped 1 unreadable images (data.bad_images=skip)", "exit 0: counted, warned, skipped; trains", "corrupt"),
    Case("image-truncated-fail", f"{RUN} --set data.bad_images=fail",
         "repro: error: DATA/train/b/005-truncated.jpg: cannot decode image (OSError: image file is truncated",
         NOTHING, "truncated"),
    Case("image-truncated-skip", f"{RUN} --set data.bad_images=skip",
         "skipped 1 unreadable images (data.bad_images=skip)", "exit 0: counted, warned, skipped; trains",
         "truncated"),
    Case("image-corrupt-fail-streaming", f"{RUN} --set data.bad_images=fail --set data.in_memory=no "
         "--set data.num_workers=1", "repro: error: DATA/train/a/000-corrupt.jpg: cannot decode image",
         "exit 2 at the first batch holding it (a DataLoader worker's error, one line); only config.json and "
         "plan.json written", "corrupt", ("config.json", "plan.json")),
    Case("image-modes", RUN, "micl: 2 steps",
         "exit 0: grayscale (L, LA), CMYK, RGBA, palette and 16-bit images are converted to RGB; trains", "modes"),
    Case("checkpoint-truncated", "python -m repro.run micl --budget 4steps",
         "repro: error: RUN/checkpoint.pt: unreadable checkpoint",
         "exit 2; the run directory and the records are left byte for byte as they were", "truncated_checkpoint"),
    Case("export-missing-key", KNN, "evals: error: EXPORT/backbone.safetensors: weights do not match the model: "
         "1 missing (norm.weight)", NOTHING, "export_missing_key"),
    Case("export-unexpected-key", KNN, "evals: error: EXPORT/backbone.safetensors: weights do not match the model: "
         "1 unexpected (head.weight)", NOTHING, "export_unexpected_key"),
    Case("export-other-architecture", KNN, "evals: error: EXPORT/backbone.safetensors: shape mismatch for "
         "cls_token: file (1, 1, 192) vs model (1, 1, 384)", NOTHING, "export_other_arch"),
    Case("export-fewer-blocks", KNN, "evals: error: EXPORT/backbone.safetensors: weights do not match the model: "
         "12 unexpected (blocks.1.attn.proj.bias", NOTHING, "export_fewer_blocks"),
    Case("export-no-metadata", KNN, "evals: error: EXPORT/backbone.json: missing", NOTHING, "export_no_meta"),
    Case("export-truncated-weights", KNN, "evals: error: EXPORT/backbone.safetensors: unreadable safetensors",
         NOTHING, "export_truncated"),
    Case("coco-json-without-annotations", "-", PENDING, f"{PENDING} (no COCO loader yet)"),
    Case("ade-mask-values-above-150", "-", PENDING, f"{PENDING} (no ADE20K loader yet)"),
]


# ----------------------------------------------------------------------------------------- builders


def _image(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def imagefolder(root: Path, per_class: int = 10) -> Path:
    """train/{a,b} with ``per_class`` 32-px JPEGs each, val/{a,b} with 2."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                _image(rng).save(root / split / c / f"{i + 1:03d}.jpg", quality=90)
    return root


def setup_data_file(tmp: Path) -> dict[str, Path]:
    (tmp / "data.txt").write_text("not a dataset\n")
    return {"DATA": tmp / "data.txt"}


def setup_empty_dir(tmp: Path) -> dict[str, Path]:
    (tmp / "data").mkdir()
    return {"DATA": tmp / "data"}


def setup_no_train(tmp: Path) -> dict[str, Path]:
    imagefolder(tmp / "data")
    (tmp / "data" / "train").rename(tmp / "data" / "training")
    return {"DATA": tmp / "data"}


def setup_empty_class(tmp: Path) -> dict[str, Path]:
    imagefolder(tmp / "data")
    for f in (tmp / "data" / "train" / "b").iterdir():
        f.unlink()
    return {"DATA": tmp / "data"}


def setup_corrupt(tmp: Path) -> dict[str, Path]:
    imagefolder(tmp / "data")  # the corrupt file sorts first: the size probe meets it before anything else
    (tmp / "data" / "train" / "a" / "000-corrupt.jpg").write_bytes(b"this is not an image\n" * 8)
    return {"DATA": tmp / "data"}


def setup_truncated(tmp: Path) -> dict[str, Path]:
    imagefolder(tmp / "data")
    buf = io.BytesIO()
    _image(np.random.default_rng(1)).save(buf, "JPEG", quality=90)
    (tmp / "data" / "train" / "b" / "005-truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return {"DATA": tmp / "data"}


def setup_modes(tmp: Path) -> dict[str, Path]:
    imagefolder(tmp / "data")
    rng = np.random.default_rng(2)
    d = tmp / "data" / "train"
    _image(rng).convert("L").save(d / "a" / "100-gray.png")
    _image(rng).convert("LA").save(d / "a" / "101-gray-alpha.png")
    _image(rng).convert("CMYK").save(d / "a" / "102-cmyk.jpg")
    _image(rng).convert("RGBA").save(d / "b" / "103-rgba.png")
    _image(rng).convert("P").save(d / "b" / "104-palette.png")
    Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)).save(d / "b" / "105-16bit.png")
    modes = {Image.open(p).mode for p in d.rglob("1*.*")}
    assert modes == {"L", "LA", "CMYK", "RGBA", "P", "I;16"}, modes
    return {"DATA": tmp / "data"}


def setup_truncated_checkpoint(tmp: Path) -> dict[str, Path]:
    """A run killed after its checkpoint, whose checkpoint.pt was then cut short (disk fault, partial copy)."""
    from repro.run import main

    assert main([*COMMON_RUN(tmp), "micl", "--budget", "4steps"]) == 0  # the case's own command, completed
    run = next((tmp / "runs" / "builtin-shapes" / "micl").iterdir())
    for name in (EXPORT_WEIGHTS, EXPORT_META, "train_summary.json"):
        (run / name).unlink()
    ckpt = run / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return {"RUN": run}


def _export(tmp: Path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    from repro.backbone import BackboneOptions, MaskedViT
    from repro.export import ExportMeta
    from tests.conftest import tiny_config

    model = tiny_config("micl").model
    bb = MaskedViT(model, BackboneOptions(pos_embed="sincos", init="mae"))
    meta = ExportMeta(timm_model=bb.timm_name, timm_kwargs=bb.timm_kwargs, img_size=bb.img_size,
                      patch_size=bb.patch_size, mean=(0.5,) * 3, std=(0.25,) * 3, method="micl", steps=0,
                      budget="-", budget_seconds=None, config_hash="", git_revision="")
    out = tmp / "export"
    export_backbone(out, bb.export_state_dict(), meta)
    _, state = read_export(out)
    return out, json.loads((out / EXPORT_META).read_text()), state


def _rewrite(out: Path, meta: dict | None = None, state: dict | None = None) -> dict[str, Path]:
    """The export with a wrong architecture written as such (its checksums name the new bytes): what is refused is the
    mismatch with the model, not a file that changed after it was written (setup_export_truncated is that case)."""
    from safetensors.torch import save_file

    from repro.checkpoint import write_checksum

    if meta is not None:
        (out / EXPORT_META).write_text(json.dumps(meta))
        write_checksum(out / EXPORT_META)
    if state is not None:
        save_file(state, str(out / EXPORT_WEIGHTS))
        write_checksum(out / EXPORT_WEIGHTS)
    return {"EXPORT": out}


def setup_export_missing_key(tmp: Path) -> dict[str, Path]:
    out, _, state = _export(tmp)
    del state["norm.weight"]
    return _rewrite(out, state=state)


def setup_export_unexpected_key(tmp: Path) -> dict[str, Path]:
    out, _, state = _export(tmp)
    state["head.weight"] = torch.zeros(10, 192)
    return _rewrite(out, state=state)


def setup_export_other_arch(tmp: Path) -> dict[str, Path]:
    out, meta, _ = _export(tmp)
    return _rewrite(out, meta={**meta, "timm_model": "vit_small_patch16_224"})


def setup_export_fewer_blocks(tmp: Path) -> dict[str, Path]:
    out, meta, _ = _export(tmp)
    assert meta["timm_kwargs"]["depth"] == SMALL["model.depth"] == 2
    return _rewrite(out, meta={**meta, "timm_kwargs": {**meta["timm_kwargs"], "depth": 1}})


def setup_export_no_meta(tmp: Path) -> dict[str, Path]:
    out, _, _ = _export(tmp)
    (out / EXPORT_META).unlink()
    return {"EXPORT": out}


def setup_export_truncated(tmp: Path) -> dict[str, Path]:
    out, _, _ = _export(tmp)
    w = out / EXPORT_WEIGHTS
    w.write_bytes(w.read_bytes()[:1000])
    return {"EXPORT": out}


SETUPS = {name[len("setup_"):]: fn for name, fn in globals().items() if name.startswith("setup_")}


def COMMON_RUN(tmp: Path) -> list[str]:  # noqa: N802 - reads like the constant it nearly is
    return ["--evals", "none", "--no-progress", "--no-report", "--out", str(tmp / "runs"), "--results",
            str(tmp / "results"), *sets()]


def COMMON_KNN(tmp: Path) -> list[str]:  # noqa: N802
    return ["--results", str(tmp / "results"), "--no-progress", "--set", "data.builtin_train=64",
            "--set", "data.builtin_test=32"]


# ----------------------------------------------------------------------------------------- tests

RUNNABLE = [c for c in CASES if not c.smoke and not c.pending]


def _fill(text: str, paths: dict[str, Path]) -> str:
    for key, p in paths.items():
        text = re.sub(rf"\b{key}\b", str(p), text)
    return text


@pytest.mark.parametrize("case", RUNNABLE, ids=lambda c: c.case)
def test_bad_input(case, tmp_path, capsys, caplog):
    from evals import knn
    from evals.cli import main as evals_main
    from repro.run import main as run_main

    paths = SETUPS[case.setup](tmp_path) if case.setup else {}
    argv = shlex.split(_fill(case.command, paths))
    assert argv[:2] == ["python", "-m"]
    if argv[2] == "repro.run":
        main, prefix, argv = run_main, "repro: error:", [*COMMON_RUN(tmp_path), *argv[3:]]
    else:
        assert argv[2] == "evals.knn"
        main, prefix = (lambda a: evals_main("knn", knn.__doc__, a)), "evals: error:"
        argv = [*COMMON_KNN(tmp_path), *argv[3:]]
    before = tree(tmp_path)
    caplog.set_level("INFO")
    warned = "warned" in case.behaviour
    with pytest.warns(UserWarning, match="skipping unreadable image .*/data/train/") if warned else nullcontext():
        rc, err = call_main(main, argv, capsys)
    expected = _fill(case.expected, paths)
    if case.expected.startswith(("repro: error:", "evals: error:")):
        assert rc == 2, err
        lines = [x for x in err.splitlines() if x.startswith(prefix)]
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, err
        after = tree(tmp_path)
        new = {k for k in after if k not in before}
        assert {Path(k).name for k in new} <= set(case.new_files), new
        assert {k: v for k, v in after.items() if k in before} == before  # nothing damaged
    else:
        assert rc == 0, err
        assert expected in caplog.text, caplog.text
        assert warned or "skipped" not in caplog.text  # odd image modes are converted, not skipped
        run = next((tmp_path / "runs").glob(f"*/micl/*/{EXPORT_WEIGHTS}"))
        assert run.stat().st_size > 0


def _md_rows() -> list[tuple[str, ...]]:
    rows = []
    for line in (HERE / "bad_inputs.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) == 4 and cells[0] not in ("case", "---") and not set(cells[0]) <= set("-: "):
            rows.append(tuple(c[1:-1] if c.startswith("`") and c.endswith("`") else c for c in cells))
    return rows


def test_table_mirrors_bad_inputs_md():
    assert _md_rows() == [(c.case, c.command, c.expected, c.behaviour) for c in CASES]


def test_smoke_rows_are_the_smoke_tests_cases():
    """Rows marked smoke are run by tests/smoke/test_cli.py: same arguments, and its needle is in our message."""
    from tests.smoke import test_cli

    mark = next(m for m in test_cli.test_bad_input_is_one_line_error.pytestmark if m.name == "parametrize")
    smoke = {tuple(args): needle for args, needle in mark.args[1]}
    for c in (c for c in CASES if c.smoke):
        args = tuple(shlex.split(c.command)[3:])
        assert args in smoke, c.case
        assert smoke[args] in c.expected, c.case
