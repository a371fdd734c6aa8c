"""Token roles from modality dynamics (docs/method.md#token-roles)."""

from __future__ import annotations

import enum

import torch
from torch import Tensor

__all__ = ["PUBLISHED_TAU", "ROLE_NAMES", "TAU_TXT", "TAU_VIS", "Role", "label_roles", "tau_label"]

# The published code's asymmetric role thresholds (docs/method.md#token-roles): every default that
# labels roles from the dynamics reads them here.
TAU_VIS = 0.0
TAU_TXT = 0.05
PUBLISHED_TAU = (TAU_VIS, TAU_TXT)


def tau_label(tau_vis: float = TAU_VIS, tau_txt: float = TAU_TXT) -> str:
    """How tables name a threshold pair, e.g. ``tau 0 / 0.05``."""
    return f"tau {tau_vis:g} / {tau_txt:g}"


class Role(enum.IntEnum):
    """Role of a generated token; the values are what role tensors hold."""

    NEUTRAL = 0
    VISUAL = 1
    TEXT = 2


ROLE_NAMES = ("neutral", "visual", "text")


def label_roles(
    v_vis: Tensor,
    v_txt: Tensor,
    mask: Tensor,
    tau_vis: float = TAU_VIS,
    tau_txt: float = TAU_TXT,
) -> Tensor:
    """Label each completion token visual, text or neutral from ``Δ = v_vis − v_txt``.

    ``visual`` where ``Δ > tau_vis``, ``text`` where ``Δ < −tau_txt``, ``neutral`` otherwise
    (so ``Δ == tau_vis`` and ``Δ == −tau_txt`` are neutral). The first token (``t = 0``, i.e. ``o_1``)
    has no previous step and is always neutral; so are masked tokens and tokens whose ``Δ`` is NaN.
    The defaults are the published code's asymmetric thresholds.

    Args:
        v_vis, v_txt: ``[B, T]`` dynamics (docs/method.md#modality-dynamics); their values at ``t = 0`` are ignored.
        mask: ``[B, T]`` bool, True for real completion tokens (right-padded).
        tau_vis, tau_txt: thresholds; the visual and text regions must not overlap
            (``tau_vis >= −tau_txt``).

    Returns:
        ``[B, T]`` long tensor of ``Role`` values.
    """
    if tau_vis < -tau_txt:
        raise ValueError(f"thresholds overlap: need tau_vis >= -tau_txt, got {tau_vis=} {tau_txt=}")
    delta = v_vis - v_txt
    valid = mask.to(torch.bool) & ~torch.isnan(delta)
    valid[..., :1] = False  # o_1 has no previous step
    roles = torch.where(delta > tau_vis, int(Role.VISUAL), torch.where(delta < -tau_txt, int(Role.TEXT), 0))
    return torch.where(valid, roles, 0).long()
