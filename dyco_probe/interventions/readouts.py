"""Reading out an intervention's effect, teacher-forced or free-running (docs/method.md#interventions).

Layout: the prompt batch is left-padded to `L` columns and completions are right-padded after it
(the layout of `generate` and of `trace_offline`), so completion token `t` sits in column `L + t`
and the query that produces it in column `L - 1 + t` for every sample.

- **teacher-forced** (`token_logprobs` under `intervene`): the trajectory is kept; the change in the
  log-probability of its tokens is measured (e.g. of the gold answer tokens).
- **free-running** (`regenerate`): the trajectory is kept up to the first intervened token, then the
  model generates on under the intervention; the answer of the new completion is scored. The
  intervention stays on the same token indices of the trajectory (the chain of thought of the
  synthetic task has a fixed template, so these are the same kinds of tokens as long as the
  regeneration follows it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..completions import (
    _gather,
    completion_mask,
    eos_token_ids,
    pad_token_id,
    placeholder_ids,
    sample,
    teacher_forced_inputs,
    token_logprobs,
)
from .attention import intervene
from .spec import Intervention

__all__ = [
    "completion_mask_from_eos",
    "generate_greedy",
    "placeholder_ids",
    "regenerate",
    "teacher_forced_inputs",
    "token_logprobs",
]

# Per-column inputs: [B, L] tensors that follow the token layout; value used for padding.
_COLUMN_KEYS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}


def completion_mask_from_eos(ids: Tensor, eos_ids) -> Tensor:
    """True up to and including the first EOS of each row (`dyco_probe.completions.completion_mask`)."""
    return completion_mask(ids, eos_ids)


def generate_greedy(model, inputs: dict, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """Greedy completions of a prompt batch without placeholder ids: `(ids [B, T], mask [B, T])`,
    the mask True up to and including the first EOS (T trimmed to the longest)."""
    sampled = sample(model, inputs, max_new_tokens=max_new_tokens)
    return sampled.ids, sampled.mask


@torch.no_grad()
def prefix_cache(model, inputs: dict, length: int):
    """The KV cache of the first `length` columns of a `teacher_forced_inputs` batch, to run many
    teacher-forced forwards that differ only from column `length` on (`token_logprobs_from_prefix`):
    interventions on completion queries leave the prompt before the first such query (column
    `prompt_length - 1`) as it is. None where the inputs carry no position ids to continue from."""
    if inputs.get("position_ids") is None or length < 1:
        return None
    prefix = {k: v for k, v in inputs.items() if k not in _COLUMN_KEYS and k != "position_ids"}
    for key in _COLUMN_KEYS:
        if inputs.get(key) is not None:
            prefix[key] = inputs[key][:, :length]
    prefix["position_ids"] = inputs["position_ids"][..., :length]
    return model(**prefix, use_cache=True, logits_to_keep=1).cache


@torch.no_grad()
def token_logprobs_from_prefix(model, inputs: dict, completion_ids: Tensor, cache, length: int) -> Tensor:
    """`token_logprobs` with columns `0 .. length-1` taken from `cache` (`prefix_cache`); the cache is
    cropped back to them afterwards, ready for the next forward."""
    t = completion_ids.shape[1]
    new = {
        "input_ids": inputs["input_ids"][:, length:],
        "attention_mask": inputs["attention_mask"],
        "position_ids": inputs["position_ids"][..., length:],
    }
    try:
        out = model(**new, cache=cache, use_cache=True, logits_to_keep=t + 1)
    finally:
        cache.crop(length - cache.get_seq_length())  # a negative count: the tokens to drop
    return _gather(out.logits[:, :t], completion_ids)


def _repad(prompt_inputs: dict, extra: list[Tensor], pad_id: int) -> tuple[dict, int]:
    """Left-padded `prompt_i ++ extra_i` batch (per-column inputs rebuilt, the rest kept)."""
    mask = prompt_inputs.get("attention_mask")
    ids = prompt_inputs["input_ids"]
    mask = torch.ones_like(ids) if mask is None else mask
    valid = mask.bool()
    lengths = [int(valid[i].sum()) + len(extra[i]) for i in range(ids.shape[0])]
    width = max(lengths)
    out = {k: v for k, v in prompt_inputs.items() if k not in _COLUMN_KEYS and k != "position_ids"}
    for key, pad in _COLUMN_KEYS.items():
        v = prompt_inputs.get(key)
        if v is None and key != "attention_mask":
            continue
        v = mask if v is None else v
        rows = []
        for i in range(ids.shape[0]):
            if key == "input_ids":
                tail, fill = extra[i].to(v), pad_id
            else:
                tail, fill = torch.full_like(extra[i], 1 if key == "attention_mask" else 0).to(v), pad
            row = torch.cat([v[i][valid[i]], tail])
            rows.append(
                torch.cat([torch.full((width - len(row),), fill, dtype=v.dtype, device=v.device), row])
            )
        out[key] = torch.stack(rows)
    return out, width


@torch.no_grad()
def regenerate(
    model,
    prompt_inputs: dict,
    completion_ids: Tensor,
    prefix_lengths: Tensor,
    *,
    max_new_tokens: int,
    spec: Intervention | None = None,
    selection: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Keep `o_1..o_{k_i}` of each trajectory (`k = prefix_lengths`) and generate greedily from there,
    under `spec` applied to the selected tokens (`selection` `[B, T]`, token indices of the trajectory;
    token `t >= k_i` acts on the query that produces `o_{t+1}`, as in `token_columns`).

    Each sample's completion (prefix included) is cut to `max_new_tokens` tokens. Returns
    `(ids [B, T'], mask [B, T'])`, the mask True up to and including the first EOS.
    """
    prefix = prefix_lengths.long().cpu()
    b = completion_ids.shape[0]
    extra = [completion_ids[i, : int(prefix[i])] for i in range(b)]
    inputs, width = _repad(prompt_inputs, extra, pad_token_id(model))
    budget = max_new_tokens - int(prefix.min()) if b else 0
    if budget <= 0:
        raise ValueError("prefix_lengths leave no token to generate within max_new_tokens")
    context = None
    if spec is not None and selection is not None:
        # trajectory token t >= k_i of sample i -> the query in column width - 1 - k_i + t
        sel = selection.to(torch.bool).cpu()
        queries = torch.zeros(b, width + sel.shape[1], dtype=torch.bool)
        for i in range(b):
            toks = sel[i].nonzero().flatten()
            toks = toks[toks >= int(prefix[i])]
            queries[i, width - 1 - int(prefix[i]) + toks] = True
        # the prompt's columns moved by the re-padding: `positions` keys follow them
        offset = width - prompt_inputs["input_ids"].shape[1] - prefix
        context = intervene(model, spec, queries, completion_start=(width - prefix), key_column_offset=offset)
    if context is None:
        new, _ = generate_greedy(model, inputs, budget)
    else:
        with context:
            new, _ = generate_greedy(model, inputs, budget)
    rows = []
    for i in range(b):
        keep = max(0, max_new_tokens - int(prefix[i]))
        rows.append(torch.cat([extra[i].to(new.device), new[i, :keep]]))
    length = max(len(r) for r in rows)
    pad = pad_token_id(model)
    ids = torch.full((b, length), pad, dtype=completion_ids.dtype, device=new.device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    mask = completion_mask(ids, eos_token_ids(model))
    lengths = torch.tensor([len(r) for r in rows], device=ids.device)
    mask &= torch.arange(length, device=ids.device)[None, :] < lengths[:, None]
    return ids, mask
