"""What every training loop shares (``dyco_probe.rl``, ``dyco_probe.pretrain``): seeding, the RNG
state, atomic checkpoints, the metrics log and saving the trained model.

A checkpoint holds the RNG state with everything else, so a run killed after a checkpoint resumes
exactly where it stopped; files are written to a temporary name and renamed over the old one, so a kill
during a write leaves the previous version intact.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from dyco_probe.files import atomic_path, write_text_atomic

__all__ = [
    "MetricsLog",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "save_model",
    "seed_everything",
    "set_rng_state",
]


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The state of every generator a run draws from (CUDA's too, where there is one)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale(path: Path) -> None:
    """Remove what a write of ``path`` killed before its rename left behind."""
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        stale.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict | None:
    """A checkpoint, or ``None`` when there is none; an unreadable one is a ``RuntimeError`` that says
    how to start over."""
    path = Path(path)
    _remove_stale(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise RuntimeError(
            f"corrupt checkpoint {path}: {type(e).__name__}: {e}; delete it to start over"
        ) from e


def save_model(model, processor, path: Path, files: dict[str, str] | None = None) -> Path:
    """``save_pretrained`` of the model and its processor (loadable with
    ``dyco_probe.models.loading.load``), plus ``files`` (name -> text), into ``path``. Written to a
    temporary folder first and renamed, so ``path`` is never half written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


class MetricsLog:
    """``metrics.jsonl`` in a run directory (one record per line, appended and flushed as it comes),
    its CSV exports by kind of record, and optionally TensorBoard.

    Every record has a ``kind`` and a ``step``. Opened with ``keep_until``, the records a killed run
    logged after its last checkpoint (``step > keep_until``) are dropped.
    """

    def __init__(
        self, out_dir: Path, keep_until: int | None, tensorboard: bool = False, name="metrics.jsonl"
    ):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / name
        self.records: list[dict] = []
        if keep_until is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                rec = json.loads(line)
                if rec["step"] <= keep_until:
                    self.records.append(rec)
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError:
                warnings.warn("tensorboard is not installed; logging to jsonl/csv only", stacklevel=2)

    def write(self, record: dict) -> None:
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "kind"):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def export_csv(self, files: dict[str, str]) -> None:
        """One CSV per kind of record (``files``: kind -> file name), columns in order of appearance."""
        for kind, name in files.items():
            rows = [r for r in self.records if r["kind"] == kind]
            if not rows:
                continue
            columns = list(dict.fromkeys(k for r in rows for k in r))
            with atomic_path(self.out_dir / name) as tmp, tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
