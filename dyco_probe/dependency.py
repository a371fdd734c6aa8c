"""Visual dependency of generated tokens: how much the next-token distribution changes when the image
is taken away (VPPO, PAPO), and roles from thresholds on it. Pure functions over tensors.

    from dyco_probe.dependency import next_token_divergence, dependency_roles

    score = next_token_divergence(logits_real, logits_cf, tokens, mask, divergence="kl")   # [B, T] nats
    roles = dependency_roles(score, mask, visual_above=0.5, text_below=0.05)

The model plumbing (counterfactual images, the teacher-forced forwards) is `dyco_probe.counterfactual`;
the labeller is `dyco_probe.labellers.visual_dependency`.

Divergences, per token `t`, between `p = π(· | o_<t, real image)` and `q = π(· | o_<t, counterfactual)`:

- `"kl"`: `KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v))`, over the whole vocabulary;
- `"k3"`: the k3 estimator of the same KL from the one token that was generated, `o_t` (a sample of `p`
  when the completion was sampled from the policy): with `r = q(o_t) / p(o_t)`, `k3 = r − 1 − log r`.
  Non-negative, unbiased for `KL(p ‖ q)` over samples of `p`, and needs only the two log-probabilities
  of `o_t` (the form VPPO uses).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .roles import Role

__all__ = [
    "DIVERGENCES",
    "best_thresholds",
    "check_thresholds",
    "dependency_roles",
    "group_auroc",
    "held_out_thresholds",
    "k3_divergence",
    "kl_divergence",
    "next_token_divergence",
]

DIVERGENCES = ("kl", "k3")


def kl_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    """`KL(p ‖ q)` over the last dimension from log-probabilities `[..., V]`; returns `[...]`, >= 0.

    Terms where `p` is 0 count 0; clamped at 0 against rounding."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0)


def k3_divergence(logp_token: Tensor, logq_token: Tensor) -> Tensor:
    """k3 estimate of `KL(p ‖ q)` from one sample of `p`: `r − 1 − log r`, `log r = log q − log p`.

    Computed as `expm1(d) − d`, `d = log r`, which stays accurate (and >= 0) for `r` near 1."""
    d = logq_token - logp_token
    return (torch.expm1(d) - d).clamp_min(0)


def next_token_divergence(
    logits_real: Tensor,
    logits_cf: Tensor,
    tokens: Tensor,
    mask: Tensor,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
) -> Tensor:
    """Per-token divergence between next-token distributions with the real and the counterfactual image.

    Args:
        logits_real, logits_cf: `[B, T, V]` logits of the distributions that produced tokens `0..T-1`.
        tokens: `[B, T]` the generated tokens (k3 reads their log-probabilities).
        mask: `[B, T]` real tokens.
        divergence: `"kl"` (full distributions) or `"k3"` (the generated token only).
        temperature: the distributions are `softmax(logits / temperature)`.

    Returns:
        `[B, T]` float32 divergence in nats, 0 on masked positions.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.log_softmax(logits_real.float() / temperature, dim=-1)
    logq = torch.log_softmax(logits_cf.float() / temperature, dim=-1)
    if divergence == "kl":
        d = kl_divergence(logp, logq)
    else:
        idx = tokens.to(logp.device).long().unsqueeze(-1)
        d = k3_divergence(logp.gather(-1, idx).squeeze(-1), logq.gather(-1, idx).squeeze(-1))
    d = torch.nan_to_num(d, nan=0.0, posinf=0.0)
    return torch.where(mask.to(d.device).bool(), d, torch.zeros_like(d))


def check_thresholds(visual_above: float, text_below: float) -> None:
    """Raise `ValueError` when `text_below > visual_above` (the visual and text regions would overlap)."""
    if text_below > visual_above:
        raise ValueError(
            f"thresholds in the wrong order: need text_below <= visual_above, got visual_above={visual_above}, "
            f"text_below={text_below}"
        )


def dependency_roles(score: Tensor, mask: Tensor, visual_above: float, text_below: float) -> Tensor:
    """Roles from a dependency score: visual where `score > visual_above`, text where
    `score < text_below`, neutral in between (and on masked tokens or NaN scores).

    Every token is labelled, the first one too (its score exists). Thresholds in the wrong order
    (`check_thresholds`) are refused."""
    check_thresholds(visual_above, text_below)
    roles = torch.where(
        score > visual_above, int(Role.VISUAL), torch.where(score < text_below, int(Role.TEXT), 0)
    )
    valid = mask.bool() & ~torch.isnan(score)
    return torch.where(valid, roles, int(Role.NEUTRAL)).long()


def best_thresholds(
    score: Tensor,
    truth: Tensor,
    mask: Tensor,
    grid: Sequence[float],
    *,
    neutral: str = "included",
) -> dict:
    """The `(visual_above, text_below)` pair of `grid` (with `text_below <= visual_above`) whose roles
    have the highest macro F1 against `truth` (`dyco_probe.labellers.compare_roles`; ties: the first in
    grid order). Returns `{"visual_above", "text_below", "macro_f1"}`."""
    from .labellers import compare_roles

    best = {"visual_above": float("nan"), "text_below": float("nan"), "macro_f1": float("-inf")}
    for hi in grid:
        for lo in grid:
            if lo > hi:
                continue
            f1 = compare_roles(dependency_roles(score, mask, hi, lo), truth, mask, neutral=neutral)[
                "macro_f1"
            ]
            if f1 > best["macro_f1"]:
                best = {"visual_above": float(hi), "text_below": float(lo), "macro_f1": f1}
    return best


def held_out_thresholds(
    score: Tensor,
    truth: Tensor,
    mask: Tensor,
    grid: Sequence[float],
    *,
    neutral: str = "excluded",
    seed: int = 0,
) -> dict:
    """Thresholds chosen on one random half of the rows (`best_thresholds`) and scored on the other,
    both ways. Returns `{"chosen": [(visual_above, text_below), ...], "macro_f1"}` (the mean of the two
    held-out macro F1s)."""
    from .labellers import compare_roles

    b = score.shape[0]
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    halves = (perm[: b // 2], perm[b // 2 :])
    chosen, f1s = [], []
    for fit, test in (halves, halves[::-1]):
        best = best_thresholds(score[fit], truth[fit], mask[fit], grid, neutral=neutral)
        chosen.append((best["visual_above"], best["text_below"]))
        roles = dependency_roles(score[test], mask[test], *chosen[-1])
        f1s.append(compare_roles(roles, truth[test], mask[test], neutral=neutral)["macro_f1"])
    return {"chosen": chosen, "macro_f1": sum(f1s) / len(f1s)}


def group_auroc(
    score: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    clusters: Sequence | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """How well a per-token score separates two groups of tokens: the AUROC of `positive` tokens
    (scoring high) against `negative` ones, with a percentile-bootstrap 95% interval
    (`dyco_probe.analysis.auroc_ci`).

    Args:
        score: `[B, T]` per-token score (e.g. visual dependency).
        positive, negative: `[B, T]` bool, the two groups (e.g. look-ups that read the image vs those
            that copied a note); a token in both is an error, tokens in neither are ignored.
        clusters: one id per row (e.g. its example's id, when an example has several completions):
            whole clusters are resampled, so the tokens of one example do not count as independent
            evidence. Default: tokens resampled within each group (stratified).

    Returns:
        `{"auroc", "ci_low", "ci_high", "n_pos", "n_neg"}` (NaNs when a group is empty), plus
        `"n_clusters"` with clusters.
    """
    from .analysis import auroc_ci

    positive, negative = positive.bool(), negative.bool()
    if positive.shape != score.shape or negative.shape != score.shape:
        raise ValueError(
            f"groups {tuple(positive.shape)}, {tuple(negative.shape)} do not match the score {tuple(score.shape)}"
        )
    if (positive & negative).any():
        raise ValueError("a token is in both groups")
    keep = positive | negative
    ids = None
    if clusters is not None:
        if len(clusters) != score.shape[0]:
            raise ValueError(f"{len(clusters)} cluster ids for {score.shape[0]} rows")
        codes = {c: k for k, c in enumerate(dict.fromkeys(clusters))}
        per_row = torch.tensor([codes[c] for c in clusters])
        ids = per_row[:, None].expand_as(score)[keep.cpu()].numpy()
    return auroc_ci(
        score[keep].double().cpu().numpy(),
        positive[keep].cpu().numpy(),
        n_boot=n_boot,
        seed=seed,
        clusters=ids,
    )
