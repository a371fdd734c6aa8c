"""Sweep results on disk: durable per unit of work, resumable, one part per process, merged at the end.

Layout of a sweep directory::

    manifest.json                 what the results depend on (model, data, roles, seed)
    parts/rank-000/<unit>.parquet one file per finished unit (a condition on a batch of items),
                                  written to a temporary name and renamed: a killed process leaves
                                  no partial file
    parts/part-000.parquet        process 0's units, compacted when it finishes
    results.parquet               `merge`: every part, one row per (condition, item)

A row is identified by `(condition_id, item_index)`. A rerun reads which rows exist (from every
process's files, whatever the number of processes was) and skips them, so a killed sweep loses at
most the units that were in flight and never duplicates a row; `merge` also drops duplicates
(keeping an `ok` row over an `error` row) as a last guard.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from ..files import atomic_path, write_bytes_atomic

__all__ = ["ResultStore"]

KEY = ("condition_id", "item_index")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)


def _write_parquet(frame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _visible(paths) -> list[Path]:
    return sorted(p for p in paths if not p.name.startswith("."))


def _read(path: Path, columns=None):
    import pandas as pd

    try:
        return pd.read_parquet(path, columns=columns)
    except FileNotFoundError:  # compacted away by its process meanwhile: its rows are in a part
        return None


class ResultStore:
    """The results of one sweep directory, as seen by process `rank` of `world_size`."""

    def __init__(self, out_dir, rank: int = 0, world_size: int = 1):
        self.out = Path(out_dir)
        self.rank, self.world_size = int(rank), int(world_size)
        self.parts = self.out / "parts"
        self.own = self.parts / f"rank-{self.rank:03d}"

    # -- manifest ------------------------------------------------------------------------------

    def check_manifest(self, identity: dict, write: bool = True) -> None:
        """Check that an existing manifest matches `identity` (ValueError if not), else write it
        (unless `write` is False: a check before anything is written)."""
        path = self.out / "manifest.json"
        blob = json.loads(json.dumps(identity, sort_keys=True, default=str))
        if path.exists():
            old = json.loads(path.read_text())
            if old != blob:
                diff = sorted(k for k in set(old) | set(blob) if old.get(k) != blob.get(k))
                raise ValueError(
                    f"{self.out} holds results of a different setup (differs in: {', '.join(diff)}); "
                    "use another output directory or remove it"
                )
            return
        if write:
            _atomic_write_bytes(path, (json.dumps(blob, indent=2, sort_keys=True) + "\n").encode())

    # -- reading -------------------------------------------------------------------------------

    def unit_files(self) -> list[Path]:
        return _visible(self.parts.glob("rank-*/*.parquet")) if self.parts.exists() else []

    def part_files(self) -> list[Path]:
        return _visible(self.parts.glob("part-*.parquet")) if self.parts.exists() else []

    def frames(self, columns=None) -> list:
        """Every stored frame: unit files first, then compacted parts (this order never misses a
        unit that its process compacts meanwhile)."""
        frames = [_read(p, columns) for p in self.unit_files()]
        frames += [_read(p, columns) for p in self.part_files()]
        return [f for f in frames if f is not None and len(f)]

    def done(self, retry_failed: bool = False) -> set[tuple[str, int]]:
        """`(condition_id, item_index)` of the stored rows (`ok` rows only with `retry_failed`)."""
        out: set[tuple[str, int]] = set()
        for f in self.frames(columns=[*KEY, "status"]):
            if retry_failed:
                f = f[f["status"] == "ok"]
            out.update(zip(f["condition_id"].tolist(), (int(i) for i in f["item_index"].tolist())))
        return out

    # -- writing -------------------------------------------------------------------------------

    def write_unit(self, name: str, rows: list[dict]) -> Path:
        """Store one finished unit's rows (atomically)."""
        import pandas as pd

        self.own.mkdir(parents=True, exist_ok=True)
        path = self.own / f"{name}.parquet"
        if path.exists():  # a rerun of a unit with failed items (retry): keep both, merge dedups
            path = self.own / f"{name}-{uuid.uuid4().hex[:8]}.parquet"
        _write_parquet(pd.DataFrame(rows), path)
        return path

    def clean_temporary(self) -> None:
        """Remove temporary files a killed run of this process left behind."""
        patterns = [(self.own, ".*.partial"), (self.parts, f".part-{self.rank:03d}.parquet.*.partial")]
        for d, pattern in patterns:
            if d.exists():
                for p in d.glob(pattern):
                    p.unlink(missing_ok=True)

    def compact(self) -> Path | None:
        """Fold this process's unit files into `parts/part-<rank>.parquet`."""
        import pandas as pd

        units = _visible(self.own.glob("*.parquet")) if self.own.exists() else []
        if not units:
            return None
        part = self.parts / f"part-{self.rank:03d}.parquet"
        frames = [_read(part)] if part.exists() else []
        frames += [_read(p) for p in units]
        frame = _dedup(pd.concat([f for f in frames if f is not None], ignore_index=True))
        _write_parquet(frame, part)
        for p in units:
            p.unlink(missing_ok=True)
        return part

    # -- merging -------------------------------------------------------------------------------

    def merge(self):
        """Every stored row once, written to `results.parquet` (and returned as a DataFrame)."""
        import pandas as pd

        frames = self.frames()
        if not frames:
            raise ValueError(f"no results under {self.parts}")
        frame = _dedup(pd.concat(frames, ignore_index=True))
        frame = frame.sort_values(["condition_id", "item_index"], kind="stable").reset_index(drop=True)
        _write_parquet(frame, self.out / "results.parquet")
        return frame


def _dedup(frame):
    order = (frame["status"] != "ok").astype(int)  # ok rows first
    frame = frame.assign(_order=order).sort_values("_order", kind="stable")
    return frame.drop_duplicates(list(KEY), keep="first").drop(columns="_order").reset_index(drop=True)
