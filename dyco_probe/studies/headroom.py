"""How much can outcome-reward RL improve a checkpoint's greedy accuracy? (`analyses/rl_headroom.py`)

RL with a verifiable reward learns from groups whose completions disagree on the reward, and it can
raise *greedy* accuracy only where the greedy answer is wrong but the right one is sampled often
enough to be reinforced. `headroom(settings)` measures both on the synthetic test split (greedy
accuracy; per sampling temperature pass@k, mixed groups and the correct share of greedy failures;
where greedy chains leave the gold chain; how confident the model is at the look-ups it gets wrong)
and writes `rl_headroom.{md,json}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dyco_probe.data import example_from_problem
from dyco_probe.evaluation import evaluate, wilson_interval
from dyco_probe.models.loading import load, weights_sha256
from dyco_probe.pretrain import language_batch
from dyco_probe.rewards import accuracy_reward
from dyco_probe.rollout import sample_rollout
from dyco_probe.task.problems import make_split

P_BINS = (0.0, 0.05, 0.2, 0.5, 1.0001)
CONFIDENCE_BINS = (0.0, 0.5, 0.7, 0.9, 0.99, 1.0001)


def first_divergence(text: str, problem) -> str | None:
    """Role of the first gold-chain word a completion gets wrong (``None``: it follows the chain)."""
    words = text.split()
    for i, w in enumerate(problem.chain):
        if i >= len(words) or words[i] != w.text:
            return w.role
    return None


@torch.no_grad()
def lookup_confidence(handle, problems, batch_size: int = 50) -> np.ndarray:
    """``[n_lookups, 3]``: (argmax is right, probability of the right value, probability of the
    argmax), teacher-forced."""
    out = []
    for start in range(0, len(problems), batch_size):
        batch = language_batch(handle, problems[start : start + batch_size], 1.0)
        inputs, lookups = batch.inputs, batch.lookups
        logits = handle.model(**inputs).logits.float()
        ids = inputs["input_ids"]
        for i, q, _ in lookups:
            p = torch.softmax(logits[i, q], -1)
            target = ids[i, q + 1]
            out.append((float(p.argmax() == target), float(p[target]), float(p.max())))
    return np.array(out)


def sampled(handle, examples, k: int, temperature: float, batch_prompts: int, seed: int) -> np.ndarray:
    """``[n, k]`` accuracy rewards of ``k`` samples per example."""
    torch.manual_seed(seed)
    rows = []
    for start in tqdm(range(0, len(examples), batch_prompts), desc=f"T={temperature}", leave=False):
        chunk = examples[start : start + batch_prompts]
        r = sample_rollout(handle, chunk, k, max_new_tokens=96, temperature=temperature, trace=False)
        acc = accuracy_reward(r.texts, [e.answer for e in r.examples])
        rows.append(np.array(acc, dtype=float).reshape(len(chunk), k))
    return np.concatenate(rows)


def calibration(confidence: np.ndarray, right: np.ndarray) -> list[dict]:
    """Reliability table: per confidence bin, how many look-ups, their mean confidence and accuracy."""
    rows = []
    for lo, hi in zip(CONFIDENCE_BINS[:-1], CONFIDENCE_BINS[1:]):
        sel = (confidence >= lo) & (confidence < hi)
        if sel.any():
            rows.append(
                {
                    "bin": f"[{lo}, {min(hi, 1.0)})",
                    "n": int(sel.sum()),
                    "mean_confidence": float(confidence[sel].mean()),
                    "accuracy": float(right[sel].mean()),
                }
            )
    return rows


def summarise(rewards: np.ndarray, greedy: np.ndarray) -> dict:
    rate = rewards.mean(1)
    wrong = ~greedy
    n_wrong = int(wrong.sum())
    return {
        "sampled_accuracy": float(rate.mean()),
        "pass_at_k": float((rate > 0).mean()),
        "mixed_groups": float(((rate > 0) & (rate < 1)).mean()),
        "greedy_wrong": n_wrong,
        "greedy_wrong_with_a_correct_sample": float((rate[wrong] > 0).mean()) if n_wrong else float("nan"),
        "greedy_wrong_mean_correct_share": float(rate[wrong].mean()) if n_wrong else float("nan"),
        "greedy_wrong_correct_share_at_least_half": float((rate[wrong] >= 0.5).mean())
        if n_wrong
        else float("nan"),
        "greedy_right_mean_correct_share": float(rate[greedy].mean()) if greedy.any() else float("nan"),
    }


def markdown(report: dict) -> str:
    g = report["greedy"]
    lines = [
        "# RL headroom: what outcome-reward RL can learn from this checkpoint",
        "",
        f"Model `{report['model']}` (weights sha256 {report['weights_sha256'][:12]}…), {report['n']} test "
        f"problems, k = {report['k']} samples per problem. Command: `{report['command']}`.",
        "",
        f"Greedy answer accuracy: {g['accuracy']:.3f} [{g['ci'][0]:.3f}, {g['ci'][1]:.3f}] "
        f"({g['wrong']} wrong).",
        "",
        "| temperature | sampled accuracy | pass@k | prompts with mixed rewards | greedy-wrong prompts with a correct sample | their mean correct share | with a correct share >= 0.5 | greedy-right prompts: mean correct share |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t, s in report["sampling"].items():
        lines.append(
            f"| {t} | {s['sampled_accuracy']:.3f} | {s['pass_at_k']:.3f} | {s['mixed_groups']:.3f} | "
            f"{s['greedy_wrong_with_a_correct_sample']:.3f} | {s['greedy_wrong_mean_correct_share']:.3f} | "
            f"{s['greedy_wrong_correct_share_at_least_half']:.3f} | {s['greedy_right_mean_correct_share']:.3f} |"
        )
    d = report["greedy_first_divergence"]
    lines += [
        "",
        "Where greedy chains first leave the gold chain (share of problems): "
        + ", ".join(f"{k} {v:.3f}" for k, v in d.items())
        + ".",
        "",
        "Teacher-forced look-ups on the gold chain (the word read from the image): "
        f"{report['lookups']['n']} look-ups, argmax right for {report['lookups']['accuracy']:.3f}. "
        "Probability given to the right value at the look-ups it gets wrong:",
        "",
        "| p(right value) | share of wrong look-ups |",
        "| --- | ---: |",
    ]
    for label, share in report["lookups"]["wrong_p_right_bins"].items():
        lines.append(f"| {label} | {share:.3f} |")
    lines += [
        "",
        "Calibration of the look-ups (probability of the model's pick against how often the pick is "
        f"right; expected calibration error {report['lookups']['ece']:.3f}):",
        "",
        "| p(pick) | look-ups | mean p(pick) | pick right |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in report["lookups"]["calibration"]:
        lines.append(f"| {row['bin']} | {row['n']} | {row['mean_confidence']:.3f} | {row['accuracy']:.3f} |")
    lines += ["", "## What it shows", "", report["reading"], ""]
    return "\n".join(lines)


def reading(report: dict) -> str:
    lk = report["lookups"]
    confident = lk["wrong_p_right_bins"][f"[{P_BINS[0]}, {P_BINS[1]})"]
    parts = []
    for t, s in report["sampling"].items():
        parts.append(
            f"at T={t}, {s['greedy_wrong_with_a_correct_sample']:.0%} of the prompts greedy gets wrong "
            f"have a correct sample among {report['k']}, and {s['greedy_wrong_correct_share_at_least_half']:.0%} "
            "have a correct share of at least one half"
        )
    return (
        "RL can only raise greedy accuracy on prompts where the right answer is sampled and greedy is "
        "wrong; "
        + "; ".join(parts)
        + f". Of the look-ups the model gets wrong when teacher-forced, {confident:.0%} give the right value "
        "under 5% (confident misreads that sampling almost never corrects); the rest are uncertain reads, "
        "which RL does sample both ways. But the look-ups are calibrated (expected calibration error "
        f"{lk['ece']:.3f}): where the model says 60/40 it is right about 60% of the time, so its errors "
        "sit where its image features leave the answer ambiguous. To fix them a learner must read the "
        "image better, and a sequence-level reward tells it less about that than the per-look-up "
        "labels the checkpoint was trained on. Expect little or no gain from RL on such a checkpoint; "
        "a checkpoint whose errors are confident and systematic, or in composition rather than "
        "perception, leaves RL more to do."
    )


@dataclass
class Headroom:
    """The diagnostic's options (`analyses/rl_headroom.py`'s, with its defaults)."""

    model: str = "builtin"
    n: int = 300
    k: int = 8
    temperatures: list[float] = field(default_factory=lambda: [1.0, 0.6])
    batch_prompts: int = 16
    seed: int = 0
    out: str = "figures/rl_headroom"  # the write-up, without suffix


def headroom(args) -> str:
    """Measure, write `rl_headroom.{md,json}` and return the Markdown."""
    handle = load(args.model)
    problems = make_split("test", args.n)
    examples = [example_from_problem(p) for p in problems]
    res = evaluate(handle, examples, batch_size=64, progress=True)
    greedy = np.array([r["correct"] for r in res.records])
    roles = [first_divergence(r["completion"], p) for r, p in zip(res.records, problems)]
    report = {
        "model": args.model,
        "weights_sha256": weights_sha256(args.model) or "",
        "n": args.n,
        "k": args.k,
        "command": "python analyses/rl_headroom.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k in ("model", "n", "k", "temperatures")
        ),
        "greedy": {
            "accuracy": res.accuracy,
            "ci": list(wilson_interval(int(greedy.sum()), len(greedy))),
            "wrong": int((~greedy).sum()),
        },
        "greedy_first_divergence": {
            name: sum(r == key for r in roles) / len(roles)
            for name, key in (
                ("follows the gold chain", None),
                ("look-up (visual)", "visual"),
                ("text step", "text"),
            )
        },
        "sampling": {},
    }
    for t in args.temperatures:
        report["sampling"][str(t)] = summarise(
            sampled(handle, examples, args.k, t, args.batch_prompts, args.seed), greedy
        )
    conf = lookup_confidence(handle, problems)
    wrong_p = conf[conf[:, 0] == 0, 1]
    bins = np.histogram(wrong_p, bins=P_BINS)[0] / max(len(wrong_p), 1)
    report["lookups"] = {
        "n": len(conf),
        "accuracy": float(conf[:, 0].mean()),
        "wrong_p_right_bins": {
            f"[{lo}, {min(hi, 1.0)})": float(b) for lo, hi, b in zip(P_BINS[:-1], P_BINS[1:], bins)
        },
        "wrong_mean_p_right": float(wrong_p.mean()) if len(wrong_p) else float("nan"),
        "calibration": calibration(conf[:, 2], conf[:, 0]),
    }
    report["lookups"]["ece"] = sum(
        row["n"] * abs(row["mean_confidence"] - row["accuracy"]) for row in report["lookups"]["calibration"]
    ) / max(len(conf), 1)
    report["reading"] = reading(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    return markdown(report)
