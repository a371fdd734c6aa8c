"""A completion in a batch: the conventions generation, tracing, interventions and RL share.

- **ids**: `eos_token_ids`, `pad_token_id`, `placeholder_ids` (image / video placeholders and vision
  markers, which a completion must never contain: a teacher-forced forward would read them as images);
- **the mask**: `completion_mask`, True up to and including the first EOS;
- **sampling**: `sample`, the one wrapper around `model.generate` (greedy, or sampled with temperature,
  top-p and top-k, where top-k 0 means the full distribution; placeholders always suppressed), which
  returns the completion ids, their mask and which rows ran out of tokens;
- **teacher-forced inputs**, in two layouts:
  - `teacher_forced_inputs`: the prompt batch left-padded as `generate` got it, the completions
    right-padded after it (completion token `t` in column `L + t` for every row, as `generate`
    produces them), with the position ids `generate` would use. Tracing and interventions use it;
  - `packed_batch`: each row's `prompt ++ completion` left-padded as a whole, with a mask of the
    completion positions. Training uses it (RL updates, pretraining, notes);
- **log-probabilities**: `token_logprobs` (first layout) and `completion_logprobs` (packed);
- **forward inputs**: `forward_inputs` reads a forward's inputs in a model pre-hook; a forward without a
  cache is a *prefill* (the prompt of a `generate` call, or a whole teacher-forced sequence).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Sampled",
    "completion_ids_for",
    "completion_logprobs",
    "completion_mask",
    "eos_token_ids",
    "forward_inputs",
    "generation_position_ids",
    "model_inputs",
    "packed_batch",
    "pad_token_id",
    "placeholder_ids",
    "right_align",
    "sample",
    "teacher_forced_inputs",
    "token_logprobs",
]

# Config attributes holding image / video placeholder and vision marker ids, across families.
_PLACEHOLDER_NAMES = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "video_token_index",  # LLaVA-OneVision
    "boi_token_index",  # Gemma 3's image start / end markers
    "eoi_token_index",
)
_PACKED_KEYS = ("completion_mask", "prompt_lengths")  # dyco_probe's bookkeeping in a packed batch


# -- ids -----------------------------------------------------------------------------------------------


def _as_list(ids) -> list[int]:
    return [int(ids)] if isinstance(ids, int) else [int(x) for x in ids]


def eos_token_ids(model, tokenizer=None, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
    """End-of-sequence ids: `eos_token_id` if given, else the model's generation config, its text
    config, then the tokenizer's; in that order, without repeats (`[]` when none is known)."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = getattr(model.config.get_text_config(), "eos_token_id", None)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    return [] if eos_token_id is None else list(dict.fromkeys(_as_list(eos_token_id)))


def pad_token_id(model, tokenizer=None) -> int:
    """The padding id: the tokenizer's if given and set, else the generation config's, the text
    config's, or 0."""
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    if pad is None:
        pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config.get_text_config(), "pad_token_id", None)
    return int(pad) if pad is not None else 0


def placeholder_ids(model) -> list[int]:
    """Image / video placeholder and vision marker ids from the config: generation must not emit them
    (a teacher-forced forward would read them as images)."""
    config = model.config
    values = (getattr(config, n, None) for n in _PLACEHOLDER_NAMES)
    return sorted({int(v) for v in values if isinstance(v, int)})


def completion_mask(ids: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """`[B, T]` bool: True up to and including the first EOS of each row (everything without EOS ids)."""
    if not eos_ids or ids.shape[1] == 0:
        return torch.ones_like(ids, dtype=torch.bool)
    is_eos = torch.isin(ids, torch.tensor(list(eos_ids), device=ids.device)).long()
    return (is_eos.cumsum(-1) - is_eos) == 0  # no EOS strictly before t


# -- sampling ------------------------------------------------------------------------------------------


@dataclass
class Sampled:
    """Completions of a prompt batch (`num_return_sequences` consecutive rows per prompt).

    `ids` `[B, T]`, trimmed to the longest completion; `mask` True up to and including the first EOS;
    `truncated` `[B]` marks rows without EOS; `sequences` is `generate`'s output, prompt included."""

    ids: Tensor
    mask: Tensor
    truncated: Tensor
    sequences: Tensor

    def row(self, i: int) -> list[int]:
        """The completion ids of row `i` (its EOS included)."""
        return self.ids[i][self.mask[i]].tolist()


def sample(
    model,
    inputs: dict,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_return_sequences: int = 1,
    tokenizer=None,
    wrap: Callable | None = None,
) -> Sampled:
    """Generate completions of a prompt batch: greedy, or sampled with `temperature`, `top_p` and
    `top_k` (0: no top-k cut, the full distribution). Placeholder ids (`placeholder_ids`, and the
    generation config's own `suppress_tokens`) are never generated.

    `tokenizer` (optional) supplies the pad and EOS ids when the model's configs do not. `wrap`, if
    given, is called as `wrap(inputs, run)` and must return `run()`'s output, the sequences (tracing
    uses it to observe the call). The model runs in eval mode without gradients and is handed back in
    the mode it came in.
    """
    suppress = set(placeholder_ids(model)) | set(model.generation_config.suppress_tokens or [])
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_return_sequences,
        pad_token_id=pad_token_id(model, tokenizer),
        suppress_tokens=sorted(suppress) or None,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)

    def run():
        with torch.no_grad():
            return model.generate(**inputs, **kwargs)

    was_training = model.training
    model.eval()
    try:
        sequences = wrap(inputs, run) if wrap is not None else run()
    finally:
        model.train(was_training)
    ids = sequences[:, inputs["input_ids"].shape[1] :]
    eos = eos_token_ids(model, tokenizer)
    mask = completion_mask(ids, eos)
    length = int(mask.sum(-1).max()) if ids.numel() else 0
    ids, mask = ids[:, :length], mask[:, :length]
    if eos:
        ended = torch.isin(ids, torch.tensor(eos, device=ids.device)) & mask
        truncated = ~ended.any(-1)
    else:
        truncated = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    return Sampled(ids=ids, mask=mask, truncated=truncated, sequences=sequences)


# -- teacher-forced inputs: the layout of `generate` ---------------------------------------------------


def generation_position_ids(model, input_ids: Tensor, inputs: dict) -> Tensor | None:
    """Position ids as `generate` makes them (Qwen: 3-D mRoPE from the image grids; others: from the
    attention mask), or None where the model leaves them to its forward."""
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if prepare is None:
        return None
    return prepare(input_ids, dict(inputs))


def teacher_forced_inputs(
    model, prompt_inputs: dict, completion_ids: Tensor, completion_mask: Tensor, *, positions: bool = True
) -> dict:
    """Model inputs for `prompt ++ completion`: the prompt batch as `generate` got it (left-padded),
    the completions right-padded after it, and (with `positions`) the position ids `generate` would use.

    Per-column inputs are extended over the completion columns: the attention mask by
    `completion_mask`, `mm_token_type_ids` / `token_type_ids` by zeros (completion tokens are text).
    """
    prompt_ids = prompt_inputs["input_ids"]
    completion_ids = completion_ids.to(prompt_ids.device)
    prompt_mask = prompt_inputs.get("attention_mask")
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    skip = ("input_ids", "attention_mask", "position_ids", *_PACKED_KEYS)
    inputs = {k: v for k, v in prompt_inputs.items() if k not in skip}
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = completion_mask.to(device=prompt_mask.device, dtype=prompt_mask.dtype)
    inputs["attention_mask"] = torch.cat([prompt_mask, mask], dim=1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if inputs.get(key) is not None:
            v = inputs[key]
            inputs[key] = torch.cat([v, torch.zeros_like(completion_ids, dtype=v.dtype)], dim=1)
    if positions:
        position_ids = generation_position_ids(model, input_ids, inputs)
        if position_ids is not None:
            inputs["position_ids"] = position_ids
    inputs["input_ids"] = input_ids
    return inputs


def _gather(logits: Tensor, targets: Tensor) -> Tensor:
    """`log_softmax(logits)` at `targets`, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.to(logp.device).unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def token_logprobs(model, inputs: dict, completion_ids: Tensor) -> Tensor:
    """`[B, T]` float32: `log p(o_{t+1} | prefix)` of each completion token of a `teacher_forced_inputs`
    batch (completion = the last `T` columns)."""
    t = completion_ids.shape[1]
    logits = model(**inputs, use_cache=False, logits_to_keep=t + 1).logits[:, :t]
    return _gather(logits, completion_ids)


# -- teacher-forced inputs: packed rows ----------------------------------------------------------------


def completion_ids_for(handle, completions: Sequence[str], add_eos: bool = True) -> list[list[int]]:
    """Token ids of completion texts (no special tokens added), each followed by EOS if `add_eos`."""
    tok = handle.tokenizer
    out = []
    for i, text in enumerate(completions):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if add_eos:
            ids = ids + [tok.eos_token_id]
        if not ids:
            raise ValueError(f"completion {i} is empty")
        out.append(ids)
    return out


def packed_batch(
    handle, prompts: Sequence[str], images: Sequence[Sequence], completion_ids: Sequence[Sequence[int]]
):
    """Encode `prompt_i ++ completion_i` for a batch, each row left-padded as a whole.

    Returns the processor's `BatchFeature` (`input_ids`, `attention_mask`, pixel inputs and, for Qwen
    families, `mm_token_type_ids`) plus `completion_mask` (`[B, L]` bool, True on completion tokens)
    and `prompt_lengths` (`[B]`, unpadded).
    """
    if not (len(prompts) == len(images) == len(completion_ids)):
        raise ValueError(
            f"got {len(prompts)} prompts, {len(images)} image lists, {len(completion_ids)} completions"
        )
    for i, ids in enumerate(completion_ids):
        if len(ids) == 0:
            raise ValueError(f"sample {i}: empty completion")
    batch = handle.encode(list(prompts), [list(x) for x in images])
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    pad_id = handle.tokenizer.pad_token_id if handle.tokenizer.pad_token_id is not None else 0
    rows, prompt_lengths = [], []
    for i in range(ids.shape[0]):
        prompt = ids[i][am[i]]
        prompt_lengths.append(prompt.numel())
        rows.append(
            torch.cat([prompt, torch.as_tensor(list(completion_ids[i]), dtype=ids.dtype, device=ids.device)])
        )
    L = max(r.numel() for r in rows)
    B = len(rows)
    new_ids = torch.full((B, L), pad_id, dtype=ids.dtype, device=ids.device)
    new_am = torch.zeros((B, L), dtype=batch["attention_mask"].dtype, device=ids.device)
    comp = torch.zeros((B, L), dtype=torch.bool, device=ids.device)
    for i, r in enumerate(rows):
        new_ids[i, L - r.numel() :] = r
        new_am[i, L - r.numel() :] = 1
        comp[i, L - len(completion_ids[i]) :] = True
    batch["input_ids"] = new_ids
    batch["attention_mask"] = new_am
    for key in ("mm_token_type_ids", "token_type_ids"):  # 1 on image placeholders (Qwen; Gemma 3)
        if key in batch:
            batch[key] = (new_ids == handle.image_token_id).to(batch[key].dtype)
    batch["completion_mask"] = comp
    batch["prompt_lengths"] = torch.tensor(prompt_lengths, device=ids.device)
    return batch


def model_inputs(batch) -> dict:
    """The keys of a packed batch that the model's forward accepts (drops dyco_probe's bookkeeping)."""
    return {k: v for k, v in batch.items() if k not in _PACKED_KEYS}


def completion_logprobs(model, batch, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of the completion tokens of a `packed_batch` under `model`.

    Returns `(logp, mask)` of shape `[B, T]` (right-padded, T = longest completion), where `logp[i, t]`
    is log p(o_{t+1} | prefix) for sample i.
    """
    out = model(**model_inputs(batch))
    tok_logp = _gather(out.logits[:, :-1].float() / temperature, batch["input_ids"][:, 1:])
    return right_align(tok_logp, batch["completion_mask"][:, 1:])


def right_align(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Gather the masked entries of each row to the left: `[B, L] -> [B, T]` with a right-padding mask."""
    counts = mask.sum(1)
    T = int(counts.max().item()) if counts.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :T]
    gathered = values.gather(1, order)
    new_mask = torch.arange(T, device=values.device)[None, :] < counts[:, None]
    return gathered.masked_fill(~new_mask, 0), new_mask


# -- forward inputs ------------------------------------------------------------------------------------


def forward_inputs(args, kwargs) -> tuple[Tensor | None, Tensor | None, int]:
    """`(input_ids, attention_mask, cached length)` of a forward, from a `with_kwargs` pre-hook's
    arguments. A cached length of 0 with input ids is a prefill: the forward that starts a sequence."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    return input_ids, kwargs.get("attention_mask"), past
