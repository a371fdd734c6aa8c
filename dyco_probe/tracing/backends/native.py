"""Offline rows through the shared attention function: one forward, only the requested rows."""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention import attention_hooks
from . import head_mean

__all__ = ["rows"]


def rows(model, inputs: dict, *, layers, heads, query_columns: Tensor, **options) -> Tensor:
    if options:
        raise TypeError(f"unexpected options for the native backend: {sorted(options)}")
    got: dict[int, Tensor] = {}

    def hook(call):
        cols = query_columns.to(call.query.device)
        # no cache: query row r sits in key column r
        call.request_probs(cols, lambda p, layer=call.layer_idx: got.__setitem__(layer, head_mean(p, heads)))

    with torch.no_grad(), attention_hooks(model, hook, layers=layers):
        model(**inputs, use_cache=False)
    return torch.stack([got[layer] for layer in layers], dim=1)
