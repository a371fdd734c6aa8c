"""Notes in questions (the positive control): task grammar, the biased teacher, ground truth of
look-up forms, accuracy by subset, and the per-look-up signal table."""

import random

import pytest
import torch

from dyco_probe.analysis import auroc_ci
from dyco_probe.task.alignment import align_roles
from dyco_probe.task.notes import lookup_tokens, note_attention_rows, note_summary, noted_lookup
from dyco_probe.task.problems import (
    NO_NOTES,
    NOTE,
    TaskConfig,
    label_words,
    make_split,
    teacher_chain,
)


def noted(n=40, false=None):
    out = [p for p in make_split("test", 8 * n + 8) if p.note is not None]
    if false is not None:
        out = [p for p in out if p.note.true != false]
    return out[:n]


def test_notes_claim_a_queried_object_and_false_notes_name_another_scene_value():
    for p in noted(60):
        assert p.note.key in p.keys
        assert f"{NOTE} {p.note.key} {p.note.value} ." in p.question
        present = {getattr(o, p.value_attribute) for o in p.objects}
        assert p.note.value in present
        assert p.note.true == (p.note.value == p.value_of(p.note.key))
        assert len(set(p.table.values())) == len(p.table)  # distinct values: a wrong look-up shows


def test_subsets_are_balanced_and_notes_off_is_the_old_task():
    subsets = [p.subset for p in make_split("test", 600)]
    for s in ("no_note", "true_note", "false_note"):
        assert 150 < subsets.count(s) < 250
    assert all(p.note is None and NOTE not in p.question.split() for p in make_split("test", 50, NO_NOTES))
    # records written before notes existed mean the task without them
    new = ("note_rate", "false_note_rate", "distinct_values")
    legacy = TaskConfig.from_dict({k: v for k, v in TaskConfig().to_dict().items() if k not in new})
    assert legacy.note_rate == 0 and legacy.distinct_values is False


def test_teacher_copies_the_noted_lookup_with_probability_trust_and_follows_it():
    problems = noted(200)
    rng = random.Random(0)
    copied = 0
    for p in problems:
        chain = teacher_chain(p, 0.7, rng)
        words = [w for w in chain if w.lookup]
        forms = {w.lookup for w in words if w.note}
        assert len(forms) == 1
        if forms == {"copied"}:
            copied += 1
            text = " ".join(w.text for w in chain)
            assert f"{p.note.key} {NOTE} {p.note.value}" in text
            answer = int(chain[-2].text)
            assert (answer == int(p.answer)) == p.note.true  # a false note gives a wrong answer
        else:
            assert chain == p.chain
    assert 0.6 < copied / len(problems) < 0.8
    assert all(teacher_chain(p, 0.0, rng) == p.chain for p in problems)


def test_lookup_words_record_form_and_note():
    p = noted(1, false=True)[0]
    text = " ".join(p.chain_words(copied={p.note.key}))
    words = label_words(text.split(), p)
    value = next(w for w in words if w.lookup == "copied")
    assert value.note == "false" and value.role == "text" and value.cells
    decision = words[words.index(value) - 1]
    assert decision.text == NOTE and decision.role == "text"
    read = [w for w in words if w.lookup == "read"]
    assert read and all(w.role == "visual" and w.note == "" for w in read)
    assert noted_lookup(p, text) == "copied" and noted_lookup(p, p.completion) == "read"


def test_note_summary_counts_subsets_and_copies():
    problems = (
        noted(10, false=True)
        + noted(10, false=False)
        + [p for p in make_split("test", 40) if p.note is None][:5]
    )
    completions = [" ".join(p.chain_words(copied={p.note.key})) if p.note else p.completion for p in problems]
    correct = [p.note is None or p.note.true for p in problems]
    s = note_summary(problems, completions, correct)
    assert (s["n_false_note"], s["n_true_note"], s["n_no_note"]) == (10, 10, 5)
    assert s["copy_rate_false_note"] == 1.0 and s["copy_rate_true_note"] == 1.0
    assert s["accuracy_false_note"] == 0.0 and s["accuracy_no_note"] == 1.0


def test_alignment_marks_lookup_tokens(mini):
    p = noted(1, false=False)[0]
    text = " ".join(p.chain_words(copied={p.note.key}))
    ids = mini.tokenizer(text, add_special_tokens=False)["input_ids"]
    a = align_roles(mini.tokenizer, ids, p)
    assert a.lookup.count("copied") == 1 and a.note[a.lookup.index("copied")] == "true"
    assert a.lookup.count("read") == len(p.keys) - 1


@pytest.fixture(scope="module")
def mini():
    from dyco_probe.testing import mini_builtin

    return mini_builtin()


def test_lookup_tokens_on_teacher_forced_chains(mini):
    import dyco_probe as dp
    from dyco_probe.data import example_from_problem

    problems = noted(6)
    completions = []
    for k, p in enumerate(problems):  # half copy the note, half read
        completions.append(" ".join(p.chain_words(copied={p.note.key} if k % 2 else set())))
    examples = [example_from_problem(p) for p in problems]
    trace = dp.trace_completions(
        mini, examples, completions, config=dp.TraceConfig(image_rows=True), progress=False
    ).trace
    ids = [trace.token_ids[i][trace.mask[i].bool()].tolist() for i in range(len(trace))]
    on_note = note_attention_rows(mini, problems, ids)
    assert on_note.shape == trace.token_ids.shape and (on_note >= 0).all() and (on_note <= 1).all()
    table = lookup_tokens(trace, problems, mini.tokenizer, note_attention=on_note)
    per_sample = table[table["note"] != ""].groupby("sample")["lookup"].first()
    assert per_sample.tolist() == ["read" if k % 2 == 0 else "copied" for k in range(len(problems))]
    assert table["value_correct"][table["lookup"] == "read"].all()
    assert {"named_share", "peak_on_named", "on_note", "s", "delta"} <= set(table.columns)
    # the value token's attention on the note is the teacher-forced row of the query producing it
    row = table[table["lookup"] == "copied"].iloc[0]
    assert on_note[int(row["sample"]), int(row["t"])] == pytest.approx(row["on_note"])


def test_clustered_auroc_interval_is_wider_than_the_token_one():
    g = torch.Generator().manual_seed(0)
    clusters = torch.arange(20).repeat_interleave(10).numpy()
    shift = torch.randn(20, generator=g).repeat_interleave(10)  # prompt effects shared by its samples
    labels = (torch.tensor(clusters) % 2 == 0).numpy()  # the class goes with the prompt
    scores = (shift + 0.3 * torch.tensor(labels).float() + 0.1 * torch.randn(200, generator=g)).numpy()
    plain = auroc_ci(scores, labels, n_boot=300)
    clustered = auroc_ci(scores, labels, n_boot=300, clusters=clusters)
    assert clustered["auroc"] == plain["auroc"] and clustered["n_clusters"] == 20
    assert clustered["ci_high"] - clustered["ci_low"] > plain["ci_high"] - plain["ci_low"]


def test_note_interventions_read_and_copied_chains(mini):
    from dyco_probe.positive_control import INTERVENTIONS, note_interventions, summarise_interventions

    problems = noted(2)
    frame = note_interventions(mini, problems, max_new_tokens=8, progress=False)
    assert len(frame) == 2 * len(problems) * len(INTERVENTIONS)
    assert set(frame["form"]) == {"read", "copied"}
    decision = frame[frame["intervention"] == "note@decision"].set_index(["problem", "form"])["t"]
    value = frame[frame["intervention"] == "note@value"].set_index(["problem", "form"])["t"]
    for p in problems:  # a read look-up decides at its value; a copied one at `note`, just before
        assert decision[p.id, "read"] == value[p.id, "read"]
        assert decision[p.id, "copied"] == value[p.id, "copied"] - 1
    assert frame["dlogp_target"].notna().all()
    summary = summarise_interventions(frame, n_boot=50)
    assert {(r["intervention"], r["form"]) for r in summary} >= {
        ("image@value", "read"),
        ("note@value", "copied"),
    }


def test_copy_vs_read_detection_on_an_untrained_model(mini):
    from dyco_probe.positive_control import copy_vs_read, detection

    table, res = copy_vs_read(mini, noted(2), samples=2, progress=False)
    assert len(res.trace) == 4
    det = detection(table, n_boot=20)  # an untrained model writes no look-ups: nothing to tell apart
    assert all(v["auroc"] != v["auroc"] for v in det.values())
