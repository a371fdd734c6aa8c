from collections import Counter

import numpy as np
import pytest

from dyco_probe.task.problems import (
    ROLE_NEUTRAL,
    ROLE_TEXT,
    ROLE_VISUAL,
    TaskConfig,
    generate_problem,
    label_words,
    make_split,
    split_seed,
)
from dyco_probe.task.render import BACKGROUND, cell_index


def test_generation_is_deterministic_per_seed():
    a, b = generate_problem(123), generate_problem(123)
    assert a.question == b.question and a.completion == b.completion and a.objects == b.objects
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    assert generate_problem(124).completion != a.completion or generate_problem(124).objects != a.objects


def test_splits_are_fixed_and_disjoint():
    train = {split_seed("train", i) for i in range(500)}
    test = {split_seed("test", i) for i in range(500)}
    assert not train & test
    assert [p.question for p in make_split("test", 5)] == [p.question for p in make_split("test", 5)]
    assert make_split("test", 3, start=2)[0].question == make_split("test", 5)[2].question


def test_attributes_are_distinct_within_a_scene():
    for p in make_split("train", 50):
        assert len({o.shape for o in p.objects}) == len(p.objects)
        assert len({o.colour for o in p.objects}) == len(p.objects)
        assert len({(o.row, o.col) for o in p.objects}) == len(p.objects)


def test_answer_is_the_arithmetic_of_the_looked_up_values():
    for p in make_split("test", 40):
        # replay the chain: every look-up names an object and reads its other attribute
        key = p.key_attribute
        value_attr = "colour" if key == "shape" else "shape"
        visual = [w for w in p.chain if w.role == ROLE_VISUAL]
        words = [w.text for w in p.chain]
        for w in visual:
            i = next(k for k, x in enumerate(p.chain) if x is w)
            obj = p.object_with(key, words[i - 1])
            assert obj is not None and getattr(obj, value_attr) == w.text
            assert w.cells == (cell_index(obj.row, obj.col, p.config.grid),)
        expr = p.question.split("compute ")[1].split()
        total = p.table[getattr(p.object_with(key, expr[0]), value_attr)]
        for op, name in zip(expr[1::2], expr[2::2]):
            v = p.table[getattr(p.object_with(key, name), value_attr)]
            total = total + v if op == "+" else total - v
        assert str(total) == p.answer
        assert p.completion.endswith(f"<answer> {p.answer} </answer>")


def test_chain_alternates_visual_and_text_roles():
    p = generate_problem(7, TaskConfig(min_hops=3, max_hops=3))
    roles = [w.role for w in p.chain if w.role != ROLE_NEUTRAL]
    assert roles.count(ROLE_VISUAL) == 3
    # each look-up is followed by text work before the next look-up
    runs = [r for i, r in enumerate(roles) if i == 0 or r != roles[i - 1]]
    assert runs[:6] == [ROLE_TEXT, ROLE_VISUAL, ROLE_TEXT, ROLE_VISUAL, ROLE_TEXT, ROLE_VISUAL]


def test_labels_follow_the_template_not_correctness():
    p = generate_problem(3)
    words = p.completion.split()
    i = next(k for k, w in enumerate(p.chain) if w.role == ROLE_VISUAL)
    wrong = [c for c in p.config.colours + p.config.shapes if c != words[i]][0]
    words[i] = wrong
    labelled = label_words(words, p)
    assert labelled[i].role == ROLE_VISUAL and labelled[i].cells == p.chain[i].cells
    assert [w.role for w in labelled] == [w.role for w in p.chain]
    assert label_words(["<think>", "blah", "</think>"], p)[1].role == ROLE_NEUTRAL


def test_lookup_verb_variant_labels_the_verb_neutral():
    p = generate_problem(5, TaskConfig(lookup_verb="is"))
    i = p.completion.split().index("is")
    assert p.chain[i].role == ROLE_NEUTRAL and p.chain[i + 1].role == ROLE_VISUAL


def test_attributes_are_balanced_so_no_guess_beats_chance():
    config = TaskConfig()
    colours, shapes = Counter(), Counter()
    for p in make_split("train", 400):
        colours.update(o.colour for o in p.objects)
        shapes.update(o.shape for o in p.objects)
    for counts, vocab in ((colours, config.colours), (shapes, config.shapes)):
        freq = np.array([counts[v] for v in vocab], dtype=float)
        assert freq.min() / freq.max() > 0.8


def test_rendered_cells_hold_exactly_their_objects():
    p = generate_problem(11, TaskConfig(pixel_noise=0.0, colour_jitter=0))
    img = np.asarray(p.render()).astype(int)
    cp = p.config.cell_px
    occupied = {(o.row, o.col) for o in p.objects}
    for r in range(p.config.grid):
        for c in range(p.config.grid):
            cell = img[r * cp : (r + 1) * cp, c * cp : (c + 1) * cp]
            drawn = (np.abs(cell - np.array(BACKGROUND)).sum(-1) > 30).sum()
            assert (drawn > 20) == ((r, c) in occupied)


@pytest.mark.parametrize(
    "changes",
    [
        dict(min_objects=0),
        dict(max_objects=20),
        dict(min_hops=4, max_hops=4, min_objects=3),
        dict(n_shapes=99),
    ],
)
def test_bad_configs_are_rejected(changes):
    with pytest.raises(ValueError):
        TaskConfig(**changes)
