"""Does DyCo reweighting help RLVR? Baseline (off) vs DyCo token vs DyCo sequence, for GRPO and DAPO.

Trains every (algorithm, granularity, seed) combination with ``dyco_probe.rl.train`` from the same
initial model, then writes to ``figures/``:

- ``rl_comparison.md`` / ``rl_comparison.csv``: held-out accuracy before and after training, mean over
  seeds with a 95% t-interval, the gain, and the paired difference to the baseline of the same
  algorithm and seed (same data order);
- ``rl_learning_curves.png`` / ``.pdf``: held-out accuracy and training reward against steps, mean
  over seeds with the 95% t-band;
- on a task with notes (the built-in model's positive control), the same by subset (no note, true
  note, false note) and the share of noted look-ups copied from the note, and
  ``rl_comparison.json`` with the headline numbers (``rl_gain_points``: GRPO with DyCo off, overall,
  in points; ``rl_gain_by_subset``; every row).

Runs live in ``--runs`` (one directory each) and the script is resumable: finished runs are skipped,
interrupted ones resume from their last checkpoint, and ``--report-only`` just redraws. The budget
flags set the cost: with the defaults (18 runs) the whole comparison takes about 60-90 min of CPU on
the built-in model with ``--jobs 2`` on two cores.

    python -m analyses.rl_comparison                         # defaults: 3 seeds, RLConfig's steps, 300 eval examples
    python -m analyses.rl_comparison --steps 40 --n-eval 100 --seeds 0 1 2 --jobs 2
    python -m analyses.rl_comparison --report-only
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRANULARITIES = ("off", "token", "sequence")
LABELS = {"off": "baseline (off)", "token": "DyCo token", "sequence": "DyCo sequence"}
SUBSETS = ("no_note", "true_note", "false_note")


def run_dir(runs: Path, algo: str, dyco: str, seed: int) -> Path:
    return runs / f"{algo}-{dyco}-seed{seed}"


def is_finished(path: Path, steps: int) -> bool:
    done = path / "done.json"
    return done.exists() and json.loads(done.read_text())["steps"] >= steps


def train_one(job: dict) -> str:
    """One run, in a worker process (or inline); resumes from a checkpoint when there is one."""
    import torch

    from dyco_probe.rl import RLConfig, train

    torch.set_num_threads(job.pop("threads"))
    path = Path(job["out_dir"])
    config = RLConfig(**job, resume=(path / "checkpoint.pt").exists())
    result = train(config, progress=False)
    (path / "done.json").write_text(
        json.dumps({"steps": config.steps, "final_eval": result.final_eval}) + "\n"
    )
    return f"{path.name}: {result.initial_eval['accuracy']:.3f} -> {result.final_eval['accuracy']:.3f}"


def read_run(path: Path) -> dict:
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return {
        "eval": [r for r in rows if r["kind"] == "eval"],
        "train": [r for r in rows if r["kind"] == "train" and not r.get("skipped")],
    }


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (nan half-width for fewer than two values)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def fmt(mean: float, half: float, scale: float = 100.0) -> str:
    if math.isnan(half):
        return f"{scale * mean:.1f}"
    return f"{scale * mean:.1f} ± {scale * half:.1f}"


def summarise(runs: Path, algos, seeds, steps: int) -> tuple[list[dict], dict]:
    """Table rows per (algo, granularity) and the per-run curves."""
    curves, rows = {}, []
    for algo in algos:
        finals_off = {}
        for dyco in GRANULARITIES:
            per_seed = {}
            for seed in seeds:
                path = run_dir(runs, algo, dyco, seed)
                if is_finished(path, steps):
                    per_seed[seed] = read_run(path)
            curves[algo, dyco] = per_seed
            if not per_seed:
                continue
            first = [r["eval"][0]["accuracy"] for r in per_seed.values()]
            final = {s: r["eval"][-1]["accuracy"] for s, r in per_seed.items()}
            if dyco == "off":
                finals_off = final
            paired = [final[s] - finals_off[s] for s in final if s in finals_off]
            last_rows = [r["train"][-10:] for r in per_seed.values()]
            row = {
                "algo": algo,
                "dyco": dyco,
                "seeds": len(per_seed),
                "steps": steps,
                "n_eval": per_seed[next(iter(per_seed))]["eval"][-1]["n"],
                "initial_accuracy": sum(first) / len(first),
                "final_accuracy": t_interval(list(final.values())),
                "gain": t_interval([final[s] - f for s, f in zip(final, first)]),
                "vs_off": t_interval(paired) if dyco != "off" and paired else (float("nan"), float("nan")),
                "final_reward": t_interval([sum(x["reward"] for x in rr) / len(rr) for rr in last_rows]),
                "subsets": subset_rows(per_seed, curves.get((algo, "off")) if dyco != "off" else None),
            }
            rows.append(row)
    return rows, curves


def subset_rows(per_seed: dict, baseline: dict | None) -> dict:
    """Per subset of a task with notes (and the copy rate): before, after, gain and the paired
    difference to the baseline runs of the same seeds; empty without notes in the evaluations."""
    out = {}
    for key in [f"accuracy_{s}" for s in SUBSETS] + ["copy_rate"]:
        if not all(key in r["eval"][0] for r in per_seed.values()):
            continue
        first = {s: r["eval"][0][key] for s, r in per_seed.items()}
        final = {s: r["eval"][-1][key] for s, r in per_seed.items()}
        entry = {
            "initial": sum(first.values()) / len(first),
            "final": t_interval(list(final.values())),
            "gain": t_interval([final[s] - first[s] for s in final]),
            "vs_off": (float("nan"), float("nan")),
        }
        if baseline:
            paired = [final[s] - baseline[s]["eval"][-1][key] for s in final if s in baseline]
            if paired:
                entry["vs_off"] = t_interval(paired)
        out[key] = entry
    return out


def write_table(rows: list[dict], out: Path) -> str:
    import csv

    header = [
        "algorithm",
        "DyCo",
        "seeds",
        "held-out accuracy before (%)",
        "after (%), mean ± 95% CI",
        "gain (points)",
        "vs baseline, paired (points)",
        "train reward, last 10 steps",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * 2 + " ---: |" * (len(header) - 2)]
    with (out / "rl_comparison.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["algo", "dyco", "seeds", "steps", "n_eval", "initial_accuracy", "final_accuracy_mean"]
            + ["final_accuracy_ci95", "gain_mean", "gain_ci95", "vs_off_mean", "vs_off_ci95"]
            + ["final_reward_mean", "final_reward_ci95"]
        )
        for r in rows:
            w.writerow(
                [r["algo"], r["dyco"], r["seeds"], r["steps"], r["n_eval"], round(r["initial_accuracy"], 4)]
                + [round(x, 4) for k in ("final_accuracy", "gain", "vs_off", "final_reward") for x in r[k]]
            )
            vs = "" if r["dyco"] == "off" else fmt(*r["vs_off"])
            lines.append(
                f"| {r['algo']} | {LABELS[r['dyco']]} | {r['seeds']} | {100 * r['initial_accuracy']:.1f} | "
                f"{fmt(*r['final_accuracy'])} | {fmt(*r['gain'])} | {vs} | {fmt(*r['final_reward'], scale=1.0)} |"
            )
    return "\n".join(lines)


def write_subset_table(rows: list[dict]) -> str:
    """Markdown: per subset (and the copy rate), before and after, gain and paired difference."""
    if not rows or not rows[0]["subsets"]:
        return ""
    names = {f"accuracy_{s}": s.replace("_", " ") for s in SUBSETS} | {"copy_rate": "noted look-ups copied"}
    lines = [
        "| algorithm | DyCo | measure | before (%) | after (%), mean ± 95% CI | change (points) | vs baseline, paired (points) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        for key, e in r["subsets"].items():
            vs = "" if r["dyco"] == "off" else fmt(*e["vs_off"])
            lines.append(
                f"| {r['algo']} | {LABELS[r['dyco']]} | {names[key]} | {100 * e['initial']:.1f} | "
                f"{fmt(*e['final'])} | {fmt(*e['gain'])} | {vs} |"
            )
    return "\n".join(lines)


def headline(rows: list[dict], settings: dict) -> dict:
    """``rl_comparison.json``: the baseline GRPO gain overall and by subset (points, 95% t-interval),
    and every row."""

    def points(mean_half, n):
        mean, half = mean_half
        return {"mean": 100 * mean, "ci_low": 100 * (mean - half), "ci_high": 100 * (mean + half), "n": n}

    out: dict = {"settings": settings, "runs": []}
    for r in rows:
        out["runs"].append(
            {
                "algo": r["algo"],
                "dyco": r["dyco"],
                "seeds": r["seeds"],
                "initial_accuracy": r["initial_accuracy"],
                "gain_points": points(r["gain"], r["seeds"]),
                "vs_off_points": None if r["dyco"] == "off" else points(r["vs_off"], r["seeds"]),
                "subsets": {
                    k: {
                        "initial": e["initial"],
                        "gain_points": points(e["gain"], r["seeds"]),
                        "vs_off_points": None if r["dyco"] == "off" else points(e["vs_off"], r["seeds"]),
                    }
                    for k, e in r["subsets"].items()
                },
            }
        )
    base = next((r for r in rows if r["algo"] == "grpo" and r["dyco"] == "off"), None)
    if base is not None:
        out["rl_gain_points"] = points(base["gain"], base["seeds"])
        out["rl_gain_by_subset"] = {
            k.removeprefix("accuracy_"): points(e["gain"], base["seeds"]) for k, e in base["subsets"].items()
        }
    return out


def findings(rows: list[dict]) -> list[str]:
    """What the table shows, in words, from its intervals (no claim the intervals do not support)."""

    def verdict(mean: float, half: float, up: str, down: str) -> str:
        if math.isnan(half):
            return f"{mean * 100:+.1f} points (one seed: no interval)"
        if mean - half > 0:
            return f"{up} ({mean * 100:+.1f} ± {half * 100:.1f} points)"
        if mean + half < 0:
            return f"{down} ({mean * 100:+.1f} ± {half * 100:.1f} points)"
        return f"no detectable change ({mean * 100:+.1f} ± {half * 100:.1f} points)"

    out = []
    for r in rows:
        line = f"- {r['algo'].upper()}, {LABELS[r['dyco']]}: held-out accuracy: " + verdict(
            *r["gain"], "rose", "fell"
        )
        if r["dyco"] != "off":
            line += "; against the baseline of the same seeds: " + verdict(
                *r["vs_off"], "DyCo ahead", "DyCo behind"
            )
        for key, e in r["subsets"].items():
            name = key.removeprefix("accuracy_").replace("_", " ")
            line += f"; {name}: " + verdict(*e["gain"], "rose", "fell")
            if r["dyco"] != "off":
                line += " (vs baseline: " + verdict(*e["vs_off"], "DyCo ahead", "DyCo behind") + ")"
        out.append(line + ".")
    return out


def plot_curves(curves: dict, algos, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import stats

    extra = [
        k
        for k in ("accuracy_false_note", "copy_rate")
        if any(k in (r["eval"][0] if r["eval"] else {}) for c in curves.values() for r in c.values())
    ]
    fig, axes = plt.subplots(
        2 + len(extra),
        len(algos),
        figsize=(5.2 * len(algos), 3.2 * (2 + len(extra))),
        squeeze=False,
        sharex="col",
    )
    colours = {"off": "0.35", "token": "tab:blue", "sequence": "tab:orange"}

    def band(ax, xs, ys, dyco):
        ys = np.asarray(ys)
        mean = ys.mean(0)
        ax.plot(xs, mean, color=colours[dyco], label=f"{LABELS[dyco]} (n={len(ys)})")
        if len(ys) > 1:
            half = stats.t.ppf(0.975, len(ys) - 1) * ys.std(0, ddof=1) / math.sqrt(len(ys))
            ax.fill_between(xs, mean - half, mean + half, color=colours[dyco], alpha=0.18, linewidth=0)

    for col, algo in enumerate(algos):
        top, bottom = axes[0][col], axes[1][col]
        for dyco in GRANULARITIES:
            per_seed = curves.get((algo, dyco)) or {}
            if not per_seed:
                continue
            evals = [r["eval"] for r in per_seed.values()]
            steps = [e["step"] for e in evals[0]]
            if all([e["step"] for e in ev] == steps for ev in evals):
                band(top, steps, [[100 * e["accuracy"] for e in ev] for ev in evals], dyco)
            trains = [r["train"] for r in per_seed.values()]
            n = min(len(t) for t in trains)
            k = max(1, n // 15)  # moving average over ~1/15 of the run
            smooth = [np.convolve([x["reward"] for x in t[:n]], np.ones(k) / k, mode="valid") for t in trains]
            band(bottom, [t["step"] for t in trains[0][k - 1 : n]], smooth, dyco)
        for row, key in enumerate(extra, start=2):
            ax = axes[row][col]
            for dyco in GRANULARITIES:
                evals = [r["eval"] for r in (curves.get((algo, dyco)) or {}).values()]
                if evals and all([e["step"] for e in ev] == [e["step"] for e in evals[0]] for ev in evals):
                    band(
                        ax, [e["step"] for e in evals[0]], [[100 * e[key] for e in ev] for ev in evals], dyco
                    )
            ax.set_ylabel(
                "false-note accuracy (%)" if key == "accuracy_false_note" else "noted look-ups copied (%)"
            )
            ax.grid(alpha=0.3)
        axes[-1][col].set_xlabel("training step")
        top.set_title(algo.upper())
        top.set_ylabel("held-out accuracy (%)")
        bottom.set_ylabel("train reward (moving average)")
        top.legend(fontsize=8, frameon=False)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    fig.suptitle("RLVR on the built-in model: baseline vs DyCo (mean over seeds, 95% t-band)", fontsize=10)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"rl_learning_curves.{ext}", dpi=150)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "rl_comparison"), help="run directories")
    parser.add_argument("--out", default=str(ROOT / "figures"), help="where the table and figures go")
    parser.add_argument("--algos", nargs="+", default=["grpo", "dapo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per run (default: RLConfig's)"
    )
    parser.add_argument("--n-eval", type=int, default=300, help="held-out examples per evaluation")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--prompts-per-step", type=int, default=None, help="default: RLConfig's")
    parser.add_argument("--num-generations", type=int, default=None, help="default: RLConfig's")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: RLConfig's")
    parser.add_argument("--lr", type=float, default=None, help="default: RLConfig's")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--report-only", action="store_true", help="skip training; table and figures only")
    args = parser.parse_args()

    from dyco_probe.rl import RLConfig

    defaults = RLConfig()
    for name in ("steps", "prompts_per_step", "num_generations", "max_new_tokens", "lr"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(defaults, name))
    runs, out = Path(args.runs), Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"lr": args.lr}
    jobs = []
    for algo, dyco, seed in itertools.product(args.algos, GRANULARITIES, args.seeds):
        path = run_dir(runs, algo, dyco, seed)
        if args.report_only or is_finished(path, args.steps):
            continue
        jobs.append(
            dict(
                out_dir=str(path),
                model=args.model,
                algo=algo,
                dyco=dyco,
                seed=seed,
                steps=args.steps,
                n_eval=args.n_eval,
                eval_every=args.eval_every,
                prompts_per_step=args.prompts_per_step,
                num_generations=args.num_generations,
                max_new_tokens=args.max_new_tokens,
                checkpoint_every=10,
                threads=args.threads,
                **extra,
            )
        )
    if jobs:
        print(f"{len(jobs)} runs to do ({args.jobs} at a time); finished runs are skipped", flush=True)
        if args.jobs > 1:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
                for line in pool.map(train_one, jobs):
                    print(line, flush=True)
        else:
            for job in jobs:
                print(train_one(job), flush=True)

    rows, curves = summarise(runs, args.algos, args.seeds, args.steps)
    if not rows:
        print("no finished runs yet")
        return
    table = write_table(rows, out)
    subset_table = write_subset_table(rows)
    plot_curves(curves, args.algos, out)
    settings = {
        k: getattr(args, k)
        for k in ("model", "steps", "n_eval", "eval_every", "prompts_per_step", "num_generations")
        + ("max_new_tokens", "lr", "seeds", "algos")
    }
    (out / "rl_comparison.json").write_text(json.dumps(headline(rows, settings), indent=1) + "\n")
    r0 = rows[0]
    text = "\n".join(
        [
            "# RLVR with and without DyCo reweighting",
            "",
            f"Model `{args.model}`; {r0['steps']} steps of {args.prompts_per_step} prompts x "
            f"{args.num_generations} completions (max {args.max_new_tokens} new tokens), lr {args.lr:g} with "
            f"RLConfig's other defaults; held-out accuracy "
            f"on {r0['n_eval']} synthetic test examples, greedy. Means over seeds with 95% t-intervals "
            "(seeds change the data order and the sampling; the initial model is the same). 'vs baseline' "
            "is the paired difference to the same algorithm and seed with DyCo off.",
            "",
            table,
            "",
            *(
                [
                    "By subset of the questions (no note, true note, false note) and the share of noted "
                    "look-ups copied from the note:",
                    "",
                    subset_table,
                    "",
                ]
                if subset_table
                else []
            ),
            "## What it shows",
            "",
            "Each gain and paired difference is read from its 95% t-interval over seeds: a change is stated "
            "only where the interval excludes 0.",
            "",
            *findings(rows),
            "",
            "Learning curves: `rl_learning_curves.png` / `.pdf`.",
            "",
        ]
    )
    (out / "rl_comparison.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
