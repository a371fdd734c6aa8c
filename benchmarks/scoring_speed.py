"""How much does the DyCo scorer cost per training batch?

Times ``score_tokens`` and ``reweight_advantages`` (token and sequence granularity) on random trace
tensors for a batch of completions (default 256 × 512 tokens, 32 prompts × 8 generations) on CPU, and,
side by side in the same run, a reference operation every RL step pays anyway: the log-softmax of one
512-token completion over a 32k-entry vocabulary slice. Reports the median of repeated calls after
warm-up, prints the figures and appends a dated section to ``benchmarks/RESULTS.md``.

    python -m benchmarks.scoring_speed [--batch 256] [--length 512] [--repeats 20] [--threads 1] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from dyco_probe.scoring import ScorerConfig, group_advantages, reweight_advantages, score_tokens

RESULTS = Path(__file__).with_name("RESULTS.md")
VOCAB_SLICE = 32_000


def time_ms(fn, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Median and minimum wall time of ``fn`` in ms, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a loaded machine extra threads make small ops erratic)",
    )
    parser.add_argument("--no-append", action="store_true", help="print only, do not touch RESULTS.md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    b, t = args.batch, args.length
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen)
    mask = torch.arange(t) < lengths[:, None]
    r_vis, r_txt = torch.rand(b, t, generator=gen), torch.rand(b, t, generator=gen)
    v_vis, v_txt = torch.rand(b, t, generator=gen), torch.rand(b, t, generator=gen)
    group_ids = torch.arange(b) // args.group_size
    rewards = torch.randint(0, 2, (b,), generator=gen).float()
    advantages = group_advantages(rewards, group_ids)
    config = ScorerConfig(min_length=60)
    scored = score_tokens(r_vis, r_txt, v_vis, v_txt, mask, config, group_ids=group_ids)
    logits = torch.randn(t, VOCAB_SLICE, generator=gen)

    def reweight(granularity):
        return lambda: reweight_advantages(
            advantages,
            scored["s"],
            scored["roles"],
            mask,
            granularity=granularity,
            group_ids=group_ids,
            min_length=config.min_length,
        )

    with torch.no_grad():
        timings = {
            "score_tokens": time_ms(
                lambda: score_tokens(r_vis, r_txt, v_vis, v_txt, mask, config, group_ids=group_ids),
                args.repeats,
            ),
            "reweight_advantages token": time_ms(reweight("token"), args.repeats),
            "reweight_advantages sequence": time_ms(reweight("sequence"), args.repeats),
        }
        reference = time_ms(lambda: torch.log_softmax(logits, dim=-1), args.repeats)

    total = tuple(a + b for a, b in zip(timings["score_tokens"], timings["reweight_advantages token"]))
    reference_name = f"log_softmax of 1 completion ({t} x {VOCAB_SLICE} vocab slice)"
    rows = list(timings.items())
    rows.append(("score_tokens + reweight (token), per batch", total))
    rows.append((f"reference: {reference_name}", reference))

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}"
    lines = [
        f"## scoring_speed: {datetime.date.today().isoformat()}",
        "",
        f"- machine: {machine}; torch {torch.__version__}, intra-op threads: {torch.get_num_threads()}",
        f"- batch: {b} completions x {t} tokens ({int(mask.sum())} unmasked), groups of {args.group_size}; "
        f"{args.repeats} timed calls after 3 warm-up calls; load average (1, 5, 15 min) {load}",
        "",
        "| operation | median ms | min ms |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {med:.3f} | {low:.3f} |" for name, (med, low) in rows),
        "",
        f"Scoring and reweighting the whole batch costs {total[0] / reference[0]:.2f}x (medians) the log-softmax of a single "
        f"completion over a {VOCAB_SLICE // 1000}k-entry vocabulary slice; a training step computes that "
        f"log-softmax for all {b} completions over the full vocabulary.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmark results\n")
        with RESULTS.open("a") as f:
            f.write("\n" + text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
