"""``dyco-probe pretrain``: train the built-in model (resumable)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dyco_probe.commands import add_command, emit


def run(args) -> int:
    from dyco_probe.models.builtin import BUILTIN_DIR
    from dyco_probe.pretrain import PretrainConfig, pretrain
    from dyco_probe.task.problems import TaskConfig

    cfg = PretrainConfig()
    if args.task_config:
        cfg = cfg.with_task(TaskConfig.from_dict(json.loads(args.task_config)))
    if args.tiny:
        cfg = cfg.tiny()
    cfg = cfg.with_overrides(
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
    )
    result = pretrain(cfg, resume=not args.no_resume, progress=not args.quiet)
    if args.install:
        install(Path(result["out"]), BUILTIN_DIR)
        result["installed"] = str(BUILTIN_DIR)
    emit(
        args,
        result,
        f"saved the model to {result['out']}" + (" and installed it as 'builtin'" if args.install else ""),
    )
    return 0


def install(source: Path, target: Path) -> None:
    """Copy the model in `source` to `target`: into a sibling folder first, then swapped in, so that
    `target` holds the old model or the whole new one, never part of it."""
    staging = target.with_name(f".{target.name}.installing")
    old = target.with_name(f".{target.name}.old")
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(source, staging)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def register(sub) -> None:
    p = add_command(sub, "pretrain", run, "train the built-in model by supervised fine-tuning (resumable)")
    p.add_argument(
        "--out",
        default="runs/pretrain",
        help="output directory: checkpoint and final model (default: runs/pretrain)",
    )
    p.add_argument("--steps", type=int, default=None, help="language-phase steps (default: 3000; --tiny: 4)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="language-phase batch size (default: 32; --tiny: 4)"
    )
    p.add_argument("--lr", type=float, default=None, help="language-phase learning rate (default: 2e-3)")
    p.add_argument("--seed", type=int, default=None, help="seed of the model and the data (default: 0)")
    p.add_argument(
        "--task-config",
        help="JSON object of TaskConfig knobs for the final task, e.g. '{\"pixel_noise\": 50}' (default: the task's defaults)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a few steps of a tiny model, for tests and smoke runs (default: off)",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="start over even if a checkpoint exists (default: resume it)"
    )
    p.add_argument(
        "--install",
        action="store_true",
        help="copy the result to dyco_probe/builtin, the 'builtin' model (default: off)",
    )
