"""Dependencies run one way: ``repro``'s core never imports ``evals``; evaluations never import the trainer or the
orchestrators. ``repro.run`` (the CLI) and ``repro.evaluate`` (the evaluation loop) are the modules above both."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ORCHESTRATORS = {"repro/run.py", "repro/evaluate.py"}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_core_never_imports_evals():
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p in sorted((ROOT / "repro").rglob("*.py"))
           if str(p.relative_to(ROOT)) not in ORCHESTRATORS
           for m in imports(p) if m == "evals" or m.startswith("evals.")]
    assert not bad, bad


def test_evals_never_import_the_trainer_or_the_orchestrators():
    above = ("repro.run", "repro.report", "repro.bench", "repro.trainer")
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p in sorted((ROOT / "evals").rglob("*.py"))
           for m in imports(p) if any(m == a or m.startswith(a + ".") for a in above)]
    assert not bad, bad
    assert "evals.registry" in imports(ROOT / "repro" / "evaluate.py")  # the bridge, so the test can fail
