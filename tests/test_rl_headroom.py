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


def test_lookup_summary_and_a_reading_chosen_by_calibration():
    from dyco_probe.studies.headroom import lookup_summary, reading

    # calibrated: picks at 0.6 right 60% of the time; systematic: picks at 0.8 right 20% of the time
    calibrated = np.array([[float(k < 6), 0.6 if k < 6 else 0.4, 0.6, 0.0] for k in range(10)])
    systematic = np.array([[float(k < 2), 0.8 if k < 2 else 0.2, 0.8, 1.0] for k in range(10)])
    a, b = lookup_summary(calibrated), lookup_summary(systematic)
    assert a["accuracy"] == pytest.approx(0.6) and a["ece"] == pytest.approx(0.0)
    assert b["accuracy"] == pytest.approx(0.2) and b["ece"] == pytest.approx(0.6)
    assert b["wrong_mean_p_right"] == pytest.approx(0.2) and b["wrong_p_right_bins"]["[0.2, 0.5)"] == 1.0
    sampling = {"1.0": summarise(np.array([[1, 0], [0, 0]], dtype=float), np.array([True, False]))}
    text = reading({"k": 2, "sampling": sampling, "lookup_groups": {"un-noted": a, "noted": b}})
    calibrated_part, systematic_part = text.split("At noted look-ups")
    assert "At un-noted look-ups" in calibrated_part and "expect little gain" in calibrated_part
    assert "not calibrated" in systematic_part and "expect RL to gain" in systematic_part


def test_lookup_confidence_flags_the_noted_lookups():
    from dyco_probe.studies.headroom import lookup_confidence
    from dyco_probe.task.problems import LOOKUP_READ
    from dyco_probe.testing import mini_builtin

    handle = mini_builtin()
    problems = make_split("test", 6)
    conf = lookup_confidence(handle, problems, batch_size=4)
    flags = [bool(w.note) for p in problems for w in p.chain if w.lookup == LOOKUP_READ]
    assert conf.shape == (len(flags), 4) and 0 < sum(flags) < len(flags)
    assert conf[:, 3].tolist() == [float(f) for f in flags]
    assert np.all((conf[:, 1] <= conf[:, 2] + 1e-6) & (conf[:, 2] <= 1))
