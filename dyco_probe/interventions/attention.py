"""`intervene`: apply an `Intervention` to chosen queries while a block runs.

    spec = Intervention.knockout("image", layers=[2, 3])
    cols = token_columns(visual_tokens, prompt_length)            # [B, C] query columns
    with intervene(model, spec, cols):
        out = model.generate(**inputs, max_new_tokens=64)       # or a teacher-forced forward

Built on the shared attention hook (`dyco_probe.tracing.attention.attention_hooks`): the model is
untouched on exit, and a tracer opened inside the block sees the intervened attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..completions import forward_inputs
from ..layers import resolve_indices
from ..spans import Spans, image_positions, image_token_id_of
from ..tracing.attention import _text_decoder, attention_hooks, attention_layers
from .spec import Intervention, KeyLayout

__all__ = ["InterventionLog", "intervene"]


@dataclass
class InterventionLog:
    """What an `intervene` block did: layer calls that received a bias, and biased query rows
    (summed over those calls and samples)."""

    calls: int = 0
    rows: int = 0


@contextlib.contextmanager
def intervene(
    model,
    spec: Intervention,
    queries: Tensor | None = None,
    *,
    spans: Spans | None = None,
    completion_start: Tensor | int | None = None,
    image_token_id: int | None = None,
    key_column_offset: Tensor | int | None = None,
) -> Iterator[InterventionLog]:
    """Apply `spec` to the queries in `queries` at `spec.layers` while the block runs.

    Args:
        model: a Hugging Face VLM whose text decoder goes through `AttentionInterface`.
        spec: what to change (keys, λ, layers, heads).
        queries: `[B, C]` bool over sequence columns (True: intervene on the query in that column;
            columns past `C` are not touched), e.g. from `token_columns`. `None`: every query,
            prompt included.
        spans: the prompt spans. Default: taken from each forward that starts a sequence (no cache
            yet), i.e. the prompt of a `generate` call or the whole sequence of a teacher-forced forward.
        completion_start: first completion column (int, or `[B]`); needed only by the key spans
            `question` and `completion`. Default: the padded prompt length (`spans`), or the length of
            the forward that started the sequence.
        image_token_id: default from the model config.
        key_column_offset: added per sample (int, or `[B]`) to the `positions` key columns, for a
            batch re-padded after the prompt was encoded (see `KeyLayout.column_offset`).

    Yields an `InterventionLog`. A λ = 1 spec, an empty query set or an empty key set adds no bias
    at all: the block then runs exactly as without intervention. A knockout that leaves a query no
    visible key at all is undefined (it cannot renormalise); no built-in key span does that.
    """
    log = InterventionLog()
    num_layers = len(_text_decoder(model).layers)
    layers = spec.resolve_layers(num_layers)
    if spec.layers is None:  # hybrid models (Qwen3.5): the softmax-attention layers; others raise
        layers = attention_layers(model)
    state: dict = {"layout": None}
    if spans is not None:
        state["layout"] = KeyLayout.from_spans(spans, completion_start, key_column_offset)
    image_id = image_token_id_of(model) if image_token_id is None else int(image_token_id)
    value = spec.logit_bias
    num_heads = model.config.get_text_config().num_attention_heads
    head_mask = None
    if spec.heads is not None:
        heads = list(resolve_indices(spec.heads, num_heads, what="heads", allow_empty=True))
        head_mask = torch.zeros(num_heads, dtype=torch.bool)
        head_mask[heads] = True

    def on_forward(module, args, kwargs):
        input_ids, attention_mask, past = forward_inputs(args, kwargs)
        if input_ids is None or past != 0:
            return
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
        image = image_positions(model, {**kwargs, "input_ids": input_ids}, image_id)
        state["layout"] = KeyLayout.build(image, valid.bool(), completion_start, key_column_offset)

    def hook(call):
        layout = state["layout"]
        if layout is None:
            raise RuntimeError("intervene: no forward started a sequence (pass spans=)")
        device = call.query.device
        cols = call.query_columns
        rows, sel = None, None
        if queries is not None:
            q = queries.to(device=device, dtype=torch.bool)
            inside = cols < q.shape[1]
            sel = torch.zeros(call.query.shape[0], len(cols), dtype=torch.bool, device=device)
            sel[:, inside] = q[:, cols[inside]]
            touched = sel.any(0)
            if not bool(touched.any()):
                return
            rows = touched.nonzero().flatten()
            sel = sel[:, rows]
            cols = cols[rows]
        keys = layout.key_mask(spec.keys, cols, call.num_columns, spec.text_span, spec.key_columns).to(device)
        chosen = keys if sel is None else keys & sel[:, :, None]  # [B, R, K]
        chosen = chosen[:, None]  # [B, 1, R, K]
        if head_mask is not None:
            chosen = chosen & head_mask.to(device)[None, :, None, None]
        if not bool(chosen.any()):
            return
        bias = torch.where(chosen, torch.tensor(value, device=device), torch.tensor(0.0, device=device))
        call.add_logit_bias(bias, rows=rows)
        log.calls += 1
        log.rows += int(chosen.any(-1).any(1).sum())

    if spec.is_noop:
        yield log
        return
    pre = None if spans is not None else model.register_forward_pre_hook(on_forward, with_kwargs=True)
    try:
        with attention_hooks(model, hook, layers=layers):
            yield log
    finally:
        if pre is not None:
            pre.remove()
