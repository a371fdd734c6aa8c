"""Activation patching: replace activations of one run by those of a donor run.

Two sites:

- **image states**: the residual stream entering decoder layer `l` (`hidden_states[l]` in
  transformers' `output_hidden_states` numbering; layer 0 = the image features themselves) at the
  image-token positions. Donor and recipient are matched by image-token order, so the prompts may
  be padded differently, but each sample needs as many image tokens in both runs.
- **attention output**: a layer's attention output before `o_proj` (`[B, Q, H, D]`: per head) at
  chosen query columns, optionally only some heads. Donor and recipient share the column layout
  (same prompt text and image size, e.g. the same question on a counterfactual image).

Record with `record_image_states` / `record_attention_output` (one teacher-forced forward), then
patch inside `patch_image_states` / `patch_attention_output`. Restore-style patching is the same
with the roles swapped: run on the corrupted input and patch the clean recording back in.

    clean = record_attention_output(model, clean_inputs, layers=[2])
    with patch_attention_output(model, clean, queries=cols):
        restored = model(**corrupted_inputs).logits

Patching a run with its own recording changes nothing (exactly). Both contexts leave the model
untouched on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..completions import forward_inputs
from ..layers import resolve_indices
from ..spans import image_positions, image_token_id_of
from ..tracing.attention import _text_decoder, attention_hooks, attention_layers

__all__ = [
    "Recording",
    "patch_attention_output",
    "patch_image_states",
    "record_attention_output",
    "record_image_states",
]


@dataclass
class Recording:
    """Activations of a donor run.

    Attributes:
        site: `"image_states"` or `"attention_output"`.
        values: layer -> `[B, N, D]` (image states, image tokens in prompt order, zero-padded to the
            largest count) or `[B, C, H, D]` (attention output over sequence columns `0..C-1`).
        counts: `[B]` image tokens per sample (image states only).
    """

    site: str
    values: dict[int, Tensor]
    counts: Tensor | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.values))


def _resolve(layers: Sequence[int] | int | None, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    return list(resolve_indices(layers, num_layers, allow_empty=True))


class _ImageColumns:
    """Tracks the image columns of the forward that starts each sequence (a model forward pre-hook)."""

    def __init__(self, model, image_token_id: int | None):
        self.model = model
        self.image_id = image_token_id_of(model) if image_token_id is None else int(image_token_id)
        self.mask: Tensor | None = None
        self.prefill = False

    def __call__(self, module, args, kwargs):
        input_ids, attention_mask, past = forward_inputs(args, kwargs)
        self.prefill = input_ids is not None and past == 0
        if self.prefill:
            valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
            image = image_positions(self.model, {**kwargs, "input_ids": input_ids}, self.image_id)
            self.mask = image & valid.bool()


@torch.no_grad()
def record_image_states(
    model, inputs: dict, layers: Sequence[int] | int | None = None, *, image_token_id: int | None = None
) -> Recording:
    """The residual stream entering each of `layers` at the image tokens, from one forward on `inputs`."""
    decoder = _text_decoder(model)
    layers = _resolve(layers, len(decoder.layers))
    tracker = _ImageColumns(model, image_token_id)
    got: dict[int, Tensor] = {}

    def grab(layer):
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            got[layer] = _pack(hidden, tracker.mask)

        return pre

    handles = [model.register_forward_pre_hook(tracker, with_kwargs=True)]
    try:
        for layer in layers:
            handles.append(decoder.layers[layer].register_forward_pre_hook(grab(layer), with_kwargs=True))
        model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return Recording("image_states", got, tracker.mask.sum(-1).cpu())


def _pack(hidden: Tensor, mask: Tensor) -> Tensor:
    counts = mask.sum(-1)
    out = hidden.new_zeros(hidden.shape[0], int(counts.max()) if counts.numel() else 0, hidden.shape[-1])
    for i in range(hidden.shape[0]):
        out[i, : int(counts[i])] = hidden[i, mask[i]]
    return out.detach()


@contextlib.contextmanager
def patch_image_states(
    model,
    donor: Recording,
    layers: Sequence[int] | int | None = None,
    *,
    samples: Tensor | None = None,
    image_token_id: int | None = None,
) -> Iterator[None]:
    """Replace the image-token states entering `layers` (default: the donor's) by the donor's.

    Args:
        donor: a `record_image_states` recording of the same batch size.
        samples: `[B]` bool, which samples to patch (default: all).
    """
    if donor.site != "image_states":
        raise ValueError(f"patch_image_states needs an image_states recording, got {donor.site!r}")
    decoder = _text_decoder(model)
    layers = _resolve(donor.layers if layers is None else layers, len(decoder.layers))
    missing = [layer for layer in layers if layer not in donor.values]
    if missing:
        raise ValueError(f"the donor has no image states for layers {missing}")
    tracker = _ImageColumns(model, image_token_id)

    def patch(layer):
        def pre(module, args, kwargs):
            if not tracker.prefill:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = tracker.mask
            if mask.shape != hidden.shape[:2]:
                return None
            counts = mask.sum(-1).cpu()
            if counts.shape != donor.counts.shape or not torch.equal(counts, donor.counts):
                raise ValueError(
                    f"image tokens per sample differ between donor {donor.counts.tolist()} and run {counts.tolist()}"
                )
            hidden = hidden.clone()
            values = donor.values[layer].to(device=hidden.device, dtype=hidden.dtype)
            for i in range(hidden.shape[0]):
                if samples is None or bool(samples[i]):
                    hidden[i, mask[i]] = values[i, : int(counts[i])]
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return pre

    handles = [model.register_forward_pre_hook(tracker, with_kwargs=True)]
    try:
        for layer in layers:
            handles.append(decoder.layers[layer].register_forward_pre_hook(patch(layer), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def record_attention_output(model, inputs: dict, layers: Sequence[int] | int | None = None) -> Recording:
    """Each of `layers`' attention output before `o_proj`, `[B, C, H, D]`, from one forward on `inputs`."""
    got: dict[int, Tensor] = {}

    def hook(call):
        def keep(out, layer=call.layer_idx):
            got[layer] = out.detach().clone()
            return out

        call.edit_output(keep)

    num_layers = len(_text_decoder(model).layers)
    chosen = attention_layers(model) if layers is None else _resolve(layers, num_layers)
    with attention_hooks(model, hook, layers=chosen):
        model(**inputs, use_cache=False)
    return Recording("attention_output", got)


@contextlib.contextmanager
def patch_attention_output(
    model,
    donor: Recording,
    layers: Sequence[int] | int | None = None,
    *,
    queries: Tensor | None = None,
    heads: Sequence[int] | None = None,
) -> Iterator[None]:
    """Replace the attention output of `layers` (default: the donor's) at the `queries` columns
    (`[B, C]` bool; None: every column the donor has) and `heads` (None: all) by the donor's.

    Works in teacher-forced forwards and in `generate` (decode steps patch their own column when
    the donor has it)."""
    if donor.site != "attention_output":
        raise ValueError(f"patch_attention_output needs an attention_output recording, got {donor.site!r}")
    num_layers = len(_text_decoder(model).layers)
    layers = _resolve(donor.layers if layers is None else layers, num_layers)
    missing = [layer for layer in layers if layer not in donor.values]
    if missing:
        raise ValueError(f"the donor has no attention output for layers {missing}")
    if queries is not None:
        width = min(donor.values[layer].shape[1] for layer in layers)
        if bool(queries[:, width:].any()):
            raise ValueError(f"queries select columns past the {width} the donor recorded")

    def hook(call):
        values = donor.values[call.layer_idx]
        cols = call.query_columns
        width = values.shape[1] if queries is None else min(values.shape[1], queries.shape[1])
        inside = cols < width
        if not bool(inside.any()):
            return
        sel = torch.zeros(call.query.shape[0], len(cols), dtype=torch.bool, device=cols.device)
        sel[:, inside] = True if queries is None else queries.to(cols.device, torch.bool)[:, cols[inside]]
        if not bool(sel.any()):
            return

        def edit(out):
            donor_out = torch.zeros_like(out)
            donor_out[:, inside] = values[:, cols[inside]].to(device=out.device, dtype=out.dtype)
            where = sel[:, :, None, None]
            if heads is not None:
                head_mask = torch.zeros(out.shape[2], dtype=torch.bool, device=out.device)
                head_mask[list(heads)] = True
                where = where & head_mask[None, None, :, None]
            return torch.where(where, donor_out, out)

        call.edit_output(edit)

    with attention_hooks(model, hook, layers=layers):
        yield
