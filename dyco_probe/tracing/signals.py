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
        self._prev_vis: Tensor | None = None
        self._prev_txt: Tensor | None = None
        self._out: dict[str, list[Tensor]] = {k: [] for k in (*SIGNALS, "nan")}
        self._image_rows: list[Tensor] = []
        if keep_image_rows:
            counts = spans.image.sum(-1)
            n = max(int(counts.max()), 1) if counts.numel() else 1
            # image columns of each sample, packed left; [B, n] with a validity mask
            order = torch.argsort((~spans.image).to(torch.int8), dim=-1, stable=True)
            self.image_index = order[:, :n]
            self.image_index_mask = torch.arange(n, device=counts.device)[None, :] < counts[:, None]

    @property
    def num_steps(self) -> int:
        return len(self._out["r_vis"])

    def step(self, rows: Tensor) -> None:
        """Feed the rows of the next step: `[B, G, K]`, `K` = query column + 1, float32."""
        spans = self.spans
        num_keys = rows.shape[-1]
        query = num_keys - 1
        t = self.num_steps + 1
        expected = spans.prompt_length - 1 + (t - 1)
        if query != expected:
            raise RuntimeError(
                f"step {t}: attention row has {num_keys} keys, expected {expected + 1} "
                "(was the cache reused or the batch reordered, e.g. by beam search?)"
            )
        rows = rows.to(torch.float32)
        prompt = spans.prompt_length
        image = spans.image_mask(num_keys)[:, None, :]
        text = spans.text_mask(query, self.text_span, num_keys)[:, None, :]

        r_vis = (rows * image).sum(-1)
        r_txt = (rows * text).sum(-1)
        r_vis_norm, r_txt_norm = normalised_ratios(r_vis, r_txt, eps=self.eps)
        p_vis = masked_distribution(rows[..., :prompt], spans.image[:, None, :])
        p_txt = masked_distribution(rows, text)
        if self._prev_vis is None:
            v_vis = torch.zeros_like(r_vis)
            v_txt = torch.zeros_like(r_txt)
        else:
            # X_{t-1}: the text span of the previous query, i.e. without this step's column
            prev_text = spans.text_mask(query - 1, self.text_span, num_keys)[:, None, :]
            p_hat_txt = masked_distribution(rows, prev_text)
            prev_txt = torch.nn.functional.pad(self._prev_txt, (0, 1))
            v_txt = self.distance(prev_txt, p_hat_txt)
            v_vis = self.distance(self._prev_vis, p_vis)
            v_vis = torch.where(spans.has_image[:, None], v_vis, torch.zeros_like(v_vis))
        self._prev_vis, self._prev_txt = p_vis, p_txt

        for name, value in zip(SIGNALS, (r_vis, r_txt, r_vis_norm, r_txt_norm, v_vis, v_txt)):
            self._out[name].append(value)
        self._out["nan"].append(torch.isnan(rows).flatten(1).any(-1))
        if self.keep_image_rows:
            gathered = torch.gather(rows[:, 0, :prompt], 1, self.image_index)
            self._image_rows.append(torch.where(self.image_index_mask, gathered, torch.zeros_like(gathered)))

    def result(self) -> dict[str, Tensor]:
        """Signals stacked over steps: each `[B, T, G]`; `nan` `[B, T]`; `image_rows` `[B, T, N]`."""
        if not self.num_steps:
            raise ValueError("no generation step was traced (empty completion)")
        out = {k: torch.stack(v, dim=1) for k, v in self._out.items()}
        if self.keep_image_rows:
            out["image_rows"] = torch.stack(self._image_rows, dim=1)
            out["image_rows_mask"] = self.image_index_mask
        return out
