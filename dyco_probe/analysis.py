"""Token-level analysis of correct vs incorrect trajectories (the paper's token analyses).

Pure functions over a `Trace` and per-sample correctness. Roles, normalised ratios and `s_t` come
from the scorer (`dyco_probe.scoring.score_tokens`, the only place `s_t` is computed); this module
only groups, counts and compares them::

    from dyco_probe.analysis import analyse_tokens

    result = analyse_tokens(trace)                    # correctness from trace.samples[i]["correct"]
    result.role_fractions                             # correct / incorrect / all x role, with 95% CIs
    result.auroc                                      # does the sample score tell correct from incorrect?
    result.tokens, result.samples                     # the per-token and per-sample tables behind them
    print(result.to_markdown())

What is measured (every mean is over trajectories, each weighing the same, with a percentile-bootstrap
95% interval over trajectories):

- **role fractions**: the share of a trajectory's tokens labelled visual, text and neutral;
- **alignment scores** `s_t` of non-neutral tokens (neutral tokens have `s_t = 0` by definition);
- **normalised ratios by role**: `r̃_vis` of visual-role tokens and `r̃_txt` of text-role tokens, i.e.
  how much of its attention a token puts on the modality its role says it works on;
- **role-switch rate**: over a trajectory's non-neutral tokens in order, the share of consecutive
  pairs whose roles differ (visual → text or text → visual); undefined with fewer than two;
- **sample score vs correctness**: AUROC (probability that a correct trajectory scores above an
  incorrect one, ties counting one half) of the scorer's sequence score (docs/method.md#advantage-reweighting, normalised over
  the whole set: a monotone function of the mean `s_t` over non-neutral tokens, so the AUROC is that
  of the mean) and of other per-trajectory features, with a stratified bootstrap 95% interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .roles import ROLE_NAMES, Role

__all__ = [
    "GROUPS",
    "SAMPLE_FEATURES",
    "TokenAnalysis",
    "analyse_tokens",
    "auroc",
    "auroc_ci",
    "correctness",
    "roc_curve",
    "role_switch_rate",
    "sample_table",
    "token_table",
]

GROUPS = ("correct", "incorrect", "all")
# per-trajectory features whose AUROC for correctness is reported (column -> description)
SAMPLE_FEATURES = {
    "sample_score": "sequence score (scorer)",  # docs/method.md#advantage-reweighting, sequence level
    "mean_s": "mean s_t of non-neutral tokens",
    "frac_visual": "visual-role fraction",
    "switch_rate": "role-switch rate",
    "r_vis_n_visual": "r̃_vis of visual-role tokens",
    "r_txt_n_text": "r̃_txt of text-role tokens",
}


# -- inputs -------------------------------------------------------------------------------------------


def correctness(trace, correct: Sequence[bool] | None = None) -> np.ndarray:
    """Per-sample correctness `[B]` bool: `correct` if given, else the samples' `"correct"` metadata."""
    if correct is not None:
        out = np.asarray([bool(c) for c in correct])
        if out.shape != (trace.batch_size,):
            raise ValueError(f"got {out.size} correctness values for {trace.batch_size} samples")
        return out
    samples = trace.samples or []
    if len(samples) != trace.batch_size or not all("correct" in s for s in samples):
        raise ValueError(
            "the trace's samples carry no correctness (trace with dyco_probe.api.trace / trace_completions, "
            "or pass correct=[...])"
        )
    return np.asarray([bool(s["correct"]) for s in samples])


def _scored(trace, roles, config) -> dict:
    """The scorer on the trace: from its own dynamics, or with `roles` given (any labeller)."""
    from .scoring import ScorerConfig, score_tokens

    config = config or ScorerConfig(normalise_over="batch")
    return score_tokens(trace.r_vis, trace.r_txt, trace.v_vis, trace.v_txt, trace.mask, config, roles=roles)


# -- tables -------------------------------------------------------------------------------------------


def token_table(trace, correct=None, *, roles=None, config=None, scored: dict | None = None):
    """One row per real completion token.

    Columns: `sample`, `sample_id`, `t`, `text`, `role` (name), `role_code`, `s`, `r_vis_n`, `r_txt_n`,
    `r_vis`, `r_txt`, `v_vis`, `v_txt`, `correct`.

    Args:
        trace: a `Trace`.
        correct: per-sample correctness (default: the samples' metadata).
        roles: `[B, T]` roles from any labeller (default: the role rule of docs/method.md#token-roles on the trace's dynamics).
        config: a `ScorerConfig` (thresholds; default with `normalise_over="batch"`).
        scored: a `score_tokens` result to reuse.
    """
    import pandas as pd

    ok = correctness(trace, correct)
    scored = scored if scored is not None else _scored(trace, roles, config)
    mask = trace.mask.bool()
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    samples = trace.samples or [{} for _ in range(trace.batch_size)]
    codes = scored["roles"][b_idx, t_idx].numpy()
    texts = (
        [trace.token_text[i][t] for i, t in zip(b_idx.tolist(), t_idx.tolist())]
        if trace.token_text is not None
        else [None] * len(b_idx)
    )
    frame = pd.DataFrame(
        {
            "sample": b_idx.numpy(),
            "sample_id": [samples[i].get("sample_id", i) for i in b_idx.tolist()],
            "t": t_idx.numpy(),
            "text": texts,
            "role": np.asarray(ROLE_NAMES, dtype=object)[codes],
            "role_code": codes,
            "s": scored["s"][b_idx, t_idx].numpy(),
            "r_vis_n": scored["r_vis_n"][b_idx, t_idx].numpy(),
            "r_txt_n": scored["r_txt_n"][b_idx, t_idx].numpy(),
            **{
                k: getattr(trace, k)[b_idx, t_idx].float().numpy()
                for k in ("r_vis", "r_txt", "v_vis", "v_txt")
            },
            "correct": ok[b_idx.numpy()],
        }
    )
    return frame


def role_switch_rate(roles: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the share of consecutive non-neutral tokens whose roles differ, and the switch count.

    Neutral tokens are skipped (a visual token, two neutral ones, then a text token is one switch).
    The rate is NaN for a sample with fewer than two non-neutral tokens.

    Returns:
        `(rate [B] float, switches [B] int)`.
    """
    rates, counts = [], []
    for row, m in zip(roles.long(), mask.bool()):
        active = row[m & (row != int(Role.NEUTRAL))]
        n = int(active.numel())
        switches = int((active[1:] != active[:-1]).sum()) if n > 1 else 0
        counts.append(switches)
        rates.append(switches / (n - 1) if n > 1 else math.nan)
    return np.asarray(rates, dtype=float), np.asarray(counts, dtype=int)


def sample_table(trace, correct=None, *, roles=None, config=None, scored: dict | None = None):
    """One row per sample (trajectory).

    Columns: `sample`, `sample_id`, `correct`, `n_tokens`, `n_active` (non-neutral tokens),
    `frac_visual`, `frac_text`, `frac_neutral`, `mean_s` (over non-neutral tokens; NaN if none),
    `sample_score` (the scorer's sequence score, normalised over the whole set), `switch_rate`,
    `n_switches`, `r_vis_n_visual` (mean `r̃_vis` of visual-role tokens), `r_txt_n_text` (mean `r̃_txt`
    of text-role tokens).
    """
    import pandas as pd

    ok = correctness(trace, correct)
    scored = scored if scored is not None else _scored(trace, roles, config)
    mask = trace.mask.bool()
    r = scored["roles"]
    n = mask.sum(-1).clamp_min(1).double()

    def frac(role):
        return (((r == int(role)) & mask).sum(-1) / n).numpy()

    def masked_mean(values, where):
        count = where.sum(-1)
        total = torch.where(where, values.double(), 0.0).sum(-1)
        return torch.where(count > 0, total / count.clamp_min(1), math.nan).numpy()

    active = mask & (r != int(Role.NEUTRAL))
    visual, text = mask & (r == int(Role.VISUAL)), mask & (r == int(Role.TEXT))
    rate, switches = role_switch_rate(r, mask)
    samples = trace.samples or [{} for _ in range(trace.batch_size)]
    return pd.DataFrame(
        {
            "sample": np.arange(trace.batch_size),
            "sample_id": [s.get("sample_id", i) for i, s in enumerate(samples)],
            "correct": ok,
            "n_tokens": mask.sum(-1).numpy(),
            "n_active": active.sum(-1).numpy(),
            "frac_visual": frac(Role.VISUAL),
            "frac_text": frac(Role.TEXT),
            "frac_neutral": frac(Role.NEUTRAL),
            "mean_s": masked_mean(scored["s"], active),
            "sample_score": scored["sequence_score"].double().numpy(),
            "switch_rate": rate,
            "n_switches": switches,
            "r_vis_n_visual": masked_mean(scored["r_vis_n"], visual),
            "r_txt_n_text": masked_mean(scored["r_txt_n"], text),
        }
    )


# -- statistics ---------------------------------------------------------------------------------------


def auroc(scores, labels) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting one half.

    NaN scores are dropped; NaN when either class is empty.
    """
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # midranks: ties count one half
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_ci(
    scores, labels, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0, clusters=None
) -> dict:
    """AUROC with a percentile-bootstrap interval.

    Without ``clusters`` the bootstrap is stratified (positives and negatives resampled separately, so
    every resample has both classes). With ``clusters`` (one id per score, e.g. the prompt several
    samples came from) whole clusters are resampled, so correlated scores are not counted as
    independent evidence; resamples that lack a class are drawn again.

    Returns `{"auroc", "ci_low", "ci_high", "n_pos", "n_neg"}` (NaNs when a class is empty), plus
    `"n_clusters"` with clusters.
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    pos, neg = s[y], s[~y]
    out = {
        "auroc": auroc(s, y),
        "ci_low": math.nan,
        "ci_high": math.nan,
        "n_pos": len(pos),
        "n_neg": len(neg),
    }
    if len(pos) == 0 or len(neg) == 0:
        return out
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    if clusters is not None:
        c = np.asarray(clusters)[keep]
        ids, inverse = np.unique(c, return_inverse=True)
        members = [np.flatnonzero(inverse == k) for k in range(len(ids))]
        out["n_clusters"] = len(ids)
        k = 0
        while k < n_boot:
            rows = np.concatenate([members[j] for j in rng.integers(0, len(ids), len(ids))])
            if y[rows].all() or not y[rows].any():
                continue
            values[k] = auroc(s[rows], y[rows])
            k += 1
    else:
        labels_b = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
        for k in range(n_boot):
            sample = np.r_[pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]]
            values[k] = auroc(sample, labels_b)
    alpha = (1 - level) / 2
    out["ci_low"], out["ci_high"] = (float(x) for x in np.quantile(values, [alpha, 1 - alpha]))
    return out


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold (from the highest score down), from (0, 0)
    to (1, 1); empty arrays when a class is empty."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    if y.all() or (~y).all():
        return np.array([]), np.array([])
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # one point per distinct threshold
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def _by_group(frame, columns: dict, *, n_boot: int, seed: int):
    """Mean of each column per group (correct / incorrect / all) with bootstrap CIs over rows."""
    import pandas as pd

    from .interventions.stats import bootstrap_ci

    rows = []
    for group in GROUPS:
        part = frame if group == "all" else frame[frame["correct"] == (group == "correct")]
        for column, label in columns.items():
            values = part[column].to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            mean, low, high = bootstrap_ci(finite, n_boot=n_boot, seed=seed)
            rows.append(
                {
                    "group": group,
                    "measure": label,
                    "n": int(finite.size),
                    "mean": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "median": float(np.median(finite)) if finite.size else math.nan,
                }
            )
    return pd.DataFrame(rows)


# -- the analysis -------------------------------------------------------------------------------------


@dataclass
class TokenAnalysis:
    """What `analyse_tokens` found; every table is a pandas DataFrame.

    Attributes:
        tokens: `token_table` (one row per real token).
        samples: `sample_table` (one row per trajectory).
        role_fractions: per group and role: `n` trajectories, `mean` fraction, `ci_low`, `ci_high`, `median`.
        scores: `s_t` of non-neutral tokens per group: the per-trajectory mean (`measure` "mean s_t")
            and the token-level pooled quantiles (`tokens`, `q10`, `q50`, `q90`).
        ratios: per group: mean `r̃_vis` of visual-role tokens and `r̃_txt` of text-role tokens.
        switches: role-switch rate per group.
        auroc: per sample feature (`SAMPLE_FEATURES`): `auroc`, `ci_low`, `ci_high`, `n_pos`, `n_neg`.
        settings: roles source, thresholds, bootstrap settings.
    """

    tokens: object
    samples: object
    role_fractions: object
    scores: object
    ratios: object
    switches: object
    auroc: object
    settings: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(self.samples["correct"].mean()) if len(self.samples) else math.nan

    def headline(self) -> dict:
        """The main numbers, JSON-ready."""

        def pick(table, group, measure):
            row = table[(table["group"] == group) & (table["measure"] == measure)]
            return None if row.empty else _clean(row.iloc[0]["mean"])

        score = self.auroc.set_index("feature").loc["sample_score"]
        return {
            "samples": int(len(self.samples)),
            "tokens": int(len(self.tokens)),
            "accuracy": _clean(self.accuracy),
            "role_fractions": {
                g: {role: pick(self.role_fractions, g, role) for role in ROLE_NAMES} for g in GROUPS
            },
            "mean_s": {g: pick(self.scores, g, "mean s_t") for g in GROUPS},
            "switch_rate": {g: pick(self.switches, g, "role-switch rate") for g in GROUPS},
            "auroc_sample_score": {k: _clean(score[k]) for k in ("auroc", "ci_low", "ci_high")},
            "settings": self.settings,
        }

    def to_markdown(self) -> str:
        """The tables as markdown (means with 95% CIs)."""

        def ci(r):
            if r["n"] == 0 or not np.isfinite(r["mean"]):
                return "–"
            return f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"

        def grouped(table, title):
            lines = [f"### {title}", "", "| measure | " + " | ".join(GROUPS) + " |", "| --- |" + " --- |" * 3]
            for measure, part in table.groupby("measure", sort=False):
                cells = []
                for g in GROUPS:
                    row = part[part["group"] == g]
                    cells.append("–" if row.empty else f"{ci(row.iloc[0])} (n={int(row.iloc[0]['n'])})")
                lines.append(f"| {measure} | " + " | ".join(cells) + " |")
            return lines + [""]

        n_ok = int(self.samples["correct"].sum())
        out = [
            f"{len(self.samples)} trajectories ({n_ok} correct, {len(self.samples) - n_ok} incorrect), "
            f"{len(self.tokens)} tokens; roles: {self.settings.get('roles')}. Means over trajectories with "
            "bootstrap 95% CIs over trajectories.",
            "",
        ]
        out += grouped(self.role_fractions, "Role fractions")
        out += grouped(
            self.scores[self.scores["measure"] == "mean s_t"], "Alignment score s_t (non-neutral tokens)"
        )
        out += grouped(self.ratios, "Normalised ratio of the token's own modality")
        out += grouped(self.switches, "Role-switch rate")
        out += [
            "### Sample score vs correctness (AUROC)",
            "",
            "| feature | AUROC [95% CI] | correct / incorrect |",
        ]
        out += ["| --- | --- | --- |"]
        for _, r in self.auroc.iterrows():
            value = (
                "–"
                if not np.isfinite(r["auroc"])
                else f"{r['auroc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
            )
            out.append(f"| {r['description']} | {value} | {int(r['n_pos'])} / {int(r['n_neg'])} |")
        return "\n".join(out) + "\n"


def _clean(x):
    x = float(x)
    return None if not math.isfinite(x) else round(x, 6)


def analyse_tokens(
    trace,
    correct: Sequence[bool] | None = None,
    *,
    roles: torch.Tensor | None = None,
    roles_name: str | None = None,
    config=None,
    n_boot: int = 1000,
    seed: int = 0,
) -> TokenAnalysis:
    """Token-level analysis of correct vs incorrect trajectories (see the module docstring).

    Args:
        trace: a `Trace` (from `dyco_probe.api.trace`, or `Trace.load`).
        correct: per-sample correctness; default: the samples' `"correct"` metadata.
        roles: `[B, T]` roles from any labeller (e.g. `get_labeller("ground_truth")(...)`); default:
            the role rule of docs/method.md#token-roles on the trace's own dynamics with `config`'s thresholds.
        roles_name: how to call the roles in the settings (default: "fisher_rao" or "given").
        config: `ScorerConfig` (default: published thresholds, sequence scores normalised over the
            whole set of trajectories).
        n_boot, seed: bootstrap resamples and seed.

    Returns:
        A `TokenAnalysis`.
    """
    import pandas as pd

    from .scoring import ScorerConfig

    config = config or ScorerConfig(normalise_over="batch")
    scored = _scored(trace, roles, config)
    tokens = token_table(trace, correct, scored=scored)
    samples = sample_table(trace, correct, scored=scored)

    fractions = _by_group(samples, {f"frac_{r}": r for r in ROLE_NAMES}, n_boot=n_boot, seed=seed)
    scores = _by_group(samples, {"mean_s": "mean s_t"}, n_boot=n_boot, seed=seed)
    active = tokens[tokens["role"] != "neutral"]
    quantiles = []
    for group in GROUPS:
        part = active if group == "all" else active[active["correct"] == (group == "correct")]
        q = np.quantile(part["s"], [0.1, 0.5, 0.9]) if len(part) else [math.nan] * 3
        quantiles.append({"group": group, "tokens": len(part), "q10": q[0], "q50": q[1], "q90": q[2]})
    scores = scores.merge(pd.DataFrame(quantiles), on="group")
    ratios = _by_group(
        samples,
        {"r_vis_n_visual": "r̃_vis of visual-role tokens", "r_txt_n_text": "r̃_txt of text-role tokens"},
        n_boot=n_boot,
        seed=seed,
    )
    switches = _by_group(samples, {"switch_rate": "role-switch rate"}, n_boot=n_boot, seed=seed)
    aurocs = pd.DataFrame(
        [
            {
                "feature": name,
                "description": description,
                **auroc_ci(samples[name], samples["correct"], n_boot=n_boot, seed=seed),
            }
            for name, description in SAMPLE_FEATURES.items()
        ]
    )
    settings = {
        "roles": roles_name or ("fisher_rao" if roles is None else "given"),
        "tau_vis": config.tau_vis,
        "tau_txt": config.tau_txt,
        "sequence_score": f"normalised over the {config.normalise_over}",
        "n_boot": n_boot,
        "seed": seed,
        "distance": (trace.metadata or {}).get("settings", {}).get("distance", "fisher_rao"),
        "layers": list(trace.layers),
    }
    return TokenAnalysis(tokens, samples, fractions, scores, ratios, switches, aurocs, settings)
