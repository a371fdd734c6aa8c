"""Interventions: correctness properties of knockout / scaling / patching, query selections, readouts, statistics."""

import math

import numpy as np
import pytest
import torch

from dyco_probe.interventions import (
    Intervention,
    KeyLayout,
    bootstrap_ci,
    ground_truth_roles,
    intervene,
    layer_windows,
    matched_random,
    paired_comparison,
    parse_layers,
    patch_attention_output,
    patch_image_states,
    prepare_trajectories,
    record_attention_output,
    record_image_states,
    regenerate,
    select_tokens,
    teacher_forced_inputs,
    token_columns,
    token_logprobs,
)
from dyco_probe.interventions.readouts import generate_greedy
from dyco_probe.roles import Role
from dyco_probe.testing import TINY_TOKENS, mini_builtin, tiny_batch, tiny_llava, tiny_qwen2_5_vl
from dyco_probe.tracing import TraceConfig, trace_offline

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl(seed=4)


@pytest.fixture(scope="module")
def batch(qwen):
    return tiny_batch(qwen, 3, images_per_prompt=2, seed=14)


@pytest.fixture(scope="module")
def completion(qwen, batch):
    """Greedy completions of `batch` (ragged: some end early) and their teacher-forced inputs."""
    ids, mask = generate_greedy(qwen, batch, 10)
    return ids, mask, teacher_forced_inputs(qwen, batch, ids, mask)


@pytest.fixture(scope="module")
def handle():
    return mini_builtin(suppress_special=False)


def other_pixels(batch, seed=99):
    out = dict(batch)
    out["pixel_values"] = torch.randn(
        batch["pixel_values"].shape, generator=torch.Generator().manual_seed(seed)
    )
    return out


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def text_rows(inputs):
    return inputs["attention_mask"].bool() & (inputs["input_ids"] != TINY_TOKENS.image)


# -- the sanity property of docs/method.md#interventions ---------------------------------------------------------------


@pytest.mark.parametrize("factory", [tiny_qwen2_5_vl, tiny_llava], ids=["qwen2.5-vl", "llava"])
def test_image_knockout_everywhere_makes_outputs_independent_of_pixels(factory):
    model = factory(seed=1)
    a = tiny_batch(model, 3, images_per_prompt=2 if factory is tiny_qwen2_5_vl else 1, seed=3)
    b = other_pixels(a)
    rows = text_rows(a)
    assert not torch.allclose(logits(model, a)[rows], logits(model, b)[rows])  # the pixels matter...
    with intervene(model, Intervention.knockout("image")):
        la, lb = logits(model, a), logits(model, b)
        ga = model.generate(**a, max_new_tokens=6, do_sample=False)
        gb = model.generate(**b, max_new_tokens=6, do_sample=False)
    assert torch.equal(la[rows], lb[rows])  # ...and not at all once no text query can see the image
    assert torch.equal(ga, gb)


def test_knockout_only_some_layers_leaves_pixels_visible(qwen, batch):
    rows = text_rows(batch)
    with intervene(qwen, Intervention.knockout("image", layers=[0, 1])):
        la, lb = logits(qwen, batch), logits(qwen, other_pixels(batch))
    assert not torch.allclose(la[rows], lb[rows])


# -- no-ops -------------------------------------------------------------------------------------


def test_scale_one_is_a_no_op(qwen, batch, completion):
    ids, mask, inputs = completion
    base = logits(qwen, inputs)
    every = torch.ones(3, inputs["input_ids"].shape[1], dtype=torch.bool)
    for keys in ("image", "text", "completion"):
        with intervene(qwen, Intervention.scaling(1.0, keys), every) as log:
            assert torch.equal(logits(qwen, inputs), base)
        assert log.calls == 0
    with intervene(qwen, Intervention.scaling(1.0, "image")):
        again, again_mask = generate_greedy(qwen, batch, 10)
    assert torch.equal(again, ids) and torch.equal(again_mask, mask)


def test_knockout_of_an_empty_set_is_a_no_op(qwen, completion):
    ids, mask, inputs = completion
    base = logits(qwen, inputs)
    nothing = torch.zeros_like(mask)
    prompt_length = inputs["input_ids"].shape[1] - ids.shape[1]
    cases = [
        (Intervention.knockout("image"), token_columns(nothing, prompt_length)),  # no query
        (Intervention.knockout("positions"), None),  # no key
        (Intervention.knockout("positions", key_columns=[10**6]), None),  # keys outside the sequence
    ]
    for spec, queries in cases:
        with intervene(qwen, spec, queries) as log:
            assert torch.equal(logits(qwen, inputs), base)
        assert log.calls == 0


def test_the_model_is_left_as_found(qwen, batch):
    before = logits(qwen, batch)
    impl = qwen.config.get_text_config()._attn_implementation
    with pytest.raises(KeyError):
        with intervene(qwen, Intervention.knockout("image")):
            raise KeyError("boom")
    assert qwen.config.get_text_config()._attn_implementation == impl
    assert torch.equal(logits(qwen, batch), before)
    assert all(not m._forward_pre_hooks for m in qwen.modules())


# -- scaling law, in the tracer's indexing ----------------------------------------------------------


@pytest.mark.parametrize("scale,keys", [(0.25, "image"), (3.0, "image"), (0.0, "image"), (2.0, "text")])
def test_scaled_share_follows_lambda_p_over_lambda_p_plus_one_minus_p(qwen, batch, completion, scale, keys):
    """Tokens selected by trace index t: their traced share (same layer and head) is λp/(λp+1−p)."""
    ids, mask, inputs = completion
    layer = 1
    chosen = torch.zeros_like(mask)
    chosen[:, ::2] = True
    chosen &= mask
    prompt_length = batch["input_ids"].shape[1]
    spec = Intervention(keys=keys, scale=scale, layers=[layer])
    signal = "r_vis" if keys == "image" else "r_txt"
    for head in range(4):
        config = TraceConfig(layers=[layer], heads=[head])
        base = getattr(trace_offline(qwen, batch, ids, mask, config=config), signal)
        with intervene(qwen, spec, token_columns(chosen, prompt_length)):
            after = getattr(trace_offline(qwen, batch, ids, mask, config=config), signal)
        p = base.double()
        expected = scale * p / (scale * p + 1 - p)
        assert torch.allclose(after.double()[chosen], expected[chosen], atol=1e-5)
        assert torch.allclose(after[mask & ~chosen], base[mask & ~chosen], atol=1e-6)  # others untouched
        assert (p[chosen] > 1e-3).all() and (p[chosen] < 1 - 1e-3).all()  # a non-trivial check


def test_knockout_by_head_touches_only_that_head(qwen, batch, completion):
    ids, mask, _ = completion
    cols = token_columns(mask, batch["input_ids"].shape[1])
    with intervene(qwen, Intervention.knockout("image", layers=[1], heads=[2]), cols):
        t0 = trace_offline(qwen, batch, ids, mask, config=TraceConfig(layers=[1], heads=[2]))
        t1 = trace_offline(qwen, batch, ids, mask, config=TraceConfig(layers=[1], heads=[1]))
    base = trace_offline(qwen, batch, ids, mask, config=TraceConfig(layers=[1], heads=[1]))
    assert (t0.r_vis[mask] == 0).all()
    assert torch.allclose(t1.r_vis[mask], base.r_vis[mask], atol=1e-6)


# -- key spans -----------------------------------------------------------------------------------


def test_key_spans_per_sample():
    image = torch.tensor([[0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    layout = KeyLayout.build(image, valid, completion_start=5)
    q = torch.tensor([5, 6])
    text = layout.key_mask("text", q, 7)
    assert text[0, 0].nonzero().flatten().tolist() == [3, 4, 5]
    assert text[1, 1].nonzero().flatten().tolist() == [4, 5, 6]
    assert layout.key_mask("text_history", q, 7)[0, 1].nonzero().flatten().tolist() == [3, 4, 5]
    assert layout.key_mask("question", q, 7)[1, 1].nonzero().flatten().tolist() == [4]
    assert layout.key_mask("completion", q, 7)[0, 1].nonzero().flatten().tolist() == [5, 6]
    assert layout.key_mask("text", q, 7, "all_text")[1, 0].nonzero().flatten().tolist() == [1, 4, 5]
    assert layout.key_mask("image", q, 8)[1, 0].nonzero().flatten().tolist() == [2, 3]


def test_layer_selections():
    assert parse_layers("all", 4) == [(0, 1, 2, 3)]
    assert parse_layers("each", 3) == [(0,), (1,), (2,)]
    assert parse_layers("window:2", 4) == [(0, 1), (1, 2), (2, 3)]
    assert layer_windows(5, 2, 2) == [(0, 1), (2, 3), (3, 4)]
    assert parse_layers("-1", 4) == [(3,)] and parse_layers("1-2", 4) == [(1, 2)]
    assert parse_layers([0, 2], 4) == [(0, 2)]
    with pytest.raises(ValueError):
        parse_layers("window:x", 4)
    with pytest.raises(ValueError):
        Intervention(keys="pixels")
    with pytest.raises(ValueError):
        Intervention(scale=-1)


# -- query selections ----------------------------------------------------------------------------


def test_token_columns_follow_the_tracer_convention():
    sel = torch.tensor([[True, False, True], [False, True, False]])
    cols = token_columns(sel, 5)
    assert cols[0].nonzero().flatten().tolist() == [4, 6]  # token t -> column L - 1 + t
    assert cols[1].nonzero().flatten().tolist() == [5]


def test_matched_random_controls():
    roles = torch.tensor([[0, 1, 2, 1, 2, 2, 0, 0], [0, 2, 2, 2, 1, 0, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 6 + [0, 0]], dtype=torch.bool)
    visual = select_tokens("visual", roles, mask)
    control = select_tokens("random:visual", roles, mask, seed=3, sample_keys=[10, 11])
    assert control.sum(-1).tolist() == visual.sum(-1).tolist() == [2, 1]
    assert not (control & ~mask).any()
    again = select_tokens("random:visual", roles[[1]], mask[[1]], seed=3, sample_keys=[11])
    assert torch.equal(again[0], control[1])  # independent of the batch a sample sits in
    other = matched_random(visual, mask, seed=4, sample_keys=[10, 11])
    draws = {
        tuple(matched_random(visual, mask, seed=s, sample_keys=[10, 11])[0].nonzero().flatten().tolist())
        for s in range(20)
    }
    assert len(draws) > 3 and other.sum() == 3
    neutral = select_tokens("neutral", roles, mask)
    assert not neutral[:, 0].any() and neutral[0].nonzero().flatten().tolist() == [6, 7]
    assert select_tokens("positions:0,2", None, mask)[0].nonzero().flatten().tolist() == [0, 2]
    assert torch.equal(select_tokens("all", None, mask), mask)


def test_ground_truth_roles_of_the_gold_chain(handle):
    from dyco_probe.data import synthetic_examples
    from dyco_probe.task.problems import ROLE_TEXT, ROLE_VISUAL

    examples = synthetic_examples("test", 3)
    tok = handle.tokenizer
    rows = [tok(ex.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for ex in examples]
    length = max(map(len, rows))
    ids = torch.zeros(3, length, dtype=torch.long)
    mask = torch.zeros(3, length, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    roles = ground_truth_roles(tok, ids, mask, [ex.problem for ex in examples])
    value = {ROLE_VISUAL: int(Role.VISUAL), ROLE_TEXT: int(Role.TEXT)}
    for i, ex in enumerate(examples):
        expected = [value.get(w.role, 0) for w in ex.problem.chain] + [
            0
        ]  # the built-in tokenizer is word-level
        assert roles[i, : len(rows[i])].tolist() == expected
    assert (roles[i][~mask[i]] == 0).all()


# -- patching ------------------------------------------------------------------------------------


def test_patching_a_run_with_itself_is_a_no_op(qwen, completion):
    ids, mask, inputs = completion
    base = logits(qwen, inputs)
    rec = record_attention_output(qwen, inputs, layers=[0, 2])
    with patch_attention_output(qwen, rec):
        assert torch.equal(logits(qwen, inputs), base)
    states = record_image_states(qwen, inputs, layers=[0, 3])
    with patch_image_states(qwen, states):
        assert torch.equal(logits(qwen, inputs), base)


def test_patching_from_a_counterfactual_donor(qwen, batch, completion):
    ids, mask, inputs = completion
    clean = logits(qwen, inputs)
    corrupted_inputs = other_pixels(inputs)
    corrupted = logits(qwen, corrupted_inputs)
    rows = text_rows(inputs)
    # restore-style: clean image states patched into the corrupted run at layer 0 restore the clean run
    states = record_image_states(qwen, inputs, layers=[0])
    with patch_image_states(qwen, states):
        restored = logits(qwen, corrupted_inputs)
    assert torch.allclose(restored[rows], clean[rows], atol=1e-5)
    assert not torch.allclose(corrupted[rows], clean[rows], atol=1e-3)
    # a counterfactual run's attention output at one column: only that column and later ones move
    rec = record_attention_output(qwen, corrupted_inputs, layers=[3])
    cols = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    cols[:, -3] = True
    with patch_attention_output(qwen, rec, queries=cols):
        patched = logits(qwen, inputs)
    assert torch.equal(patched[:, :-3], clean[:, :-3])
    assert not torch.allclose(patched[:, -3], clean[:, -3], atol=1e-3)
    assert torch.equal(patched[:, -2:], clean[:, -2:])  # the last layer: nothing reads the column after it
    # at every layer, the column's residual stream becomes the donor's (same token, same attention outputs)
    rec = record_attention_output(qwen, corrupted_inputs)
    with patch_attention_output(qwen, rec, queries=cols):
        patched = logits(qwen, inputs)
    assert torch.allclose(patched[:, -3], corrupted[:, -3], atol=1e-5)
    assert torch.equal(patched[:, :-3], clean[:, :-3])


# -- readouts ------------------------------------------------------------------------------------


def test_teacher_forced_logprobs_match_generation(qwen, batch, completion):
    ids, mask, inputs = completion
    out = qwen.generate(
        **batch,
        max_new_tokens=10,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        suppress_tokens=[3, 4, 5, 6],
    )
    ref = torch.stack(out.logits, 1)[:, : ids.shape[1]].log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    assert torch.allclose(token_logprobs(qwen, inputs, ids)[mask], ref[mask], atol=1e-4)


def test_regenerate_continues_a_trajectory(qwen, batch, completion):
    ids, mask, _ = completion
    same, same_mask = regenerate(qwen, batch, ids, torch.tensor([0, 3, 5]), max_new_tokens=10)
    assert torch.equal(same[:, : ids.shape[1]][mask], ids[mask])  # greedy from its own prefix: itself
    # an intervention on every token from the start is the same as one on a fresh generation
    spec = Intervention.knockout("image")
    every = torch.ones(3, 10, dtype=torch.bool)
    ko, ko_mask = regenerate(qwen, batch, ids, torch.zeros(3), max_new_tokens=10, spec=spec, selection=every)
    with intervene(qwen, spec, token_columns(every, batch["input_ids"].shape[1])):
        fresh, fresh_mask = generate_greedy(qwen, batch, 10)
    assert torch.equal(ko[:, : fresh.shape[1]][fresh_mask], fresh[fresh_mask])


def test_trajectory_readouts(handle):
    from dyco_probe.data import synthetic_examples

    traj = prepare_trajectories(
        handle, synthetic_examples("test", 3), [7, 8, 9], trajectory="gold", max_new_tokens=48
    )
    assert traj.correct.all() and traj.answer_mask.sum(-1).tolist() == [1, 1, 1]
    roles = traj.roles("ground_truth")
    visual = select_tokens("visual", roles, traj.completion_mask)
    nothing = torch.zeros_like(visual)
    tf = traj.teacher_forced(Intervention.knockout("image"), visual)
    assert all(n >= 2 for n in tf["n_targets"]) and all(math.isfinite(x) for x in tf["dlogp_target"])
    empty = traj.teacher_forced(Intervention.knockout("image"), nothing)
    assert all(math.isnan(x) for x in empty["dlogp_answer"])
    one = traj.teacher_forced(Intervention.scaling(1.0), visual)
    assert all(x == 0 for x in one["dlogp_target"])
    fr = traj.free_running(Intervention.scaling(1.0), visual)
    assert fr["dacc"] == [0.0, 0.0, 0.0] and fr["changed"] == [0.0, 0.0, 0.0]
    assert traj.select([2]).indices == [9]


def test_teacher_forced_readouts_continue_from_the_prompt_cache(handle):
    """Every condition of a batch reuses one KV cache of the prompt: the same effects as rerunning
    the whole sequence, and the cache is left as it was for the next condition."""
    from dyco_probe.data import synthetic_examples

    traj = prepare_trajectories(handle, synthetic_examples("test", 3), trajectory="gold", max_new_tokens=48)
    visual = select_tokens("visual", traj.roles("ground_truth"), traj.completion_mask)
    specs = [
        Intervention.knockout("image"),
        Intervention.knockout("question", layers=[1]),
        Intervention.scaling(2.0),
    ]
    cached = [traj.teacher_forced(spec, visual) for spec in specs]
    cache, _ = traj._prompt_prefix()
    assert cache.get_seq_length() == traj.prompt_length - 1
    traj._prefix = False  # the whole sequence each time
    for spec, got in zip(specs, cached):
        want = traj.teacher_forced(spec, visual)
        for key in ("dlogp_target", "dlogp_after"):
            assert got[key] == pytest.approx(want[key], abs=1e-5, nan_ok=True)
        assert any(abs(x) > 1e-3 for x in want["dlogp_after"])  # the interventions do something


def test_a_last_layer_knockout_reaches_only_the_intervened_tokens(handle):
    """What the teacher-forced answer readout can see: a query's last-layer output feeds only its own logits."""
    from dyco_probe.data import synthetic_examples

    traj = prepare_trajectories(handle, synthetic_examples("test", 3), trajectory="gold", max_new_tokens=48)
    answer = traj.answer_mask & traj.completion_mask.cpu()
    t = torch.arange(answer.shape[1])
    before = traj.completion_mask.cpu() & (t[None, :] < answer.float().argmax(-1)[:, None])
    for keys in ("image", "text_history"):
        last = traj.teacher_forced(Intervention.knockout(keys, layers=[-1]), before)
        assert last["n_answer_targets"] == [0, 0, 0]
        assert all(abs(x) < 1e-5 for x in last["dlogp_answer"]) and any(
            abs(x) > 1e-3 for x in last["dlogp_target"]
        )
        first = traj.teacher_forced(Intervention.knockout(keys, layers=[0]), before)
        assert any(abs(x) > 1e-4 for x in first["dlogp_answer"])
    on_answer = traj.teacher_forced(Intervention.knockout("text_history", layers=[-1]), answer)
    assert on_answer["n_answer_targets"] == [1, 1, 1] and all(
        abs(x) > 1e-5 for x in on_answer["dlogp_answer"]
    )


def test_roles_from_any_labeller(handle):
    from dyco_probe.data import synthetic_examples
    from dyco_probe.labellers import LABELLERS, get_labeller

    traj = prepare_trajectories(handle, synthetic_examples("test", 3), trajectory="gold", max_new_tokens=48)
    args = (handle.model, traj.prompt_inputs, traj.completion_ids, traj.completion_mask)
    trace = trace_offline(*args)
    assert torch.equal(traj.roles("fisher_rao"), trace.roles())
    assert torch.equal(traj.roles("fisher_rao", tau_txt=0.2), trace.roles(tau_txt=0.2))
    assert torch.equal(
        traj.roles("ratio_threshold", theta=0.3), get_labeller("ratio_threshold")(trace, theta=0.3)
    )
    truth = get_labeller("ground_truth")(trace, examples=traj.examples, tokenizer=handle.tokenizer)
    assert torch.equal(traj.roles("ground_truth"), truth)
    # a distance's labeller refuses Fisher-Rao dynamics: the trajectories trace it with its own distance
    hellinger = trace_offline(*args, config=TraceConfig(distance="hellinger"))
    assert torch.equal(traj.roles("hellinger"), get_labeller("hellinger")(hellinger))
    for name in LABELLERS:
        roles = traj.roles(name)
        assert roles.shape == traj.completion_ids.shape and not roles[~traj.completion_mask.cpu()].any()
    with pytest.raises(ValueError, match="unknown role source 'fisher'.*ratio_threshold.*ground_truth"):
        traj.roles("fisher")


# -- statistics ----------------------------------------------------------------------------------


def test_bootstrap_and_paired_statistics():
    from scipy import stats

    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 1.0, 200)
    mean, low, high = bootstrap_ci(a, seed=1)
    assert low < mean < high and abs(mean - a.mean()) < 1e-12
    half = 1.96 * a.std(ddof=1) / math.sqrt(a.size)
    assert abs((high - low) / 2 - half) < 0.05
    b = a - 0.5 + rng.normal(0, 0.1, 200)
    res = paired_comparison(a, b)
    ref = stats.ttest_rel(a, b)
    assert res.n == 200 and math.isclose(res.p_t, ref.pvalue) and math.isclose(res.t, ref.statistic)
    assert res.diff_low < 0.5 < res.diff_high and res.cohens_dz > 3
    with_nan = paired_comparison([1.0, math.nan, 2.0, 3.0], [0.0, 1.0, math.nan, 1.0])
    assert with_nan.n == 2 and with_nan.diff == 1.5
    assert math.isnan(bootstrap_ci([math.nan])[0]) and bootstrap_ci([2.0]) == (2.0, 2.0, 2.0)


def test_summaries_and_comparisons_by_condition():
    import pandas as pd

    from dyco_probe.interventions import compare_to_control, summarize

    rng = np.random.default_rng(1)
    rows = []
    for layers in ("0", "all"):
        for i in range(30):
            base = rng.normal()
            rows.append({"layers": layers, "target": "visual", "item_index": i, "dacc": base - 1.0})
            rows.append({"layers": layers, "target": "random:visual", "item_index": i, "dacc": base})
    frame = pd.DataFrame(rows)
    table = summarize(frame, "dacc", ["layers", "target"])
    assert len(table) == 4 and (table["n"] == 30).all() and (table["ci_low"] <= table["mean"]).all()
    cmp = compare_to_control(
        frame, "dacc", target={"target": "visual"}, control={"target": "random:visual"}, by=["layers"]
    )
    assert cmp["layers"].tolist() == ["0", "all"] and np.allclose(cmp["diff"], -1.0)
    assert (cmp["p_t"] == 0.0).all() and (cmp["n"] == 30).all()  # constant paired difference


def test_positions_keys_follow_the_prompt_when_a_batch_is_re_padded(handle, monkeypatch):
    """Free-running regeneration re-pads prompt ++ prefix per sample: a `positions` knockout must hit
    the prompt tokens it names in every row, whatever the row's prefix length."""
    from dyco_probe.data import synthetic_examples
    from dyco_probe.interventions.readouts import regenerate
    from dyco_probe.interventions.spec import KeyLayout

    layout = KeyLayout.build(
        torch.zeros(2, 6, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool), 6, [0, 2]
    )
    mask = layout.key_mask("positions", torch.tensor([7]), 9, key_columns=(1, 3))
    assert mask[0, 0].nonzero().flatten().tolist() == [1, 3] and mask[1, 0].nonzero().flatten().tolist() == [
        3,
        5,
    ]

    traj = prepare_trajectories(handle, synthetic_examples("test", 3), trajectory="gold", max_new_tokens=40)
    prompt = traj.prompt_inputs["input_ids"].cpu()
    width = prompt.shape[1]
    columns = (width - 4, width - 3, 5)  # near the end, and inside the left padding's reach
    prefix = torch.tensor([2, 5, 9])
    selection = torch.zeros(traj.completion_ids.shape, dtype=torch.bool)
    for i, k in enumerate(prefix.tolist()):
        selection[i, k:] = True

    seen = {}
    real_key_mask = KeyLayout.key_mask

    def spy(self, keys, query_columns, num_keys, *args, **kwargs):
        out = real_key_mask(self, keys, query_columns, num_keys, *args, **kwargs)
        seen.setdefault("mask", out.expand(-1, len(query_columns), -1)[:, 0].cpu())
        return out

    def prefill(module, args, kwargs):
        seen.setdefault("ids", kwargs["input_ids"].cpu())  # the prefill: prompt ++ prefix, re-padded

    monkeypatch.setattr(KeyLayout, "key_mask", spy)
    hook = handle.model.register_forward_pre_hook(prefill, with_kwargs=True)
    try:
        regenerate(
            handle.model,
            traj.prompt_inputs,
            traj.completion_ids,
            prefix,
            max_new_tokens=40,
            spec=Intervention.knockout("positions", key_columns=columns),
            selection=selection,
        )
    finally:
        hook.remove()
    ids, mask = seen["ids"], seen["mask"]
    for i in range(3):
        hit = mask[i].nonzero().flatten()
        assert len(hit) == 3
        assert ids[i, hit].tolist() == prompt[i, sorted(columns)].tolist(), i
