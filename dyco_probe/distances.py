"""Distances between attention distributions (docs/method.md#modality-dynamics).

Every function takes distributions over the last dimension, ``[..., K]``, and returns ``[...]``.
Entries outside a key mask are expected to be zero (``masked_distribution`` produces that), so two
distributions over different key sets are compared on the union of their supports.

Fisher–Rao is the default; the others exist for ablations. All of them return finite, non-negative
values: a non-finite result (NaN or inf inputs) is reported as 0, as docs/method.md#modality-dynamics defines for Fisher–Rao.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "DISTANCES",
    "fisher_rao_distance",
    "get_distance",
    "hellinger_distance",
    "jensen_shannon_distance",
    "l2_distance",
    "masked_distribution",
    "modality_dynamics",
    "symmetric_kl_distance",
]

# Entries are floored here before logs in the KL-type distances, matching the floor of
# masked_distribution, so a key with zero mass on one side costs a finite amount.
_LOG_FLOOR = 1e-12


def masked_distribution(weights: Tensor, mask: Tensor, floor: float = 1e-12) -> Tensor:
    """Restrict ``weights`` to ``mask`` and normalise to a probability distribution.

    Args:
        weights: ``[..., K]`` non-negative weights (e.g. an attention row).
        mask: ``[..., K]`` bool, True for the keys that belong to the distribution. Broadcasts
            against ``weights``.
        floor: entries inside the mask are clamped below at this value before normalising
            (docs/method.md#attention-signals), so every key of the span keeps a little mass and logs stay finite.

    Returns:
        ``[..., K]``: zero outside the mask, summing to 1 over the mask. A row whose mask is empty
        is all zeros (no NaN). Non-finite weights inside the mask are treated as 0 (then floored).
    """
    mask = mask.to(torch.bool)
    clean = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)
    w = torch.where(mask, clean.clamp_min(floor), torch.zeros_like(clean))
    total = w.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), w)


def _finite_or_zero(d: Tensor) -> Tensor:
    return torch.where(torch.isfinite(d), d, torch.zeros_like(d))


def fisher_rao_distance(p: Tensor, q: Tensor) -> Tensor:
    """Fisher–Rao distance ``2·arccos(BC(p, q))``, ``BC = clamp(Σ_k sqrt(p_k q_k), 0, 1)`` (docs/method.md#modality-dynamics).

    Range ``[0, π]``; ``π`` for disjoint supports; non-finite results are 0.

    ``arccos`` is ill-conditioned next to 1: in float32 a distribution whose entries sum to
    ``1 − 6e-8`` would sit ``7e-4`` away from itself. So the angle between ``sqrt(p)`` and
    ``sqrt(q)`` is computed in the stable form ``2·atan2(|u − v|, |u + v|)`` on the unit vectors
    ``u = sqrt(p)/|sqrt(p)|``, ``v = sqrt(q)/|sqrt(q)|``. For distributions this equals
    ``arccos(BC)`` exactly (``|sqrt(p)| = 1``); like the published code, inputs that do not quite
    sum to 1 are thereby renormalised. An all-zero input (empty span) has ``BC = 0`` and gives ``π``,
    as the literal formula does.
    """
    sp, sq = p.clamp_min(0).sqrt(), q.clamp_min(0).sqrt()
    np_, nq = torch.linalg.vector_norm(sp, dim=-1), torch.linalg.vector_norm(sq, dim=-1)
    empty = (np_ == 0) | (nq == 0)
    u = sp / torch.where(np_ == 0, torch.ones_like(np_), np_).unsqueeze(-1)
    v = sq / torch.where(nq == 0, torch.ones_like(nq), nq).unsqueeze(-1)
    half_angle = torch.atan2(torch.linalg.vector_norm(u - v, dim=-1), torch.linalg.vector_norm(u + v, dim=-1))
    d = torch.where(empty, torch.full_like(half_angle, math.pi), 4.0 * half_angle)
    return _finite_or_zero(d)


def hellinger_distance(p: Tensor, q: Tensor) -> Tensor:
    """Hellinger distance ``|sqrt(p) − sqrt(q)|₂ / sqrt(2)``; range ``[0, 1]`` on distributions."""
    d = torch.linalg.vector_norm(p.clamp_min(0).sqrt() - q.clamp_min(0).sqrt(), dim=-1) / math.sqrt(2.0)
    return _finite_or_zero(d)


def l2_distance(p: Tensor, q: Tensor) -> Tensor:
    """Euclidean distance ``|p − q|₂``; range ``[0, sqrt(2)]`` on distributions."""
    return _finite_or_zero(torch.linalg.vector_norm(p - q, dim=-1))


def jensen_shannon_distance(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon distance: the square root of the JS divergence in nats; range ``[0, sqrt(ln 2)]``."""
    p, q = p.clamp_min(0), q.clamp_min(0)
    m = 0.5 * (p + q)
    # Σ p log(p/m) + q log(q/m) = Σ p log p + q log q − 2 m log m, with 0 log 0 = 0.
    js = (0.5 * (torch.xlogy(p, p) + torch.xlogy(q, q)) - torch.xlogy(m, m)).sum(dim=-1)
    return _finite_or_zero(js.clamp_min(0).sqrt())


def symmetric_kl_distance(p: Tensor, q: Tensor) -> Tensor:
    """Symmetric KL ``KL(p‖q) + KL(q‖p) = Σ (p − q)(log p − log q)``, entries floored at 1e-12.

    Not a metric (no triangle inequality) but non-negative, zero on identical inputs, and finite
    where one side has no mass on a key: the floor caps that key's cost.
    """
    lp = p.clamp_min(_LOG_FLOOR).log()
    lq = q.clamp_min(_LOG_FLOOR).log()
    # Flooring is monotone, so each term has the sign of (p − q)² and the sum is >= 0.
    d = ((p - q) * (lp - lq)).sum(dim=-1)
    return _finite_or_zero(d.clamp_min(0))


DISTANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "fisher_rao": fisher_rao_distance,
    "hellinger": hellinger_distance,
    "l2": l2_distance,
    "jensen_shannon": jensen_shannon_distance,
    "symmetric_kl": symmetric_kl_distance,
}


def get_distance(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Look a distance up by name; raises ``ValueError`` listing the valid names."""
    try:
        return DISTANCES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown distance {name!r}; valid: {', '.join(DISTANCES)}") from None


def modality_dynamics(
    prev_vis: Tensor,
    cur_vis: Tensor,
    prev_txt: Tensor,
    cur_txt_restricted: Tensor,
    distance: str = "fisher_rao",
) -> tuple[Tensor, Tensor]:
    """``v_vis(t)`` and ``v_txt(t)`` of docs/method.md#modality-dynamics from within-modality distributions.

    Args:
        prev_vis, cur_vis: ``p_vis(t-1)``, ``p_vis(t)``, ``[..., K_img]``.
        prev_txt: ``p_txt(t-1)`` over the keys of ``X_{t-1}``, ``[..., K]``.
        cur_txt_restricted: ``p̂_txt(t)``: ``a_t`` restricted to the keys of ``X_{t-1}`` and
            renormalised, laid out like ``prev_txt``.
        distance: a key of ``DISTANCES``.

    Returns:
        ``(v_vis, v_txt)``, each ``[...]``.
    """
    dist = get_distance(distance)
    return dist(prev_vis, cur_vis), dist(prev_txt, cur_txt_restricted)
