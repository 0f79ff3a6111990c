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
