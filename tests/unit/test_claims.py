"""Claims as data (repro.report.claims): intervals, verdicts, premises, and the 'reaches' fraction."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from repro.config import ConfigError
from repro.report.claims import (
    CANNOT_TELL,
    CONTRADICTED,
    NOT_TESTABLE,
    SUPPORTED,
    Claim,
    check_beats,
    check_reaches,
    claims_markdown,
    crossing,
    load_claims,
    reaches_verdict,
    welch_interval,
)


def rows(method: str, ev: str, budget: str, values: list[float], steps: int = 500, note: str = "") -> list[dict]:
    out = []
    for seed, v in enumerate(values):
        out.append(dict(method=method, eval=ev, metric="top1", budget=budget, seed=seed, value=v, eval_key="",
                        steps=None, note=""))
        if method != "random-init" and ev == "knn":
            out.append(dict(method=method, eval="pretrain", metric="final_loss", budget=budget, seed=seed, value=1.0,
                            eval_key="", steps=steps, note=note))
    return out


def frame(*parts: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame([r for p in parts for r in p])
    key = ["method", "eval", "metric", "budget", "seed"] + (["precision"] if "precision" in df else [])
    return df.drop_duplicates(key)


def test_welch_interval_matches_scipy():
    a, b = (40.1, 41.3, 40.7, 42.0), (38.2, 39.9, 37.5)
    w = welch_interval(a, b)
    assert w is not None
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert w.low == pytest.approx(ci.low) and w.high == pytest.approx(ci.high)
    assert w.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert welch_interval((1.0,), b) is None


def test_verdicts_follow_the_interval_and_need_three_seeds():
    floor = rows("random-init", "knn", "-", [30.0, 30.5, 29.5])
    c = Claim(id="x", kind="beats", a="m", b="random-init", evals=("knn",), budget="1e12flop")
    up = check_beats(frame(rows("m", "knn", "1e12flop", [40.0, 41.0, 40.5]), floor), c, "knn")
    assert up.verdict == SUPPORTED and "Welch" in up.interval
    down = check_beats(frame(rows("m", "knn", "1e12flop", [20.0, 21.0, 20.5]), floor), c, "knn")
    assert down.verdict == CONTRADICTED
    same = check_beats(frame(rows("m", "knn", "1e12flop", [29.0, 31.0, 30.4]), floor), c, "knn")
    assert same.verdict == CANNOT_TELL
    # two seeds: an interval far from zero still gives no verdict
    two = check_beats(frame(rows("m", "knn", "1e12flop", [40.0, 41.0]), floor), c, "knn")
    assert two.verdict == CANNOT_TELL and "≥ 3 seeds" in two.reason


def test_an_unmet_premise_is_not_testable_with_its_reason():
    floor = rows("random-init", "knn", "-", [30.0, 30.5, 29.5])
    c = Claim(id="x", kind="beats", a="m", b="random-init", evals=("knn",), budget="1e12flop", min_steps=100,
              why="warm-up")
    r = check_beats(frame(rows("m", "knn", "1e12flop", [40.0, 41.0, 40.5], steps=39), floor), c, "knn")
    assert r.verdict == NOT_TESTABLE and "39 optimizer steps" in r.reason and "warm-up" in r.reason
    teacher = "budget 1e12flop = stage 1 mocov3 teacher 5e11flop (19 steps, 60s) + stage 2 student"
    c2 = Claim(id="y", kind="beats", a="m", b="random-init", evals=("knn",), budget="1e12flop", min_teacher_steps=50)
    r2 = check_beats(frame(rows("m", "knn", "1e12flop", [40.0, 41.0, 40.5], note=teacher), floor), c2, "knn")
    assert r2.verdict == NOT_TESTABLE and "teacher trained 19 steps" in r2.reason


def test_arms_with_different_evaluation_settings_are_not_compared():
    df = frame(rows("a", "knn", "1e12flop", [40.0, 41.0, 40.5]), rows("b", "knn", "1e12flop", [30.0, 31.0, 30.5]))
    df.loc[df["method"] == "b", "eval_key"] = "other"
    df.loc[(df["method"] == "a") & (df["eval"] == "knn"), "eval_key"] = "mine"
    r = check_beats(df, Claim(id="x", kind="beats", a="a", b="b", evals=("knn",), budget="1e12flop"), "knn")
    assert r.verdict == NOT_TESTABLE and "different evaluation settings" in r.reason


def test_crossing_is_log_linear_and_censored_at_the_ends():
    assert crossing([1e12, 1e13], [10.0, 20.0], 15.0) == pytest.approx(math.sqrt(1e12 * 1e13))
    assert crossing([1e12, 1e13], [10.0, 20.0], 5.0) == -math.inf
    assert crossing([1e12, 1e13], [10.0, 20.0], 25.0) == math.inf


def curve(method: str, means: dict[str, float], spread: float = 0.3) -> list[dict]:
    out = []
    for budget, m in means.items():
        out += rows(method, "knn", budget, [m - spread, m, m + spread])
    return out


def test_reaches_needs_the_target_above_the_floor():
    floor = rows("random-init", "knn", "-", [30.0, 30.5, 29.5])
    a = curve("a", {"1e12flop": 31.0, "1e13flop": 40.0})
    b = curve("b", {"1e12flop": 28.0, "1e13flop": 30.2})  # at the floor: an untrained network 'reaches' it
    r = check_reaches(frame(a, b, floor), Claim(id="r", kind="reaches", a="a", b="b", evals=("knn",)), "knn")
    assert r.verdict == NOT_TESTABLE and "does not clear the random-init floor" in r.reason


def test_reaches_reports_the_fraction_with_an_interval():
    floor = rows("random-init", "knn", "-", [30.0, 30.5, 29.5])
    a = curve("a", {"1e12flop": 32.0, "1e13flop": 42.0, "1e14flop": 50.0})
    b = curve("b", {"1e13flop": 33.0, "1e14flop": 37.0})
    c = Claim(id="r", kind="reaches", a="a", b="b", evals=("knn",), paper_fraction=0.33)
    r = check_reaches(frame(a, b, floor), c, "knn")
    # a's mean curve crosses 37 at 10^(12 + 5/10) FLOPs = 3.16e12, i.e. 0.0316 of b's 1e14
    assert "0.0316" in r.interval
    assert r.verdict == SUPPORTED
    assert any("outside" in e for e in r.extra)


def test_reaches_with_a_curve_that_never_gets_there_is_censored_not_nan():
    floor = rows("random-init", "knn", "-", [44.0, 44.5, 43.5])
    b = curve("b", {"1e13flop": 46.0, "1e14flop": 50.0})
    a = curve("a", {"1e12flop": 45.0, "1e13flop": 46.5})  # stops at 0.1 of b's budget, below 50
    c = Claim(id="r", kind="reaches", a="a", b="b", evals=("knn",))
    r = check_reaches(frame(a, b, floor), c, "knn")
    assert "nan" not in r.interval and "> 0.1 (not reached within its budgets)" in r.interval
    assert r.verdict == CANNOT_TELL and "a longer curve of a would tell" in r.reason
    # the same curve carried on to b's own budget and still short: a needs more than b's compute, contradicted
    a = curve("a", {"1e12flop": 45.0, "1e13flop": 46.5, "1e14flop": 47.0})
    r = check_reaches(frame(a, b, floor), c, "knn")
    assert "nan" not in r.interval and "> 1 (not reached within its budgets)" in r.interval
    assert r.verdict == CONTRADICTED


def test_reaches_verdict_reads_censored_ends():
    inf = math.inf
    assert reaches_verdict(0.05, 0.2, 0.01, 1.0) == SUPPORTED
    assert reaches_verdict(-inf, -inf, 0.01, 1.0) == SUPPORTED  # already reached at 1% of b's compute
    assert reaches_verdict(-inf, -inf, 2.0, 3.0) == CANNOT_TELL  # 'at or below 2x b's compute' is not a fraction < 1
    assert reaches_verdict(0.5, inf, 0.01, 1.0) == CANNOT_TELL
    assert reaches_verdict(inf, inf, 0.01, 0.33) == CANNOT_TELL  # the curve stopped at a third of b's budget
    assert reaches_verdict(inf, inf, 0.01, 1.0) == CONTRADICTED
    assert reaches_verdict(1.2, 1.8, 0.01, 3.0) == CONTRADICTED


def test_load_claims_rejects_bad_declarations(tmp_path):
    p = tmp_path / "claims.toml"
    p.write_text('[[claim]]\nid = "x"\nkind = "wins"\na = "a"\nb = "b"\nevals = ["knn"]\n')
    with pytest.raises(ConfigError, match="kind must be one of"):
        load_claims(p)
    p.write_text('[[claim]]\nid = "x"\nkind = "beats"\na = "a"\nb = "b"\nevals = ["knn"]\nbudgett = "1"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_claims(p)
    p.write_text('[[claim]]\nid = "x"\nkind = "beats"\na = "a"\nb = "b"\nevals = ["knn"]\n')
    with pytest.raises(ConfigError, match="needs 'budget'"):
        load_claims(p)
    assert load_claims(tmp_path / "absent.toml") == []


def test_claims_markdown_has_every_row_against_the_floor():
    df = frame(rows("random-init", "knn", "-", [30.0, 30.5, 29.5]), rows("m", "knn", "1e12flop", [40.0, 41.0]))
    md = "\n".join(claims_markdown(df, [], "d"))
    assert "| m at 1e12flop | knn | 2 vs 3 |" in md and "cannot tell" in md


def with_precision(parts: list[dict], precision: str) -> list[dict]:
    return [dict(r, precision=precision) for r in parts]


def test_matches_is_an_equivalence_test_between_precisions():
    fp32 = with_precision(rows("m", "knn", "1e12flop", [40.0, 40.4, 39.8, 40.2]), "fp32")
    near = with_precision(rows("m", "knn", "1e12flop", [40.1, 40.3, 39.9, 40.0]), "bf16")
    c = Claim(id="p", kind="matches", a="m", b="m", evals=("knn",), budget="1e12flop", a_precision="bf16",
              b_precision="fp32", margin=1.0)
    r = check_beats(frame(fp32, near), c, "knn")
    assert r.verdict == SUPPORTED and "margin ±1" in r.interval
    far = with_precision(rows("m", "knn", "1e12flop", [35.0, 35.2, 34.9, 35.1]), "bf16")
    assert check_beats(frame(fp32, far), c, "knn").verdict == CONTRADICTED
    # without choosing a precision, mixed precisions are not compared
    mixed = Claim(id="q", kind="beats", a="m", b="random-init", evals=("knn",), budget="1e12flop")
    floor = rows("random-init", "knn", "-", [30.0, 30.5, 29.5])
    assert check_beats(frame(fp32, far, floor), mixed, "knn").verdict == NOT_TESTABLE


def test_floor_checks_and_tables_keep_precisions_apart():
    from repro.report.tables import dataset_table

    fp32 = with_precision(rows("m", "knn", "1e12flop", [40.0, 40.4, 39.8]), "fp32")
    bf16 = with_precision(rows("m", "knn", "1e12flop", [35.0, 35.2, 34.9]), "bf16")
    floor = with_precision(rows("random-init", "knn", "-", [30.0, 30.5, 29.5]), "")
    df = frame(fp32, bf16, floor)
    md = "\n".join(claims_markdown(df, [], "d"))
    assert "| m at 1e12flop (fp32) | knn | 3 vs 3 |" in md and "| m at 1e12flop (bf16) | knn | 3 vs 3 |" in md
    df["model"], df["dataset"] = "vit", "d"
    for col in ("epochs", "pretrain_seconds", "images_per_second", "device_hours"):
        df[col] = 1.0
    table = dataset_table(df)
    assert sorted(table[table["method"] == "m"]["precision"]) == ["bf16", "fp32"]


def test_a_variant_of_the_recipe_is_its_own_row_and_arm():
    """A run with ``--set method.augment=none`` records its variant; the report names its rows ``micl[augment=none]``,
    never averaged with (or replacing) the recipe's rows of the same method, budget and seed."""
    from repro.records import ResultRecord
    from repro.report.tables import dataset_table, method_order, records_frame

    recs = []
    for variant, values in (("", [40.0, 40.4, 39.8]), ("augment=none", [41.0, 41.2, 41.4])):
        for seed, v in enumerate(values):
            common = dict(method="micl", model="vit", dataset="d", budget="1e12flop", seed=seed, variant=variant,
                          time=f"2026-01-0{seed + 1}T00:00:0{int(bool(variant))}", config_hash=f"h{variant}{seed}")
            recs += [ResultRecord(eval="pretrain", metric="final_loss", value=1.0, steps=500, epochs=1.0,
                                  pretrain_seconds=1.0, images_per_second=1.0, device_hours=1.0, **common),
                     ResultRecord(eval="knn", metric="top1", value=v, **common)]
    df = records_frame(recs)
    assert set(df["method"]) == {"micl", "micl[augment=none]"} and set(df["run_method"]) == {"micl"}
    table = dataset_table(df)
    assert list(table["method"]) == ["micl", "micl[augment=none]"]
    assert list(table["knn top1"]) == ["40.07 ± 0.31", "41.20 ± 0.20"]
    assert method_order(["random-init", "mae", "micl[augment=none]", "micl"]) == [
        "micl", "micl[augment=none]", "mae", "random-init"]
    c = Claim(id="aug", kind="matches", a="micl[augment=none]", b="micl", evals=("knn",), budget="1e12flop",
              margin=0.5)
    r = check_beats(df, c, "knn")
    assert (r.a.values, r.b.values) == ((41.0, 41.2, 41.4), (40.0, 40.4, 39.8)) and r.verdict == CONTRADICTED


def test_a_run_config_names_how_it_differs_from_its_recipe():
    from repro.recipes import build_config

    assert build_config("micl", "cifar10-cpu").variant() == ""
    assert build_config("micl", "cifar10-cpu", {"method.augment": "none"}).variant() == "augment=none"
    assert build_config("micl", "cifar10-cpu", {"train.precision": "bf16"}).variant() == ""  # its own column
    assert build_config("mae", "cifar10-cpu", {"method.decoder_depth": 2, "train.base_lr": 3e-3}).variant() == (
        "decoder_depth=2,train.base_lr=0.003")
    assert build_config("micl", "tiny", {"model.depth": 2}).variant() == "model.depth=2"
    # the teacher a prerequisite stage trains for each run is a path, not a setting
    assert build_config("mimco", "cifar10-cpu", {"method.teacher": "/runs/s0/stage1-mocov3"}).variant() == ""
    assert build_config("mimco", "cifar10-cpu", {"method.stage1_fraction": 0.25}).variant() == "stage1_fraction=0.25"


def test_no_worse_is_a_non_inferiority_test():
    """'x is not needed': dropping it must not cost more than the margin. Better counts as supported (unlike
    'matches'); a resolved loss beyond the margin contradicts; an interval across -margin cannot tell."""
    base = rows("m", "knn", "1e12flop", [40.0, 40.4, 39.8])
    c = Claim(id="n", kind="no-worse", a="v", b="m", evals=("knn",), budget="1e12flop", margin=1.0)
    better = rows("v", "knn", "1e12flop", [41.0, 41.2, 41.4])
    assert check_beats(frame(base, better), c, "knn").verdict == SUPPORTED
    assert check_beats(frame(base, better), replace(c, kind="matches"), "knn").verdict == CONTRADICTED
    assert check_beats(frame(base, rows("v", "knn", "1e12flop", [37.0, 37.2, 36.9])), c, "knn").verdict == CONTRADICTED
    wide = rows("v", "knn", "1e12flop", [38.0, 40.5, 39.0])
    r = check_beats(frame(base, wide), c, "knn")
    assert r.verdict == CANNOT_TELL and "margin −1" in r.interval
    two = rows("v", "knn", "1e12flop", [41.0, 41.2])
    assert check_beats(frame(base, two), c, "knn").verdict == CANNOT_TELL  # two seeds: no verdict


def test_no_worse_needs_a_margin(tmp_path):
    p = tmp_path / "claims.toml"
    p.write_text('[[claim]]\nid = "n"\nkind = "no-worse"\na = "v"\nb = "m"\nbudget = "1e12flop"\nevals = ["knn"]\n')
    with pytest.raises(ConfigError, match="margin"):
        load_claims(p)
