"""The `Trace`: per-sample, per-token attention signals of a batch of completions.

    trace.r_vis              # [B, T] tensor; likewise r_txt, r_vis_norm, r_txt_norm, v_vis, v_txt
    trace.mask               # [B, T] bool: real completion tokens (up to and including EOS)
    trace[i]                 # SampleTrace: sample i, its valid tokens only
    trace[i, t]              # TokenRecord of o_{t+1} of sample i (t is 0-based)
    trace.per_layer["r_vis"] # [B, T, n_layers] when per-layer output was asked for
    trace.to_pandas()        # one row per sample x token (x layer)
    trace.save("x.parquet"); Trace.load("x.parquet")

Token `t` (0-based) is `o_{t+1}` of docs/method.md#sequences-and-spans; `v_vis`, `v_txt` at `t = 0` are 0 (no previous step; roles
start at the second token). Values at masked tokens are meaningless and kept only for the layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["SIGNAL_NAMES", "SampleTrace", "TokenRecord", "Trace"]

SIGNAL_NAMES = ("r_vis", "r_txt", "r_vis_norm", "r_txt_norm", "v_vis", "v_txt")
_FORMAT = "dyco_probe.trace/1"


@dataclass(frozen=True)
class TokenRecord:
    """One completion token of one sample."""

    sample: int
    t: int
    token_id: int
    text: str | None
    valid: bool
    r_vis: float
    r_txt: float
    r_vis_norm: float
    r_txt_norm: float
    v_vis: float
    v_txt: float
    image_row: Tensor | None = None
    per_layer: dict[int, dict[str, float]] | None = None


@dataclass
class Trace:
    """Attention signals of `B` completions of up to `T` tokens (see the module docstring).

    Attributes:
        token_ids: `[B, T]` long, the completion tokens `o_1..o_T` (pad after the end).
        mask: `[B, T]` bool, True for real tokens.
        r_vis, r_txt, r_vis_norm, r_txt_norm, v_vis, v_txt: `[B, T]` float32 (docs/method.md#attention-signals, #modality-dynamics), averaged over
            the probed heads and layers.
        token_text: per sample, per token text (when a tokenizer was given), else None.
        layers: probed layers (indices into the text decoder).
        per_layer: `{name: [B, T, len(layers)]}` for the six signals, when per-layer output was asked.
        image_rows: `[B, T, N]` attention of each token on each image token of its sample (packed in
            prompt order, zero-padded to the largest image span), when asked; `image_rows_mask` `[B, N]`.
        samples: per-sample metadata: `sample_id`, `prompt_length`, `completion_length`, `num_images`,
            `num_image_tokens`, `first_image_token`, `last_image_token` (unpadded prompt positions).
        metadata: model, settings, package versions, mode and backend.
    """

    token_ids: Tensor
    mask: Tensor
    r_vis: Tensor
    r_txt: Tensor
    r_vis_norm: Tensor
    r_txt_norm: Tensor
    v_vis: Tensor
    v_txt: Tensor
    token_text: list[list[str]] | None = None
    layers: tuple[int, ...] = ()
    per_layer: dict[str, Tensor] | None = None
    image_rows: Tensor | None = None
    image_rows_mask: Tensor | None = None
    samples: list[dict] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    # -- shape and indexing -------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """`T`, the padded completion length."""
        return self.token_ids.shape[1]

    @property
    def lengths(self) -> Tensor:
        """`[B]` number of real tokens per completion."""
        return self.mask.sum(-1)

    def __len__(self) -> int:
        return self.batch_size

    def __iter__(self):
        return (self[i] for i in range(self.batch_size))

    def __getitem__(self, index):
        if isinstance(index, tuple):
            i, t = index
            return self.token(int(i), int(t))
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"sample {index} out of range for {self.batch_size} samples")
            return SampleTrace(self, index % self.batch_size)
        if isinstance(index, slice):
            return self.select(range(self.batch_size)[index])
        return self.select(index)

    def token(self, i: int, t: int) -> TokenRecord:
        """Record of token `t` (0-based) of sample `i`."""
        if not -self.num_tokens <= t < self.num_tokens:
            raise IndexError(f"token {t} out of range for {self.num_tokens} tokens")
        i, t = i % self.batch_size, t % self.num_tokens
        per_layer = None
        if self.per_layer is not None:
            per_layer = {
                layer: {k: float(v[i, t, j]) for k, v in self.per_layer.items()}
                for j, layer in enumerate(self.layers)
            }
        image_row = None
        if self.image_rows is not None:
            image_row = self.image_rows[i, t][self.image_rows_mask[i]]
        return TokenRecord(
            sample=i,
            t=t,
            token_id=int(self.token_ids[i, t]),
            text=None if self.token_text is None else self.token_text[i][t],
            valid=bool(self.mask[i, t]),
            **{k: float(getattr(self, k)[i, t]) for k in SIGNAL_NAMES},
            image_row=image_row,
            per_layer=per_layer,
        )

    def select(self, indices) -> Trace:
        """A trace of the samples `indices` (a sequence of ints or a bool mask)."""
        idx = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx_list = idx.tolist()
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value[idx]
            elif f.name == "per_layer" and value is not None:
                value = {k: v[idx] for k, v in value.items()}
            elif f.name in ("token_text", "samples") and value is not None:
                value = [value[i] for i in idx_list]
            kwargs[f.name] = value
        return Trace(**kwargs)

    # -- downstream --------------------------------------------------------------------------

    def roles(self, tau_vis: float | None = None, tau_txt: float | None = None) -> Tensor:
        """Token roles (docs/method.md#token-roles) from `v_vis`, `v_txt`: `[B, T]` long `dyco_probe.roles.Role`
        values, with the published thresholds unless given."""
        from ..roles import TAU_TXT, TAU_VIS, label_roles

        tau_vis = TAU_VIS if tau_vis is None else tau_vis
        tau_txt = TAU_TXT if tau_txt is None else tau_txt
        return label_roles(self.v_vis, self.v_txt, self.mask, tau_vis=tau_vis, tau_txt=tau_txt)

    def score(self, config=None) -> dict[str, Tensor]:
        """The scorer on this trace (`dyco_probe.scoring.score_tokens`): roles, `s_t`, `w_t`, sequence scores."""
        from ..scoring import score_tokens

        return score_tokens(self.r_vis, self.r_txt, self.v_vis, self.v_txt, self.mask, config)

    # -- tables ------------------------------------------------------------------------------

    def to_pandas(self, per_layer: bool | None = None, valid_only: bool = True):
        """Long format: one row per sample x token, or per sample x token x layer.

        Args:
            per_layer: rows per probed layer (columns hold that layer's signals, `layer` its index);
                default: when per-layer signals were recorded.
            valid_only: drop masked (padding) tokens.

        Columns: `sample`, `sample_id`, `t`, `token_id`, `text`, `valid`, [`layer`], the six signals.
        """
        import pandas as pd

        per_layer = self.per_layer is not None if per_layer is None else per_layer
        if per_layer and self.per_layer is None:
            raise ValueError("this trace has no per-layer signals (trace with TraceConfig(per_layer=True))")
        b, t = self.token_ids.shape
        base = {
            "sample": torch.arange(b).repeat_interleave(t).numpy(),
            "sample_id": [s.get("sample_id", i) for i, s in enumerate(self._samples()) for _ in range(t)],
            "t": torch.arange(t).repeat(b).numpy(),
            "token_id": self.token_ids.reshape(-1).cpu().numpy(),
            "text": [x for row in self.token_text for x in row] if self.token_text else [None] * (b * t),
            "valid": self.mask.reshape(-1).cpu().numpy(),
        }
        if not per_layer:
            frame = pd.DataFrame({**base, **{k: _np(getattr(self, k)).reshape(-1) for k in SIGNAL_NAMES}})
        else:
            parts = []
            for j, layer in enumerate(self.layers):
                values = {k: _np(self.per_layer[k][:, :, j]).reshape(-1) for k in SIGNAL_NAMES}
                parts.append(pd.DataFrame({**base, "layer": layer, **values}))
            frame = pd.concat(parts, ignore_index=True).sort_values(["sample", "t", "layer"], kind="stable")
            frame = frame.reset_index(drop=True)
        if valid_only:
            frame = frame[frame["valid"]].reset_index(drop=True)
        return frame

    def _samples(self) -> list[dict]:
        return self.samples or [{} for _ in range(self.batch_size)]

    # -- persistence -------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write a parquet file: one row per sample x token (all tokens, masked ones included) with
        the signals, per-layer signals and image rows as list columns, and the sample table, layers
        and metadata in the file's key-value metadata.

        Missing parent folders are created. The file is written under a temporary name and renamed
        when complete, so `path` never holds a partial trace (`dyco_probe.files.atomic_path`)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ..files import atomic_path

        b, t = self.token_ids.shape
        columns = {
            "sample": pa.array(torch.arange(b).repeat_interleave(t).numpy()),
            "t": pa.array(torch.arange(t).repeat(b).numpy()),
            "token_id": pa.array(self.token_ids.reshape(-1).cpu().numpy()),
            "valid": pa.array(self.mask.reshape(-1).cpu().numpy()),
        }
        if self.token_text is not None:
            columns["text"] = pa.array([x for row in self.token_text for x in row], pa.string())
        for k in SIGNAL_NAMES:
            columns[k] = pa.array(_np(getattr(self, k)).reshape(-1))
        if self.per_layer is not None:
            for k in SIGNAL_NAMES:
                columns[f"{k}_per_layer"] = _list_column(self.per_layer[k])
        if self.image_rows is not None:
            columns["image_row"] = _list_column(self.image_rows)
        table = pa.table(columns)
        extra = {
            "format": _FORMAT,
            "shape": [b, t],
            "layers": list(self.layers),
            "samples": self.samples,
            "metadata": self.metadata,
            "image_rows_mask": None if self.image_rows_mask is None else self.image_rows_mask.tolist(),
        }
        meta = dict(table.schema.metadata or {})
        meta[b"dyco_probe"] = json.dumps(extra, default=str).encode()
        with atomic_path(path) as tmp:
            pq.write_table(table.replace_schema_metadata(meta), str(tmp))

    @classmethod
    def load(cls, path) -> Trace:
        """Read a trace written by `save`; a missing or unreadable file is an error naming it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such trace file")
        try:
            table = pq.read_table(str(path))
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path} is not a readable parquet trace: {e}") from e
        raw = (table.schema.metadata or {}).get(b"dyco_probe")
        if raw is None:
            raise ValueError(f"{path} is not a dyco_probe trace (no 'dyco_probe' metadata)")
        extra = json.loads(raw)
        if extra.get("format") != _FORMAT:
            raise ValueError(f"{path}: unknown trace format {extra.get('format')!r}")
        b, t = extra["shape"]

        def col(name, dtype):
            return torch.tensor(table.column(name).to_numpy(), dtype=dtype).reshape(b, t)

        per_layer = None
        names = set(table.column_names)
        if f"{SIGNAL_NAMES[0]}_per_layer" in names:
            per_layer = {k: _from_list_column(table.column(f"{k}_per_layer"), b, t) for k in SIGNAL_NAMES}
        texts = None
        if "text" in names:
            flat = table.column("text").to_pylist()
            texts = [flat[i * t : (i + 1) * t] for i in range(b)]
        mask_rows = extra.get("image_rows_mask")
        return cls(
            token_ids=col("token_id", torch.long),
            mask=col("valid", torch.bool),
            **{k: col(k, torch.float32) for k in SIGNAL_NAMES},
            token_text=texts,
            layers=tuple(extra["layers"]),
            per_layer=per_layer,
            image_rows=_from_list_column(table.column("image_row"), b, t) if "image_row" in names else None,
            image_rows_mask=None if mask_rows is None else torch.tensor(mask_rows, dtype=torch.bool),
            samples=extra["samples"],
            metadata=extra["metadata"],
        )

    def __repr__(self) -> str:
        layers = ",".join(map(str, self.layers))
        return (
            f"Trace(samples={self.batch_size}, tokens={self.num_tokens}, layers=[{layers}], "
            f"per_layer={self.per_layer is not None}, image_rows={self.image_rows is not None})"
        )


class SampleTrace:
    """One sample of a `Trace`, cut to its real tokens; `sample[t]` is a `TokenRecord`."""

    def __init__(self, trace: Trace, index: int):
        self.trace = trace
        self.index = index
        self.length = int(trace.mask[index].sum())

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, t: int) -> TokenRecord:
        if not -self.length <= t < self.length:
            raise IndexError(f"token {t} out of range for a completion of {self.length} tokens")
        return self.trace.token(self.index, t % self.length)

    def __iter__(self):
        return (self[t] for t in range(self.length))

    def __getattr__(self, name):
        trace = self.__dict__["trace"]
        if name in SIGNAL_NAMES or name in ("token_ids", "mask"):
            return getattr(trace, name)[self.index, : self.length]
        if name == "token_text":
            return None if trace.token_text is None else trace.token_text[self.index][: self.length]
        if name == "image_rows" and trace.image_rows is not None:
            return trace.image_rows[self.index, : self.length][:, trace.image_rows_mask[self.index]]
        if name == "meta":
            return trace._samples()[self.index]
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"SampleTrace(sample={self.index}, tokens={self.length})"


def _np(x: Tensor):
    return x.detach().to(torch.float32).cpu().numpy()


def _list_column(x: Tensor):
    import pyarrow as pa

    b, t = x.shape[:2]
    flat = _np(x).reshape(b * t, -1)
    return pa.array(list(flat), type=pa.list_(pa.float32()))


def _from_list_column(column, b: int, t: int) -> Tensor:
    import numpy as np

    values = np.stack([np.asarray(v, dtype=np.float32) for v in column.to_pylist()])
    return torch.from_numpy(values).reshape(b, t, -1)
