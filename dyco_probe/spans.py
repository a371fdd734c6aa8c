"""Image and text spans of each sample of a batch (docs/method.md#sequences-and-spans).

Positions are columns of the padded batch: `prompt ++ completion`, prompts left- or right-padded to a
common length `L`, completion columns `L, L+1, ...` (as `generate` lays them out). Everything is
computed per sample; nothing assumes that two samples share positions.

- image span `I`: the columns holding the image placeholder token (all images of the sample) whose
    input embedding is a vision feature: markers around images, tile separators, row/column tags and
    LLaVA-OneVision's row-end vectors are not image (docs/families.md);
- text span at the query in column `q`, `X(q)`:
    `post_image` (default, the published code): columns after the sample's last image token up to and
    including `q`: the question plus the completion so far;
    `all_text`: every non-image, non-padding column up to and including `q` (system prompt included).

The query column itself belongs to the text span: it is what the query attends to last. For the
query of `o_t` (column `L-1+t-1`), `X(q) = X_t` and `X(q-1) = X_{t-1}`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TEXT_SPANS", "Spans", "find_spans", "image_positions", "image_token_id_of", "spans_for_model"]

TEXT_SPANS = ("post_image", "all_text")


@dataclass(frozen=True)
class Spans:
    """Spans of a padded prompt batch; build with `find_spans` or `spans_for_model`.

    Attributes:
        image: `[B, L]` bool, image placeholder columns.
        valid: `[B, L]` bool, non-padding columns.
        last_image: `[B]` long, column of each sample's last image token (-1 without image).
        num_images: `[B]` long, images per sample.
        image_layout: per sample, one `(tokens, rows, cols)` per image in prompt order: its number of
            placeholder tokens and the grid they form (`rows`, `cols` None where the inputs do not
            say; `viz.infer_token_grid` then guesses one).
    """

    image: Tensor
    valid: Tensor
    last_image: Tensor
    num_images: Tensor
    image_layout: tuple = ()

    @property
    def batch_size(self) -> int:
        return self.image.shape[0]

    @property
    def prompt_length(self) -> int:
        """Padded prompt length `L`; the query of `o_1` is column `L - 1`."""
        return self.image.shape[1]

    @property
    def has_image(self) -> Tensor:
        return self.last_image >= 0

    @property
    def num_image_tokens(self) -> Tensor:
        return self.image.sum(-1)

    @property
    def prompt_lengths(self) -> Tensor:
        """Unpadded prompt length of each sample."""
        return self.valid.sum(-1)

    def image_mask(self, num_keys: int) -> Tensor:
        """`I` over the first `num_keys` columns, `[B, num_keys]` (completion columns are never image)."""
        return _fit(self.image, num_keys)

    def text_mask(self, query: int, convention: str = "post_image", num_keys: int | None = None) -> Tensor:
        """`X(query)` as a `[B, num_keys]` bool mask (`num_keys` defaults to `query + 1`).

        Completion columns (`>= L`) up to the query are text for every sample.
        """
        if convention not in TEXT_SPANS:
            raise ValueError(f"unknown text span {convention!r}; valid: {', '.join(TEXT_SPANS)}")
        num_keys = query + 1 if num_keys is None else num_keys
        cols = torch.arange(num_keys, device=self.image.device)
        valid = _fit(self.valid, num_keys, fill=True)
        upto = cols <= query
        if convention == "post_image":
            after = cols[None, :] > self.last_image[:, None]
            return valid & after & upto
        return valid & ~self.image_mask(num_keys) & upto

    def summary(self) -> list[dict]:
        """Per-sample span summary in unpadded positions (0 = first real prompt token)."""
        out = []
        position = self.valid.long().cumsum(-1) - 1  # unpadded position of each column
        for i in range(self.batch_size):
            cols = self.image[i].nonzero().flatten()
            layout = self.image_layout[i] if i < len(self.image_layout) else ()
            out.append(
                {
                    "prompt_length": int(self.valid[i].sum()),
                    "num_images": int(self.num_images[i]),
                    "num_image_tokens": int(cols.numel()),
                    "first_image_token": int(position[i, cols[0]]) if cols.numel() else -1,
                    "last_image_token": int(position[i, cols[-1]]) if cols.numel() else -1,
                    "image_token_counts": [n for n, _, _ in layout],
                    "image_grids": [None if r is None else [r, c] for _, r, c in layout],
                }
            )
        return out


def _fit(mask: Tensor, num_keys: int, fill: bool = False) -> Tensor:
    """Crop or extend `[B, L]` to `[B, num_keys]`, extension filled with `fill`."""
    length = mask.shape[1]
    if num_keys <= length:
        return mask[:, :num_keys]
    ext = torch.full((mask.shape[0], num_keys - length), fill, dtype=torch.bool, device=mask.device)
    return torch.cat([mask, ext], dim=1)


def find_spans(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    image_token_id: int,
    image_grid_thw: Tensor | None = None,
    merge_size: int = 2,
    tokens_per_image: int | None = None,
    num_pixel_rows: int | None = None,
    position_ids: Tensor | None = None,
    on_missing_image: str = "error",
    not_image: Tensor | None = None,
) -> Spans:
    """Find the spans of a prompt batch and check them against the images.

    Each sample's images are told apart by `image_grid_thw` (Qwen-VL), else by `tokens_per_image`
    (LLaVA), else as the contiguous runs of placeholder tokens (Qwen-VL's prompts put
    `<|vision_end|><|vision_start|>` between two images); a run's grid comes from the grid, from
    3-D rotary `position_ids` (Qwen-VL's height and width rows, as `generate` passes them), or is
    left unknown.

    Args:
        input_ids: `[B, L]` prompt ids (padded).
        attention_mask: `[B, L]`, 1 for real tokens; `None`: no padding.
        image_token_id: the image placeholder id.
        image_grid_thw: Qwen-VL: `[num_images, 3]` grids of all images of the batch, in order. Each
            image is `t*h*w / merge_size**2` placeholder tokens; images are assigned to samples in order.
        merge_size: Qwen-VL spatial merge size (2).
        tokens_per_image: LLaVA-style fixed number of tokens per image (checks divisibility).
        num_pixel_rows: Qwen-VL: `pixel_values.shape[0]`, checked against the grids (`t*h*w` patches each).
        position_ids: `[3 or 4, B, L]` multimodal rotary positions (the last two rows are an image
            token's row and column), used for the grids when `image_grid_thw` is not given.
        on_missing_image: a sample without image tokens raises (`"error"`) or warns and gets an empty
            image span, hence `r_vis = 0` (`"warn"`).
        not_image: `[B, L]` bool, placeholder columns that hold no vision feature (LLaVA-OneVision's
            row ends; `dyco_probe.models.layouts`): left out of the image span.

    Raises:
        ValueError naming the sample: no image tokens (with `"error"`), image-token count not matching
        the grids, grids not matching the pixels.
    """
    if on_missing_image not in ("error", "warn"):
        raise ValueError(f"on_missing_image must be 'error' or 'warn', got {on_missing_image!r}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    valid = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.to(torch.bool)
    )
    image = (input_ids == image_token_id) & valid
    if not_image is not None:
        image = image & ~not_image.to(device=image.device, dtype=torch.bool)
    counts = image.sum(-1)
    cols = torch.arange(input_ids.shape[1], device=input_ids.device)
    last_image = torch.where(image, cols, torch.full_like(cols, -1)).amax(-1)

    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        msg = f"sample(s) {missing} have no image tokens (id {image_token_id}) in the prompt"
        if on_missing_image == "error":
            raise ValueError(msg + "; pass on_missing_image='warn' to trace them with r_vis = 0")
        warnings.warn(msg + "; their r_vis is 0 and v_vis is 0", stacklevel=2)

    if image_grid_thw is not None:
        layout = _assign_grids(counts, image_grid_thw, merge_size, num_pixel_rows)
    elif tokens_per_image:
        bad = (counts % tokens_per_image != 0).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"sample {bad[0]} has {int(counts[bad[0]])} image tokens, not a multiple of the "
                f"{tokens_per_image} tokens per image"
            )
        side = math.isqrt(tokens_per_image)
        grid = (side, side) if side * side == tokens_per_image else (None, None)
        layout = [[(tokens_per_image, *grid)] * (int(c) // tokens_per_image) for c in counts]
    else:
        layout = [_runs_layout(image[i], position_ids, i) for i in range(image.shape[0])]
    num_images = torch.tensor([len(x) for x in layout], dtype=torch.long, device=counts.device)
    return Spans(
        image=image,
        valid=valid,
        last_image=last_image,
        num_images=num_images,
        image_layout=tuple(tuple(x) for x in layout),
    )


def _runs_layout(image_row: Tensor, position_ids: Tensor | None, i: int) -> list[tuple]:
    """`(tokens, rows, cols)` of each contiguous run of image columns of one sample; the grid from
    3-D rotary positions when given and consistent, else unknown."""
    cols = image_row.nonzero().flatten()
    if cols.numel() == 0:
        return []
    breaks = (cols[1:] - cols[:-1] != 1).nonzero().flatten() + 1
    runs = torch.tensor_split(cols, breaks.cpu())
    rope = position_ids is not None and position_ids.ndim == 3 and position_ids.shape[0] in (3, 4)
    out = []
    for run in runs:
        rows = width = None
        if rope:
            at = run.to(position_ids.device)
            h = int(position_ids[-2, i, at].unique().numel())
            w = int(position_ids[-1, i, at].unique().numel())
            if h * w == run.numel():
                rows, width = h, w
        out.append((int(run.numel()), rows, width))
    return out


def _assign_grids(counts: Tensor, grids: Tensor, merge_size: int, num_pixel_rows: int | None) -> list:
    """Walk the grids in order, giving each sample the images that make up its token count;
    returns each sample's `(tokens, rows, cols)` per image."""
    grids = grids.reshape(-1, 3).long().cpu()
    tokens = (grids.prod(-1) // merge_size**2).tolist()
    patches = grids.prod(-1).tolist()
    layout, k, rows = [], 0, 0
    for i, need in enumerate(counts.tolist()):
        got, mine = 0, []
        while got < need and k < len(tokens):
            got += tokens[k]
            rows += patches[k]
            t, h, w = grids[k].tolist()
            grid = (h // merge_size, w // merge_size) if t == 1 else (None, None)
            mine.append((tokens[k], *grid))
            k += 1
        if got != need:
            raise ValueError(
                f"sample {i} has {need} image tokens but its image grid(s) give {got} "
                f"(image_grid_thw does not match the prompt)"
            )
        if num_pixel_rows is not None and rows > num_pixel_rows:
            raise ValueError(
                f"sample {i}: image_grid_thw needs {rows} pixel patches up to this sample but pixel_values "
                f"has {num_pixel_rows} rows (the grid does not match the pixels)"
            )
        layout.append(mine)
    if k != len(tokens):
        raise ValueError(f"image_grid_thw has {len(tokens)} images but the prompts use only {k}")
    if num_pixel_rows is not None and rows != num_pixel_rows:
        raise ValueError(
            f"image_grid_thw describes {rows} pixel patches but pixel_values has {num_pixel_rows} rows "
            "(the grid does not match the pixels)"
        )
    return layout


def image_token_id_of(model) -> int:
    """The image placeholder id from a model config (`image_token_id`, or LLaVA's `image_token_index`)."""
    config = getattr(model, "config", model)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the model config has no image_token_id / image_token_index; pass image_token_id")


def _not_image(model, inputs: dict, image_token_id: int) -> Tensor | None:
    from dyco_probe.models.layouts import not_image_placeholders

    return not_image_placeholders(model, inputs, inputs["input_ids"] == image_token_id)


def image_positions(model, inputs: dict, image_token_id: int | None = None) -> Tensor:
    """`[B, L]` bool: the columns of `inputs["input_ids"]` whose input embedding is a vision feature
    (the image span `I` before padding is taken out), as `spans_for_model` finds them."""
    image_token_id = image_token_id_of(model) if image_token_id is None else image_token_id
    image = inputs["input_ids"] == image_token_id
    not_image = _not_image(model, inputs, image_token_id)
    return image if not_image is None else image & ~not_image


def spans_for_model(
    model,
    inputs: dict,
    *,
    image_token_id: int | None = None,
    on_missing_image: str = "error",
) -> Spans:
    """`find_spans` with the image checks a model's config implies (Qwen grids, LLaVA and Gemma 3
    tokens per image) and the family's layout (LLaVA-OneVision's row ends are not image)."""
    config = model.config
    image_token_id = image_token_id_of(model) if image_token_id is None else image_token_id
    vision = getattr(config, "vision_config", None)
    grid = inputs.get("image_grid_thw")
    pixels = inputs.get("pixel_values")
    model_type = getattr(config, "model_type", "")
    kwargs = {}
    if grid is not None:
        kwargs["image_grid_thw"] = grid
        kwargs["merge_size"] = getattr(vision, "spatial_merge_size", 2)
        if pixels is not None and pixels.ndim == 2:
            kwargs["num_pixel_rows"] = pixels.shape[0]
    elif getattr(config, "image_seq_length", None) and model_type == "llava":
        kwargs["tokens_per_image"] = int(config.image_seq_length)
    elif getattr(config, "mm_tokens_per_image", None) and model_type == "gemma3":
        kwargs["tokens_per_image"] = int(config.mm_tokens_per_image)
    spans = find_spans(
        inputs["input_ids"],
        inputs.get("attention_mask"),
        image_token_id=image_token_id,
        on_missing_image=on_missing_image,
        not_image=_not_image(model, inputs, image_token_id),
        position_ids=inputs.get("position_ids"),
        **kwargs,
    )
    counts = inputs.get("batch_num_images")  # LLaVA-OneVision: images per prompt
    if counts is not None and counts.numel() == spans.batch_size:
        spans = Spans(spans.image, spans.valid, spans.last_image, counts.to(spans.num_images))
    if grid is None and kwargs.get("tokens_per_image") and pixels is not None and model_type == "llava":
        expected = int(spans.num_images.sum())
        if pixels.shape[0] != expected:
            raise ValueError(
                f"the prompts hold {expected} images' worth of image tokens but pixel_values has "
                f"{pixels.shape[0]} images"
            )
    return spans
