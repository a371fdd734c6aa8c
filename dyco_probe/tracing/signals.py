"""From attention rows to the per-token signals of docs/method.md#attention-signals, #modality-dynamics, processed a block of steps at a time.

Every backend and both modes (online during `generate`, offline teacher-forced) feed the same
`StepSignals`, so they produce the same numbers: online one `[B, G, K]` row per step (`step`, which
buffers), offline all steps at once (`steps`). `G` indexes row groups: group 0 is the mean over
probed layers, groups 1.. the probed layers themselves when per-layer output is asked for. Besides
the per-token outputs, only the buffered rows (at most `chunk`) and the last processed step's
distributions are kept: memory is `O(chunk · G · K)` per sample, whatever the number of layers or steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distances import get_distance, masked_distribution
from ..scoring import normalised_ratios
from ..spans import Spans

__all__ = ["StepSignals", "reduce_rows"]

SIGNALS = ("r_vis", "r_txt", "r_vis_norm", "r_txt_norm", "v_vis", "v_txt")
DEFAULT_CHUNK = 32  # steps buffered online before they are processed together


def reduce_rows(per_layer: Tensor, per_layer_output: bool) -> Tensor:
    """`[B, n_layers, ..., K]` head-averaged rows -> `[B, G, ..., K]`: the layer mean, then (optionally)
    each layer."""
    mean = per_layer.mean(dim=1, keepdim=True)
    return torch.cat([mean, per_layer], dim=1) if per_layer_output else mean


class StepSignals:
    """Accumulates `r_vis, r_txt, r̃_vis, r̃_txt, v_vis, v_txt` step by step.

    Args:
        spans: the prompt batch's spans; step `t` (1-based) is the query in column `L - 1 + t - 1`.
        text_span: `"post_image"` or `"all_text"`.
        distance: name of the distance for the dynamics.
        keep_image_rows: also keep group 0's attention over each sample's image tokens.
        eps: guard of the normalised ratios.
        chunk: steps buffered before they are processed together (default `DEFAULT_CHUNK`).

    Online, a step only checks the row's length and buffers it (it runs once per generated token,
    so it must be cheap); every `chunk` steps the buffered rows are processed at once by the same
    vectorised code that processes an offline trace (`steps`). Memory stays bounded: the buffer
    (`chunk` rows), the last processed step's distributions, and 16 bytes per step per sample of
    output. The span masks are prefixes of buffers built once, the three distributions share one
    `masked_distribution` call and the two distances one distance call (zero padding changes
    neither), and what depends on the ratios alone (`r̃`, the NaN check) is computed at the end.
    """

    def __init__(
        self,
        spans: Spans,
        text_span: str = "post_image",
        distance: str = "fisher_rao",
        keep_image_rows: bool = False,
        eps: float = 1e-8,
        chunk: int | None = None,
    ):
        chunk = DEFAULT_CHUNK if chunk is None else chunk
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.spans = spans
        self.text_span = text_span
        self.distance = get_distance(distance)
        self.eps = eps
        self.chunk = chunk
        self.keep_image_rows = keep_image_rows
        self._pending: list[Tensor] = []  # buffered rows, [B, G, K_t] each
        self._steps = 0  # steps fed, buffered ones included
        self._prev: Tensor | None = None  # [2, B, G, K]: p_vis, p_txt of the last processed step
        self._ratios: list[Tensor] = []  # [B, G, n, 2] per processed block
        self._dynamics: list[Tensor] = []  # [B, G, n, 2] per processed block
        self._image_rows: list[Tensor] = []  # [B, n, N] per processed block
        self._has_image = spans.has_image[:, None, None].to(torch.float32)  # [B, 1, 1]
        self._masks: Tensor | None = None  # [3, B, 1, capacity] bool: I, X, X
        self._weights: Tensor | None = None  # [B, capacity, 2] float: I, X
        if keep_image_rows:
            counts = spans.image.sum(-1)
            n = max(int(counts.max()), 1) if counts.numel() else 1
            # image columns of each sample, packed left; [B, n] with a validity mask
            order = torch.argsort((~spans.image).to(torch.int8), dim=-1, stable=True)
            self.image_index = order[:, :n]
            self.image_index_mask = torch.arange(n, device=counts.device)[None, :] < counts[:, None]

    @property
    def num_steps(self) -> int:
        return self._steps

    def state_nbytes(self) -> int:
        """Bytes retained: buffered rows, the last step's distributions, the span-mask buffers and
        the outputs so far."""
        tensors = [self._prev, self._masks, self._weights, *self._pending, *self._ratios, *self._dynamics]
        tensors += self._image_rows
        return sum(x.numel() * x.element_size() for x in tensors if x is not None)

    def _span_masks(self, num_keys: int) -> tuple[Tensor, Tensor]:
        """`(masks [3, B, 1, K], weights [B, K, 2])` over the first `K = num_keys` columns.

        `X(q)` for every query is a prefix of one mask (columns up to `q`), so the buffers are built
        once (and doubled when generation outgrows them); `_process` cuts each step's prefix.
        """
        if self._masks is None or self._masks.shape[-1] < num_keys:
            size = max(num_keys, 2 * self.spans.prompt_length + 64)
            if self._masks is not None:
                size = max(size, 2 * self._masks.shape[-1])
            text = self.spans.text_mask(size - 1, self.text_span)
            image = self.spans.image_mask(size)
            self._masks = torch.stack([image, text, text])[:, :, None, :]
            self._weights = torch.stack([image, text], dim=-1).to(torch.float32)
        return self._masks[..., :num_keys], self._weights[:, :num_keys]

    def _expected_keys(self, t: int) -> int:
        return self.spans.prompt_length + t - 1

    def step(self, rows: Tensor) -> None:
        """Feed the rows of the next step: `[B, G, K]`, `K` = query column + 1."""
        t = self._steps + 1
        if rows.shape[-1] != self._expected_keys(t):
            raise RuntimeError(
                f"step {t}: attention row has {rows.shape[-1]} keys, expected {self._expected_keys(t)} "
                "(was the cache reused or the batch reordered, e.g. by beam search?)"
            )
        self._pending.append(rows)
        self._steps = t
        if len(self._pending) >= self.chunk:
            self._flush()

    def steps(self, rows: Tensor) -> None:
        """Feed `n` steps at once: `[B, G, n, K]`; step `j`'s row is read over its own keys only
        (the first `L + t - 1` columns, `t` its 1-based step), so anything past them is ignored."""
        self._flush()
        n = rows.shape[2]
        last = self._expected_keys(self._steps + n)
        if n and rows.shape[-1] < last:
            raise RuntimeError(
                f"steps {self._steps + 1}..{self._steps + n}: rows have {rows.shape[-1]} keys, need {last}"
            )
        first = self._steps + 1
        self._steps += n
        for start in range(0, n, self.chunk):
            stop = min(start + self.chunk, n)
            self._process(rows[:, :, start:stop, : self._expected_keys(first + stop - 1)], first + start)

    def _flush(self) -> None:
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        num_keys = rows[-1].shape[-1]
        block = rows[-1].new_zeros(*rows[-1].shape[:2], len(rows), num_keys)
        for j, row in enumerate(rows):
            block[:, :, j, : row.shape[-1]] = row
        self._process(block, self._steps - len(rows) + 1)

    def _process(self, rows: Tensor, first: int) -> None:
        """Signals of steps `first .. first + n - 1` from their rows `[B, G, n, K]` (`K` the last
        step's key count; each step's row is cut to its own keys here)."""
        # float32 math also inside a mixed-precision (autocast) forward
        with torch.autocast(device_type=rows.device.type, enabled=False):
            self._process_float32(rows, first)

    def _process_float32(self, rows: Tensor, first: int) -> None:
        n, num_keys = rows.shape[2], rows.shape[3]
        cols = torch.arange(num_keys, device=rows.device)
        keys = self._expected_keys(first) + torch.arange(n, device=rows.device)  # [n]
        upto = cols[None, :] < keys[:, None]  # [n, K]: step j's keys
        rows = torch.where(upto, rows.to(torch.float32), torch.zeros((), device=rows.device))
        masks, weights = self._span_masks(num_keys)
        ratios = torch.matmul(rows, weights[:, None])  # r_vis, r_txt: [B, G, n, 2]; NaN rows stay NaN

        upto_prev = cols[None, :] < (keys - 1)[:, None]  # X_{t-1}: step j's keys but its query's own
        prefix = torch.stack([upto, upto, upto_prev])[:, None, None]  # [3, 1, 1, n, K]
        # p_vis(t), p_txt(t), p̂_txt(t) (a_t restricted to X_{t-1}); all [3, B, G, n, K]
        dists = masked_distribution(rows.unsqueeze(0), masks[..., None, :] & prefix)
        prev = self._prev
        if prev is None:
            prev = torch.zeros_like(dists[:2, :, :, :1])
        else:
            prev = torch.nn.functional.pad(prev, (0, num_keys - prev.shape[-1]))[:, :, :, None]
        # (p_vis(t-1), p_vis(t)), (p_txt(t-1), p̂_txt(t)) for every step of the block at once
        v = self.distance(torch.cat([prev, dists[:2, :, :, :-1]], dim=3), dists[::2])  # [2, B, G, n]
        if self._prev is None:
            v[..., 0] = 0.0  # the first step has no predecessor
        self._dynamics.append(torch.stack([v[0] * self._has_image, v[1]], dim=-1))
        self._ratios.append(ratios)
        self._prev = dists[:2, :, :, -1]

        if self.keep_image_rows:
            length = self.spans.prompt_length
            index = self.image_index[:, None, :].expand(-1, n, -1)
            gathered = torch.gather(rows[:, 0, :, :length], 2, index)
            self._image_rows.append(gathered * self.image_index_mask[:, None, :])

    def result(self) -> dict[str, Tensor]:
        """Signals stacked over steps: each `[B, T, G]`; `nan` `[B, T]`; `image_rows` `[B, T, N]`."""
        self._flush()
        if not self._steps:
            raise ValueError("no generation step was traced (empty completion)")
        ratios = torch.cat(self._ratios, dim=2).transpose(1, 2)  # [B, T, G, 2]
        dynamics = torch.cat(self._dynamics, dim=2).transpose(1, 2)
        r_vis, r_txt = ratios.unbind(-1)
        r_vis_norm, r_txt_norm = normalised_ratios(r_vis, r_txt, eps=self.eps)
        v_vis, v_txt = dynamics.unbind(-1)
        out = dict(zip(SIGNALS, (r_vis, r_txt, r_vis_norm, r_txt_norm, v_vis, v_txt)))
        out["nan"] = torch.isnan(ratios).flatten(2).any(-1)
        if self.keep_image_rows:
            out["image_rows"] = torch.cat(self._image_rows, dim=1)
            out["image_rows_mask"] = self.image_index_mask
        return out
