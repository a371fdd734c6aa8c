"""Role labellers, their registry, and the validation metrics (compare_roles, attention_peak_share)."""

import math

import pytest
import torch

from dyco_probe.labellers import (
    LABELLERS,
    attention_peak_share,
    compare_roles,
    get_labeller,
    ground_truth,
    ground_truth_alignments,
    problems_for,
    ratio_threshold,
    relevant_image_tokens,
)
from dyco_probe.roles import Role, label_roles
from dyco_probe.task.problems import ROLE_NEUTRAL, ROLE_TEXT, ROLE_VISUAL
from dyco_probe.tracing import Trace

V, X, N = int(Role.VISUAL), int(Role.TEXT), int(Role.NEUTRAL)
CODE = {ROLE_NEUTRAL: N, ROLE_VISUAL: V, ROLE_TEXT: X}


def make_trace(v_vis, v_txt, r_vis_norm=None, mask=None, distance="fisher_rao", token_ids=None, samples=None):
    v_vis, v_txt = torch.as_tensor(v_vis, dtype=torch.float32), torch.as_tensor(v_txt, dtype=torch.float32)
    shape = v_vis.shape
    r = torch.full(shape, 0.5) if r_vis_norm is None else torch.as_tensor(r_vis_norm, dtype=torch.float32)
    return Trace(
        token_ids=torch.zeros(shape, dtype=torch.long) if token_ids is None else token_ids,
        mask=torch.ones(shape, dtype=torch.bool) if mask is None else mask,
        r_vis=r,
        r_txt=1 - r,
        r_vis_norm=r,
        r_txt_norm=1 - r,
        v_vis=v_vis,
        v_txt=v_txt,
        samples=samples or [{} for _ in range(shape[0])],
        metadata={"settings": {"distance": distance}},
    )


def test_registry():
    assert set(LABELLERS) == {
        "fisher_rao",
        "hellinger",
        "l2",
        "jensen_shannon",
        "symmetric_kl",
        "ratio_threshold",
        "ground_truth",
        "visual_dependency",
    }
    assert get_labeller("fisher_rao") is LABELLERS["fisher_rao"]
    with pytest.raises(ValueError, match="valid: fisher_rao"):
        get_labeller("nope")


def test_fisher_rao_is_the_spec_rule_with_published_thresholds():
    g = torch.Generator().manual_seed(0)
    v_vis, v_txt = torch.rand(3, 9, generator=g), torch.rand(3, 9, generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    tr = make_trace(v_vis, v_txt, mask=mask)
    assert torch.equal(get_labeller("fisher_rao")(tr), label_roles(v_vis, v_txt, mask, 0.0, 0.05))
    assert torch.equal(
        get_labeller("fisher_rao")(tr, tau_vis=0.2, tau_txt=0.1), label_roles(v_vis, v_txt, mask, 0.2, 0.1)
    )
    assert torch.equal(tr.roles(), get_labeller("fisher_rao")(tr))


@pytest.mark.parametrize("distance", ["hellinger", "l2", "jensen_shannon", "symmetric_kl"])
def test_distance_rules_need_a_trace_of_their_distance(distance):
    v_vis, v_txt = torch.tensor([[0.0, 0.3, 0.0, 0.02]]), torch.tensor([[0.0, 0.0, 0.3, 0.0]])
    with pytest.raises(ValueError, match=f"TraceConfig\\(distance='{distance}'\\)"):
        get_labeller(distance)(make_trace(v_vis, v_txt))
    with pytest.raises(ValueError, match="fisher_rao"):
        get_labeller("fisher_rao")(make_trace(v_vis, v_txt, distance=distance))
    roles = get_labeller(distance)(make_trace(v_vis, v_txt, distance=distance))
    assert roles.tolist() == [[N, V, X, V]]


def test_ratio_threshold():
    r = torch.tensor([[0.9, 0.1, 0.5, 0.45, 0.55]])
    mask = torch.tensor([[True, True, True, True, False]])
    tr = make_trace(torch.zeros(1, 5), torch.zeros(1, 5), r_vis_norm=r, mask=mask)
    assert ratio_threshold(tr).tolist() == [[V, X, N, X, N]]  # r == theta: neither side; masked: neutral
    assert ratio_threshold(tr, theta=0.3).tolist() == [[V, X, V, V, N]]
    assert ratio_threshold(tr, theta=0.5, theta_txt=0.4).tolist() == [[V, X, N, N, N]]
    with pytest.raises(ValueError, match="theta_txt"):
        ratio_threshold(tr, theta=0.3, theta_txt=0.4)


def test_compare_roles_by_hand():
    truth = torch.tensor([[V, V, X, X, N, N, V, X]])
    pred = torch.tensor([[V, X, X, N, V, N, V, X]])
    mask = torch.tensor([[True] * 7 + [False]])
    inc = compare_roles(pred, truth, mask)  # tokens 0..6
    assert inc["tokens"] == 7 and inc["accuracy"] == pytest.approx(4 / 7)
    vis, txt, neu = inc["roles"]["visual"], inc["roles"]["text"], inc["roles"]["neutral"]
    assert (vis["precision"], vis["recall"], vis["support"], vis["predicted"]) == (
        pytest.approx(2 / 3),
        2 / 3,
        3,
        3,
    )
    assert (txt["precision"], txt["recall"]) == (pytest.approx(1 / 2), 1 / 2)
    assert (neu["precision"], neu["recall"]) == (pytest.approx(1 / 2), 1 / 2)
    assert vis["f1"] == pytest.approx(2 / 3) and inc["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    exc = compare_roles(pred, truth, mask, neutral="excluded")  # tokens 0, 1, 2, 3, 6
    assert exc["tokens"] == 5 and set(exc["roles"]) == {"visual", "text"}
    vis, txt = exc["roles"]["visual"], exc["roles"]["text"]
    assert (vis["precision"], vis["recall"]) == (1.0, pytest.approx(2 / 3))
    assert (txt["precision"], txt["recall"]) == (pytest.approx(1 / 2), pytest.approx(1 / 2))
    assert exc["accuracy"] == pytest.approx(3 / 5)


def test_compare_roles_never_predicted_role():
    truth = torch.tensor([[V, X, X]])
    res = compare_roles(
        torch.tensor([[X, X, X]]), truth, torch.ones(1, 3, dtype=torch.bool), neutral="excluded"
    )
    assert math.isnan(res["roles"]["visual"]["precision"]) and res["roles"]["visual"]["f1"] == 0.0
    assert res["macro_f1"] == pytest.approx((0.0 + 0.8) / 2)
    with pytest.raises(ValueError):
        compare_roles(truth, truth, torch.ones(1, 3, dtype=torch.bool), neutral="sometimes")


def test_attention_peak_share():
    tr = make_trace(torch.zeros(2, 3), torch.zeros(2, 3))
    tr.image_rows = torch.tensor(
        [
            [[0.1, 0.7, 0.2, 0.0], [0.5, 0.1, 0.1, 0.0], [0.3, 0.3, 0.4, 0.0]],
            [[0.0, 0.0, 0.9, 0.5], [0.2, 0.1, 0.1, 0.6], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    # sample 1 has 4 image tokens, sample 0 three (its 4th column is padding and must never win)
    tr.image_rows_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    relevant = torch.zeros(2, 3, 4, dtype=torch.bool)
    relevant[0, 0, 1] = True  # peak 1: hit
    relevant[0, 1, 2] = True  # peak 0: miss
    relevant[1, 0, 3] = True  # peak 2: miss
    relevant[1, 1, [0, 3]] = True  # peak 3: hit
    res = attention_peak_share(tr, relevant)
    assert res["tokens"] == 4 and res["share"] == pytest.approx(0.5)
    assert res["chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 4 + 2 / 4) / 4)
    roles = torch.tensor([[V, X, X], [X, V, X]])
    assert attention_peak_share(tr, relevant, roles)["share"] == pytest.approx(1.0)
    tr.image_rows = None
    with pytest.raises(ValueError, match="image_rows=True"):
        attention_peak_share(tr, relevant)


@pytest.fixture(scope="module")
def word_tok():
    from dyco_probe.models.builtin import build_tokenizer

    return build_tokenizer()


def gold_trace(tokenizer, examples):
    """A trace whose tokens are the examples' gold completions (+ EOS), right-padded; no signals."""
    rows = [
        tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for ex in examples
    ]
    t = max(map(len, rows))
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    samples = [
        {
            "example_id": ex.id,
            "synthetic": {"seed": ex.problem.seed, "config": ex.problem.config.to_dict()},
            "num_image_tokens": 16,
        }
        for ex in examples
    ]
    return make_trace(
        torch.zeros(ids.shape), torch.zeros(ids.shape), mask=mask, token_ids=ids, samples=samples
    )


def test_ground_truth_labeller(word_tok):
    from dyco_probe.data import synthetic_examples

    examples = synthetic_examples("test", 4)
    tr = gold_trace(word_tok, examples)
    truth = get_labeller("ground_truth")(tr, examples=examples, tokenizer=word_tok)
    for i, ex in enumerate(examples):
        n = len(ex.problem.chain)
        assert truth[i, :n].tolist() == [CODE[w.role] for w in ex.problem.chain]
        assert (truth[i, n:] == N).all()
    # rebuilt from the samples' synthetic records, by id in any order, or by position
    assert torch.equal(ground_truth(tr, tokenizer=word_tok), truth)
    assert torch.equal(ground_truth(tr, examples=examples[::-1], tokenizer=word_tok), truth)
    with pytest.raises(ValueError, match="tokenizer"):
        ground_truth(tr, examples=examples)
    with pytest.raises(ValueError, match="cannot match"):
        problems_for(tr, examples[:2])
    tr.samples = [{} for _ in examples]
    assert [p.id for p in problems_for(tr, examples)] == [ex.id for ex in examples]
    with pytest.raises(ValueError, match="synthetic"):
        problems_for(tr)


def test_relevant_image_tokens_are_the_named_objects_cells(word_tok):
    from dyco_probe.data import synthetic_examples
    from dyco_probe.task.render import cell_index

    examples = synthetic_examples("test", 3)
    tr = gold_trace(word_tok, examples)
    aligned = ground_truth_alignments(tr, examples, tokenizer=word_tok)
    relevant = relevant_image_tokens(tr, aligned)
    assert relevant.shape == (*tr.token_ids.shape, 16)
    truth = ground_truth(tr, examples=examples, tokenizer=word_tok)
    assert torch.equal(relevant.any(-1), truth == V)  # exactly the visual tokens have a relevant cell
    for i, ex in enumerate(examples):
        p = ex.problem
        for t, w in enumerate(p.chain):
            if w.role == ROLE_VISUAL:
                obj = p.object_with(p.key_attribute, p.chain[t - 1].text)
                assert relevant[i, t].nonzero().flatten().tolist() == [
                    cell_index(obj.row, obj.col, p.config.grid)
                ]
    # a synthetic "model" that always looks at the relevant cell peaks there every time
    tr.image_rows = relevant.float() + 0.01
    tr.image_rows_mask = torch.ones(3, 16, dtype=torch.bool)
    res = attention_peak_share(tr, relevant, truth)
    assert res["share"] == 1.0 and res["chance"] == pytest.approx(1 / 16)
