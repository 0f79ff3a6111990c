"""No number typed by hand: hand-written notes take their numbers from the records through placeholders, and a check
finds any number in a results directory's markdown that the records do not give.

Placeholders in a hand-written ``NOTES.md`` (rendered into the directory's README by the report; the NOTES file keeps
the placeholders):

    {{cell METHOD EVAL BUDGET}}       mean ± std (n=k) of the top-1 over seeds, one decimal
                                      (each of these takes the training precision as an optional last word, and
                                      must where the records hold two: a mean over two precisions is an error)
    {{mean METHOD EVAL BUDGET}}       the mean alone, one decimal
    {{n METHOD EVAL BUDGET}}          how many seeds
    {{steps METHOD BUDGET}}           mean optimizer steps of the pre-training records
    {{hours PHASE}}                   total hours of one phase over the directory's records: ``pretrain`` (pre-training
                                      wall-clock) or an evaluation's name (its ``eval_seconds``); ``eval`` = all evals

``BUDGET`` is written as the records write it (``1.5e+13flop``); the random-init floor takes ``-``.

The check (:func:`check_results`, ``python -m repro.report --check``): (1) every file the report generates is what
the report makes from the records now, byte for byte (a number planted in a generated table, or a stale one, fails);
(2) the bench's tables (``throughput*.md``) are what ``repro.bench`` renders from the CSVs beside them, byte for
byte; (3) in every other markdown file of the directory (hand-written notes) each number outside code and placeholders
must be given directly by a record (a field's value at the precision written, or a number inside a record's text). A
mean, a difference or a ratio typed by hand is not in any record, so it fails: it must come from a placeholder or a
generated file.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from repro.config import ConfigError

PLACEHOLDER = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
NUMBER = re.compile(r"(?<![\w.\-/#])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[+-]?\d+)?(?![\w/])")
"""A standalone number: not part of a name (``CIFAR-10``, ``ViT-B/16``, ``top1``, ``1.5e13flop``, ``x4``)."""
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
_LINK_TARGET = re.compile(r"\]\([^)]*\)")
_COMMENT = re.compile(r"<!--.*?-->", re.S)


# --- placeholders ---------------------------------------------------------------------------------------------


def _select(df: pd.DataFrame, method: str, ev: str, budget: str, precision: str = "", where: str = "") -> pd.Series:
    sel = df[(df["method"] == method) & (df["eval"] == ev) & (df["metric"] == ("final_loss" if ev == "pretrain"
                                                                               else "top1"))]
    if budget != "-" or method != "random-init":
        sel = sel[sel["budget"] == budget]
    return _one_precision(sel, precision, where)["value"].astype(float)


def _one_precision(sel: pd.DataFrame, precision: str, where: str) -> pd.DataFrame:
    """``sel`` of one training precision: the one named, or the only one there is (never a mean over two)."""
    if "precision" not in sel:
        return sel
    if precision:
        return sel[sel["precision"].fillna("") == precision]
    found = sorted(set(sel["precision"].fillna("")))
    if len(found) > 1:
        raise ConfigError(f"{where}: these records hold several training precisions ({', '.join(found)}): name one "
                          "as the placeholder's last word")
    return sel


def _phase_hours(df: pd.DataFrame, phase: str) -> float:
    if phase == "pretrain":
        return float(df[df["eval"] == "pretrain"]["pretrain_seconds"].fillna(0).sum()) / 3600
    evs = df[df["eval"] != "pretrain"] if phase == "eval" else df[df["eval"] == phase]
    # one evaluation run writes several records (top1 and top5, ...): count each run once
    runs = evs.drop_duplicates(["method", "model", "budget", "seed", "eval", "eval_seconds"])
    return float(runs["eval_seconds"].fillna(0).sum()) / 3600


def render_placeholder(expr: str, df: pd.DataFrame, where: str = "") -> str:
    """The text of one ``{{...}}`` placeholder, computed from the records in ``df``."""
    parts = expr.split()
    fn, args = parts[0], parts[1:]
    arity = {"cell": 3, "mean": 3, "n": 3, "steps": 2, "hours": 1}
    if fn not in arity or len(args) not in (arity[fn], arity[fn] + (fn != "hours")):
        raise ConfigError(f"{where}: unknown placeholder {{{{{expr}}}}} (one of: cell|mean|n METHOD EVAL BUDGET "
                          "[PRECISION], steps METHOD BUDGET [PRECISION], hours PHASE)")
    precision = args[arity[fn]] if len(args) > arity[fn] else ""
    args = args[: arity[fn]]
    here = f"{where}: {{{{{expr}}}}}"
    if fn == "hours":
        return f"{_phase_hours(df, args[0]):.1f}"
    if fn == "steps":
        pre = df[(df["method"] == args[0]) & (df["eval"] == "pretrain") & (df["budget"] == args[1])]
        pre = _one_precision(pre, precision, here)
        if pre.empty:
            raise ConfigError(f"{here}: no pre-training records of {args[0]} at {args[1]}")
        return f"{pre['steps'].mean():.0f}"
    v = _select(df, args[0], args[1], args[2], precision=precision, where=here)
    if v.empty:
        raise ConfigError(f"{where}: {{{{{expr}}}}}: no records of {' '.join(args)}")
    if fn == "n":
        return str(len(v))
    if fn == "mean" or len(v) == 1:
        return f"{v.mean():.1f}" + (" (n=1)" if fn == "cell" else "")
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f} (n={len(v)})"


def render_notes(text: str, df: pd.DataFrame, where: str = "NOTES.md") -> str:
    """``text`` with its HTML comments dropped (notes to the editor) and its placeholders filled from ``df``."""
    text = re.sub(r"<!--.*?-->\n?", "", text, flags=re.S)
    return PLACEHOLDER.sub(lambda m: render_placeholder(m.group(1), df, where), text)


# --- the check ------------------------------------------------------------------------------------------------


def numbers_in(text: str) -> list[str]:
    """The standalone numbers of a markdown text, outside code, link targets, comments and placeholders."""
    for pat in (_CODE, _COMMENT, _LINK_TARGET, PLACEHOLDER):
        text = pat.sub(" ", text)
    return [m.group(0) for m in NUMBER.finditer(text)]


def _as_float(token: str) -> float:
    return float(token.replace(",", "").replace("−", "-").lstrip("+"))


def _decimals(token: str) -> int:
    mant = token.lower().split("e")[0]
    return len(mant.split(".")[1]) if "." in mant else 0


def given_numbers(records: pd.DataFrame) -> tuple[set[float], list[float]]:
    """What records give: every number inside their text fields (exactly), and their numeric values (matched at the
    precision a number is written with)."""
    exact: set[float] = set()
    values: list[float] = []
    for col in records.columns:
        for v in records[col].dropna():
            if isinstance(v, bool):
                continue
            if isinstance(v, int | float):
                if math.isfinite(float(v)):
                    values.append(float(v))
            else:
                exact.update(abs(_as_float(t)) for t in re.findall(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", str(v)))
    return exact, values


def _given(token: str, exact: set[float], values: list[float]) -> bool:
    x = abs(_as_float(token))
    if x in exact:
        return True
    d = _decimals(token)
    return any(abs(round(v, d) - x) < 1e-9 or abs(round(abs(v), d) - x) < 1e-9 for v in values)


def _records_of(results_dir: Path) -> pd.DataFrame:
    from repro.records import read_all

    recs, _ = read_all(results_dir / "records")
    return pd.DataFrame([r.__dict__ for r in recs])


def unsupported_numbers(text: str, records: pd.DataFrame) -> list[str]:
    exact, values = given_numbers(records)
    return [t for t in numbers_in(text) if not _given(t, exact, values)]


def results_dirs(root: Path) -> list[Path]:
    """Every results directory under ``root`` (a directory with ``records/``), ``root`` first."""
    return sorted({p.parent for p in Path(root).rglob("records") if p.is_dir()}, key=lambda p: (len(p.parts), p))


def _inputs(results_dir: Path) -> list[Path]:
    """What the report reads in one results directory (copied to regenerate it elsewhere)."""
    from repro.report import ABOUT_INPUTS

    return [results_dir / n for n in ("records", "curves", "reference.csv", *ABOUT_INPUTS)
            if (results_dir / n).exists()]


def check_generated(results_dir: Path) -> tuple[list[str], set[Path]]:
    """Regenerate ``results_dir`` from its records in a scratch copy; one problem per generated file that differs
    from the committed one. Returns the problems and the generated files' paths (in ``results_dir``)."""
    from repro.report import generate

    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "r"
        copy.mkdir()
        for p in _inputs(results_dir):
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, copy / p.name)
        written = generate(copy)
        generated = set()
        for w in written:
            rel = w.relative_to(copy)
            mine = results_dir / rel
            generated.add(mine)
            if not mine.exists():
                problems.append(f"{mine}: the report generates it but it is not committed")
            elif mine.read_bytes() != w.read_bytes():
                problems.append(f"{mine}: differs from what `python -m repro.report --results {results_dir}` "
                                "generates from the records (a number typed or changed by hand, or stale)")
    return problems, generated


def check_results(root: Path) -> list[str]:
    """Every problem with the numbers of the markdown under ``root`` (a ``results/`` tree); empty when clean."""
    problems: list[str] = []
    dirs = results_dirs(root)
    nested = set(dirs)
    for d in dirs:
        gen_problems, generated = check_generated(d)
        problems += gen_problems
        records = _records_of(d)
        for md in sorted(d.glob("*.md")):
            if md in generated:
                continue
            text = md.read_text()
            if md.stem.startswith("throughput"):  # the bench's tables: generated from the CSVs beside them
                from repro.bench.tables import render_from_csvs

                expected = render_from_csvs(md)
                if expected is None:
                    problems.append(f"{md}: a bench table without the CSV it is generated from")
                elif expected != text:
                    problems.append(f"{md}: differs from what `python -m repro.bench` generates from the CSVs beside "
                                    "it (a number typed or changed by hand, or stale)")
                continue
            for t in unsupported_numbers(text, records):
                problems.append(f"{md}: the number {t} is not given by the records: take it from a placeholder or "
                                "a generated file")
    # markdown outside any results directory's own level (e.g. results/foo/notes.md without records) has no source
    for md in sorted(Path(root).rglob("*.md")):
        if md.parent not in nested and not any(md.is_relative_to(d / "curves") for d in dirs):
            nums = numbers_in(md.read_text())
            if nums:
                problems.append(f"{md}: numbers ({', '.join(nums[:5])}) in a directory without records")
    return problems


_README_BLOCK = re.compile(r"<!-- numbers from: ([^>]*?) -->(.*?)<!-- end numbers -->", re.S)


def check_readme(readme: Path, read: Callable[[Path], str] | None = None) -> list[str]:
    """Numbers in the README's marked blocks (``<!-- numbers from: FILE ... -->`` ... ``<!-- end numbers -->``) must
    each appear in one of the generated files the block names (which :func:`check_results` ties to the records); a
    README with numbers in results tables outside such a block is caught by its reviewers, not here."""
    problems = []
    text = readme.read_text()
    for m in _README_BLOCK.finditer(text):
        sources = [readme.parent / f for f in m.group(1).split()]
        missing = [str(f) for f in sources if not f.is_file()]
        if missing:
            problems.append(f"{readme}: the block cites {', '.join(missing)}, which does not exist")
            continue
        given = {t for f in sources for t in NUMBER.findall((read or Path.read_text)(f))}
        given |= {t.lstrip("+-−") for t in given}
        for t in numbers_in(m.group(2)):
            if t not in given and t.lstrip("+-−") not in given:
                problems.append(f"{readme}: the number {t} is not in {' or '.join(m.group(1).split())}")
    return problems
