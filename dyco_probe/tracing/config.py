"""Tracer settings, defaults from docs/method.md#sequences-and-spans, #attention-signals, #modality-dynamics and the paper's code."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..distances import DISTANCES
from ..layers import resolve_indices
from ..spans import TEXT_SPANS

__all__ = ["TraceConfig"]


@dataclass(frozen=True)
class TraceConfig:
    """What the tracer records.

    Attributes:
        layers: probed text-decoder layers: `None` = the last one (default), `"all"`, or indices
            (negative count from the end). In hybrid models (Qwen3.5) `"all"` means every
            softmax-attention layer; a linear-attention layer has no row and asking for it raises.
        heads: probed query heads (`None` = all); rows are averaged over them, then over layers.
        per_layer: also keep each probed layer's signals (`trace.per_layer`), besides their mean.
        text_span: `"post_image"` (default) or `"all_text"` (docs/method.md#sequences-and-spans).
        distance: distance for `v_vis`, `v_txt` (`"fisher_rao"` default; see `dyco_probe.distances`).
        image_rows: keep each token's attention row over the image tokens (heat-maps), `[B, T, N_img]`.
        on_missing_image: a prompt without image tokens raises (`"error"`) or is traced with
            `r_vis = 0`, `v_vis = 0` after a warning (`"warn"`).
        eps: guard of the normalised ratios.
    """

    layers: tuple[int, ...] | str | None = None
    heads: tuple[int, ...] | None = None
    per_layer: bool = False
    text_span: str = "post_image"
    distance: str = "fisher_rao"
    image_rows: bool = False
    on_missing_image: str = "error"
    eps: float = 1e-8

    def __post_init__(self):
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"layers must be None, 'all' or indices, got {self.layers!r}")
        if self.layers is not None and not isinstance(self.layers, str):
            object.__setattr__(self, "layers", tuple(int(i) for i in _as_seq(self.layers)))
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple(int(i) for i in _as_seq(self.heads)))
        if self.text_span not in TEXT_SPANS:
            raise ValueError(f"unknown text_span {self.text_span!r}; valid: {', '.join(TEXT_SPANS)}")
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance {self.distance!r}; valid: {', '.join(DISTANCES)}")
        if self.on_missing_image not in ("error", "warn"):
            raise ValueError(f"on_missing_image must be 'error' or 'warn', got {self.on_missing_image!r}")

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        """Probed layer indices, sorted and non-negative."""
        if self.layers is None:
            return (num_layers - 1,)
        if self.layers == "all":
            return tuple(range(num_layers))
        return resolve_indices(self.layers, num_layers)

    def resolve_heads(self, num_heads: int) -> tuple[int, ...] | None:
        """Probed head indices, or None for all."""
        if self.heads is None:
            return None
        return resolve_indices(self.heads, num_heads, what="heads")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("layers", "heads"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d


def _as_seq(x):
    return [x] if isinstance(x, int) else list(x)
