"""Backends that compute attention rows for offline (teacher-forced) tracing.

Each backend is a function

    rows(model, inputs, *, layers, heads, query_columns, **options) -> Tensor [B, len(layers), R, K]

returning, for every probed layer, the head-averaged (over `heads`, None = all) attention
probabilities (float32) of the query columns `query_columns` over all `K` key columns of one
teacher-forced forward pass on `inputs` (prompt ++ completion). `trace_offline` turns them into a
`Trace` with the same code as online tracing.

- `native` (default): the shared attention function; only the requested rows are computed.
- `eager`: transformers' own eager attention with `output_attentions=True` (reference; L x L).
- `nnsight`: queries and keys read with nnsight 0.8 from the wrapped model, rows computed from them.
- `transformer_lens`: `blocks.{l}.attn.hook_pattern` of a TransformerLens 4.3 TransformerBridge.

Online tracing (during `generate`) is native only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["BACKENDS", "get_backend", "head_mean", "left_as_found"]

BACKENDS = ("native", "eager", "nnsight", "transformer_lens")


def head_mean(probs: Tensor, heads) -> Tensor:
    """`[B, H, ...]` -> `[B, ...]`: the mean over `heads` (None = all)."""
    if heads is not None:
        probs = probs[:, list(heads)]
    return probs.mean(dim=1)


@contextlib.contextmanager
def left_as_found(model: nn.Module):
    """Undo what a library installs on the modules of `model` while the block runs and keeps for
    later: instance attributes (nnsight's controller `forward`, transformers' output-capturing flag)
    and forward hooks (transformers' lazily installed output-capturing hooks)."""
    before = {
        name: (dict(m.__dict__), set(m._forward_hooks), set(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }
    try:
        yield
    finally:
        for name, module in model.named_modules():
            if name not in before:
                continue
            attrs, hooks, pre_hooks = before[name]
            for key in [k for k in module.__dict__ if k not in attrs]:
                del module.__dict__[key]
            if "forward" in attrs:
                module.__dict__["forward"] = attrs["forward"]
            for key in [k for k in module._forward_hooks if k not in hooks]:
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
            for key in [k for k in module._forward_pre_hooks if k not in pre_hooks]:
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


def get_backend(name: str) -> Callable[..., Tensor]:
    """The rows function of backend `name`."""
    if name == "native":
        from .native import rows
    elif name == "eager":
        from .eager import rows
    elif name == "nnsight":
        from .nnsight import rows
    elif name == "transformer_lens":
        from .transformer_lens import rows
    else:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    return rows
