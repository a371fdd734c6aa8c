"""Sweep throughput: condition x sample evaluations per second, batched against one sample at a time.

The same sweep (image knockout on visual-role tokens, their matched random control and text-role
tokens, each layer and all layers) runs with `[data] batch_size = B` and with `batch_size = 1`,
for teacher-forced readouts only and for teacher-forced + free-running readouts. The variants run
interleaved (A B C D, A B C D, ...) in fresh output directories with the same loaded model, so
slow drifts of a shared machine hit all of them alike; the median over repeats is reported.

    python benchmarks/sweep_throughput.py                       # built-in model if present, else untrained
    python benchmarks/sweep_throughput.py --model untrained --n 16 --batch-size 16 --repeats 3
    python benchmarks/sweep_throughput.py --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dyco_probe.interventions import SweepConfig, expand_conditions, load_sweep_model, run_sweep  # noqa: E402

GRID = {
    "keys": ["image"],
    "strengths": [0.0],
    "targets": ["visual", "random:visual", "text"],
    "role_sources": ["ground_truth"],
    "layers": ["each", "all"],
}


def config_for(
    model: str, n: int, batch_size: int, free_running: bool, trajectory: str, max_new: int, out: str
):
    return SweepConfig.from_dict(
        {
            "out": out,
            "model": {"source": model},
            "data": {
                "split": "test",
                "n": n,
                "batch_size": batch_size,
                "trajectory": trajectory,
                "max_new_tokens": max_new,
            },
            "readouts": {"teacher_forced": True, "free_running": free_running},
            "grid": [GRID],
        },
        name="throughput",
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{platform.node() or 'host'} ({platform.machine()}, {os.cpu_count()} CPUs, {cpu}), "
        f"Python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load average {load}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="builtin, untrained or a checkpoint (default: builtin if present)"
    )
    p.add_argument("--n", type=int, default=16, help="samples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--append", help="append a dated section to this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dyco_probe.models.builtin import BUILTIN_DIR

    model = args.model or ("builtin" if (BUILTIN_DIR / "config.json").exists() else "untrained")
    trajectory = "greedy" if model != "untrained" else "gold"  # an untrained model never answers
    variants = [(fr, bs) for fr in (False, True) for bs in (args.batch_size, 1)]  # (free-running, batch size)
    with tempfile.TemporaryDirectory() as tmp:
        probe = config_for(model, args.n, 1, False, trajectory, args.max_new_tokens, tmp)
        handle = load_sweep_model(probe)
        text = handle.model.config.get_text_config()
        conditions = len(expand_conditions(probe, text.num_hidden_layers, text.num_attention_heads))
        params = sum(p.numel() for p in handle.model.parameters())
        # warm-up (allocator, lazy imports) on a few samples
        run_sweep(
            config_for(model, 2, 2, True, trajectory, args.max_new_tokens, f"{tmp}/warm"),
            handle=handle,
            progress=False,
        )
        times: dict[tuple, list[float]] = {v: [] for v in variants}
        for r in range(args.repeats):
            for fr, bs in variants:
                out = f"{tmp}/{r}-{int(fr)}-{bs}"
                config = config_for(model, args.n, bs, fr, trajectory, args.max_new_tokens, out)
                t0 = time.perf_counter()
                summary = run_sweep(config, handle=handle, progress=False, merge=False)
                times[(fr, bs)].append(time.perf_counter() - t0)
                assert summary.rows_written == conditions * args.n and summary.errors == 0
    evaluations = conditions * args.n
    rows = []
    for fr in (False, True):
        batched, single = statistics.median(times[(fr, args.batch_size)]), statistics.median(times[(fr, 1)])
        label = "teacher-forced + free-running" if fr else "teacher-forced"
        rows.append(
            (
                label,
                args.batch_size,
                batched,
                evaluations / batched,
                single,
                evaluations / single,
                single / batched,
            )
        )
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"## Sweep throughput — {stamp}",
        "",
        f"Machine: {machine()}. No GPU.",
        f"Model: `{model}`{' (the built-in architecture, random weights)' if model == 'untrained' else ''} "
        f"({params / 1e6:.1f}M parameters), {conditions} conditions (image knockout on "
        f"visual / matched random / text tokens, ground-truth roles, each layer and all layers) x {args.n} "
        f"synthetic test samples = {evaluations} evaluations; {trajectory} trajectories, max {args.max_new_tokens} "
        f"new tokens; median of {args.repeats} interleaved repeats after a warm-up, in-process (model loaded once).",
        "",
        "| readouts | batch | batched (s) | evaluations/s | one at a time (s) | evaluations/s | speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, bs, tb, rb, ts, rs, speed in rows:
        lines.append(f"| {label} | {bs} | {tb:.2f} | {rb:.1f} | {ts:.2f} | {rs:.1f} | {speed:.2f}x |")
    lines.append("")
    report = "\n".join(lines)
    print(report)
    print("raw seconds:", {f"fr={int(k[0])},bs={k[1]}": [round(x, 2) for x in v] for k, v in times.items()})
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
