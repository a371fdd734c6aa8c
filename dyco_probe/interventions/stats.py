"""Statistics of intervention effects: bootstrap means, paired tests against controls, effect sizes.

Per-sample effects (one value per example and condition) are the unit: a condition's effect is
their mean with a percentile-bootstrap 95% interval, and a target is compared with its control on
the same examples (paired: `paired_comparison`). NaNs (samples where a condition touched nothing)
are dropped, pairwise for paired comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "READOUT_LABELS",
    "ROLE_SOURCE_LABELS",
    "PairedComparison",
    "bootstrap_ci",
    "cohens_d",
    "compare_to_control",
    "paired_comparison",
    "summarize",
]

# How tables, figures and the report name the readouts and the sources of the token roles.
READOUT_LABELS = {
    "dacc": "Δ accuracy (free-running)",
    "dlogp_answer": "Δ log p(gold answer) (teacher-forced)",
    "dlogp_target": "Δ log p(intervened token) (teacher-forced)",
}
ROLE_SOURCE_LABELS = {"ground_truth": "ground-truth roles", "fisher_rao": "Fisher–Rao roles"}


def _clean(values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    return x[np.isfinite(x)]


def bootstrap_ci(
    values, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """`(mean, low, high)`: the mean of the finite `values` and its percentile-bootstrap interval.

    With fewer than two values the interval is the mean itself (one value) or NaN (none).
    """
    x = _clean(values)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return (mean, mean, mean)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return (mean, float(low), float(high))


def cohens_d(a, b) -> float:
    """Cohen's d of two independent samples (pooled standard deviation); NaN if undefined."""
    a, b = _clean(a), _clean(b)
    if a.size < 2 or b.size < 2:
        return math.nan
    pooled = ((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2)
    return float((a.mean() - b.mean()) / math.sqrt(pooled)) if pooled > 0 else math.nan


@dataclass(frozen=True)
class PairedComparison:
    """Target vs control on the same samples.

    Attributes:
        n: pairs with both values finite.
        mean_target, mean_control: means over those pairs.
        diff, diff_low, diff_high: mean paired difference (target − control) and its bootstrap 95% CI.
        t, p_t: paired t-test (`scipy.stats.ttest_rel`); p_wilcoxon: Wilcoxon signed-rank test
            (zero differences dropped; NaN when every difference is zero).
        cohens_dz: mean difference / SD of the differences (paired effect size).
    """

    n: int
    mean_target: float
    mean_control: float
    diff: float
    diff_low: float
    diff_high: float
    t: float
    p_t: float
    p_wilcoxon: float
    cohens_dz: float

    def to_dict(self) -> dict:
        return asdict(self)


def paired_comparison(target, control, *, n_boot: int = 2000, seed: int = 0) -> PairedComparison:
    """Compare per-sample effects of a target and its control (same order of samples)."""
    from scipy import stats

    a = np.asarray(target, dtype=np.float64).reshape(-1)
    b = np.asarray(control, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"target and control need the same samples, got {a.size} and {b.size} values")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    nan = math.nan
    if d.size == 0:
        return PairedComparison(0, nan, nan, nan, nan, nan, nan, nan, nan, nan)
    diff, low, high = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    t = p_t = p_w = dz = nan
    if d.size >= 2:
        sd = d.std(ddof=1)
        if sd > 1e-12 * max(1.0, abs(float(d.mean()))):  # else constant up to rounding
            res = stats.ttest_rel(a, b)
            t, p_t = float(res.statistic), float(res.pvalue)
            dz = float(d.mean() / sd)
        elif d.mean() != 0:
            t, p_t = math.copysign(math.inf, d.mean()), 0.0
        else:
            p_t = 1.0
        if np.any(d != 0):
            p_w = float(stats.wilcoxon(d[d != 0]).pvalue)
    return PairedComparison(
        n=int(d.size),
        mean_target=float(a.mean()),
        mean_control=float(b.mean()),
        diff=diff,
        diff_low=low,
        diff_high=high,
        t=t,
        p_t=p_t,
        p_wilcoxon=p_w,
        cohens_dz=dz,
    )


def summarize(frame, value: str, by: Sequence[str], *, n_boot: int = 2000, seed: int = 0):
    """Mean of `value` per group of `by` with its bootstrap 95% CI: columns `by..., n, mean, ci_low, ci_high, sd`."""
    import pandas as pd

    rows = []
    for key, group in frame.groupby(list(by), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        x = _clean(group[value])
        mean, low, high = bootstrap_ci(x, n_boot=n_boot, seed=seed)
        sd = float(x.std(ddof=1)) if x.size > 1 else math.nan
        rows.append(
            {**dict(zip(by, key)), "n": int(x.size), "mean": mean, "ci_low": low, "ci_high": high, "sd": sd}
        )
    return pd.DataFrame(rows, columns=[*by, "n", "mean", "ci_low", "ci_high", "sd"])


def compare_to_control(
    frame,
    value: str,
    *,
    target: dict,
    control: dict,
    by: Sequence[str] = (),
    pair_on: str = "item_index",
    n_boot: int = 2000,
    seed: int = 0,
):
    """Paired comparison of the rows matching `target` against those matching `control`, per group.

    `target` / `control` are column -> value filters (e.g. `{"target": "visual"}` vs
    `{"target": "random:visual"}`); within each group of `by`, rows are paired on `pair_on`.
    Returns one row per group: `by...` and the `PairedComparison` fields.
    """
    import pandas as pd

    def pick(spec):
        mask = np.ones(len(frame), dtype=bool)
        for col, val in spec.items():
            mask &= (frame[col] == val).to_numpy()
        return frame[mask]

    a_all, b_all = pick(target), pick(control)
    groups = sorted(set(map(tuple, a_all[list(by)].itertuples(index=False)))) if by else [()]
    rows = []
    for key in groups:
        a, b = a_all, b_all
        for col, val in zip(by, key):
            a, b = a[a[col] == val], b[b[col] == val]
        merged = a[[pair_on, value]].merge(b[[pair_on, value]], on=pair_on, suffixes=("_t", "_c"))
        res = paired_comparison(merged[f"{value}_t"], merged[f"{value}_c"], n_boot=n_boot, seed=seed)
        rows.append({**dict(zip(by, key)), **res.to_dict()})
    return pd.DataFrame(rows)
