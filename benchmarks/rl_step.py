"""Wall time of one RL training step with DyCo (token, sequence) against the baseline (off), and with
roles from the counterfactual labeller instead of the traced dynamics (``token+visual_dependency``).

Every variant runs ``dyco_probe.rl.train`` on a fresh copy of the same model with the same seed and
data, for ``--steps`` steps (the first is a warm-up and not counted), without evaluation; the
variants are interleaved, ``--repeats`` times, in a rotating order. From the per-step timings the loop
logs (``time_generate``, ``time_score``, ``time_update``, ``time_step``) it reports medians, the
median step time relative to ``off``, and how a step splits into

- generation (``off``: plain ``generate``, nothing traced),
- tracing (the extra ``generate`` time of a traced variant over ``off``: online tracing runs inside
  ``generate``),
- roles (``token+visual_dependency`` only: the labeller's teacher-forced forward of the batch with its
  real and its counterfactual images, ``RLConfig.roles``),
- scoring (trace to advantages: ``score_tokens`` and the reweighting; for ``off`` just the group
  advantages),
- update (teacher-forced log-probabilities of policy and reference, loss, backward, AdamW).

``off`` skips tracing altogether, so the ratio is the whole cost of DyCo. Completion lengths can drift
apart between variants as their policies diverge, so time per generated token is reported too.

    python -m benchmarks.rl_step                       # built-in model if shipped, else an untrained one
    python -m benchmarks.rl_step --model untrained --repeats 5 --steps 4 --no-append
    python -m benchmarks.rl_step --variants off token token+visual_dependency --note "shared machine"
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from dyco_probe.labellers import DEPENDENCY_DEFAULTS
from dyco_probe.rl import RLConfig, train

RESULTS = Path(__file__).with_name("RESULTS.md")
# name -> RLConfig fields
VARIANTS = {
    "off": {"dyco": "off"},
    "token": {"dyco": "token"},
    "sequence": {"dyco": "sequence"},
    "token+visual_dependency": {"dyco": "token", "roles": "visual_dependency"},
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_handle(name: str):
    """``(handle, description)``: the built-in model, a local checkpoint, or an untrained built-in."""
    from dyco_probe.models.builtin import BUILTIN_DIR

    if name == "auto":
        name = "builtin" if (BUILTIN_DIR / "config.json").exists() else "untrained"
    if name == "untrained":
        from dyco_probe.models.adapters import QWEN2_5_VL
        from dyco_probe.models.builtin import build_untrained
        from dyco_probe.models.loading import ModelHandle

        model, processor = build_untrained(seed=0)
        model.eval()
        return ModelHandle(model, processor, QWEN2_5_VL, "untrained"), "untrained built-in architecture"
    from dyco_probe.models.loading import load

    return load(name), name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="auto", help="auto, builtin, untrained or a checkpoint path")
    parser.add_argument("--label", help="how to describe the model in the report (default: its name)")
    parser.add_argument("--algo", default="grpo")
    parser.add_argument("--steps", type=int, default=4, help="steps per run; the first is not counted")
    parser.add_argument("--repeats", type=int, default=5, help="runs per variant, interleaved")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="`off` is always run"
    )
    parser.add_argument("--note", default="", help="a line about the machine for the report (e.g. shared)")
    parser.add_argument("--no-append", action="store_true", help="print only, do not touch RESULTS.md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    handle, description = make_handle(args.model)
    description = args.label or description
    initial = copy.deepcopy(handle.model.state_dict())
    from dyco_probe.data import synthetic_examples

    train_examples = synthetic_examples("train", 200)
    variants = ["off"] + [v for v in dict.fromkeys(args.variants) if v != "off"]
    steps: dict[str, list[dict]] = {v: [] for v in variants}
    per_repeat: dict[str, list[float]] = {v: [] for v in variants}  # median step time of each run
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            k = r % len(variants)
            order = variants[k:] + variants[:k]
            for variant in order:
                handle.model.load_state_dict(initial)
                config = RLConfig(
                    out_dir=f"{tmp}/{variant}-{r}",
                    algo=args.algo,
                    **VARIANTS[variant],
                    steps=args.steps,
                    prompts_per_step=args.prompts_per_step,
                    num_generations=args.num_generations,
                    max_new_tokens=args.max_new_tokens,
                    n_eval=0,
                    checkpoint_every=0,
                    seed=0,
                )
                train(config, handle, train_examples=train_examples, progress=False)
                rows = [json.loads(x) for x in Path(config.out_dir, "metrics.jsonl").read_text().splitlines()]
                timed = [x for x in rows if x["kind"] == "train" and x["step"] > 1]
                steps[variant] += timed
                per_repeat[variant].append(statistics.median(x["time_step"] for x in timed))
                print(
                    f"repeat {r + 1}/{args.repeats} {variant}: {rows[-1]['time_step']:.2f} s/step", flush=True
                )

    def med(variant: str, key: str) -> float:
        return statistics.median(x[key] for x in steps[variant])

    def per_token(variant: str) -> float:
        n = args.prompts_per_step * args.num_generations
        return statistics.median(x["time_step"] / (x["completion_length"] * n) for x in steps[variant])

    def ratio(variant: str, base: str = "off") -> float:
        """Median over repeats of the run's step time over the ``base`` run of the same repeat."""
        return statistics.median(a / b for a, b in zip(per_repeat[variant], per_repeat[base]))

    base_gen = med("off", "time_generate")
    table = []
    for v in variants:
        vs_token = f"{ratio(v, 'token'):.3f}" if "token" in variants else "–"
        table.append(
            f"| {v} | {med(v, 'time_step'):.3f} | {ratio(v):.3f} | {vs_token} | "
            f"{base_gen:.3f} | {med(v, 'time_generate') - base_gen:+.3f} | {med(v, 'time_roles'):.3f} | "
            f"{med(v, 'time_score') * 1e3:.1f} | "
            f"{med(v, 'time_update'):.3f} | {med(v, 'completion_length'):.1f} | {1e3 * per_token(v):.2f} | "
            f"{per_token(v) / per_token('off'):.3f} |"
        )
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    n_steps = len(steps["off"])
    text = "\n".join(
        [
            f"## rl_step: {datetime.date.today().isoformat()}",
            "",
            f"- machine: {platform.machine()}, {os.cpu_count()} cores, {cpu_model()}; torch {torch.__version__}, "
            f"intra-op threads {torch.get_num_threads()}; load average (1, 5, 15 min) {load}"
            + (f"; {args.note}" if args.note else ""),
            f"- model: {description}; {args.algo}, {args.prompts_per_step} prompts x {args.num_generations} "
            f"completions, max {args.max_new_tokens} new tokens, KL to a reference model (beta 0.04)",
            f"- {args.repeats} interleaved runs per variant x {args.steps - 1} timed steps = {n_steps} steps each; "
            "medians; step vs off: median over repeats of each run's median step time over the `off` run of "
            "the same repeat (likewise vs token). `off` does not trace at all, so the ratio is the full cost of "
            "DyCo. `token+visual_dependency`: roles from the counterfactual labeller at its defaults "
            f"({', '.join(f'{k} {v}' for k, v in DEPENDENCY_DEFAULTS.items() if k != 'mask_fraction')}).",
            "",
            "| dyco | step s | step vs off | step vs token | generation s | tracing s | roles s | scoring ms | "
            "update s | completion tokens | ms / token | per token vs off |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *table,
            "",
            "generation: plain `generate` (the `off` median); tracing: the traced variant's extra `generate` "
            "time over it; roles: the counterfactual labeller's forward; scoring: trace to advantages.",
            "",
        ]
    )
    print(text)
    if not args.no_append:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
