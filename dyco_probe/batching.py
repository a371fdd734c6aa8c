"""Teacher-forced batches: prompts with their images followed by given completion ids, left-padded
like ``generate``'s own layout, with a mask of the completion positions."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def completion_ids_for(handle, completions: Sequence[str], add_eos: bool = True) -> list[list[int]]:
    """Token ids of completion texts (no special tokens added), each followed by EOS if ``add_eos``."""
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


def teacher_forced_batch(
    handle, prompts: Sequence[str], images: Sequence[Sequence], completion_ids: Sequence[Sequence[int]]
):
    """Encode ``prompt_i ++ completion_i`` for a batch, left-padded.

    Returns the processor's ``BatchFeature`` (``input_ids``, ``attention_mask``, pixel inputs and, for
    Qwen families, ``mm_token_type_ids``) plus ``completion_mask`` ([B, L] bool, True on completion
    tokens) and ``prompt_lengths`` ([B], unpadded).
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
    """The keys of a batch that the model's forward accepts (drops dyco_probe's bookkeeping)."""
    return {k: v for k, v in batch.items() if k not in ("completion_mask", "prompt_lengths")}


def completion_logprobs(model, batch, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the completion tokens under ``model``.

    Returns ``(logp, mask)`` of shape [B, T] (right-padded, T = longest completion), where ``logp[i, t]``
    is log p(o_{t+1} | prefix) for sample i.
    """
    out = model(**model_inputs(batch))
    logits = out.logits[:, :-1].float() / temperature
    targets = batch["input_ids"][:, 1:]
    tok_logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    comp = batch["completion_mask"][:, 1:]
    return right_align(tok_logp, comp)


def right_align(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the masked entries of each row to the left: ``[B, L] -> [B, T]`` with a right-padding mask."""
    counts = mask.sum(1)
    T = int(counts.max().item()) if counts.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :T]
    gathered = values.gather(1, order)
    new_mask = torch.arange(T, device=values.device)[None, :] < counts[:, None]
    return gathered.masked_fill(~new_mask, 0), new_mask
