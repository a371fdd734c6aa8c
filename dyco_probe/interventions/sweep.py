"""The sweep runner: a grid of conditions over a data set, resumable, batched, split across processes.

    config = SweepConfig.load("analyses/sweeps/example.toml")
    summary = run_sweep(config)            # one process; merges at the end
    frame = merge_sweep(config)            # results.parquet as a DataFrame

Work is done batch by batch: for each batch of items (`[data] batch_size`) the reference
trajectories are prepared once, then every condition of this process runs on the whole batch
(one teacher-forced forward and / or one `generate` per condition) and its rows are stored as one
unit (`dyco_probe.interventions.store`). Rerunning skips stored rows. An item that fails is
retried alone; if it fails again its rows are stored with `status = "error"` and the message, and
the sweep goes on (`retry_failed=True` reruns them).

Several processes (`accelerate launch` / `torchrun`, or `RANK` / `WORLD_SIZE` set by hand) take
conditions round-robin (condition k goes to rank k mod world size) and write their own part; run
`merge_sweep` (`dyco-probe sweep FILE --merge`) when all are done. The processes never communicate,
so on a CPU-only machine `accelerate launch --multi_gpu --num_processes 2 -m dyco_probe.cli sweep
FILE` works too (`--multi_gpu` only selects the torchrun launcher; each process uses
`cuda:<LOCAL_RANK>` when CUDA is there, else the CPU).
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .conditions import Condition, SweepConfig, expand_conditions, labeller_options
from .patching import (
    patch_attention_output,
    patch_image_states,
    record_attention_output,
    record_image_states,
)
from .queries import select_tokens
from .store import ResultStore
from .trajectories import Trajectories, prepare_trajectories

__all__ = [
    "SweepSummary",
    "load_sweep_model",
    "merge_sweep",
    "run_sweep",
    "summarize_sweep",
    "sweep_examples",
]

TEACHER_FORCED = (
    "n_targets",
    "t0",
    "dlogp_answer",
    "logp_answer_base",
    "dlogp_target",
    "dlogp_after",
    "n_answer_targets",
    "dlogp_answer_gap",
)
FREE_RUNNING = ("correct_ref", "correct_base", "correct_int", "dacc", "changed")


@dataclass
class SweepSummary:
    """What one process did."""

    out: str
    rank: int
    world_size: int
    conditions: int
    rows_written: int
    errors: int
    skipped: int
    seconds: float

    @property
    def items_per_second(self) -> float:
        """Condition × item evaluations per second."""
        return self.rows_written / self.seconds if self.seconds > 0 else math.inf


def _env_rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def load_sweep_model(config: SweepConfig):
    """The `ModelHandle` a sweep file names (`source = "builtin"`, a path, or `"untrained"`)."""
    from ..models.loading import load

    m = config.model
    device = m.get("device", "auto")
    if device == "auto":
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if m["source"] == "untrained":
        from ..models.adapters import QWEN2_5_VL
        from ..models.loading import check_device

        check_device(device)
        from ..models.builtin import BuiltinArchitecture, build_untrained
        from ..models.loading import ModelHandle

        arch = BuiltinArchitecture(**m.get("arch", {}))
        model, processor = build_untrained(arch, seed=int(m.get("seed", 0)))
        model = model.to(device).eval()
        return ModelHandle(model=model, processor=processor, adapter=QWEN2_5_VL, source="untrained")
    if "arch" in m:
        raise ValueError("[model] arch applies to source = 'untrained' only")
    return load(m["source"], device=device, dtype=m.get("dtype"))


def sweep_examples(config: SweepConfig) -> list:
    """The sweep's data: items `start .. start+n-1` of the synthetic split or the jsonl file."""
    from ..data import read_jsonl, synthetic_examples

    d = config.data
    if d.get("jsonl"):
        examples = read_jsonl(d["jsonl"], skip_bad=bool(d.get("skip_bad")))
        examples = examples[int(d["start"]) : int(d["start"]) + int(d["n"])]
        if len(examples) < int(d["n"]):
            raise ValueError(
                f"{d['jsonl']} has only {len(examples)} examples from {d['start']} on, n = {d['n']}"
            )
        return examples
    return synthetic_examples(d["split"], int(d["n"]), start=int(d["start"]))


def _error_text(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}{where}"[:2000]


class _Runner:
    """Runs conditions on batches for one process."""

    def __init__(self, config: SweepConfig, handle, examples: Sequence, rank: int, world_size: int):
        self.config = config
        self.handle = handle
        self.examples = list(examples)
        self.rank = rank
        self.world_size = world_size
        self.trace_config = config.trace_config()

    # -- references ----------------------------------------------------------------------------

    def prepare(self, items: list[int]) -> tuple[Trajectories | None, dict[int, str]]:
        """Trajectories of `items` (dataset positions); items that fail on their own are returned as errors."""
        d = self.config.data

        def build(idx):
            return prepare_trajectories(
                self.handle,
                [self.examples[i] for i in idx],
                [int(d["start"]) + i for i in idx],
                trajectory=d["trajectory"],
                max_new_tokens=int(d["max_new_tokens"]),
                trace_config=self.trace_config,
            )

        try:
            return build(items), {}
        except Exception:  # find the culprit(s): retry one by one
            failed, good = {}, []
            for i in items:
                try:
                    build([i])
                    good.append(i)
                except Exception as e:
                    failed[i] = _error_text(e)
            if not good:
                return None, failed
            try:
                return build(good), failed
            except Exception as e:
                return None, {**failed, **{i: _error_text(e) for i in good}}

    def roles(self, traj: Trajectories, source: str):
        """Roles from the labeller `source`, with the `[roles]` options that labeller takes."""
        return traj.roles(source, **labeller_options(source, self.config.roles))

    def selection(self, c: Condition, traj: Trajectories):
        if not c.target:  # image-state patches act on states, not queries
            return traj.completion_mask.cpu().clone()
        roles = self.roles(traj, c.role_source) if c.role_source else None
        return select_tokens(
            c.target, roles, traj.completion_mask.cpu(), seed=self.config.seed, sample_keys=traj.indices
        )

    # -- one condition on one batch ------------------------------------------------------------

    def donor_images(self, traj: Trajectories, donor: str) -> list[list]:
        if donor == "blank":
            from ..task.render import blank_like

            return [[blank_like(im) for im in ims] for ims in traj.images]
        start, n = int(self.config.data["start"]), len(self.examples)
        return [self.examples[(i - start + 1) % n].load_images() for i in traj.indices]

    def metrics(self, c: Condition, traj: Trajectories) -> dict[str, list]:
        selection = self.selection(c, traj)
        out: dict[str, list] = {}
        readouts = self.config.readouts
        if c.is_patch:
            out.update(self.patch_metrics(c, traj, selection))
            if readouts.get("free_running"):  # patched values exist for the reference trajectory only
                out.update({k: [math.nan] * len(traj) for k in FREE_RUNNING})
            return out
        spec = c.intervention(self.config.roles["text_span"])
        if readouts.get("teacher_forced"):
            out.update(traj.teacher_forced(spec, selection))
            out["dlogp_answer_gap"] = [math.nan] * len(traj)
        if readouts.get("free_running"):
            fr = traj.free_running(spec, selection)
            out.update({k: v for k, v in fr.items() if k not in out})
        return out

    def patch_metrics(self, c: Condition, traj: Trajectories, selection) -> dict[str, list]:
        other = traj.with_images(self.donor_images(traj, c.donor))
        donor, recipient = (other, traj) if c.direction == "noise" else (traj, other)
        model = traj.model
        if c.kind == "patch_image_states":
            rec = record_image_states(model, donor.inputs(), c.layers)

            def factory(queries):
                return patch_image_states(model, rec, c.layers)
        else:
            rec = record_attention_output(model, donor.inputs(), c.layers)

            def factory(queries):
                return patch_attention_output(model, rec, c.layers, queries=queries, heads=c.heads)

        out = recipient.teacher_forced(None, selection, patch=factory)
        gap = (traj.base_logp - other.base_logp).double()
        answer = traj.answer_mask.bool() & traj.completion_mask.cpu().bool()
        out["dlogp_answer_gap"] = [
            float(torch.where(answer[i], gap[i], 0).sum()) if answer[i].any() else math.nan
            for i in range(len(traj))
        ]
        return out

    def rows(self, c: Condition, traj: Trajectories) -> list[dict]:
        metrics = self.metrics(c, traj)
        rows = []
        for j in range(len(traj)):
            row = self.base_row(c, traj.indices[j], traj.examples[j].id)
            row.update({k: _num(v[j]) if k != "answer_int" else v[j] for k, v in metrics.items()})
            row["n_tokens"] = int(traj.completion_mask[j].sum())
            rows.append(row)
        return rows

    def base_row(self, c: Condition, index: int, item_id: str, error: str = "") -> dict:
        return {
            "sweep": self.config.name,
            **c.columns(),
            "item_index": int(index),
            "item_id": str(item_id),
            "status": "error" if error else "ok",
            "error": error,
            "rank": self.rank,
        }

    def error_rows(self, c: Condition, items: dict[int, str]) -> list[dict]:
        start = int(self.config.data["start"])
        return [self.base_row(c, start + i, self.examples[i].id, msg) for i, msg in items.items()]

    def run(self, c: Condition, traj: Trajectories) -> list[dict]:
        """Rows of `c` on `traj`; on failure each item is retried alone and failing ones become error rows."""
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                rows = self.rows(c, traj)
            seconds = time.perf_counter() - t0
            for r in rows:
                r["seconds"] = seconds / len(rows)
            return rows
        except Exception as batch_error:
            if len(traj) == 1:
                return [self.base_row(c, traj.indices[0], traj.examples[0].id, _error_text(batch_error))]
            out = []
            for j in range(len(traj)):
                out.extend(self.run(c, traj.select([j])))
            return out


def _num(x) -> float:
    if x is None:
        return math.nan
    return float(x)


def run_sweep(
    config: SweepConfig,
    *,
    out: str | os.PathLike | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    handle=None,
    progress: bool = True,
    retry_failed: bool = False,
    merge: bool | None = None,
) -> SweepSummary:
    """Run this process's share of the sweep, skipping stored rows.

    Args:
        config: the parsed sweep file.
        out: output directory (default `config.out`).
        rank, world_size: this process's share (default: `RANK` / `WORLD_SIZE` from the environment,
            as `accelerate launch` and `torchrun` set them; else 0 / 1).
        handle: a loaded `ModelHandle` (default: `load_sweep_model(config)`).
        progress: show a progress bar (items, with ETA).
        retry_failed: rerun rows stored with `status = "error"`.
        merge: write `results.parquet` at the end (default: when `world_size == 1`).
    """
    env_rank, env_world = _env_rank()
    rank = env_rank if rank is None else int(rank)
    world_size = env_world if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    store = ResultStore(out or config.out, rank, world_size)
    store.check_manifest(config.identity(), write=False)  # a different setup fails before any work
    started = time.perf_counter()
    handle = handle if handle is not None else load_sweep_model(config)
    examples = sweep_examples(config)
    num_layers = int(handle.model.config.get_text_config().num_hidden_layers)
    num_heads = int(handle.model.config.get_text_config().num_attention_heads)
    conditions = expand_conditions(config, num_layers, num_heads)
    mine = [c for k, c in enumerate(conditions) if k % world_size == rank]
    store.out.mkdir(parents=True, exist_ok=True)  # everything checked: now the directory is written
    store.check_manifest(config.identity())
    store.clean_temporary()
    done = store.done(retry_failed=retry_failed)
    slices = {s.name: s for s in config.slices}
    todo: dict[str, set[int]] = {}
    for c in mine:
        s = slices[c.slice]
        todo[c.id] = {
            i for i in range(s.start, s.start + s.n) if (c.id, int(config.data["start"]) + i) not in done
        }
    total = sum(len(v) for v in todo.values())
    skipped = sum(slices[c.slice].n for c in mine) - total
    runner = _Runner(config, handle, examples, rank, world_size)
    written = errors = 0
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        desc=f"sweep {config.name} [{rank}/{world_size}]",
        unit="item",
        disable=not progress,
        dynamic_ncols=True,
    )
    batch_size = int(config.data["batch_size"])
    try:
        for s in config.slices:
            items = list(range(s.start, s.start + s.n))
            for b in range(0, len(items), batch_size):
                chunk = items[b : b + batch_size]
                conds = [c for c in mine if c.slice == s.name and todo[c.id].intersection(chunk)]
                if not conds:
                    continue
                traj, failed = runner.prepare(chunk)
                positions = {} if traj is None else {idx: j for j, idx in enumerate(traj.indices)}
                offset = int(config.data["start"])
                for c in conds:
                    wanted = [i for i in chunk if i in todo[c.id]]
                    rows = runner.error_rows(c, {i: failed[i] for i in wanted if i in failed})
                    ok = [positions[offset + i] for i in wanted if i not in failed]
                    if ok:
                        sub = traj if len(ok) == len(traj) else traj.select(ok)
                        rows += runner.run(c, sub)
                    rows.sort(key=lambda r: r["item_index"])
                    store.write_unit(f"{c.id}-{offset + wanted[0]:06d}-{offset + wanted[-1]:06d}", rows)
                    written += len(rows)
                    errors += sum(r["status"] != "ok" for r in rows)
                    bar.update(len(wanted))
                    bar.set_postfix(errors=errors, refresh=False)
    finally:
        bar.close()
    store.compact()
    if (world_size == 1) if merge is None else merge:
        merge_sweep(store.out)
    return SweepSummary(
        out=str(store.out),
        rank=rank,
        world_size=world_size,
        conditions=len(mine),
        rows_written=written,
        errors=errors,
        skipped=skipped,
        seconds=time.perf_counter() - started,
    )


SUMMARY_METRICS = ("dacc", "dlogp_answer", "dlogp_target", "dlogp_after")
CONDITION_COLUMNS = (
    "condition_id",
    "kind",
    "keys",
    "strength",
    "target",
    "role_source",
    "layers",
    "heads",
    "slice",
    "donor",
    "direction",
)


def summarize_sweep(frame, n_boot: int = 1000):
    """One row per condition: its columns, `n_items`, `n_errors`, mean `n_targets`, and for each
    effect (`SUMMARY_METRICS`) the mean with its bootstrap 95% CI (`<metric>`, `<metric>_low`,
    `<metric>_high`) over the samples the condition touched."""
    import pandas as pd

    from .stats import bootstrap_ci

    rows = []
    for _, group in frame.groupby("condition_id", sort=False):
        first = group.iloc[0]
        ok = group[group["status"] == "ok"]
        row = {c: first[c] for c in CONDITION_COLUMNS if c in group}
        row.update(n_items=len(group), n_errors=int((group["status"] != "ok").sum()))
        row["n_targets"] = float(ok["n_targets"].mean()) if "n_targets" in ok and len(ok) else math.nan
        for m in SUMMARY_METRICS:
            if m in ok:
                row[m], row[f"{m}_low"], row[f"{m}_high"] = bootstrap_ci(ok[m], n_boot=n_boot)
        rows.append(row)
    return pd.DataFrame(rows)


def merge_sweep(config_or_out):
    """Join every process's part of a sweep into `results.parquet` (one row per condition and
    item) and write `summary.csv` (`summarize_sweep`); returns the rows as a DataFrame."""
    out = config_or_out.out if isinstance(config_or_out, SweepConfig) else config_or_out
    frame = ResultStore(out).merge()
    summarize_sweep(frame).to_csv(Path(out) / "summary.csv", index=False, float_format="%.6g")
    return frame
