"""From attention rows to the per-token signals of SPEC §2-3, one generation step at a time.

Every backend and both modes (online during `generate`, offline teacher-forced) feed the same
`StepSignals`, one `[B, G, K]` row block per step, so they produce the same numbers. `G` indexes row
groups: group 0 is the mean over probed layers, groups 1.. the probed layers themselves when
per-layer output is asked for. Only the previous step's distributions are kept: memory is
`O(G · K)` per sample, whatever the number of layers or steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distances import get_distance, masked_distribution
from ..scoring import normalised_ratios
from ..spans import Spans

__all__ = ["StepSignals", "reduce_rows"]

SIGNALS = ("r_vis", "r_txt", "r_vis_norm", "r_txt_norm", "v_vis", "v_txt")


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

    A step costs a few dozen small tensor operations (it runs once per generated token): the span
    masks are prefixes of buffers built once, the three distributions share one `masked_distribution`
    call and the two distances one distance call (zero padding changes neither), and what depends on
    the ratios alone (`r̃`, the NaN check) is computed once at the end.
    """

    def __init__(
        self,
        spans: Spans,
        text_span: str = "post_image",
        distance: str = "fisher_rao",
        keep_image_rows: bool = False,
        eps: float = 1e-8,
    ):
        self.spans = spans
        self.text_span = text_span
        self.distance = get_distance(distance)
        self.eps = eps
        self.keep_image_rows = keep_image_rows
        self._prev: Tensor | None = None  # [2, B, G, K-1]: p_vis(t-1), p_txt(t-1)
        self._ratios: list[Tensor] = []  # [B, G, 2] per step
        self._dynamics: list[Tensor] = []  # [B, G, 2] per step
        self._image_rows: list[Tensor] = []
        self._has_image = spans.has_image[:, None].to(torch.float32)
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
        return len(self._ratios)

    def state_nbytes(self) -> int:
        """Bytes retained: the previous step's distributions plus the per-token outputs so far."""
        tensors = [self._prev, *self._ratios, *self._dynamics, *self._image_rows]
        return sum(x.numel() * x.element_size() for x in tensors if x is not None)

    def _span_masks(self, num_keys: int) -> tuple[Tensor, Tensor]:
        """`(masks [3, B, 1, K], weights [B, K, 2])` for the query in column `K - 1`.

        `X(q)` for every query is a prefix of one mask (columns up to `q`), so the buffers are built
        once (and doubled when generation outgrows them); the third mask is `X_{t-1}`, i.e. `X_t`
        without its last column, which the caller clears.
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

    def step(self, rows: Tensor) -> None:
        """Feed the rows of the next step: `[B, G, K]`, `K` = query column + 1, float32."""
        num_keys = rows.shape[-1]
        t = self.num_steps + 1
        if num_keys != self.spans.prompt_length + t - 1:
            raise RuntimeError(
                f"step {t}: attention row has {num_keys} keys, expected {self.spans.prompt_length + t - 1} "
                "(was the cache reused or the batch reordered, e.g. by beam search?)"
            )
        rows = rows.to(torch.float32)
        masks, weights = self._span_masks(num_keys)
        self._ratios.append(torch.bmm(rows, weights))  # r_vis, r_txt: [B, G, 2]; NaN rows stay NaN

        masks = masks.clone()
        masks[2, ..., -1] = False  # X_{t-1}
        # p_vis(t), p_txt(t), p̂_txt(t) (a_t restricted to X_{t-1}); all [B, G, K]
        dists = masked_distribution(rows.unsqueeze(0), masks)
        if self._prev is None:
            self._dynamics.append(torch.zeros_like(self._ratios[-1]))
        else:
            v = self.distance(
                self._prev, dists[::2, ..., :-1]
            )  # (p_vis(t-1), p_vis(t)), (p_txt(t-1), p̂_txt(t))
            self._dynamics.append(torch.stack([v[0] * self._has_image, v[1]], dim=-1))
        self._prev = dists[:2]

        if self.keep_image_rows:
            gathered = torch.gather(rows[:, 0, : self.spans.prompt_length], 1, self.image_index)
            self._image_rows.append(gathered * self.image_index_mask)

    def result(self) -> dict[str, Tensor]:
        """Signals stacked over steps: each `[B, T, G]`; `nan` `[B, T]`; `image_rows` `[B, T, N]`."""
        if not self.num_steps:
            raise ValueError("no generation step was traced (empty completion)")
        ratios = torch.stack(self._ratios, dim=1)  # [B, T, G, 2]
        dynamics = torch.stack(self._dynamics, dim=1)
        r_vis, r_txt = ratios.unbind(-1)
        r_vis_norm, r_txt_norm = normalised_ratios(r_vis, r_txt, eps=self.eps)
        v_vis, v_txt = dynamics.unbind(-1)
        out = dict(zip(SIGNALS, (r_vis, r_txt, r_vis_norm, r_txt_norm, v_vis, v_txt)))
        out["nan"] = torch.isnan(ratios).flatten(2).any(-1)
        if self.keep_image_rows:
            out["image_rows"] = torch.stack(self._image_rows, dim=1)
            out["image_rows_mask"] = self.image_index_mask
        return out
