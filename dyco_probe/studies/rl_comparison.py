"""Does DyCo reweighting help RLVR? Baseline (off) vs DyCo token vs DyCo sequence, for GRPO and DAPO,
over seeds (`analyses/rl_comparison.py`).

`compare(settings)` trains every (algorithm, granularity, seed) combination with `dyco_probe.rl.train`
from the same initial model (finished runs are skipped, interrupted ones resume), then writes
`rl_comparison.md` / `.csv` / `.json` and `rl_learning_curves.png` / `.pdf`: held-out accuracy before
and after, mean over seeds with a 95% t-interval, the gain, and the paired difference to the baseline
of the same algorithm and seed; on a task with notes, the same by subset and the share of noted
look-ups copied. `runs_table` is the report's table of single runs.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dyco_probe.rundir import TrainingRun

LABELS = {"off": "baseline (off)", "token": "DyCo token", "sequence": "DyCo sequence"}
GRANULARITIES = tuple(LABELS)  # the baseline first: the others are paired with it
SUBSETS = ("no_note", "true_note", "false_note")


def run_dir(runs: Path, algo: str, dyco: str, seed: int) -> Path:
    return runs / f"{algo}-{dyco}-seed{seed}"


def is_finished(path: Path, steps: int) -> bool:
    done = TrainingRun(path).done
    return done.exists() and json.loads(done.read_text())["steps"] >= steps


def train_one(job: dict) -> str:
    """One run, in a worker process (or inline); resumes from a checkpoint when there is one."""
    import torch

    from dyco_probe.rl import RLConfig, train

    torch.set_num_threads(job.pop("threads"))
    run = TrainingRun(job["out_dir"])
    config = RLConfig(**job, resume=run.checkpoint.exists())
    result = train(config, progress=False)
    run.done.write_text(json.dumps({"steps": config.steps, "final_eval": result.final_eval}) + "\n")
    return f"{run.root.name}: {result.initial_eval['accuracy']:.3f} -> {result.final_eval['accuracy']:.3f}"


def read_run(path: Path) -> dict:
    """A finished run's evaluation and (not skipped) training records."""
    rows = TrainingRun(path).records()
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


# -- single runs (the report's table) ----------------------------------------------------------------


def runs_table(runs: dict):
    """One row per training run (`runs`: name -> `dyco_probe.rundir.read_rl_run(...)`): its settings,
    held-out accuracy before and after (Wilson 95% interval), and the last 10 steps' reward and `s_t`."""
    import pandas as pd

    rows = []
    for name, r in runs.items():
        cfg, ev, tr = r["config"], r["eval"], r["train"]
        last = tr.tail(10)
        rows.append(
            {
                "run": name,
                "algo": cfg.get("algo"),
                "dyco": cfg.get("dyco"),
                "steps": f"{r['steps_done']} / {cfg.get('steps', '?')}",
                "held-out accuracy before": ev["accuracy"].iloc[0] if len(ev) else math.nan,
                "after": ev["accuracy"].iloc[-1] if len(ev) else math.nan,
                "95% CI after": (
                    f"{ev['accuracy_ci_low'].iloc[-1]:.3f}–{ev['accuracy_ci_high'].iloc[-1]:.3f}"
                    if len(ev) and "accuracy_ci_low" in ev
                    else "–"
                ),
                "n eval": int(ev["n"].iloc[-1]) if len(ev) and "n" in ev else 0,
                "reward, last 10 steps": last["reward"].mean() if "reward" in last else math.nan,
                "s_mean, last 10 steps": last["s_mean"].mean() if "s_mean" in last else math.nan,
                "s / step": tr["time_step"].mean() if "time_step" in tr else math.nan,
            }
        )
    return pd.DataFrame(rows)


# -- the comparison -----------------------------------------------------------------------------------


@dataclass
class RLComparison:
    """The comparison's options (`analyses/rl_comparison.py`'s, with its defaults); `None`: RLConfig's."""

    runs: str  # run directories
    out: str  # where the table and figures go
    model: str = "builtin"
    algos: list[str] = field(default_factory=lambda: ["grpo", "dapo"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int | None = None
    n_eval: int = 300
    eval_every: int = 25
    prompts_per_step: int | None = None
    num_generations: int | None = None
    max_new_tokens: int | None = None
    lr: float | None = None
    jobs: int = 1  # runs in parallel (processes)
    threads: int = 1  # torch threads per run
    report_only: bool = False  # skip training; table and figures only


def compare(args, say=print) -> str | None:
    """Train what is missing, then write the table, the JSON and the learning curves; returns the
    Markdown of `rl_comparison.md` (None while no run has finished). `say` gets the progress lines."""
    import matplotlib.pyplot as plt

    from dyco_probe.rl import RLConfig
    from dyco_probe.viz import plot_rl_comparison

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
        say(f"{len(jobs)} runs to do ({args.jobs} at a time); finished runs are skipped")
        if args.jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
                for line in pool.map(train_one, jobs):
                    say(line)
        else:
            for job in jobs:
                say(train_one(job))

    rows, curves = summarise(runs, args.algos, args.seeds, args.steps)
    if not rows:
        say("no finished runs yet")
        return None
    table = write_table(rows, out)
    subset_table = write_subset_table(rows)
    fig = plot_rl_comparison(curves, args.algos, LABELS)
    for ext in ("png", "pdf"):
        fig.savefig(out / f"rl_learning_curves.{ext}", dpi=150)
    plt.close(fig)
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
    return text
