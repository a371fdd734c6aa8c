"""Policy-gradient losses of the minimal training loop (docs/method.md#policy-losses).

All losses take right-padded ``[B, T]`` per-token log-probabilities of the sampled completion tokens
under the current policy (``logp``, with grad) and the sampling policy (``old_logp``), the advantages
(``[B, T]`` DyCo-reweighted, or ``[B]`` broadcast over tokens) and a bool ``mask``. Values under the
mask never matter, not even NaN or ``-inf``. Reductions follow the published training code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LOSSES", "LossConfig", "dynamic_sampling_mask", "kl_k3", "policy_loss"]

LOSSES = ("grpo", "dr_grpo", "dapo", "gspo", "sapo")


@dataclass(frozen=True)
class LossConfig:
    """Loss hyperparameters (docs/method.md#policy-losses).

    eps: GRPO / Dr. GRPO clip range, ``clip(ρ, 1 − eps, 1 + eps)``.
    beta: KL coefficient of every loss but DAPO; the KL term needs ``ref_logp``.
    dapo_beta: DAPO's own KL coefficient (0: DAPO drops the KL term).
    eps_low, eps_high: DAPO's decoupled clip, ``clip(ρ, 1 − eps_low, 1 + eps_high)``.
    gspo_eps_low, gspo_eps_high: GSPO's clip of the sequence ratio.
    sapo_tau_pos, sapo_tau_neg: SAPO gate temperatures for ``A_t > 0`` and ``A_t <= 0``.
    max_completion_length: Dr. GRPO's constant divisor; ``None``: the ``T`` of the batch.
    """

    eps: float = 0.2
    beta: float = 0.04
    dapo_beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    gspo_eps_low: float = 3e-4
    gspo_eps_high: float = 4e-4
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    max_completion_length: int | None = None


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of ``KL(π_θ ‖ π_ref)``: ``exp(r) − r − 1`` with ``r = ref_logp − logp``; >= 0."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def _as_float(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over all True entries of ``mask`` (0 if none)."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp_min(1)


def _sequence_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``[B]``: mean of ``x`` over each row's unmasked tokens (0 for an empty row)."""
    return torch.where(mask, x, 0.0).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1)


def _clip_surrogate(ratio: Tensor, adv: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """PPO loss ``−min(ρA, clip(ρ, low, high)A)`` and where the clip is active (zero gradient)."""
    loss = -torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)
    clipped = ((ratio > high) & (adv > 0)) | ((ratio < low) & (adv < 0))
    return loss, clipped


def policy_loss(
    name: str,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    config: LossConfig | None = None,
    truncated: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Scalar policy loss and detached metrics, for ``name`` in ``LOSSES``.

    With ``ρ_t = exp(logp − old_logp)`` and ``KL_t = kl_k3(logp, ref_logp)`` (added as ``β·KL_t``
    per token when ``β > 0`` and ``ref_logp`` is given):

    - ``"grpo"``: ``−min(ρA, clip(ρ, 1 ± eps)A) + β KL``, mean over each sequence's tokens, then
      mean over the ``B`` sequences.
    - ``"dr_grpo"``: same per-token loss, summed over all tokens and divided by
      ``B · max_completion_length``.
    - ``"dapo"``: decoupled clip ``[1 − eps_low, 1 + eps_high]``, ``β = dapo_beta`` (0), mean over
      all unmasked tokens of the batch; completions flagged in ``truncated`` (``[B]`` bool) are
      masked out.
    - ``"gspo"``: sequence ratio ``s_i = exp(mean_t log ρ_t)`` clipped to
      ``[1 − gspo_eps_low, 1 + gspo_eps_high]``, surrogate ``−min(s_i A_i, clip(s_i) A_i)`` with
      ``A_i`` the mean of the token advantages, plus ``β·mean_t KL_t``; mean over sequences.
    - ``"sapo"``: soft gate ``g_t = sigmoid(τ(ρ_t − 1))·4/τ`` (``τ_pos`` where ``A_t > 0``, else
      ``τ_neg``), loss ``−g_t A_t + β KL``, reduced like GRPO. At ``ρ = 1`` the gate is ``2/τ`` and
      its slope is 1, the unclipped policy gradient.

    Empty completions count as sequences with loss 0 in the ``B``-means (published convention).

    Returns:
        ``(loss, metrics)``; metrics has ``ratio_mean`` and ``kl_mean`` (over unmasked tokens; for
        GSPO ``ratio_mean`` is over sequence ratios), ``clip_fraction`` for the clipped losses
        (fraction of tokens, or of sequences for GSPO, whose gradient the clip removes) and
        ``gate_mean`` for SAPO.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    cfg = config or LossConfig()
    mask = mask.to(torch.bool)
    if name == "dapo" and truncated is not None:
        mask = mask & ~truncated.to(torch.bool).unsqueeze(-1)
    logp, old_logp = _as_float(logp), _as_float(old_logp)
    adv = _as_float(advantages)
    adv = adv if adv.dim() == 2 else adv.unsqueeze(-1)
    adv = torch.where(mask, adv.expand(mask.shape), 0.0)
    # Sanitise before exp: garbage under the mask would otherwise turn gradients into NaN.
    log_ratio = torch.where(mask, logp - old_logp, 0.0)
    ratio = torch.exp(log_ratio)

    beta = cfg.dapo_beta if name == "dapo" else cfg.beta
    if ref_logp is not None:
        kl = kl_k3(torch.where(mask, logp, 0.0), torch.where(mask, _as_float(ref_logp), 0.0))
    else:
        kl = torch.zeros_like(ratio)
    use_kl = beta > 0 and ref_logp is not None

    metrics: dict[str, float] = {"kl_mean": float(_masked_mean(kl.detach(), mask))}
    n_seq = mask.shape[0]

    if name == "gspo":
        seq_ratio = torch.exp(_sequence_mean(log_ratio, mask))
        seq_adv = _sequence_mean(adv, mask)
        seq_loss, clipped = _clip_surrogate(seq_ratio, seq_adv, 1 - cfg.gspo_eps_low, 1 + cfg.gspo_eps_high)
        if use_kl:
            seq_loss = seq_loss + beta * _sequence_mean(kl, mask)
        loss = seq_loss.sum() / max(n_seq, 1)
        nonempty = mask.any(dim=-1)
        metrics["ratio_mean"] = float(_masked_mean(seq_ratio.detach(), nonempty))
        metrics["clip_fraction"] = float(_masked_mean(clipped.float(), nonempty))
        return loss, metrics

    if name == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg).to(ratio.dtype)
        gate = torch.sigmoid(tau * (ratio - 1)) * 4 / tau
        per_token = -gate * adv
        metrics["gate_mean"] = float(_masked_mean(gate.detach(), mask))
    else:
        eps_low, eps_high = (cfg.eps_low, cfg.eps_high) if name == "dapo" else (cfg.eps, cfg.eps)
        per_token, clipped = _clip_surrogate(ratio, adv, 1 - eps_low, 1 + eps_high)
        metrics["clip_fraction"] = float(_masked_mean(clipped.float(), mask))
    if use_kl:
        per_token = per_token + beta * kl
    metrics["ratio_mean"] = float(_masked_mean(ratio.detach(), mask))

    if name == "dapo":
        loss = _masked_mean(per_token, mask)
    elif name == "dr_grpo":
        max_len = cfg.max_completion_length or mask.shape[-1]
        loss = torch.where(mask, per_token, 0.0).sum() / (max(n_seq, 1) * max_len)
    else:  # grpo, sapo
        loss = _sequence_mean(per_token, mask).sum() / max(n_seq, 1)
    return loss, metrics


def dynamic_sampling_mask(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """DAPO dynamic sampling: ``[B]`` bool, False for samples whose group's rewards are all equal.

    Such groups (all right or all wrong, or a single sample) have zero advantage and no gradient.
    """
    _, index = torch.unique(group_ids, return_inverse=True)
    n_groups = int(index.max()) + 1 if index.numel() else 0
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    init = torch.zeros(n_groups, dtype=r.dtype, device=r.device)
    hi = init.scatter_reduce(0, index, r, reduce="amax", include_self=False)
    lo = init.scatter_reduce(0, index, r, reduce="amin", include_self=False)
    return (hi > lo)[index]
