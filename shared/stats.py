"""Small-sample statistics for comparing training runs: Welch's t-test (one-sided), the Welch
confidence interval of a difference in means, Hedges' g, and the paired t-test of per-seed
differences.

Welch's test, not Student's, because a change can alter the spread as well as the mean (a new
optimiser may be less stable), so the two variances are never assumed equal."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from scipy import stats as _st


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); the deviation is None for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def welch_df(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """Welch–Satterthwaite degrees of freedom for sample variances var_a, var_b."""
    qa, qb = var_a / n_a, var_b / n_b
    if qa + qb == 0:
        return float(n_a + n_b - 2)  # both samples constant: no spread to weigh, fall back to pooled df
    return (qa + qb) ** 2 / (qa**2 / (n_a - 1) + qb**2 / (n_b - 1))


@dataclass(frozen=True)
class Welch:
    """Candidate `new` against `base`; diff = mean(new) - mean(base). p is one-sided: H1 is new < base."""

    n_new: int
    n_base: int
    mean_new: float
    mean_base: float
    diff: float
    t: float | None  # None when both samples are constant
    df: float
    p: float
    confidence: float
    ci: tuple[float, float]  # two-sided Welch interval of diff at `confidence`
    cohen_d: float | None  # diff / pooled sd; None when the pooled sd is 0
    hedges_g: float | None  # d with the small-sample correction

    def to_dict(self) -> dict:
        return {**asdict(self), "ci": list(self.ci)}


def welch_less(new: Sequence[float], base: Sequence[float], confidence: float = 0.95) -> Welch:
    """Welch's t-test of mean(new) < mean(base), with the two-sided CI of the difference."""
    n_a, n_b = len(new), len(base)
    if n_a < 2 or n_b < 2:
        raise ValueError(f"Welch's test needs at least 2 values per side (got {n_a} and {n_b})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    (m_a, s_a), (m_b, s_b) = mean_std(new), mean_std(base)
    va, vb = s_a**2, s_b**2
    diff, se = m_a - m_b, math.sqrt(va / n_a + vb / n_b)
    df = welch_df(va, n_a, vb, n_b)
    if se == 0:  # constant samples: the sign of the difference is certain, and the interval is a point
        t, p, half = None, (0.0 if diff < 0 else 1.0), 0.0
    else:
        res = _st.ttest_ind(new, base, equal_var=False, alternative="less")
        t, p = float(res.statistic), float(res.pvalue)
        half = float(_st.t.ppf(0.5 + confidence / 2, df)) * se
    pooled = math.sqrt(((n_a - 1) * va + (n_b - 1) * vb) / (n_a + n_b - 2))
    d = diff / pooled if pooled > 0 else None
    g = d * (1 - 3 / (4 * (n_a + n_b) - 9)) if d is not None else None
    return Welch(n_a, n_b, m_a, m_b, diff, t, df, p, confidence, (diff - half, diff + half), d, g)


@dataclass(frozen=True)
class Paired:
    """Candidate `new` against `base`, value i of each from the same seed; diff = mean(new - base).
    p is one-sided: H1 is new < base."""

    n: int
    diff: float
    sd_diff: float
    t: float | None  # None when every difference is the same
    df: int
    p: float
    confidence: float
    ci: tuple[float, float]  # two-sided t interval of the mean difference

    def to_dict(self) -> dict:
        return {**asdict(self), "ci": list(self.ci)}


def paired_less(new: Sequence[float], base: Sequence[float], confidence: float = 0.95) -> Paired:
    """The paired t-test of mean(new - base) < 0: valid whatever the pairs share, and more powerful
    the more they share (runs of one seed see the same batches and, for one shape, the same init)."""
    if len(new) != len(base) or len(new) < 2:
        raise ValueError(f"the paired test needs 2 or more pairs (got {len(new)} and {len(base)} values)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = [a - b for a, b in zip(new, base)]
    n = len(d)
    mean, sd = mean_std(d)
    if sd == 0:
        t, p, half = None, (0.0 if mean < 0 else 1.0), 0.0
    else:
        res = _st.ttest_rel(new, base, alternative="less")
        t, p = float(res.statistic), float(res.pvalue)
        half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Paired(n, mean, sd, t, n - 1, p, confidence, (mean - half, mean + half))


def two_sided(p_less: float) -> float:
    """The two-sided p of a symmetric test from its one-sided p (mean < 0): for a direction chosen
    after looking at the means, as when the best of several values is tested against the others."""
    return min(1.0, 2 * min(p_less, 1 - p_less))


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of several p values of one family (None: no test), each adjusted
    p to compare with alpha as it stands: the family's chance of any false claim stays below alpha.
    Written here: scipy (a dependency already) has no Holm, and statsmodels would be one for a loop."""
    order = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * ps[i]))
        out[i] = running
    return out


def runs_to_show(diff: float, sd_new: float, sd_base: float, alpha: float, power: float = 0.8,
                 paired: bool = False, most: int = 200) -> int | None:
    """Runs a side (pairs, for the paired test, whose sd_new is the sd of the per-seed differences)
    at which the one-sided test of new < base rejects at `alpha` with probability `power`, were the
    true difference and spread the ones given: the noncentral t's chance of passing the critical
    value, with Welch's degrees of freedom for equal sides. An estimate from measured values, which
    flatter an effect picked for looking good; None for a difference >= 0 or beyond `most`.
    Written here: statsmodels' power classes assume equal variances and would be one more dependency."""
    if diff >= 0:
        return None
    for n in range(2, most + 1):
        if paired:
            se, df = sd_new / math.sqrt(n), n - 1
        else:
            se, df = math.sqrt((sd_new**2 + sd_base**2) / n), welch_df(sd_new**2, n, sd_base**2, n)
        if se == 0 or _st.nct.cdf(_st.t.ppf(alpha, df), df, diff / se) >= power:
            return n
    return None
