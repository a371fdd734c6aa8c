"""Reading out an intervention's effect, teacher-forced or free-running (SPEC §8).

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


def placeholder_ids(model) -> list[int]:
    """Image / video placeholder and vision marker ids from the config: generation must not emit them
    (a teacher-forced forward would read them as images)."""
    config = model.config
    names = (
        "image_token_id",
        "image_token_index",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
        "video_token_index",  # LLaVA-OneVision
        "boi_token_index",  # Gemma 3's image start / end markers
        "eoi_token_index",
    )
    return sorted({int(v) for v in (getattr(config, n, None) for n in names) if isinstance(v, int)})


def _eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.get_text_config().eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(x) for x in eos]


def _pad_id(model) -> int:
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = model.config.get_text_config().pad_token_id
    return int(pad) if pad is not None else 0


def completion_mask_from_eos(ids: Tensor, eos_ids) -> Tensor:
    """True up to and including the first EOS of each row."""
    if not eos_ids or ids.shape[1] == 0:
        return torch.ones_like(ids, dtype=torch.bool)
    is_eos = torch.isin(ids, torch.tensor(list(eos_ids), device=ids.device)).long()
    return (is_eos.cumsum(-1) - is_eos) == 0


def generate_greedy(model, inputs: dict, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """Greedy completions of a prompt batch without placeholder ids: `(ids [B, T], mask [B, T])`,
    the mask True up to and including the first EOS (T trimmed to the longest)."""
    suppress = sorted(set(placeholder_ids(model)) | set(model.generation_config.suppress_tokens or []))
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=_pad_id(model),
            suppress_tokens=suppress or None,
        )
    ids = out[:, inputs["input_ids"].shape[1] :]
    mask = completion_mask_from_eos(ids, _eos_ids(model))
    length = int(mask.sum(-1).max()) if ids.numel() else 0
    return ids[:, :length], mask[:, :length]


def teacher_forced_inputs(
    model, prompt_inputs: dict, completion_ids: Tensor, completion_mask: Tensor
) -> dict:
    """Model inputs for `prompt ++ completion` (prompt left-padded, completion right-padded after it),
    with the position ids `generate` would use (Qwen: 3-D mRoPE)."""
    prompt_ids = prompt_inputs["input_ids"]
    completion_ids = completion_ids.to(prompt_ids.device)
    prompt_mask = prompt_inputs.get("attention_mask")
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    skip = ("input_ids", "attention_mask", "position_ids", "completion_mask", "prompt_lengths")
    inputs = {k: v for k, v in prompt_inputs.items() if k not in skip}
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = completion_mask.to(device=prompt_mask.device, dtype=prompt_mask.dtype)
    inputs["attention_mask"] = torch.cat([prompt_mask, mask], dim=1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if inputs.get(key) is not None:
            v = inputs[key]
            inputs[key] = torch.cat([v, torch.zeros_like(completion_ids, dtype=v.dtype)], dim=1)
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if prepare is not None:
        position_ids = prepare(input_ids, dict(inputs))
        if position_ids is not None:
            inputs["position_ids"] = position_ids
    inputs["input_ids"] = input_ids
    return inputs


@torch.no_grad()
def token_logprobs(model, inputs: dict, completion_ids: Tensor) -> Tensor:
    """`[B, T]` float32: `log p(o_{t+1} | prefix)` of each completion token of a `teacher_forced_inputs`
    batch (completion = the last `T` columns)."""
    t = completion_ids.shape[1]
    logits = model(**inputs, use_cache=False, logits_to_keep=t + 1).logits[:, :t].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, completion_ids.to(logp.device)[..., None])[..., 0]


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
    logp = torch.log_softmax(out.logits[:, :t].float(), dim=-1)
    return logp.gather(-1, completion_ids.to(logp.device)[..., None])[..., 0]


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
    inputs, width = _repad(prompt_inputs, extra, _pad_id(model))
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
        context = intervene(model, spec, queries, completion_start=(width - prefix))
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
    pad = _pad_id(model)
    ids = torch.full((b, length), pad, dtype=completion_ids.dtype, device=new.device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    mask = completion_mask_from_eos(ids, _eos_ids(model))
    lengths = torch.tensor([len(r) for r in rows], device=ids.device)
    mask &= torch.arange(length, device=ids.device)[None, :] < lengths[:, None]
    return ids, mask
