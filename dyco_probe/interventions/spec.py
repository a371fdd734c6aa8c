"""What an intervention changes (docs/method.md#interventions): attention logits of chosen layers, heads and key spans.

An `Intervention` says *what* to do at every query it is applied to; *which* queries is a separate
choice (`dyco_probe.interventions.queries`), so one spec runs against a target and its controls.

- `scale = 0`: knockout, `-inf` is added to the chosen keys' logits: they get zero weight and the
  rest of the row renormalises.
- `scale = λ > 0`: `log λ` is added: a share `p` of the chosen keys becomes `λp / (λp + 1 − p)`.
  `λ = 1` changes nothing (the hook then adds no bias at all, so it is an exact no-op).

Key spans, per sample, for the query in column `q` (columns index `prompt ++ completion`, padding
included, like `input_ids`; `c0` is the sample's first completion column):

| keys | columns |
| --- | --- |
| `image` | the image placeholder tokens (`I`, docs/method.md#sequences-and-spans) |
| `text` | `X(q)` of docs/method.md#sequences-and-spans (`text_span` convention), `q` itself included: what `r_txt` measures |
| `text_history` | `X(q)` without `q`: the text the query reads, not itself |
| `question` | `X(q)` restricted to the prompt (columns `< c0`) |
| `completion` | completion columns `c0 .. q` (the chain of thought so far, `q` included) |
| `positions` | the explicit columns `key_columns` (same for every sample) |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..layers import resolve_indices
from ..spans import TEXT_SPANS, Spans

__all__ = [
    "KEY_SPANS",
    "Intervention",
    "KeyLayout",
    "layer_windows",
    "layers_label",
    "parse_layers",
]

KEY_SPANS = ("image", "text", "text_history", "question", "completion", "positions")


def _as_tuple(x) -> tuple[int, ...] | None:
    if x is None:
        return None
    if isinstance(x, int):
        return (int(x),)
    return tuple(int(i) for i in x)


@dataclass(frozen=True)
class Intervention:
    """A change to attention logits: `keys` of the chosen `layers` and `heads` are scaled by `scale`.

    Attributes:
        keys: key span, one of `KEY_SPANS` (see the module docstring).
        scale: λ >= 0; 0 knocks the keys out, 1 is a no-op.
        layers: text-decoder layers (negative count from the end); None = all (in hybrid models,
            Qwen3.5, every softmax-attention layer: linear-attention layers cannot be biased).
        heads: query heads; None = all.
        text_span: `"post_image"` (default) or `"all_text"`, for the text-based key spans (docs/method.md#sequences-and-spans).
        key_columns: the columns of `keys="positions"`.
    """

    keys: str = "image"
    scale: float = 0.0
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    text_span: str = "post_image"
    key_columns: tuple[int, ...] = ()

    def __post_init__(self):
        if self.keys not in KEY_SPANS:
            raise ValueError(f"unknown key span {self.keys!r}; valid: {', '.join(KEY_SPANS)}")
        if self.text_span not in TEXT_SPANS:
            raise ValueError(f"unknown text_span {self.text_span!r}; valid: {', '.join(TEXT_SPANS)}")
        scale = float(self.scale)
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale must be a finite number >= 0 (0 = knockout), got {self.scale!r}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "layers", _as_tuple(self.layers))
        object.__setattr__(self, "heads", _as_tuple(self.heads))
        object.__setattr__(self, "key_columns", _as_tuple(self.key_columns) or ())
        if self.keys == "positions" and any(c < 0 for c in self.key_columns):
            raise ValueError("key_columns must be non-negative sequence columns")

    @classmethod
    def knockout(cls, keys: str = "image", **kwargs) -> Intervention:
        """Knock out `keys` (λ = 0)."""
        return cls(keys=keys, scale=0.0, **kwargs)

    @classmethod
    def scaling(cls, scale: float, keys: str = "image", **kwargs) -> Intervention:
        """Scale the attention weight of `keys` by `scale` (λ)."""
        return cls(keys=keys, scale=scale, **kwargs)

    @property
    def kind(self) -> str:
        """`"knockout"` (λ = 0) or `"scale"`."""
        return "knockout" if self.scale == 0 else "scale"

    @property
    def is_noop(self) -> bool:
        """λ = 1, or an empty explicit key set: nothing changes."""
        return self.scale == 1.0 or (self.keys == "positions" and not self.key_columns)

    @property
    def logit_bias(self) -> float:
        """What is added to the chosen logits: `-inf` for a knockout, `log λ` otherwise."""
        return float("-inf") if self.scale == 0 else math.log(self.scale)

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layer indices, sorted and non-negative (all layers when `layers` is None)."""
        if self.layers is None:
            return tuple(range(num_layers))
        return resolve_indices(self.layers, num_layers, allow_empty=True)

    def label(self) -> str:
        """A short human-readable name, e.g. `knockout image L0-1 H*`."""
        what = "knockout" if self.scale == 0 else f"scale {self.scale:g}x"
        layers = "*" if self.layers is None else _range_label(self.layers)
        heads = "*" if self.heads is None else ",".join(map(str, self.heads))
        return f"{what} {self.keys} L{layers} H{heads}"


def _range_label(layers) -> str:
    layers = sorted(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def layer_windows(num_layers: int, size: int, stride: int = 1) -> list[tuple[int, ...]]:
    """Windows of `size` consecutive layers slid over depth with `stride` (the last window ends at the top)."""
    if not 1 <= size <= num_layers:
        raise ValueError(f"window size must be in 1..{num_layers}, got {size}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    starts = list(range(0, num_layers - size + 1, stride))
    if starts[-1] != num_layers - size:
        starts.append(num_layers - size)
    return [tuple(range(s, s + size)) for s in starts]


def parse_layers(spec, num_layers: int) -> list[tuple[int, ...]]:
    """Layer selections from a compact description, each a tuple of layer indices.

    - `"all"`: one selection, every layer;
    - `"window:K"` / `"window:K:S"`: sliding windows of K layers, stride S (default 1);
    - `"each"`: every layer on its own (`window:1`);
    - an int, `"3"`, `"-1"`: one layer; `"1-3"`: layers 1 to 3; a list of ints: those layers.
    """
    if isinstance(spec, (list, tuple)):
        return [resolve_indices(spec, num_layers)]
    if isinstance(spec, int):
        return parse_layers([spec], num_layers)
    text = str(spec).strip()
    if text == "all":
        return [tuple(range(num_layers))]
    if text == "each":
        return layer_windows(num_layers, 1)
    if text.startswith("window:"):
        parts = text.split(":")[1:]
        try:
            size, stride = int(parts[0]), int(parts[1]) if len(parts) > 1 else 1
        except (ValueError, IndexError) as e:
            raise ValueError(f"bad layer window {spec!r}; write window:K or window:K:S") from e
        return layer_windows(num_layers, size, stride)
    try:
        if "-" in text[1:]:
            a, b = text[0] + text[1:].split("-", 1)[0], text[1:].split("-", 1)[1]
            layers = list(range(int(a), int(b) + 1))
        else:
            layers = [int(text)]
    except ValueError:
        raise ValueError(
            f"bad layer selection {spec!r}; use all, each, window:K[:S], N, A-B or a list"
        ) from None
    if not layers:
        raise ValueError(f"layer range {spec!r} is empty (write A-B with A <= B)")
    return parse_layers(layers, num_layers)


def layers_label(layers: tuple[int, ...], num_layers: int) -> str:
    """`"all"` for every layer, else `"a-b"` for a contiguous range or a comma list."""
    if tuple(layers) == tuple(range(num_layers)):
        return "all"
    return _range_label(layers)


@dataclass(frozen=True)
class KeyLayout:
    """Per-sample column layout that key spans are computed from.

    Attributes:
        image: `[B, C]` bool, image placeholder columns (columns past `C` are never image).
        valid: `[B, C]` bool, non-padding columns (columns past `C` count as valid).
        last_image: `[B]` long, last image column of each sample (-1 without image).
        completion_start: `[B]` long, each sample's first completion column.
        column_offset: `[B]` long, added to the `positions` key columns of each sample: where a
            batch was re-padded after its prompt was encoded (free-running regeneration), the
            prompt's column `c` of sample `i` is now `c + column_offset[i]`.
    """

    image: Tensor
    valid: Tensor
    last_image: Tensor
    completion_start: Tensor
    column_offset: Tensor | None = None

    @classmethod
    def from_spans(
        cls, spans: Spans, completion_start: Tensor | int | None = None, column_offset=None
    ) -> KeyLayout:
        """From prompt spans; completion starts at the padded prompt length unless given."""
        return cls.build(spans.image, spans.valid, completion_start, column_offset)

    @classmethod
    def build(
        cls, image: Tensor, valid: Tensor, completion_start: Tensor | int | None = None, column_offset=None
    ) -> KeyLayout:
        b, c = image.shape
        cols = torch.arange(c, device=image.device)
        last = torch.where(image, cols, torch.full_like(cols, -1)).amax(-1) if c else image.new_full((b,), -1)
        if completion_start is None:
            completion_start = c
        start = torch.as_tensor(completion_start, dtype=torch.long, device=image.device).expand(b).clone()
        offset = None
        if column_offset is not None:
            offset = torch.as_tensor(column_offset, dtype=torch.long, device=image.device).expand(b).clone()
        return cls(
            image=image.bool(),
            valid=valid.bool(),
            last_image=last.long(),
            completion_start=start,
            column_offset=offset,
        )

    @property
    def batch_size(self) -> int:
        return self.image.shape[0]

    def _fit(self, mask: Tensor, num_keys: int, fill: bool) -> Tensor:
        c = mask.shape[1]
        if num_keys <= c:
            return mask[:, :num_keys]
        ext = torch.full((mask.shape[0], num_keys - c), fill, dtype=torch.bool, device=mask.device)
        return torch.cat([mask, ext], dim=1)

    def key_mask(
        self,
        keys: str,
        query_columns: Tensor,
        num_keys: int,
        text_span: str = "post_image",
        key_columns: tuple[int, ...] = (),
    ) -> Tensor:
        """The keys of span `keys` for each query column: bool, broadcastable to `[B, R, num_keys]`."""
        device = self.image.device
        cols = torch.arange(num_keys, device=device)
        query_columns = query_columns.to(device)
        if keys == "image":
            return self._fit(self.image, num_keys, False)[:, None, :]
        if keys == "positions":
            if self.column_offset is not None:
                wanted = torch.tensor(key_columns, dtype=torch.long, device=device)
                shifted = wanted[None, :] + self.column_offset.to(device)[:, None]  # [B, n]
                return (cols[None, :, None] == shifted[:, None, :]).any(-1)[:, None, :]
            chosen = torch.zeros(num_keys, dtype=torch.bool, device=device)
            inside = [c for c in key_columns if c < num_keys]
            if inside:
                chosen[torch.tensor(inside, device=device)] = True
            return chosen[None, None, :]
        valid = self._fit(self.valid, num_keys, True)
        upto = cols[None, :] <= query_columns[:, None]  # [R, K]
        if keys == "completion":
            after = cols[None, :] >= self.completion_start[:, None]
            return (valid & after)[:, None, :] & upto[None]
        if text_span == "post_image":
            base = valid & (cols[None, :] > self.last_image[:, None])
        else:
            base = valid & ~self._fit(self.image, num_keys, False)
        span = base[:, None, :] & upto[None]  # X(q), q included
        if keys == "text":
            return span
        if keys == "text_history":
            return span & (cols[None, :] != query_columns[:, None])[None]
        if keys == "question":
            return span & (cols[None, :] < self.completion_start[:, None])[:, None, :]
        raise ValueError(f"unknown key span {keys!r}")
