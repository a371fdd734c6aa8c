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
    """``[n_lookups, 4]``: (argmax is right, probability of the right value, probability of the
    argmax, the look-up is of the object a note names), teacher-forced on the gold chains (every
    look-up read from the image)."""
    from dyco_probe.task.problems import LOOKUP_READ

    out = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        batch = language_batch(handle, chunk, 1.0)
        inputs, lookups = batch.inputs, batch.lookups
        noted = [bool(w.note) for p in chunk for w in p.chain if w.lookup == LOOKUP_READ]
        if len(noted) != len(lookups):
            raise RuntimeError(f"{len(lookups)} look-up queries but {len(noted)} read look-ups in the chains")
        logits = handle.model(**inputs).logits.float()
        ids = inputs["input_ids"]
        for (i, q, _), flag in zip(lookups, noted):
            p = torch.softmax(logits[i, q], -1)
            target = ids[i, q + 1]
            out.append((float(p.argmax() == target), float(p[target]), float(p.max()), float(flag)))
    return np.array(out)


def lookup_summary(conf: np.ndarray) -> dict:
    """Accuracy, where the wrong look-ups put the right value, and calibration of ``conf``'s rows."""
    wrong_p = conf[conf[:, 0] == 0, 1]
    bins = np.histogram(wrong_p, bins=P_BINS)[0] / max(len(wrong_p), 1)
    calib = calibration(conf[:, 2], conf[:, 0])
    return {
        "n": len(conf),
        "accuracy": float(conf[:, 0].mean()) if len(conf) else float("nan"),
        "wrong_p_right_bins": {
            f"[{lo}, {min(hi, 1.0)})": float(b) for lo, hi, b in zip(P_BINS[:-1], P_BINS[1:], bins)
        },
        "wrong_mean_p_right": float(wrong_p.mean()) if len(wrong_p) else float("nan"),
        "calibration": calib,
        "ece": sum(row["n"] * abs(row["mean_confidence"] - row["accuracy"]) for row in calib)
        / max(len(conf), 1),
    }


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
        "Teacher-forced look-ups on the gold chain (the value read from the image), split by whether "
        "a note names the looked-up object. There the model's pick may be `note` (citing the note instead "
        "of reading): a wrong reading here, and a wrong answer when the note is false.",
        "",
        "| look-ups | n | argmax right | mean p(right value) when wrong | expected calibration error |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, lk in _lookup_groups(report):
        lines.append(
            f"| {name} | {lk['n']} | {lk['accuracy']:.3f} | {lk['wrong_mean_p_right']:.3f} | {lk['ece']:.3f} |"
        )
    for name, lk in _lookup_groups(report):
        lines += [
            "",
            f"{name.capitalize()} look-ups: probability given to the right value where the argmax is wrong, "
            "and calibration (probability of the model's pick against how often the pick is right):",
            "",
            "| p(right value) | share of wrong look-ups |",
            "| --- | ---: |",
        ]
        for label, share in lk["wrong_p_right_bins"].items():
            lines.append(f"| {label} | {share:.3f} |")
        lines += ["", "| p(pick) | look-ups | mean p(pick) | pick right |", "| --- | ---: | ---: | ---: |"]
        for row in lk["calibration"]:
            lines.append(
                f"| {row['bin']} | {row['n']} | {row['mean_confidence']:.3f} | {row['accuracy']:.3f} |"
            )
    lines += ["", "## What it shows", "", report["reading"], ""]
    return "\n".join(lines)


def _lookup_groups(report: dict) -> list[tuple[str, dict]]:
    groups = report["lookup_groups"]
    return [(name, groups[name]) for name in ("un-noted", "noted") if groups.get(name, {}).get("n")]


CALIBRATED_ECE = 0.05  # below this, a group of look-ups counts as calibrated in the reading


def reading(report: dict) -> str:
    """What the numbers say about RL's room, in words chosen by the numbers."""
    parts = []
    for t, s in report["sampling"].items():
        parts.append(
            f"at T={t}, {s['greedy_wrong_with_a_correct_sample']:.0%} of the prompts greedy gets wrong "
            f"have a correct sample among {report['k']}, and {s['greedy_wrong_correct_share_at_least_half']:.0%} "
            "have a correct share of at least one half"
        )
    text = (
        "RL can only raise greedy accuracy on prompts where the right answer is sampled and greedy is "
        "wrong; " + "; ".join(parts) + "."
    )
    for name, lk in _lookup_groups(report):
        wrong = 1 - lk["accuracy"]
        confident = lk["wrong_p_right_bins"][f"[{P_BINS[0]}, {P_BINS[1]})"]
        if lk["ece"] < CALIBRATED_ECE:
            text += (
                f" At {name} look-ups the argmax is wrong {wrong:.0%} of the time and the model is "
                f"calibrated (expected calibration error {lk['ece']:.3f}): where it says 60/40 it is right "
                "about 60% of the time, so these errors sit where its image features leave the reading "
                f"ambiguous ({confident:.0%} of them give the right value under 5%). A sequence-level reward "
                "says less about reading better than the per-look-up labels the checkpoint was trained on: "
                "expect little gain from RL on them."
            )
        else:
            text += (
                f" At {name} look-ups the argmax is wrong {wrong:.0%} of the time and the model is not "
                f"calibrated (expected calibration error {lk['ece']:.3f}): it is systematically wrong where "
                f"it is fairly sure, while giving the right value {lk['wrong_mean_p_right']:.0%} on average "
                "where it is wrong. Errors that are systematic but sampled both ways are what a "
                "verifiable reward can fix from the model's own samples: expect RL to gain here."
            )
    return text


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
    report["lookups"] = lookup_summary(conf)
    report["lookup_groups"] = {
        "un-noted": lookup_summary(conf[conf[:, 3] == 0]),
        "noted": lookup_summary(conf[conf[:, 3] == 1]),
    }
    report["reading"] = reading(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    return markdown(report)
