"""The scorer: alignment scores ``s_t``, token weights, sequence scores and DyCo advantages
(docs/method.md: #attention-signals, #alignment-score, #advantage-reweighting).

This is the only place ``s_t`` is computed; analyses and the RL loop both call it. Everything is over
right-padded ``[B, T]`` completion tensors with a bool ``mask`` (True = real token, ``t = 0`` is
``o_1``), vectorised over the batch; group statistics use segment sums, not loops over groups.

Typical use::

    scored = score_tokens(r_vis, r_txt, v_vis, v_txt, mask, config)          # analyses stop here
    advantages = dyco_advantages(rewards, group_ids, scored, mask, config)   # [B, T] for the loss
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dyco_probe.roles import TAU_TXT, TAU_VIS, Role, label_roles

__all__ = [
    "GRANULARITIES",
    "NORMALISE_OVER",
    "ScorerConfig",
    "alignment_scores",
    "dyco_advantages",
    "group_advantages",
    "normalised_ratios",
    "reweight_advantages",
    "score_tokens",
    "sequence_scores",
    "token_weights",
]

GRANULARITIES = ("token", "sequence", "off")
NORMALISE_OVER = ("group", "batch")

_STD_FLOOR = 1e-8  # sequence scores: below this spread the z-score is meaningless, scores are 0
_ADV_EPS = 1e-4  # group advantages: (R - mean) / (std + 1e-4)


@dataclass(frozen=True)
class ScorerConfig:
    """Scoring knobs, defaults from docs/method.md#token-roles and #advantage-reweighting.

    granularity: ``"token"`` (paper: ``(1 + α w_t) Â``), ``"sequence"`` (published code:
        ``clamp(1 + α score_i) Â``) or ``"off"`` (plain ``Â``).
    alpha: reweighting strength α.
    tau_vis, tau_txt: role thresholds (docs/method.md#token-roles).
    normalise_over: set over which sequence scores are z-scored: ``"group"`` (the completions of one
        prompt) or ``"batch"`` (what the published code did per device).
    min_length: completions with fewer unmasked tokens get sequence score −1 (published: 60 for 3B,
        150 for 7B; 0 disables).
    clamp: bounds of the sequence-level factor ``1 + α·score``.
    eps: guard of ``r_vis + r_txt`` in the normalised ratios.
    """

    granularity: str = "token"
    alpha: float = 0.2
    tau_vis: float = TAU_VIS
    tau_txt: float = TAU_TXT
    normalise_over: str = "group"
    min_length: int = 0
    clamp: tuple[float, float] = (0.8, 1.2)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check_choice("DyCo granularity", self.granularity, GRANULARITIES)
        _check_choice("normalise_over", self.normalise_over, NORMALISE_OVER)
        if self.clamp[0] > self.clamp[1]:
            raise ValueError(f"clamp bounds reversed: {self.clamp}")


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def normalised_ratios(r_vis: Tensor, r_txt: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """``r̃_vis = r_vis / (r_vis + r_txt)`` and ``r̃_txt`` likewise (docs/method.md#attention-signals).

    The denominator is clamped below at ``eps`` (as in the published code), so the pair sums to 1
    wherever there is attention on either modality and is ``(0, 0)`` where there is none.
    Non-finite results (NaN inputs, e.g. at padded positions) become 0.
    """
    total = (r_vis + r_txt).clamp_min(eps)
    out = []
    for r in (r_vis, r_txt):
        x = r / total
        out.append(torch.where(torch.isfinite(x), x, torch.zeros_like(x)))
    return out[0], out[1]


def alignment_scores(r_vis_n: Tensor, r_txt_n: Tensor, roles: Tensor, mask: Tensor) -> Tensor:
    """``s_t = r̃_vis·[visual] + r̃_txt·[text]`` (docs/method.md#alignment-score); 0 for neutral, masked and non-finite entries.

    Args:
        r_vis_n, r_txt_n: ``[B, T]`` normalised ratios (``normalised_ratios``).
        roles: ``[B, T]`` long ``Role`` values (``label_roles``).
        mask: ``[B, T]`` bool.

    Returns:
        ``[B, T]`` scores in ``[0, 1]`` for normalised inputs.
    """
    s = torch.where(roles == Role.VISUAL, r_vis_n, torch.where(roles == Role.TEXT, r_txt_n, 0.0))
    keep = mask.to(torch.bool) & torch.isfinite(s)
    return torch.where(keep, s, torch.zeros_like(s))


def token_weights(s: Tensor, mask: Tensor) -> Tensor:
    """Token weights ``w_t = |o| · exp(s_t) / Σ_k exp(s_k)`` over each completion's unmasked tokens (docs/method.md#advantage-reweighting).

    Every token counts in the softmax, neutral ones with ``s_t = 0``. Each row sums to its number of
    unmasked tokens; masked positions are 0 and a row with no tokens is all zeros. The row maximum is
    subtracted before ``exp``.

    Args:
        s: ``[B, T]`` alignment scores, finite on the mask.
        mask: ``[B, T]`` bool.
    """
    mask = mask.to(torch.bool)
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    s_masked = torch.where(mask, s, neg_inf)
    row_max = s_masked.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # empty rows
    e = torch.where(mask, torch.exp(s_masked - row_max), torch.zeros_like(s))
    denom = e.sum(dim=-1, keepdim=True)
    n_tokens = mask.sum(dim=-1, keepdim=True).to(s.dtype)
    return torch.where(denom > 0, n_tokens * e / torch.where(denom > 0, denom, torch.ones_like(denom)), e)


def _group_index(group_ids: Tensor | None, batch: int, device: torch.device) -> tuple[Tensor, int]:
    """Dense group index ``[B]`` in ``0..G-1`` and ``G``; ``None`` means one group."""
    if group_ids is None:
        return torch.zeros(batch, dtype=torch.long, device=device), 1
    if group_ids.shape != (batch,):
        raise ValueError(f"group_ids must have shape ({batch},), got {tuple(group_ids.shape)}")
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def _group_mean_std(x: Tensor, index: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Per-sample mean and unbiased std of ``x`` over its group (segment sums, two-pass).

    A group of one sample has std 0 (torch would give NaN).
    """
    zeros = torch.zeros(n_groups, dtype=x.dtype, device=x.device)
    counts = zeros.index_add(0, index, torch.ones_like(x))
    mean = zeros.index_add(0, index, x) / counts.clamp_min(1)
    dev = x - mean[index]
    sq = zeros.index_add(0, index, dev * dev)
    var = torch.where(counts > 1, sq / (counts - 1).clamp_min(1), zeros)
    return mean[index], var.sqrt()[index]


def sequence_scores(
    s: Tensor,
    roles: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    *,
    normalise_over: str = "group",
    min_length: int = 0,
) -> Tensor:
    """Sequence-level scores in ``[-1, 1]`` (docs/method.md#advantage-reweighting, published code).

    1. ``score_i = sigmoid(mean of s_t over unmasked non-neutral tokens)``, 0.5 if there are none;
    2. ``score_i ← tanh((score_i − mean) / std)`` over the normalisation set (unbiased std), 0 for the
       whole set where ``std <= 1e-8`` (a set of one sample included);
    3. ``score_i ← −1`` where the completion has fewer than ``min_length`` unmasked tokens. Short
       completions still take part in step 2's statistics, as in the published code.

    Args:
        s, roles, mask: ``[B, T]``.
        group_ids: ``[B]`` long; samples sharing an id form a group. ``None``: one group.
        normalise_over: ``"group"`` or ``"batch"`` (ignores ``group_ids``).
        min_length: anti-collapse guard; 0 disables it.

    Returns:
        ``[B]``.
    """
    _check_choice("normalise_over", normalise_over, NORMALISE_OVER)
    mask = mask.to(torch.bool)
    active = mask & (roles != Role.NEUTRAL)
    n_active = active.sum(dim=-1)
    mean_s = torch.where(active, s, torch.zeros_like(s)).sum(dim=-1) / n_active.clamp_min(1).to(s.dtype)
    raw = torch.where(n_active > 0, torch.sigmoid(mean_s), torch.full_like(mean_s, 0.5))

    ids = group_ids if normalise_over == "group" else None
    index, n_groups = _group_index(ids, raw.shape[0], raw.device)
    mean, std = _group_mean_std(raw, index, n_groups)
    spread = std > _STD_FLOOR
    score = torch.where(spread, torch.tanh((raw - mean) / torch.where(spread, std, 1.0)), 0.0)

    too_short = mask.sum(dim=-1) < min_length
    return torch.where(too_short, torch.full_like(score, -1.0), score)


def group_advantages(rewards: Tensor, group_ids: Tensor | None) -> Tensor:
    """GRPO advantages ``Â_i = (R_i − mean_g R) / (std_g R + 1e-4)`` within each group (docs/method.md#advantage-reweighting).

    ``std`` is the unbiased (n − 1) standard deviation. A group of a single sample has no spread: its
    std is taken as 0 (torch would give NaN), so its advantage is 0.

    Args:
        rewards: ``[B]`` float.
        group_ids: ``[B]`` long, samples of one prompt share an id; ``None``: one group.

    Returns:
        ``[B]``.
    """
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    index, n_groups = _group_index(group_ids, rewards.shape[0], rewards.device)
    mean, std = _group_mean_std(rewards, index, n_groups)
    return (rewards - mean) / (std + _ADV_EPS)


def reweight_advantages(
    advantages: Tensor,
    s: Tensor,
    roles: Tensor,
    mask: Tensor,
    *,
    granularity: str = "token",
    alpha: float = 0.2,
    group_ids: Tensor | None = None,
    normalise_over: str = "group",
    min_length: int = 0,
    clamp: tuple[float, float] = (0.8, 1.2),
) -> Tensor:
    """Token-level DyCo advantages ``Ã`` ``[B, T]`` for every granularity (docs/method.md#advantage-reweighting).

    - ``"token"``: ``(1 + α·w_t)·Â_i`` with ``w_t = token_weights(s, mask)``;
    - ``"sequence"``: ``clamp(1 + α·score_i, *clamp)·Â_i`` with ``score_i = sequence_scores(...)``,
      the same for every token of the completion;
    - ``"off"``: ``Â_i`` on every token.

    Masked positions are 0. ``group_ids``, ``normalise_over`` and ``min_length`` only matter for
    ``"sequence"``.

    Args:
        advantages: ``[B]`` sequence advantages (``group_advantages``); a ``[B, T]`` tensor is taken
            as already per token.
        s, roles, mask: ``[B, T]``.
    """
    _check_choice("granularity", granularity, GRANULARITIES)
    mask = mask.to(torch.bool)
    weights = token_weights(s, mask) if granularity == "token" else None
    score = None
    if granularity == "sequence":
        score = sequence_scores(
            s, roles, mask, group_ids, normalise_over=normalise_over, min_length=min_length
        )
    return _reweighted(advantages, mask, granularity, alpha, clamp, weights, score, like=s)


def _reweighted(advantages, mask, granularity, alpha, clamp, weights, score, like: Tensor) -> Tensor:
    """``reweight_advantages`` from the token weights (``"token"``) or sequence scores (``"sequence"``)."""
    adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)
    if granularity == "token":
        factor = 1.0 + alpha * weights
    elif granularity == "sequence":
        factor = (1.0 + alpha * score).clamp(clamp[0], clamp[1]).unsqueeze(-1)
    else:
        factor = torch.ones((), dtype=like.dtype, device=like.device)
    out = (factor * adv).expand(mask.shape)
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


def score_tokens(
    r_vis: Tensor,
    r_txt: Tensor,
    v_vis: Tensor | None,
    v_txt: Tensor | None,
    mask: Tensor,
    config: ScorerConfig | None = None,
    *,
    roles: Tensor | None = None,
    group_ids: Tensor | None = None,
) -> dict[str, Tensor]:
    """Run the scorer on trace tensors: roles, normalised ratios, ``s_t``, ``w_t`` and sequence scores.

    Args:
        r_vis, r_txt: ``[B, T]`` attention ratios (docs/method.md#attention-signals).
        v_vis, v_txt: ``[B, T]`` dynamics (docs/method.md#modality-dynamics); may be ``None`` when ``roles`` is given.
        mask: ``[B, T]`` bool.
        config: scoring knobs; ``ScorerConfig()`` if omitted.
        roles: ``[B, T]`` roles to use instead of labelling them from the dynamics (ablations,
            ground truth on the synthetic task).
        group_ids: ``[B]`` groups for the sequence-score normalisation; ``None``: one group.

    Returns:
        ``{"roles", "r_vis_n", "r_txt_n", "s", "w"}`` (``[B, T]``, 0 / neutral on masked positions)
        and ``"sequence_score"`` (``[B]``).
    """
    config = config or ScorerConfig()
    mask = mask.to(torch.bool)
    if roles is None:
        if v_vis is None or v_txt is None:
            raise ValueError("need v_vis and v_txt to label roles, or roles")
        roles = label_roles(v_vis, v_txt, mask, tau_vis=config.tau_vis, tau_txt=config.tau_txt)
    else:
        roles = torch.where(mask, roles.long(), int(Role.NEUTRAL))
    r_vis_n, r_txt_n = normalised_ratios(r_vis, r_txt, eps=config.eps)
    r_vis_n, r_txt_n = (torch.where(mask, r, torch.zeros_like(r)) for r in (r_vis_n, r_txt_n))
    s = alignment_scores(r_vis_n, r_txt_n, roles, mask)
    seq = sequence_scores(
        s, roles, mask, group_ids, normalise_over=config.normalise_over, min_length=config.min_length
    )
    return {
        "roles": roles,
        "r_vis_n": r_vis_n,
        "r_txt_n": r_txt_n,
        "s": s,
        "w": token_weights(s, mask),
        "sequence_score": seq,
    }


def dyco_advantages(
    rewards: Tensor,
    group_ids: Tensor | None,
    scored: dict[str, Tensor],
    mask: Tensor,
    config: ScorerConfig | None = None,
) -> Tensor:
    """From rewards and a ``score_tokens`` result to the ``[B, T]`` advantages a policy loss takes.

    ``group_advantages`` reweighted as ``reweight_advantages`` does, with the token weights and
    sequence scores ``score_tokens`` already computed (so ``scored`` must come from the same
    ``group_ids`` and ``config``).
    """
    config = config or ScorerConfig()
    _check_choice("granularity", config.granularity, GRANULARITIES)
    return _reweighted(
        group_advantages(rewards, group_ids),
        mask.to(torch.bool),
        config.granularity,
        config.alpha,
        config.clamp,
        scored["w"],
        scored["sequence_score"],
        like=scored["s"],
    )
