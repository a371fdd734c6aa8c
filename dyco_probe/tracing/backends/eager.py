"""Reference rows from transformers' eager attention (`output_attentions=True`).

The text decoder is switched to `eager` for the one forward pass and switched back; the full
`[B, H, L, L]` matrices of every layer are materialised, so this is for checking, not for scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention import _text_decoder, attention_layers, check_attention_layers, text_attention_modules
from . import head_mean, left_as_found

__all__ = ["rows"]


def rows(model, inputs: dict, *, layers, heads, query_columns: Tensor, **options) -> Tensor:
    if options:
        raise TypeError(f"unexpected options for the eager backend: {sorted(options)}")
    decoder = _text_decoder(model)
    configs = {id(m.config): m.config for m in text_attention_modules(decoder)}
    configs[id(decoder.config)] = decoder.config
    saved = [(c, c.__dict__.get("_attn_implementation_internal")) for c in configs.values()]
    try:
        for c, _ in saved:
            c._attn_implementation_internal = "eager"
        with torch.no_grad(), left_as_found(model):  # transformers installs output-capturing hooks
            out = model(**inputs, use_cache=False, output_attentions=True)
    finally:
        for c, value in saved:
            c._attn_implementation_internal = value
    attentions = out.attentions
    softmax_layers = attention_layers(decoder)  # all layers, but in hybrid models (Qwen3.5)
    if attentions is None or len(attentions) != len(softmax_layers):
        raise RuntimeError("the model did not return one attention matrix per softmax-attention layer")
    check_attention_layers(decoder, layers)
    by_layer = dict(zip(softmax_layers, attentions))
    cols = query_columns.to(attentions[0].device)
    return torch.stack([head_mean(by_layer[layer][:, :, cols].float(), heads) for layer in layers], dim=1)
