"""Claims as data: each declared comparison tested on the records, with n per arm, a 95% interval and a verdict.

A results directory declares what it tests in ``claims.toml`` (optional); every results directory also gets the
floor check, undeclared: each trained row against the random-init backbone of the same model, per evaluation.

Kinds of claim (``kind`` in a ``[[claim]]`` table):

- ``beats`` — ``a`` has a higher mean than ``b`` on each of ``evals`` at ``budget`` (``b = "random-init"``: the
  floor, whatever the budget). The interval is Welch's t on the difference of the seed means (unequal variances,
  Welch-Satterthwaite degrees of freedom, stated).
- ``matches`` — ``a`` and ``b`` (e.g. one method trained in bf16 and in fp32: ``a_precision``/``b_precision``) reach
  the same accuracy: *supported* when the whole Welch interval lies within ±``margin`` points, *contradicted* when it
  excludes zero (a difference the seeds resolve), *cannot tell* otherwise.
- ``no-worse`` — ``a`` is not worse than ``b`` by more than ``margin`` points (non-inferiority: a claim that
  something is *not needed*): *supported* when the Welch interval's lower end is above −``margin``, *contradicted*
  when its upper end is below −``margin`` (worse by more than the margin, resolved), *cannot tell* otherwise.
- ``reaches`` — ``a`` reaches ``b``'s accuracy at ``b``'s largest measured budget at a fraction of ``b``'s compute
  (FLOP budgets). Computed only where that target clears the floor by a margin its own interval resolves; the
  fraction is read off ``a``'s curve of seed means (log-linear between measured budgets) and its 95% interval comes
  from a bootstrap over seeds (every arm's seeds resampled with replacement per budget, the target with them; a
  fixed generator, so the report is reproducible byte for byte).

Verdicts: *supported* (the interval excludes zero on the claimed side; for ``reaches``: the whole interval below a
fraction of 1), *contradicted* (it excludes zero on the other side), *cannot tell* (it contains zero, or an arm has
fewer than :data:`MIN_SEEDS` seeds: no other verdict is given then), *not testable at this scale* (a premise the
claim declares is unmet, with the reason). Only records are read: every number printed here is computed from them.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from repro.budget import BudgetError, parse_budget
from repro.config import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

MIN_SEEDS = 3
"""Seeds per arm below which the verdict is always 'cannot tell'."""
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 4000
FLOOR = "random-init"
KINDS = ("beats", "reaches", "matches", "no-worse")

SUPPORTED, CONTRADICTED, CANNOT_TELL, NOT_TESTABLE = ("supported", "contradicted", "cannot tell",
                                                      "not testable at this scale")


@dataclass(frozen=True)
class Claim:
    """One declared comparison (a ``[[claim]]`` table of ``claims.toml``)."""

    id: str
    kind: str
    a: str
    b: str
    evals: tuple[str, ...]
    says: str = ""
    """The claim in its source's words (what is being tested)."""
    source: str = ""
    """Who claims it (paper, section)."""
    budget: str = ""
    """``beats``: the budget both arms are compared at (ignored for the floor arm)."""
    metric: str = "top1"
    a_label: str = ""
    """Display names (default: the method names)."""
    b_label: str = ""
    a_precision: str = ""
    """Only ``a``'s records of this training precision ('fp32' / 'bf16'; '' = any, and mixed precisions are then not
    compared)."""
    b_precision: str = ""
    margin: float = 0.0
    """``matches``: the largest difference (points) that still counts as the same accuracy."""
    min_steps: int = 0
    """Premise: every seed of each trained arm ran at least this many optimizer steps."""
    min_teacher_steps: int = 0
    """Premise (two-stage methods): the teacher stage ran at least this many steps (read from the record's note)."""
    paper_fraction: float | None = None
    """``reaches``: the fraction the paper reports (shown against the interval; the verdict is on a fraction < 1)."""
    why: str = ""
    """Why the premises are what they are (printed with a 'not testable' verdict)."""

    @property
    def label_a(self) -> str:
        return self.a_label or self.a

    @property
    def label_b(self) -> str:
        return self.b_label or ("the random-init floor" if self.b == FLOOR else self.b)


def load_claims(path: Path) -> list[Claim]:
    """The claims declared in ``path`` (a TOML file of ``[[claim]]`` tables); none when it does not exist."""
    if not path.is_file():
        return []
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    out = []
    known = {f for f in Claim.__dataclass_fields__}
    for i, c in enumerate(doc.get("claim", [])):
        where = f"{path}: claim {i + 1}"
        unknown = set(c) - known
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        for k in ("id", "kind", "a", "b", "evals"):
            if k not in c:
                raise ConfigError(f"{where}: missing '{k}'")
        if c["kind"] not in KINDS:
            raise ConfigError(f"{where}: kind must be one of {', '.join(KINDS)}, got {c['kind']!r}")
        if c["kind"] != "reaches" and c["b"] != FLOOR and not c.get("budget"):
            raise ConfigError(f"{where}: a '{c['kind']}' claim between two arms needs 'budget'")
        if c["kind"] in ("matches", "no-worse") and not c.get("margin", 0) > 0:
            raise ConfigError(f"{where}: a 'matches' claim needs a positive 'margin' (points)")
        out.append(Claim(**{**c, "evals": tuple(c["evals"])}))
    ids = [c.id for c in out]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: claim ids must be unique")
    return out


# --- statistics -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    label: str
    values: tuple[float, ...]
    seeds: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan

    def text(self) -> str:
        if not self.values:
            return f"{self.label}: no records"
        spread = f" ± {self.std:.2f}" if self.n > 1 else ""
        return f"{self.label} {self.mean:.2f}{spread} (n={self.n})"


@dataclass(frozen=True)
class Welch:
    diff: float
    low: float
    high: float
    df: float


def welch_interval(a: tuple[float, ...], b: tuple[float, ...], confidence: float = CONFIDENCE) -> Welch | None:
    """Welch's t interval on mean(a) - mean(b); None with fewer than two values in an arm."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    diff = float(np.mean(a) - np.mean(b))
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Welch(diff, diff, diff, math.inf)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = float(stats.t.ppf(0.5 + confidence / 2, df))
    return Welch(diff, diff - t * se, diff + t * se, float(df))


def verdict_from_interval(low: float, high: float, n_a: int, n_b: int) -> str:
    if min(n_a, n_b) < MIN_SEEDS:
        return CANNOT_TELL
    if low > 0:
        return SUPPORTED
    if high < 0:
        return CONTRADICTED
    return CANNOT_TELL


# --- records -> arms ------------------------------------------------------------------------------------------


def budget_flops(budget: str) -> float:
    try:
        b = parse_budget(str(budget))
    except BudgetError:
        return math.nan
    return b.amount if b.kind == "flop" else math.nan


def arm(df: pd.DataFrame, method: str, ev: str, metric: str, budget: str | None, label: str,
        precision: str = "") -> Arm:
    """The seed values of ``method`` on ``ev``/``metric`` (at ``budget``; the floor has none), of one training
    ``precision`` when given."""
    sel = df[(df["method"] == method) & (df["eval"] == ev) & (df["metric"] == metric)]
    if budget is not None and method != FLOOR:
        sel = sel[sel["budget"] == budget]
    if precision and "precision" in sel:
        sel = sel[sel["precision"] == precision]
    sel = sel.sort_values("seed")
    return Arm(label, tuple(float(v) for v in sel["value"]), tuple(int(s) for s in sel["seed"]))


def _pretrain(df: pd.DataFrame, method: str, budget: str) -> pd.DataFrame:
    return df[(df["method"] == method) & (df["eval"] == "pretrain") & (df["budget"] == budget)]


_TEACHER_STEPS = re.compile(r"teacher [^()]*\((\d+) steps")


def unmet_premises(df: pd.DataFrame, c: Claim, budget: str) -> list[str]:
    """Why ``c`` is not testable at ``budget`` (empty when every declared premise holds)."""
    out = []
    for method in (c.a, c.b):
        if method == FLOOR:
            continue
        pre = _pretrain(df, method, budget)
        if c.min_steps and not pre.empty and pre["steps"].min() < c.min_steps:
            out.append(f"{method} ran {int(pre['steps'].min())} optimizer steps at {budget} (the claim needs "
                       f"≥ {c.min_steps})")
        if c.min_teacher_steps and not pre.empty:
            found = [int(m.group(1)) for n in pre["note"].fillna("") for m in [_TEACHER_STEPS.search(n)] if m]
            if found and min(found) < c.min_teacher_steps:
                out.append(f"{method}'s teacher trained {min(found)} steps at {budget} (the claim needs "
                           f"≥ {c.min_teacher_steps})")
    return out


def mixed_settings(df: pd.DataFrame, methods: tuple[str, ...], ev: str, precisions: tuple[str, ...] = ()) -> str:
    """Why arms' records of ``ev`` cannot be compared (different evaluation settings; different training precisions
    unless the claim chose them), or ''. The floor was never trained: its precision does not count."""
    sel = df[df["method"].isin(methods) & (df["eval"] == ev)]
    for col, what in (("eval_key", "evaluation settings"), ("precision", "training precisions")):
        if col == "precision":
            if any(precisions):
                continue
            sel = sel[sel["method"] != FLOOR]
        if col in sel:
            vals = set(sel[col].fillna("")) - {""}
            if len(vals) > 1:
                return f"the arms were evaluated with different {what} ({', '.join(sorted(vals))})"
    return ""


# --- results --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    claim: Claim
    ev: str
    verdict: str
    a: Arm | None = None
    b: Arm | None = None
    interval: str = ""
    reason: str = ""
    extra: list[str] = field(default_factory=list)

    def line(self) -> str:
        arms = " vs ".join(x.text() for x in (self.a, self.b) if x is not None)
        parts = [p for p in (arms, self.interval) if p]
        tail = f" — {self.reason}" if self.reason else ""
        return f"  - {self.ev}: {'; '.join(parts)} → **{self.verdict}**{tail}" + "".join(
            f"\n    {e}" for e in self.extra)


def check_beats(df: pd.DataFrame, c: Claim, ev: str) -> Result:
    budget = c.budget
    a = arm(df, c.a, ev, c.metric, budget, c.label_a, c.a_precision)
    b = arm(df, c.b, ev, c.metric, budget, c.label_b, c.b_precision)
    r = Result(c, ev, CANNOT_TELL, a, b)
    if not a.values or not b.values:
        r.verdict, r.reason = CANNOT_TELL, "no records for " + " and ".join(
            x.label for x in (a, b) if not x.values)
        return r
    mixed = mixed_settings(df, (c.a, c.b), ev, (c.a_precision, c.b_precision))
    if mixed:
        r.verdict, r.reason = NOT_TESTABLE, mixed
        return r
    unmet = unmet_premises(df, c, budget)
    if unmet:
        r.verdict, r.reason = NOT_TESTABLE, "; ".join(unmet) + (f" ({c.why})" if c.why else "")
        return r
    w = welch_interval(a.values, b.values)
    if w is None:
        r.reason = f"n = {a.n} vs {b.n}: a verdict needs ≥ {MIN_SEEDS} seeds per arm"
        r.interval = f"difference {a.mean - b.mean:+.2f}, no interval"
        return r
    r.interval = (f"difference {w.diff:+.2f}, {CONFIDENCE:.0%} CI [{w.low:+.2f}, {w.high:+.2f}] (Welch t, "
                  f"df {w.df:.1f})" if math.isfinite(w.df) else
                  f"difference {w.diff:+.2f}, zero spread in both arms")
    r.verdict = verdict_from_interval(w.low, w.high, a.n, b.n)
    if c.kind == "matches" and min(a.n, b.n) >= MIN_SEEDS:
        # equivalence: the whole interval within the margin; a difference the interval resolves contradicts it
        r.verdict = (SUPPORTED if -c.margin <= w.low and w.high <= c.margin else
                     CONTRADICTED if w.low > 0 or w.high < 0 else CANNOT_TELL)
        r.interval += f"; margin ±{c.margin:g}"
    if c.kind == "no-worse" and min(a.n, b.n) >= MIN_SEEDS:
        # non-inferiority: the whole interval above -margin; worse by more than the margin, resolved, contradicts it
        r.verdict = SUPPORTED if w.low > -c.margin else CONTRADICTED if w.high < -c.margin else CANNOT_TELL
        r.interval += f"; margin −{c.margin:g}"
    if min(a.n, b.n) < MIN_SEEDS:
        r.reason = f"n = {a.n} vs {b.n}: a verdict needs ≥ {MIN_SEEDS} seeds per arm"
    return r


def _curve(df: pd.DataFrame, method: str, ev: str, metric: str) -> dict[float, tuple[float, ...]]:
    """FLOPs -> seed values of ``method`` (FLOP budgets only)."""
    sel = df[(df["method"] == method) & (df["eval"] == ev) & (df["metric"] == metric)]
    out: dict[float, tuple[float, ...]] = {}
    for budget, g in sel.groupby("budget"):
        f = budget_flops(str(budget))
        if math.isfinite(f):
            out[f] = tuple(float(v) for v in g.sort_values("seed")["value"])
    return dict(sorted(out.items()))


def crossing(flops: list[float], means: list[float], target: float) -> float:
    """FLOPs at which a curve of means first reaches ``target``: log-linear between measured budgets; ``-inf`` when
    the smallest budget already reaches it, ``inf`` when no measured budget does."""
    if means[0] >= target:
        return -math.inf
    for (f0, a0), (f1, a1) in zip(zip(flops, means, strict=True), zip(flops[1:], means[1:], strict=True),
                                  strict=False):
        if a1 >= target > a0:
            w = (target - a0) / (a1 - a0)
            return float(math.exp(math.log(f0) + w * (math.log(f1) - math.log(f0))))
    return math.inf


def check_reaches(df: pd.DataFrame, c: Claim, ev: str) -> Result:
    ca, cb = _curve(df, c.a, ev, c.metric), _curve(df, c.b, ev, c.metric)
    r = Result(c, ev, CANNOT_TELL)
    if not ca or not cb:
        r.reason = f"no FLOP-budget curve of {c.label_a if not ca else c.label_b}"
        return r
    mixed = mixed_settings(df, (c.a, c.b, FLOOR), ev)
    if mixed:
        r.verdict, r.reason = NOT_TESTABLE, mixed
        return r
    fb = max(cb)
    target_vals = cb[fb]
    floor = arm(df, FLOOR, ev, c.metric, None, "random-init")
    b_arm = Arm(f"{c.label_b} at {fb:.3g} FLOPs", target_vals, ())
    r.a, r.b = None, b_arm
    w = welch_interval(target_vals, floor.values)
    floor_txt = (f"target {b_arm.text()} vs {floor.text()}: " + (
        f"difference {w.diff:+.2f}, {CONFIDENCE:.0%} CI [{w.low:+.2f}, {w.high:+.2f}]" if w else "no interval"))
    r.extra.append(floor_txt)
    if w is None or min(len(target_vals), floor.n) < MIN_SEEDS:
        r.reason = (f"the target needs ≥ {MIN_SEEDS} seeds of {c.label_b} at its largest budget and of the floor to "
                    "be shown above the floor")
        return r
    if w.low <= 0:
        r.verdict = NOT_TESTABLE
        r.reason = (f"{c.label_b}'s {ev} at its largest budget ({fb:.3g} FLOPs) does not clear the random-init floor "
                    "by a margin its interval resolves, so 'reaching' it says nothing an untrained network does not")
        return r
    flops = list(ca)
    if min(len(v) for v in ca.values()) < MIN_SEEDS:
        r.reason = f"{c.label_a} has fewer than {MIN_SEEDS} seeds at some budget of its curve"
        return r
    point = crossing(flops, [float(np.mean(v)) for v in ca.values()], float(np.mean(target_vals))) / fb
    rng = np.random.default_rng(0)
    boots = np.empty(BOOTSTRAP_RESAMPLES)
    for i in range(BOOTSTRAP_RESAMPLES):
        t = float(np.mean(rng.choice(target_vals, len(target_vals))))
        means = [float(np.mean(rng.choice(v, len(v)))) for v in ca.values()]
        boots[i] = crossing(flops, means, t) / fb
    # order statistics, not interpolated: a resample whose curve never reaches the target is +inf (censored), and
    # interpolating towards it would give nan
    lo, hi = (float(x) for x in np.quantile(boots, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2],
                                            method="inverted_cdf"))
    r.a = Arm(f"{c.label_a} ({', '.join(f'{f:.3g}' for f in flops)} FLOPs)", (), ())
    r.interval = (f"{c.label_a} reaches {c.label_b}'s {float(np.mean(target_vals)):.2f} at "
                  f"{_fraction(point, flops, fb)} of {c.label_b}'s {fb:.3g} FLOPs; {CONFIDENCE:.0%} bootstrap "
                  f"interval [{_fraction(lo, flops, fb)}, {_fraction(hi, flops, fb)}] ({BOOTSTRAP_RESAMPLES} "
                  "resamples of the seeds)")
    r.a = None
    if c.paper_fraction is not None:
        inside = lo <= c.paper_fraction <= hi
        r.extra.append(f"the paper's fraction {c.paper_fraction:.2g} is {'inside' if inside else 'outside'} this "
                       "interval")
    r.verdict = reaches_verdict(lo, hi, flops[0] / fb, flops[-1] / fb)
    if r.verdict == CANNOT_TELL and lo == math.inf:
        r.reason = (f"{c.label_a} does not reach it within its largest budget, {flops[-1] / fb:.3g} of "
                    f"{c.label_b}'s; a longer curve of {c.label_a} would tell")
    return r


def reaches_verdict(lo: float, hi: float, first: float, last: float) -> str:
    """The verdict on a 'reaches' fraction's interval [lo, hi], whose ends may be censored: ``-inf`` is "at or below
    ``first``" (``a``'s smallest budget, as a fraction of ``b``'s largest, already reaches the target), ``+inf`` is
    "above ``last``" (its largest budget does not). Supported when the whole interval is below 1; contradicted when
    it is above 1 (a censored end counts only when ``a``'s curve itself went to ``b``'s budget or beyond)."""
    upper = first if hi == -math.inf else hi
    if upper < 1:
        return SUPPORTED
    if lo == math.inf:
        return CONTRADICTED if last >= 1 else CANNOT_TELL
    return CONTRADICTED if lo > 1 else CANNOT_TELL


def _fraction(x: float, flops: list[float], fb: float) -> str:
    if x == -math.inf:
        return f"≤ {flops[0] / fb:.3g} (its smallest budget already reaches it)"
    if x == math.inf:
        return f"> {flops[-1] / fb:.3g} (not reached within its budgets)"
    return f"{x:.3g}"


def floor_checks(df: pd.DataFrame) -> list[Result]:
    """The undeclared check of every results directory: each trained (method, budget) against the floor, per eval."""
    out = []
    evs = [e for e in df["eval"].unique() if e not in ("pretrain", "finetune")]
    trained = df[(df["eval"] == "pretrain") & (df["method"] != FLOOR)]
    if "precision" not in trained:
        trained = trained.assign(precision="")
    for (method, budget, precision), _ in trained.groupby(["method", "budget", "precision"], sort=False):
        for ev in sorted(evs):
            c = Claim(id=f"{method}@{budget}", kind="beats", a=method, b=FLOOR, evals=(ev,), budget=str(budget),
                      a_label=f"{method} at {budget}" + (f" ({precision})" if precision else ""), a_precision=precision)
            if arm(df, method, ev, "top1", str(budget), method, precision).values:
                out.append(check_beats(df, c, ev))
    return out


def evaluate_claim(df: pd.DataFrame, c: Claim) -> list[Result]:
    check = check_reaches if c.kind == "reaches" else check_beats
    return [check(df, c, ev) for ev in c.evals]


def claims_markdown(df: pd.DataFrame, claims: list[Claim], dataset: str) -> list[str]:
    """The claims section of one dataset: declared claims, then the floor check of every row."""
    lines = [f"## Claims ({dataset})", "",
             f"Generated by `python -m repro.report` from the records. Intervals are {CONFIDENCE:.0%}: Welch's t on "
             "the difference of seed means (its degrees of freedom stated), or a bootstrap over seeds for 'reaches' "
             f"claims. Verdicts: supported / contradicted (the interval excludes zero), cannot tell (it does not, or "
             f"an arm has fewer than {MIN_SEEDS} seeds), not testable at this scale (a declared premise is unmet).",
             ""]
    for c in claims:
        head = f"- **{c.id}**" + (f" ({c.source})" if c.source else "") + (f": {c.says}" if c.says else "")
        if c.kind == "reaches":
            what = f"{c.label_a} reaches {c.label_b}'s accuracy at {c.label_b}'s largest budget"
        else:
            verb = {"beats": "vs", "matches": "matches", "no-worse": f"no worse by more than {c.margin:g} than"}
            what = (f"{c.label_a} {verb[c.kind]} {c.label_b}"
                    + (f" at {c.budget}" if c.budget and c.b != FLOOR else ""))
        lines.append(f"{head} — tested as: {what} ({c.metric}).")
        lines += [r.line() for r in evaluate_claim(df, c)]
    floor = floor_checks(df)
    if floor:
        lines += ["", "### Every row against the random-init floor", "",
                  "| row | eval | n | mean | floor | difference [95% CI] | verdict |", "|---|---|---|---|---|---|---|"]
        for r in floor:
            assert r.a is not None and r.b is not None
            lines.append(f"| {r.a.label} | {r.ev} | {r.a.n} vs {r.b.n} | {_mean_sd(r.a)} | {_mean_sd(r.b)} | "
                         f"{_interval_cell(r)} | {r.verdict} |")
    return [*lines, ""]


def _mean_sd(a: Arm) -> str:
    if not a.values:
        return "-"
    return f"{a.mean:.2f} ± {a.std:.2f}" if a.n > 1 else f"{a.mean:.2f}"


def _interval_cell(r: Result) -> str:
    assert r.a is not None and r.b is not None
    if r.verdict == NOT_TESTABLE or not r.b.values:
        return r.reason
    w = welch_interval(r.a.values, r.b.values)
    if w is None:
        return f"{r.a.mean - r.b.mean:+.2f} (no interval: n = 1)"
    return f"{w.diff:+.2f} [{w.low:+.2f}, {w.high:+.2f}]"
