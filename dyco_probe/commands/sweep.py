"""``dyco-probe sweep FILE.toml``: run an intervention sweep (resumable; several processes under
``accelerate launch``), or ``--merge`` the parts of one."""

from __future__ import annotations

from dyco_probe.commands import add_command, emit


def run(args) -> int:
    import torch

    from dyco_probe.interventions import SweepConfig, merge_sweep, run_sweep

    config = SweepConfig.load(args.file)
    if args.out:
        config.out = args.out
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        frame = merge_sweep(config)
        errors = int((frame["status"] != "ok").sum())
        result = {
            "out": config.out,
            "results": f"{config.out}/results.parquet",
            "summary": f"{config.out}/summary.csv",
            "rows": len(frame),
            "conditions": int(frame["condition_id"].nunique()),
            "errors": errors,
        }
        emit(
            args,
            result,
            f"merged {len(frame)} rows of {result['conditions']} conditions ({errors} errors) into {result['results']}",
        )
        return 0
    summary = run_sweep(
        config,
        rank=args.rank,
        world_size=args.world_size,
        progress=not args.quiet,
        retry_failed=args.retry_failed,
    )
    result = {
        "out": summary.out,
        "rank": summary.rank,
        "world_size": summary.world_size,
        "conditions": summary.conditions,
        "rows_written": summary.rows_written,
        "rows_skipped": summary.skipped,
        "errors": summary.errors,
        "seconds": round(summary.seconds, 2),
    }
    text = (
        f"rank {summary.rank}/{summary.world_size}: {summary.rows_written} rows written "
        f"({summary.skipped} already done, {summary.errors} errors) for {summary.conditions} conditions "
        f"in {summary.seconds:.1f} s -> {summary.out}"
    )
    if summary.world_size > 1:
        out = f" --out {args.out}" if args.out else ""
        text += f"\nwhen every process has finished: dyco-probe sweep {args.file}{out} --merge"
    emit(args, result, text)
    return 0


def register(sub) -> None:
    p = add_command(sub, "sweep", run, "run a sweep of causal interventions from a TOML file (resumable)")
    p.add_argument(
        "file", help="sweep file (.toml); schema in dyco_probe.interventions.conditions (required)"
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="join the per-process parts into results.parquet (default: run the sweep)",
    )
    p.add_argument("--out", help="output directory (default: the file's `out`)")
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK or 0)")
    p.add_argument(
        "--world-size", type=int, default=None, help="number of processes (default: $WORLD_SIZE or 1)"
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="rerun rows stored with status 'error' (default: keep them)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads per process (0: torch's default)"
    )
