"""Choosing layers and heads: one parser of a command line's choice, one resolver of indices.

- `parse_layer_choice`: `"all"`, `"0,2,-1"`, or `""` / `"last"` / `"none"` (the default: the last
  layer) from an option or a config file, as `"all"`, a tuple of ints or `None`;
- `resolve_indices`: indices of `count` layers (or heads) sorted, without repeats, negative ones
  counted from the end; out of range is a `ValueError` that says what the model has;
- `window_order`: the order tables and figures list layer windows in (`"0"`, `"1"`, `"1-2"`, ...,
  `"all"` last).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["parse_layer_choice", "resolve_indices", "window_order"]


def parse_layer_choice(text) -> tuple[int, ...] | str | None:
    """`None` / `""` / `"last"` / `"none"` -> None (the last layer), `"all"` -> "all",
    `"0,2,-1"` -> (0, 2, -1)."""
    if text is None:
        return None
    text = str(text).strip()
    if text in ("", "none", "last"):
        return None
    if text == "all":
        return "all"
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected 'all' or comma-separated integers, got {text!r}") from None


def resolve_indices(
    indices: Iterable[int] | int, count: int, *, what: str = "layers", allow_empty: bool = False
) -> tuple[int, ...]:
    """`indices` of `count` layers (or heads: `what="heads"`), sorted, without repeats, negative ones
    counted from the end (`-1`: the last). An index out of range, or none at all unless
    `allow_empty`, is a `ValueError`."""
    given = [indices] if isinstance(indices, int) else list(indices)
    out = sorted({int(i) + count if int(i) < 0 else int(i) for i in given})
    if (not out and not allow_empty) or (out and (out[0] < 0 or out[-1] >= count)):
        raise ValueError(
            f"{what} {[int(i) for i in given]} out of range: the model has {count} {what} "
            f"(indices 0 to {count - 1}, or -{count} to -1 from the end)"
        )
    return tuple(out)


def window_order(name) -> tuple:
    """Sort key of a layer window's name: single layers and ranges by their first layer, then
    anything else, `"all"` last."""
    name = str(name)
    if name == "all":
        return (1, 0, name)
    head = name.split("-")[0].split(":")[0]
    return (0, int(head), name) if head.isdigit() else (0, 10**6, name)
