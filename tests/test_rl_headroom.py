"""The RL headroom diagnostic's arithmetic (dyco_probe.studies.headroom; analyses/rl_headroom.py runs it on the built-in model)."""

import numpy as np
import pytest

from dyco_probe.studies.headroom import calibration, first_divergence, summarise
from dyco_probe.task.problems import make_split


def test_first_divergence_names_the_role_of_the_first_wrong_word():
    problem = make_split("test", 1)[0]
    words = [w.text for w in problem.chain]
    assert first_divergence(" ".join(words), problem) is None
    for i, w in enumerate(problem.chain):
        if w.role in ("visual", "text"):
            wrong = words[:i] + ["zzz"] + words[i + 1 :]
            assert first_divergence(" ".join(wrong), problem) == w.role
    assert first_divergence(" ".join(words[:3]), problem) == problem.chain[3].role  # cut short


def test_summarise_counts_mixed_groups_and_correct_samples_of_greedy_failures():
    rewards = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=float)
    greedy = np.array([True, False, False, True])
    s = summarise(rewards, greedy)
    assert s["sampled_accuracy"] == pytest.approx(7 / 16)
    assert s["pass_at_k"] == pytest.approx(3 / 4)
    assert s["mixed_groups"] == pytest.approx(2 / 4)
    assert s["greedy_wrong"] == 2
    assert s["greedy_wrong_with_a_correct_sample"] == pytest.approx(1 / 2)
    assert s["greedy_wrong_mean_correct_share"] == pytest.approx(0.125)
    assert s["greedy_wrong_correct_share_at_least_half"] == 0.0
    assert s["greedy_right_mean_correct_share"] == pytest.approx(0.75)


def test_calibration_bins_confidence_against_accuracy():
    confidence = np.array([0.3, 0.6, 0.65, 0.95, 0.999, 1.0])
    right = np.array([0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    rows = {r["bin"]: r for r in calibration(confidence, right)}
    assert rows["[0.5, 0.7)"]["n"] == 2 and rows["[0.5, 0.7)"]["accuracy"] == 0.5
    assert rows["[0.99, 1.0)"]["n"] == 2  # p = 1.0 falls in the last bin
    assert sum(r["n"] for r in rows.values()) == len(confidence)
