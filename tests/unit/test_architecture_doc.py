"""ARCHITECTURE.md stays a true map: it names every module under ``repro/``, ``baselines/`` and ``evals/`` by its path
(``repro/bench/steps.py``; every ``.py`` file but ``__init__.py`` and ``__main__.py``), it names no such path that does
not exist, and each dotted name it uses (``repro.run``, ``evals.dense.check_ready``) resolves to a module, a package
or a name a package's ``__init__`` defines. Nothing is imported: the files are read as text."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "ARCHITECTURE.md"
PACKAGES = ("repro", "baselines", "evals")
EXEMPT = {"__init__.py", "__main__.py"}
PATH = re.compile(r"(?<![\w./-])((?:repro|baselines|evals)/[\w/]*\.py)\b")
DOTTED = re.compile(r"(?<![\w./-])((?:repro|baselines|evals)(?:\.\w+)+)")


def modules(root: Path = ROOT) -> set[str]:
    """Every module file the doc must name, as a path relative to ``root``."""
    return {p.relative_to(root).as_posix() for pkg in PACKAGES for p in (root / pkg).rglob("*.py")
            if p.name not in EXEMPT}


@cache
def _package_names(init: Path) -> frozenset[str]:
    """Names defined at the top level of a package's ``__init__.py`` (defs, classes, assignments, imports)."""
    out: set[str] = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return frozenset(out)


def resolves(dotted: str, root: Path = ROOT) -> bool:
    """``a.b.c`` names a package, a module (anything after a module is taken to be a name in it), or a name the
    last package's ``__init__.py`` defines."""
    first, *rest = dotted.split(".")
    path = root / first
    for part in rest:
        if (path / part / "__init__.py").is_file():
            path = path / part
        elif (path / f"{part}.py").is_file():
            return True
        else:
            return part in _package_names(path / "__init__.py")
    return True


def problems(doc: str, root: Path = ROOT) -> list[str]:
    named = set(PATH.findall(doc))
    out = [f"ARCHITECTURE.md does not name {m} (say where it is and its job in one line)"
           for m in sorted(modules(root) - named)]
    out += [f"ARCHITECTURE.md names {p}, which does not exist" for p in sorted(named) if not (root / p).is_file()]
    out += [f"ARCHITECTURE.md names {d}, which is no module, package or package-level name"
            for d in sorted(set(DOTTED.findall(doc))) if not resolves(d, root)]
    return out


def test_architecture_doc_names_every_module_and_nothing_stale():
    assert not problems(DOC.read_text()), problems(DOC.read_text())


def test_the_check_fails_on_a_missing_or_stale_module():
    doc = DOC.read_text()
    assert "repro/seeds.py" in doc
    assert problems(doc.replace("repro/seeds.py", "")) == [
        "ARCHITECTURE.md does not name repro/seeds.py (say where it is and its job in one line)"]
    assert problems(doc + "\n`repro/bench_data.py` — gone.\n") == [
        "ARCHITECTURE.md names repro/bench_data.py, which does not exist"]
    assert problems(doc + "\n`python -m repro.bench_data OUT N`\n") == [
        "ARCHITECTURE.md names repro.bench_data, which is no module, package or package-level name"]
    assert problems(doc + "\n`evals.dense.check_ready`, `repro.report.generate`, `evals.registry.EVALS`\n") == []


def test_every_module_counts():
    found = modules()
    assert {"repro/run.py", "repro/bench/steps.py", "evals/dense/launch.py", "baselines/mae.py",
            "evals/segmentation/configs/upernet_vit_ade20k.py"} <= found
    assert not any(Path(m).name in EXEMPT for m in found)
