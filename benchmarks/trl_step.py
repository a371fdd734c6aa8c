"""Wall time of a TRL ``GRPOTrainer`` step against ``DyCoGRPOTrainer`` (token, sequence), and how it splits.

Every variant trains a fresh model loaded from the same checkpoint with the same seed and data for
``--steps`` optimiser steps (the first ``--warmup`` are not counted), on the synthetic task with the
accuracy and format rewards and a KL term (``beta``, so TRL runs a reference forward). The variants
run interleaved, ``--repeats`` times, in a rotating order; reported are medians, and the step ratio
to plain TRL as the median over repeats of each run's mean step time over the TRL run of the same
repeat, in wall time and in this process's CPU time (``time.process_time``, all threads), which other
jobs on a shared machine inflate far less. The DyCo share is the timed DyCo parts (tracing and
scoring) over the variant's own step: a figure that contention between runs does not move.

Variants: ``trl`` (``GRPOTrainer``), ``token`` / ``sequence`` (``DyCoGRPOTrainer``, attention rows
captured in a forward TRL runs anyway) and ``token-extra`` / ``sequence-extra``
(``capture="extra_forward"``: one extra teacher-forced forward per batch, the fallback).

Settings (``--setting``):

- ``default``: TRL's defaults with transformers generation (no old-log-probability pass): DyCo reads
  the rows in the loss forward;
- ``old_logps``: ``steps_per_generation=2``, so TRL computes old log-probabilities in a
  no-gradient pass of the policy over the generation batch, which is the forward structure of vLLM
  generation with importance-sampling correction (TRL's default there); DyCo reads the rows in that
  pass. Generation is still transformers' (no vLLM on a CPU).

A step splits into (exclusive wall times, summed over the step):
generation (``_generate``), rewards, TRL log-probs (old/reference passes, DyCo's capture excluded),
loss forward (DyCo's capture and scoring excluded), DyCo tracing (the extra forward, or the captured
rows: their ``q·Kᵀ`` and the signals), DyCo scoring (trace to advantages, metrics), and the rest
(backward, optimiser, TRL's bookkeeping).

    python -m benchmarks.trl_step                                   # built-in model, default setting
    python -m benchmarks.trl_step --model random-45m --setting old_logps
    python -m benchmarks.trl_step --repeats 3 --steps 4 --no-append
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
VARIANTS = ("trl", "token", "sequence", "token-extra", "sequence-extra")
PARTS = ("generation", "rewards", "trl_logps", "loss_forward", "dyco_trace", "dyco_score")
# ~45M parameters: the built-in architecture (and tokenizer) at 13 layers of width 512.
RANDOM_45M = dict(hidden_size=512, intermediate_size=1792, num_layers=13, num_heads=8, num_kv_heads=2)


class _Clock:
    """Exclusive wall time per part: a nested timed block's time is its own, not its parent's."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._stack: list[list] = []

    @contextlib.contextmanager
    def part(self, name: str):
        self._stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            name, start, children = self._stack.pop()
            elapsed = time.perf_counter() - start
            self.totals[name] = self.totals.get(name, 0.0) + elapsed - children
            if self._stack:
                self._stack[-1][2] += elapsed

    def take(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


CLOCK = _Clock()


def _timed(cls):
    """``cls`` with its step's parts timed on ``CLOCK``."""

    class Timed(cls):
        _in_loss = False

        def _generate(self, *args, **kwargs):
            with CLOCK.part("generation"):
                return super()._generate(*args, **kwargs)

        def _calculate_rewards(self, *args, **kwargs):
            with CLOCK.part("rewards"):
                return super()._calculate_rewards(*args, **kwargs)

        def _compute_loss(self, model, inputs):
            self._in_loss = True
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self._in_loss = False

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            with CLOCK.part("loss_forward" if self._in_loss else "trl_logps"):
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)

        def _trace(self, batch):
            with CLOCK.part("dyco_trace"):
                return super()._trace(batch)

        def _apply_dyco(self, batch, trace, extra_forward):
            with CLOCK.part("dyco_score"):
                return super()._apply_dyco(batch, trace, extra_forward)

    Timed.__name__ = cls.__name__
    return Timed


@contextlib.contextmanager
def _capture_timed():
    """Time the captured rows (their ``q·Kᵀ`` in the shared attention function) and the signals
    the ride-along tracer computes from them, as DyCo tracing."""
    from dyco_probe.tracing import attention, tracer

    saved = attention._probs_in_chunks, tracer.OfflineTracer._on_rows, tracer.OfflineTracer.trace
    saved_init = tracer.OfflineTracer.__init__

    def wrap(fn):
        def timed(*args, **kwargs):
            with CLOCK.part("dyco_trace"):
                return fn(*args, **kwargs)

        return timed

    attention._probs_in_chunks = wrap(saved[0])
    tracer.OfflineTracer._on_rows = wrap(saved[1])
    tracer.OfflineTracer.trace = wrap(saved[2])
    tracer.OfflineTracer.__init__ = wrap(saved_init)
    try:
        yield
    finally:
        attention._probs_in_chunks = saved[0]
        tracer.OfflineTracer._on_rows, tracer.OfflineTracer.trace = saved[1], saved[2]
        tracer.OfflineTracer.__init__ = saved_init


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def make_checkpoint(name: str, tmp: str) -> tuple[str, str]:
    """``(path, description)`` of a saved checkpoint TRL can load (it builds the reference from it)."""
    from dyco_probe.models.builtin import BUILTIN_DIR, BuiltinArchitecture, build_untrained

    if name == "builtin":
        return str(BUILTIN_DIR), "builtin (the shipped built-in model)"
    if name == "random-45m":
        model, processor = build_untrained(BuiltinArchitecture(**RANDOM_45M), seed=0)
        path = Path(tmp) / "random-45m"
        model.save_pretrained(path)
        processor.save_pretrained(path)
        n = sum(p.numel() for p in model.parameters()) / 1e6
        return str(path), f"random-45m (the built-in architecture at 13 x 512, random weights, {n:.1f}M)"
    return name, name


def make_trainer(variant: str, path: str, args, out: str, max_steps: int):
    """The TRL (``trl``) or DyCo trainer of ``variant`` (``token``, ``sequence``, ``*-extra``), timed."""
    from trl import GRPOConfig, GRPOTrainer

    from dyco_probe.integrations.trl import (
        DyCoGRPOTrainer,
        _load_processor,
        as_trl_reward,
        synthetic_dataset,
    )
    from dyco_probe.rewards import accuracy_reward, format_reward
    from dyco_probe.scoring import ScorerConfig

    processor, _ = _load_processor(path)
    processor.tokenizer.padding_side = "left"
    per_step = args.prompts_per_step * args.num_generations
    settings = dict(
        output_dir=out,
        num_generations=args.num_generations,
        per_device_train_batch_size=per_step,
        max_completion_length=args.max_new_tokens,
        max_steps=max_steps,
        learning_rate=1e-5,
        beta=0.04,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    if args.setting == "old_logps":
        settings["steps_per_generation"] = 2
    kwargs = dict(
        model=path,
        processing_class=processor,
        reward_funcs=[as_trl_reward(accuracy_reward), as_trl_reward(format_reward)],
        args=GRPOConfig(**settings),
        train_dataset=synthetic_dataset("train", max_steps * per_step * 2),
    )
    if variant == "trl":
        return _timed(GRPOTrainer)(**kwargs)
    granularity, _, extra = variant.partition("-")
    return _timed(DyCoGRPOTrainer)(
        **kwargs,
        dyco=ScorerConfig(granularity=granularity),
        capture="extra_forward" if extra else "auto",
    )


def run_variant(variant: str, path: str, args, out: str):
    """Train one variant; ``(step seconds, step CPU seconds, per-step parts, completion lengths)`` of
    the timed steps."""
    from transformers import TrainerCallback

    trainer = make_trainer(variant, path, args, out, args.steps)
    steps: list[float] = []
    cpu: list[float] = []
    parts: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            CLOCK.take()
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            steps.append(time.perf_counter() - self.start)
            cpu.append(time.process_time() - self.start_cpu)
            parts.append(CLOCK.take())

    trainer.add_callback(Clock())
    with _capture_timed():
        trainer.train()
    lengths = [
        r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r
    ]
    plans = {r.get("dyco/extra_forward") for r in trainer.state.log_history if "dyco/extra_forward" in r}
    if variant != "trl":
        assert plans == ({1.0} if "extra" in variant else {0.0}), (variant, plans)
    w = args.warmup
    return steps[w:], cpu[w:], parts[w:], lengths[w:] or lengths


def same_batch(path: str, args, out: str, granularity: str) -> dict:
    """The DyCo pieces timed on one generated batch, interleaved ``--micro`` times: what TRL runs
    anyway (``plain``: the loss forward and backward, or the old-log-prob pass), the same with
    DyCo's rows read in it and scored (``captured``), and the same plus DyCo's extra forward and
    scoring (``extra``). Median seconds of each."""
    from trl import GRPOTrainer

    from dyco_probe.integrations.trl import _Slot

    trainer = make_trainer(granularity, path, args, out, max_steps=1)
    kept = {}
    generate = trainer._generate_and_score_completions

    def keep(inputs):
        batch = generate(inputs)
        kept.update({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        return batch

    trainer._generate_and_score_completions = keep
    trainer.train()
    model = trainer.model_wrapped
    model.train()
    b = kept["completion_ids"].shape[0]
    sequence_advantages = kept["advantages"] if kept["advantages"].dim() == 1 else kept["advantages"][:, 0]

    def batch(dyco: bool) -> dict:
        out = {k: v for k, v in kept.items() if dyco or k != "dyco_group_ids"}
        return {**out, "advantages": sequence_advantages.clone()}

    if args.setting == "default":  # the loss forward and backward

        def plain():
            GRPOTrainer._compute_loss(trainer, model, batch(False)).backward()

        def captured():
            trainer._compute_loss(model, batch(True)).backward()

        def extra():
            inputs = batch(True)
            trainer._apply_dyco(inputs, trainer._trace(inputs), extra_forward=True)
            trainer._compute_loss(model, inputs).backward()

    else:  # TRL's old-log-prob pass over the generation batch
        ids = torch.cat([kept["prompt_ids"], kept["completion_ids"]], dim=1)
        mask = torch.cat([kept["prompt_mask"], kept["completion_mask"]], dim=1)
        forward = {k: kept[k] for k in ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids")}
        chunk = args.prompts_per_step * args.num_generations
        t = kept["completion_ids"].shape[1]

        def logps():
            with torch.no_grad():
                trainer._get_per_token_logps_and_entropies(model, ids, mask, t, batch_size=chunk, **forward)

        def plain():
            logps()

        def captured():
            slot = trainer._dyco_slot = _Slot()
            logps()
            trainer._apply_dyco(batch(True), slot.trace, extra_forward=False)

        def extra():
            logps()
            inputs = batch(True)
            trainer._apply_dyco(inputs, trainer._trace(inputs), extra_forward=True)

    runs = {"plain": plain, "captured": captured, "extra": extra}
    seconds = {k: [] for k in runs}
    with _capture_timed():
        for fn in runs.values():  # warm-up
            fn()
            model.zero_grad(set_to_none=True)
        for _ in range(args.micro):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
    CLOCK.take()
    paired = {  # interleaved: each repeat's difference, then the median
        f"{k}-plain": statistics.median(x - y for x, y in zip(seconds[k], seconds["plain"]))
        for k in ("captured", "extra")
    }
    return {"batch": b, **{k: statistics.median(v) for k, v in seconds.items()}, **paired, "raw": seconds}


def _micro_lines(args, micro: dict, trl_step: float) -> list[str]:
    if not micro:
        return []
    per_generation = 2 if args.setting == "old_logps" else 1
    what = {
        "default": "the loss forward and backward",
        "old_logps": "TRL's old-log-prob pass over the generation batch",
    }[args.setting]
    lines = [
        f"Same batch, interleaved ({args.micro} times, medians): {what} as TRL runs it (plain), with DyCo's "
        "rows read in it and scored (captured), and plain plus DyCo's extra forward and scoring (extra). "
        "Differences: the median of each repeat's difference (paired); the step estimate adds it, per "
        f"optimiser step (the pass runs once per {per_generation} steps), to the median TRL step above.",
        "",
        "| dyco | batch | plain s | captured s | extra s | captured - plain, s per step | extra - plain, s per step | "
        "step estimate captured | step estimate extra |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for g, m in micro.items():
        dc, de = m["captured-plain"] / per_generation, m["extra-plain"] / per_generation
        lines.append(
            f"| {g} | {m['batch']} | {m['plain']:.3f} | {m['captured']:.3f} | {m['extra']:.3f} | {dc:+.3f} | "
            f"{de:+.3f} | {1 + dc / trl_step:.3f} | {1 + de / trl_step:.3f} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin", help="builtin, random-45m or a checkpoint path")
    parser.add_argument("--setting", default="default", choices=("default", "old_logps"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=5, help="optimiser steps per run")
    parser.add_argument(
        "--warmup", type=int, default=None, help="steps not counted (default 1; 2 for old_logps)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, interleaved")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--micro", type=int, default=15, help="same-batch repeats of the DyCo pieces (0: skip)"
    )
    parser.add_argument("--no-append", action="store_true", help="print only, do not touch RESULTS.md")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = 2 if args.setting == "old_logps" else 1
    variants = tuple(args.variants.split(","))
    torch.set_num_threads(args.threads)
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())

    times = {v: [] for v in variants}  # mean step time of each run
    cpu_times = {v: [] for v in variants}
    parts = {v: [] for v in variants}  # every timed step's parts
    lengths = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        path, description = make_checkpoint(args.model, tmp)
        for r in range(args.repeats):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                steps, cpu, step_parts, lens = run_variant(v, path, args, f"{tmp}/{v}-{r}")
                times[v].append(statistics.fmean(steps))
                cpu_times[v].append(statistics.fmean(cpu))
                parts[v] += step_parts
                lengths[v] += lens
                print(f"repeat {r + 1}/{args.repeats} {v}: {times[v][-1]:.3f} s/step", flush=True)
        micro = {}
        if args.micro:
            for granularity in [v for v in ("token", "sequence") if v in variants]:
                micro[granularity] = same_batch(path, args, f"{tmp}/micro-{granularity}", granularity)
                print(f"same batch {granularity}: {micro[granularity]}", flush=True)

    base = variants[0]

    def ratio(v: str, runs: dict) -> float:
        return statistics.median(a / b for a, b in zip(runs[v], runs[base]))

    def part(v: str, name: str) -> float:
        return statistics.fmean(p.get(name, 0.0) for p in parts[v])

    rows = []
    for v in variants:
        step = statistics.median(times[v])
        split = [part(v, name) for name in PARTS]
        mean_step = statistics.fmean(times[v])
        rest = mean_step - sum(split)
        cells = " | ".join(f"{x:.3f}" for x in (*split, rest))
        share = (part(v, "dyco_trace") + part(v, "dyco_score")) / mean_step
        rows.append(
            f"| {v} | {step:.3f} | {ratio(v, times):.3f} | {ratio(v, cpu_times):.3f} | {100 * share:.1f}% | "
            f"{cells} | {statistics.fmean(lengths[v]):.1f} |"
        )
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    n_steps = args.steps - args.warmup
    setting = {
        "default": "TRL defaults, transformers generation, no old-log-prob pass: DyCo reads the loss forward",
        "old_logps": "steps_per_generation=2: TRL runs an old-log-prob pass (as with vLLM's IS correction); "
        "DyCo reads it",
    }[args.setting]
    text = "\n".join(
        [
            f"## trl_step ({args.setting}): {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
            "",
            f"- machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} cores, {cpu_model()}); "
            f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, float32; shared with "
            f"other jobs, load average (1, 5, 15 min) {load_start} at start, {load_end} at end. No GPU.",
            f"- model: {description}; {args.prompts_per_step} prompts x {args.num_generations} completions "
            f"per step, max {args.max_new_tokens} new tokens, sampling at temperature 1, beta 0.04 (reference "
            f"forward), loss dapo (TRL's default); setting: {setting}",
            f"- {args.repeats} interleaved runs per variant x {n_steps} timed steps (after {args.warmup} "
            f"warm-up); step s: median over runs of the run's mean step; vs trl: median over repeats of the "
            f"ratio to the TRL run of the same repeat (wall; CPU: process CPU time); DyCo share: DyCo "
            f"tracing + scoring over the variant's step; parts: mean wall seconds per step.",
            "",
            "| variant | step s | vs trl (wall) | vs trl (CPU) | DyCo share | generation | rewards | TRL log-probs "
            "| loss forward | DyCo tracing | DyCo scoring | backward, optimiser, rest | completion tokens |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            *_micro_lines(args, micro, statistics.median(times[base])),
            "raw mean step seconds per run (wall / CPU): "
            + "; ".join(
                f"{v} {[round(x, 3) for x in times[v]]} / {[round(x, 3) for x in cpu_times[v]]}"
                for v in variants
            ),
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
