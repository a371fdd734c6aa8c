"""Which queries an intervention touches: completion tokens chosen by role, matched controls, positions.

Selections are `[B, T]` bool masks over completion tokens, indexed like a `Trace`: token `t`
(0-based) is `o_{t+1}`. **An intervention on token `t` acts on the query whose logits produce
`o_{t+1}`**, i.e. the query in the column of `o_t` (for `t = 0` the last prompt position): column
`L - 1 + t` when the prompt batch is padded to `L` columns. That is the same query whose attention
row the tracer records as `a_{t+1}` (docs/method.md#attention-signals), so a role computed from a trace and an intervention on
that token concern the same attention row. The intervened query's output changes the residual stream
at its column, hence (through keys and values) every later column too; it does not change `o_{t+1}`
itself in a teacher-forced run, only its probability.

`token_columns` turns a token selection into the `[B, C]` column mask `intervene` takes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import torch
from torch import Tensor

from ..roles import ROLE_NAMES, Role

__all__ = [
    "TARGETS",
    "all_tokens",
    "ground_truth_roles",
    "matched_random",
    "role_tokens",
    "select_tokens",
    "token_columns",
    "token_positions",
]

TARGETS = ("visual", "text", "neutral", "random:visual", "random:text", "random:neutral", "all")


def role_tokens(roles: Tensor, mask: Tensor, role: str | int | Role) -> Tensor:
    """Tokens of one role: `[B, T]` bool (`role` a name of `ROLE_NAMES` or a `Role`)."""
    value = ROLE_NAMES.index(role) if isinstance(role, str) else int(role)
    return (roles == value) & mask.to(torch.bool)


def all_tokens(mask: Tensor) -> Tensor:
    """Every real completion token."""
    return mask.to(torch.bool).clone()


def token_positions(batch_size: int, length: int, positions) -> Tensor:
    """Explicit token indices: `positions` is one list for every sample or one list per sample."""
    out = torch.zeros(batch_size, length, dtype=torch.bool)
    per_sample = positions and isinstance(positions[0], (list, tuple))
    for i in range(batch_size):
        for t in positions[i] if per_sample else positions:
            t = int(t)
            if not -length <= t < length:
                raise IndexError(f"token {t} out of range for {length} tokens")
            out[i, t] = True
    return out


def _seed(*parts) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def matched_random(
    selection: Tensor,
    mask: Tensor,
    *,
    seed: int = 0,
    sample_keys: Sequence | None = None,
    eligible: Tensor | None = None,
) -> Tensor:
    """The matched random control: per sample, as many tokens as `selection` has, drawn uniformly
    without replacement from the sample's eligible tokens (default: its real completion tokens).

    The draw of sample `i` depends only on `(seed, sample_keys[i], count)`, never on the batch it
    sits in, so every layer, strength and rerun sees the same control tokens.
    """
    selection, mask = selection.to(torch.bool).cpu(), mask.to(torch.bool).cpu()
    eligible = mask if eligible is None else eligible.to(torch.bool).cpu() & mask
    keys = list(range(selection.shape[0])) if sample_keys is None else list(sample_keys)
    out = torch.zeros_like(selection)
    for i, key in enumerate(keys):
        k = int(selection[i].sum())
        pool = eligible[i].nonzero().flatten()
        if k == 0:
            continue
        if k > len(pool):
            raise ValueError(f"sample {key}: {k} tokens to match but only {len(pool)} eligible")
        gen = torch.Generator().manual_seed(_seed(seed, key, k))
        out[i, pool[torch.randperm(len(pool), generator=gen)[:k]]] = True
    return out


def select_tokens(
    target: str,
    roles: Tensor | None,
    mask: Tensor,
    *,
    seed: int = 0,
    sample_keys: Sequence | None = None,
) -> Tensor:
    """Resolve a target name to a `[B, T]` token selection.

    Targets: a role (`"visual"`, `"text"`, `"neutral"`; neutral excludes `o_1`, which is neutral by
    convention), `"random:<role>"` (matched random control of that role's selection), `"all"` (every
    real token) or `"positions:3,7,9"` (token indices, the same for every sample).
    """
    mask = mask.to(torch.bool)
    if target == "all":
        return all_tokens(mask)
    if target.startswith("positions:"):
        items = [int(x) for x in re.split(r"[,\s]+", target.split(":", 1)[1].strip()) if x]
        return token_positions(mask.shape[0], mask.shape[1], items).to(mask.device) & mask
    role = target.split(":", 1)[1] if target.startswith("random:") else target
    if role not in ROLE_NAMES:
        raise ValueError(f"unknown target {target!r}; valid: {', '.join(TARGETS)} or positions:i,j,...")
    if roles is None:
        raise ValueError(f"target {target!r} needs token roles")
    chosen = role_tokens(roles.to(mask.device), mask, role)
    if role == "neutral":
        chosen[:, :1] = False
    if target.startswith("random:"):
        return matched_random(chosen, mask, seed=seed, sample_keys=sample_keys).to(mask.device)
    return chosen


def token_columns(selection: Tensor, prompt_length: int | Tensor, num_columns: int | None = None) -> Tensor:
    """Column mask of the queries of the selected tokens: token `t` of sample `i` -> column
    `prompt_length[i] - 1 + t` (see the module docstring). Returns `[B, num_columns]` bool
    (default width: the last selected column + 1, at least `max prompt_length`)."""
    b, t = selection.shape
    start = torch.as_tensor(prompt_length, dtype=torch.long).expand(b).cpu()
    sel = selection.to(torch.bool).cpu()
    rows, toks = sel.nonzero(as_tuple=True)
    cols = start[rows] - 1 + toks
    width = num_columns
    if width is None:
        width = max(int(start.max()) if b else 0, int(cols.max()) + 1 if cols.numel() else 0)
    out = torch.zeros(b, width, dtype=torch.bool)
    keep = cols < width
    out[rows[keep], cols[keep]] = True
    return out.to(selection.device)


def ground_truth_roles(tokenizer, completion_ids: Tensor, mask: Tensor, problems: Sequence) -> Tensor:
    """Ground-truth token roles of the synthetic task: `[B, T]` long `Role` values (padding neutral).

    The words of each completion are labelled against its problem and aligned to the tokens by
    `dyco_probe.task.alignment.align_roles` (the ground truth the labellers use too).
    """
    from ..task.alignment import align_roles

    out = torch.zeros(completion_ids.shape, dtype=torch.long)
    for i, problem in enumerate(problems):
        if problem is None:
            raise ValueError(
                f"sample {i} has no synthetic problem: ground-truth roles need the synthetic task"
            )
        n = int(mask[i].sum())
        out[i, :n] = torch.tensor(align_roles(tokenizer, completion_ids[i, :n].tolist(), problem).roles)
    return out.to(completion_ids.device)
