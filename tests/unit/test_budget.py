from __future__ import annotations

import pytest

from repro.budget import BudgetError, parse_budget, steps_for_budget


@pytest.mark.parametrize(("spec", "kind", "amount"), [
    ("3m", "time", 180), ("90s", "time", 90), ("2h", "time", 7200), ("133h", "time", 133 * 3600),
    ("2d", "time", 172800), ("1.5m", "time", 90), ("300ep", "epochs", 300), ("5000steps", "steps", 5000),
    ("200steps", "steps", 200), ("2e18flop", "flop", 2e18),
])
def test_parse(spec, kind, amount):
    b = parse_budget(spec)
    assert (b.kind, b.amount) == (kind, pytest.approx(amount))


@pytest.mark.parametrize("spec", ["5", "5x", "-3h", "0m", "", "m", "1.5steps", "3 parsecs", "nanm"])
def test_bad_budgets_are_errors(spec):
    with pytest.raises(BudgetError, match="--budget"):
        parse_budget(spec)


def test_steps_for_budget():
    assert steps_for_budget(parse_budget("10ep"), steps_per_epoch=39, global_batch=128) == 390
    assert steps_for_budget(parse_budget("7steps"), steps_per_epoch=39, global_batch=128) == 7
    assert steps_for_budget(parse_budget("90s"), steps_per_epoch=39, global_batch=128, seconds_per_step=0.2) == 450
    assert steps_for_budget(parse_budget("1e12flop"), steps_per_epoch=1, global_batch=100,
                            flops_per_image=1e9) == 10
    with pytest.raises(BudgetError):
        steps_for_budget(parse_budget("90s"), steps_per_epoch=1, global_batch=1)


def test_the_config_parses_the_budget_once_and_hashes_its_text():
    from repro.config import ConfigError, apply_overrides
    from tests.conftest import tiny_config

    cfg = apply_overrides(tiny_config("micl"), {"budget.spec": "90s"})
    assert cfg.budget.spec == parse_budget("90s") and cfg.budget.spec.seconds == 90.0
    assert cfg.to_dict()["budget"]["spec"] == "90s" and str(cfg.budget.spec) == "90s"
    assert apply_overrides(cfg, {"budget.spec": cfg.budget.spec}) == cfg  # a parsed budget passes through as is
    with pytest.raises(BudgetError, match="--budget '5x': unknown unit"):  # not re-worded as a ConfigError
        apply_overrides(cfg, {"budget.spec": "5x"})
    assert not issubclass(BudgetError, ConfigError)


def test_the_budget_string_is_parsed_in_one_place():
    """Only the config parses a budget string (``--budget``, ``--set budget.spec=``); everything after it receives the
    parsed :class:`Budget`. The report and ``repro.results`` parse the budget column of records read from disk."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    callers = sorted(str(p.relative_to(root)) for pkg in ("repro", "baselines", "evals")
                     for p in (root / pkg).rglob("*.py") if re.search(r"\bparse_budget\(", p.read_text())
                     and p.name != "budget.py")
    readers = [c for c in callers if c.startswith("repro/report/") or c == "repro/results.py"]
    assert [c for c in callers if c not in readers] == ["repro/config.py"]
    assert len(re.findall(r"\bparse_budget\(", (root / "repro" / "config.py").read_text())) == 1
