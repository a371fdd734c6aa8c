"""Which placeholder positions of a prompt hold a vision feature, per family (docs/families.md).

Every supported family writes one placeholder token per vision feature, so the image span is the
placeholder columns, with one exception: LLaVA-OneVision also writes its learned row-end vector
(`image_newline`) on placeholder columns. That vector does not depend on the pixels, so those
columns are not image: `not_image_placeholders` finds them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["not_image_placeholders", "onevision_newline_flags"]


def not_image_placeholders(model, inputs: dict, placeholder: Tensor) -> Tensor | None:
    """`[B, L]` bool: placeholder columns (`placeholder`, `[B, L]`) that hold no vision feature, or
    None when every placeholder is a vision feature (every family but LLaVA-OneVision)."""
    if getattr(model.config, "model_type", "") != "llava_onevision" or not bool(placeholder.any()):
        return None
    flags = onevision_newline_flags(model, inputs)
    if flags is None:
        raise ValueError(
            "LLaVA-OneVision image spans need the processor's image_sizes (and batch_num_images) or "
            "the encoded image features: its row-end positions share the image placeholder id"
        )
    return _scatter(placeholder, flags)


def onevision_newline_flags(model, inputs: dict) -> list[Tensor] | None:
    """Per image, in order: a bool vector over its placeholder tokens, True on row-end positions.

    From the encoded features when `generate` has already encoded them (`mm_encoder_outputs`): a
    row-end feature is exactly the model's `image_newline`. Otherwise from `image_sizes` and
    `batch_num_images`, by running the model's own `pack_image_features` on one-channel dummy
    features (zeros for pixels, one for the row end): the layout without the vision tower.
    """
    core = model.model
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
    if encoded is not None:
        newline = core.image_newline
        return [
            (f == newline.to(device=f.device, dtype=f.dtype)).all(-1).to(torch.bool)
            for f in encoded.pooler_output
        ]
    sizes = inputs.get("image_sizes")
    if sizes is None:
        return None
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    config = model.config
    counts = inputs.get("batch_num_images")
    sizes = sizes.reshape(-1, 2).cpu()
    patching = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
    side = config.vision_config.image_size // config.vision_config.patch_size
    features = []
    for size, patch in zip(sizes, patching):
        n = (
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            if patch
            else 1
        )
        features.append(torch.zeros(n, side * side, 1))
    packed, _ = core.pack_image_features(
        features, sizes, image_newline=torch.ones(1), vision_aspect_ratio=config.vision_aspect_ratio
    )
    return [p[:, 0] > 0.5 for p in packed]


def _scatter(placeholder: Tensor, flags: list[Tensor]) -> Tensor:
    """Lay the per-image flags over the placeholder columns, images in batch order."""
    out = torch.zeros_like(placeholder)
    sizes = [len(f) for f in flags]
    k = 0
    for i in range(placeholder.shape[0]):
        cols = placeholder[i].nonzero().flatten()
        got, parts = 0, []
        while got < len(cols) and k < len(flags):
            parts.append(flags[k])
            got, k = got + sizes[k], k + 1
        if got != len(cols):
            raise ValueError(
                f"sample {i} has {len(cols)} image placeholders but its images' layout gives {got} "
                "(image_sizes do not match the prompt)"
            )
        if parts:
            out[i, cols] = torch.cat(parts).to(out.device)
    if k != len(flags):
        raise ValueError(f"{len(flags)} images were given but the prompts hold placeholders for {k}")
    return out
