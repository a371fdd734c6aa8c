"""Answer accuracy of a model on a set of examples, under normal, blank or swapped images."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from dyco_probe.generation import Generation, generate
from dyco_probe.rewards import accuracy_reward, extract_answer, format_reward


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class EvalResult:
    """Accuracy with its 95% interval, the format rate, throughput and per-example records."""

    accuracy: float
    accuracy_ci: tuple[float, float]
    format_rate: float
    n: int
    image_mode: str
    seconds: float
    samples_per_second: float
    records: list[dict] = field(default_factory=list)
    generations: list[Generation] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {
            "accuracy": round(self.accuracy, 4),
            "accuracy_ci95": [round(x, 4) for x in self.accuracy_ci],
            "format_rate": round(self.format_rate, 4),
            "n": self.n,
            "image_mode": self.image_mode,
            "seconds": round(self.seconds, 2),
            "samples_per_second": round(self.samples_per_second, 2),
        }


def evaluate(
    handle,
    examples: Sequence,
    *,
    image_mode: str = "normal",
    max_new_tokens: int = 96,
    batch_size: int = 32,
    progress: bool = True,
) -> EvalResult:
    """Greedy-decode every example and score it with :func:`~dyco_probe.rewards.accuracy_reward`."""
    if not examples:
        raise ValueError("evaluate needs at least one example")
    t0 = time.perf_counter()
    gens = generate(
        handle,
        examples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        image_mode=image_mode,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    completions = [g.completion for g in gens]
    answers = [ex.answer for ex in examples]
    acc = accuracy_reward(completions, answers)
    fmt = format_reward(completions, answers)
    records = [
        {
            "id": ex.id,
            "answer": ex.answer,
            "prediction": extract_answer(g.completion),
            "correct": bool(a),
            "format": bool(f),
            "completion": g.completion,
        }
        for ex, g, a, f in zip(examples, gens, acc, fmt)
    ]
    k = int(sum(acc))
    return EvalResult(
        accuracy=k / len(acc),
        accuracy_ci=wilson_interval(k, len(acc)),
        format_rate=sum(fmt) / len(fmt),
        n=len(acc),
        image_mode=image_mode,
        seconds=seconds,
        samples_per_second=len(acc) / seconds if seconds > 0 else float("inf"),
        records=records,
        generations=gens,
    )
