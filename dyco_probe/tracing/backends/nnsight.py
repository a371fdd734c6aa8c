"""Offline rows with nnsight 0.8: read each probed layer's queries, keys and rotary tables from the
wrapped model, then compute the attention rows from them.

The rows are rebuilt from `q_proj` / `k_proj` outputs (or, for Qwen3-style attention, the per-head
`q_norm` / `k_norm` outputs) and the `position_embeddings` (cos, sin) the decoder hands to the
attention module, with the standard rotate-half RoPE (Llama, Qwen2, Qwen2-VL, Qwen2.5-VL, Qwen3-VL:
the multimodal sections are already folded into cos/sin), GQA, the module's `scaling`, and the
causal + padding mask from the 2-D attention mask. Refused: other q/k norms, and layers whose mask
is not causal + padding (Gemma 3's sliding windows and bidirectional image blocks).

`NNsight(model)` installs a controller `forward` on every module and leaves it there; this backend
removes it afterwards (`left_as_found`), so the model is left as it was.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention import _text_decoder
from . import head_mean, left_as_found

__all__ = ["rows"]


# Attention modules whose q/k norms act on `[B, L, H, D]` per head, before the transpose and RoPE.
_PER_HEAD_NORMS = ("Qwen3VLTextAttention", "Qwen3Attention", "Qwen3VLMoeTextAttention", "Qwen3MoeAttention")


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
    normed = []
    for layer in layers:
        attn = decoder.layers[layer].self_attn
        if (
            getattr(attn, "sliding_window", None) is not None
            or getattr(model.config, "model_type", "") == "gemma3"
        ):
            raise NotImplementedError(
                f"the nnsight backend rebuilds causal + padding masks only; {type(attn).__name__} uses sliding "
                "windows or bidirectional image blocks: use the native, eager or transformer_lens backend"
            )
        has_norm = getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None
        if has_norm and type(attn).__name__ not in _PER_HEAD_NORMS:
            raise NotImplementedError(
                f"the nnsight backend cannot rebuild the queries of {type(attn).__name__} (q/k norms, gates): "
                "use the native, eager or transformer_lens backend"
            )
        normed.append(has_norm)

    saved = []
    with torch.no_grad(), left_as_found(model):
        wrapped = NNsight(model)
        layer_envoys = _envoy_at(wrapped, path).layers
        with wrapped.trace(**inputs, use_cache=False):
            for layer, norm in zip(layers, normed):  # in execution order: module inputs, then q, then k
                attn = layer_envoys[layer].self_attn
                kwargs = attn.inputs[1]
                cos, sin = kwargs["position_embeddings"]
                q, k = (attn.q_norm, attn.k_norm) if norm else (attn.q_proj, attn.k_proj)
                saved.append((cos.save(), sin.save(), q.output.save(), k.output.save()))

    mask2d = inputs.get("attention_mask")
    out = []
    for layer, (cos, sin, q, k) in zip(layers, saved):
        module = decoder.layers[layer].self_attn
        b, length = q.shape[:2]  # [B, L, H*D], or [B, L, H, D] after a per-head norm
        d = module.head_dim
        q = q.reshape(b, length, -1, d).transpose(1, 2)
        k = k.reshape(b, length, -1, d).transpose(1, 2)
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
