"""Offline rows with nnsight 0.8: read each probed layer's queries, keys and rotary tables from the
wrapped model, then compute the attention rows from them.

The rows are rebuilt from `q_proj` / `k_proj` outputs and the `position_embeddings` (cos, sin) the
decoder hands to the attention module, with the standard rotate-half RoPE (Llama, Qwen2, Qwen2-VL,
Qwen2.5-VL: the multimodal sections are already folded into cos/sin), GQA, the module's `scaling`,
and the causal + padding mask from the 2-D attention mask. Attention modules with q/k norms are
refused.

`NNsight(model)` installs a controller `forward` on every module and leaves it there; this backend
removes it afterwards (`left_as_found`), so the model is left as it was.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention import _text_decoder
from . import head_mean, left_as_found

__all__ = ["rows"]


def _envoy_at(envoy, path: str):
    for part in path.split(".") if path else []:
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rows(model, inputs: dict, *, layers, heads, query_columns: Tensor, **options) -> Tensor:
    if options:
        raise TypeError(f"unexpected options for the nnsight backend: {sorted(options)}")
    from nnsight import NNsight

    decoder = _text_decoder(model)
    path = next(name for name, module in model.named_modules() if module is decoder)
    for layer in layers:
        attn = decoder.layers[layer].self_attn
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            raise NotImplementedError("the nnsight backend does not rebuild q/k norms")

    saved = []
    with torch.no_grad(), left_as_found(model):
        wrapped = NNsight(model)
        layer_envoys = _envoy_at(wrapped, path).layers
        with wrapped.trace(**inputs, use_cache=False):
            for layer in layers:  # in execution order: module inputs, then q, then k
                attn = layer_envoys[layer].self_attn
                kwargs = attn.inputs[1]
                cos, sin = kwargs["position_embeddings"]
                saved.append(
                    (
                        cos.save(),
                        sin.save(),
                        attn.q_proj.output.save(),
                        attn.k_proj.output.save(),
                    )
                )

    mask2d = inputs.get("attention_mask")
    out = []
    for layer, (cos, sin, q, k) in zip(layers, saved):
        module = decoder.layers[layer].self_attn
        b, length, _ = q.shape
        d = module.head_dim
        q = q.view(b, length, -1, d).transpose(1, 2)
        k = k.view(b, length, -1, d).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        cols = query_columns.to(q.device)
        keys = torch.arange(length, device=q.device)
        visible = keys[None, :] <= cols[:, None]  # [R, K]
        visible = visible[None, None]
        if mask2d is not None:
            visible = visible & mask2d.to(torch.bool)[:, None, None, :]
        k = k.repeat_interleave(
            q.shape[1] // k.shape[1], dim=1
        )  # GQA: query head h reads kv head h // groups
        logits = torch.matmul(q[:, :, cols].float(), k.float().transpose(-1, -2)) * module.scaling
        logits = logits.masked_fill(~visible, torch.finfo(torch.float32).min)
        probs = torch.softmax(logits, dim=-1)
        out.append(head_mean(probs, heads))
    return torch.stack(out, dim=1)
