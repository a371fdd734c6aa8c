"""The labeller validation (dyco_probe.studies.labellers, labeller_dependency): where the tokens each labeller calls visual look."""

import math

import pytest
import torch

from dyco_probe.roles import Role
from dyco_probe.studies.labellers import visual_token_peaks
from dyco_probe.tracing import Trace

V, X, N = int(Role.VISUAL), int(Role.TEXT), int(Role.NEUTRAL)


def test_visual_token_peaks_score_look_ups_and_count_the_rest():
    shape = (2, 3)
    half = torch.full(shape, 0.5)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    trace = Trace(
        token_ids=torch.zeros(shape, dtype=torch.long),
        mask=mask,
        r_vis=half,
        r_txt=half,
        r_vis_norm=half,
        r_txt_norm=half,
        v_vis=torch.zeros(shape),
        v_txt=torch.zeros(shape),
        samples=[{}, {}],
    )
    trace.image_rows = torch.tensor(
        [
            [[0.1, 0.7, 0.2, 0.0], [0.5, 0.1, 0.1, 0.0], [0.3, 0.3, 0.4, 0.0]],
            [[0.0, 0.0, 0.9, 0.5], [0.1, 0.1, 0.7, 0.1], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    trace.image_rows_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    truth = torch.tensor([[V, X, N], [X, V, N]])
    relevant = torch.zeros(2, 3, 4, dtype=torch.bool)  # only ground-truth visual tokens name an object
    relevant[0, 0, 1] = True  # peak 1: hit
    relevant[1, 1, [0, 3]] = True  # peak 2: miss
    objects = torch.zeros_like(relevant)
    objects[0, :, [1, 2]] = True
    objects[1, :, [0, 2, 3]] = True
    # the labeller calls every token visual, the masked one included (never counted)
    pred = torch.full(shape, V)
    rows = visual_token_peaks(trace, relevant, objects, [("gt", "", truth), ("all", "", pred)], truth)

    gt, every = rows
    assert (gt["visual_tokens"], gt["with_relevant"], gt["without_relevant"]) == (2, 2, 0)
    assert gt["without_relevant_share"] == 0.0
    assert every["visual_tokens"] == 5 and every["with_relevant"] == 2 and every["tokens"] == 2
    assert every["without_relevant"] == 3 and every["without_relevant_share"] == pytest.approx(3 / 5)
    assert (every["without_relevant_text"], every["without_relevant_neutral"]) == (2, 1)
    for r in rows:  # scored over the same look-ups: one hit of two, both on some object
        assert r["peak_share"] == pytest.approx(0.5) and r["object_share"] == pytest.approx(1.0)
        assert r["chance"] == pytest.approx((1 / 3 + 2 / 4) / 2)
        assert r["object_chance"] == pytest.approx((2 / 3 + 3 / 4) / 2)

    none = visual_token_peaks(trace, relevant, objects, [("none", "", torch.full(shape, X))], truth)[0]
    assert none["visual_tokens"] == 0 and none["tokens"] == 0
    assert math.isnan(none["without_relevant_share"]) and math.isnan(none["peak_share"])


def test_overlap_counts_visual_tokens_of_two_labellers():
    from dyco_probe.studies.labellers import overlap

    truth = torch.tensor([[V, V, X, N], [V, X, X, N]])
    a = torch.tensor([[V, X, V, N], [V, V, X, V]])
    b = torch.tensor([[V, V, X, N], [X, X, V, N]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    out = overlap(a, b, truth, mask)
    assert out["true_visual"] == {"tokens": 3, "both": 1, "only_first": 1, "only_second": 1, "neither": 0}
    assert out["other"] == {"tokens": 4, "both": 0, "only_first": 2, "only_second": 1, "neither": 1}


def test_dependency_section_writes_its_files(tmp_path):
    """The counterfactual labeller's validation end to end on a miniature model and gold chains."""
    import argparse

    from dyco_probe.api import trace_completions
    from dyco_probe.data import synthetic_examples
    from dyco_probe.labellers import get_labeller
    from dyco_probe.studies.labeller_dependency import dependency_section
    from dyco_probe.testing import mini_builtin

    handle = mini_builtin()
    examples = synthetic_examples("test", 6)
    online = trace_completions(handle, examples, [ex.completion for ex in examples], progress=False).trace
    truth = get_labeller("ground_truth")(online, examples=examples, tokenizer=handle.tokenizer)
    args = argparse.Namespace(
        counterfactuals=["blank", "swap"],
        divergences=["kl", "k3"],
        mask_fraction=0.5,
        batch_size=4,
        model="builtin",
        split="test",
        completions="gold",
    )
    data = {"handle": handle, "examples": examples, "online": online, "runs": tmp_path}
    predictions, md = dependency_section(args, data, truth, tmp_path)
    assert [(name, setting.split(",")[0]) for name, setting, _ in predictions] == [
        ("visual_dependency", "blank"),
        ("visual_dependency", "swap"),
    ]
    assert all(pred.shape == online.mask.shape for _, _, pred in predictions)
    for name in ("labeller_dependency.md", "labeller_dependency.csv", "labeller_dependency_thresholds.csv"):
        assert (tmp_path / name).exists()
    assert (tmp_path / "labeller_dependency_vs_delta.png").exists()
    assert len(list(tmp_path.glob("dependency_*.pt"))) == 4  # the scores, cached for reruns
    text = "\n".join(md)
    assert "| swap | k3 |" in text and "Fisher–Rao rule" in text
