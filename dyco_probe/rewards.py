"""Answer extraction and verifiable rewards (accuracy and format), shared by evaluation and RL.

Reward functions are plain callables ``(completions: list[str], answers: list[str]) -> list[float]``.
"""

from __future__ import annotations

import re

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` of a completion, stripped; ``None`` if absent."""
    found = _ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


def _normalise(ans: str) -> str:
    ans = ans.strip().strip(".").strip()
    try:
        x = float(ans)
    except ValueError:
        return " ".join(ans.lower().split())
    return str(int(x)) if x == int(x) else repr(x)


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether a predicted answer equals the reference (numbers compared by value, text case- and
    whitespace-insensitively). The reference may itself be wrapped in answer tags."""
    if predicted is None:
        return False
    ref = extract_answer(reference)
    return _normalise(predicted) == _normalise(ref if ref is not None else reference)


def accuracy_reward(completions: list[str], answers: list[str]) -> list[float]:
    """1.0 where the extracted answer matches the reference, else 0.0."""
    return [float(answers_match(extract_answer(c), a)) for c, a in zip(completions, answers, strict=True)]


def format_reward(completions: list[str], answers: list[str] | None = None) -> list[float]:
    """1.0 where the completion is ``<think> ... </think> <answer> ... </answer>`` and nothing else."""
    return [float(bool(_FORMAT_RE.match(c))) for c in completions]


DEFAULT_REWARDS = {"accuracy": accuracy_reward, "format": format_reward}
