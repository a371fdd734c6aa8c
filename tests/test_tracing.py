"""Online tracing during generate, offline tracing, and the docs/method.md#attention-signals, #modality-dynamics numbers they produce."""

import math

import pytest
import torch

from dyco_probe.testing import (
    TINY_TOKENS,
    tiny_batch,
    tiny_llava,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_tokenizer,
)
from dyco_probe.tracing import (
    SIGNAL_NAMES,
    OfflineTracer,
    Trace,
    TraceConfig,
    Tracer,
    trace_generate,
    trace_offline,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl()


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


def reference_trace(model, batch, completion, mask, *, layers, heads=None, text_span="post_image"):
    """docs/method.md#attention-signals, #modality-dynamics written out literally, sample by sample and token by token, from the full attention
    matrices of transformers' eager attention (float64 arithmetic, python loops)."""
    eager = model.config._attn_implementation
    text_config = model.config.get_text_config()
    saved = text_config._attn_implementation
    text_config._attn_implementation = "eager"
    try:
        ids = torch.cat([batch["input_ids"], completion], 1)
        am = torch.cat([batch["attention_mask"], mask.long()], 1)
        kw = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        if "mm_token_type_ids" in kw:
            kw["mm_token_type_ids"] = torch.cat([kw["mm_token_type_ids"], torch.zeros_like(completion)], 1)
        kw["position_ids"] = model._prepare_position_ids_for_generation(ids, dict(kw, attention_mask=am))
        with torch.no_grad():
            attn = model(input_ids=ids, attention_mask=am, output_attentions=True, **kw).attentions
    finally:
        text_config._attn_implementation = saved
    assert model.config._attn_implementation == eager
    b, length = batch["input_ids"].shape
    out = {k: torch.zeros(completion.shape, dtype=torch.float64) for k in SIGNAL_NAMES}

    def fr(p, q):
        bc = sum(math.sqrt(p.get(k, 0.0) * q.get(k, 0.0)) for k in set(p) | set(q))
        return 2 * math.acos(min(max(bc, 0.0), 1.0))

    def dist(row, cols):
        w = {c: max(row[c], 1e-12) for c in cols}
        s = sum(w.values())
        return {c: v / s for c, v in w.items()}

    for i in range(b):
        valid = [bool(batch["attention_mask"][i, c]) for c in range(length)]
        image = [c for c in range(length) if valid[c] and int(batch["input_ids"][i, c]) == TINY_TOKENS.image]

        def text_cols(q, valid=valid, image=image):
            if text_span == "post_image":
                return [c for c in range(max(image) + 1, q + 1) if c >= length or valid[c]]
            return [c for c in range(q + 1) if (c >= length or valid[c]) and c not in image]

        prev_vis = prev_txt = None
        for t in range(completion.shape[1]):
            q = length - 1 + t
            rows = []
            for layer in layers:
                a = attn[layer][i, :, q, : q + 1].double()
                a = a if heads is None else a[list(heads)]
                rows.append(a.mean(0))
            row = torch.stack(rows).mean(0).tolist()
            x_t = text_cols(q)
            r_vis, r_txt = sum(row[c] for c in image), sum(row[c] for c in x_t)
            out["r_vis"][i, t], out["r_txt"][i, t] = r_vis, r_txt
            out["r_vis_norm"][i, t] = r_vis / max(r_vis + r_txt, 1e-8)
            out["r_txt_norm"][i, t] = r_txt / max(r_vis + r_txt, 1e-8)
            p_vis, p_txt = dist(row, image), dist(row, x_t)
            if t > 0:
                out["v_vis"][i, t] = fr(prev_vis, p_vis)
                out["v_txt"][i, t] = fr(prev_txt, dist(row, text_cols(q - 1)))
            prev_vis, prev_txt = p_vis, p_txt
    return out


def assert_close_to_reference(trace, ref, atol=1e-4):
    for k in SIGNAL_NAMES:
        got = getattr(trace, k).double()[trace.mask]
        want = ref[k][trace.mask]
        assert torch.allclose(got, want, atol=atol), (k, (got - want).abs().max())


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_online_trace_matches_the_spec_written_out(family, qwen, llava):
    model = qwen if family == "qwen2_5_vl" else llava
    batch = tiny_batch(model, 3, images_per_prompt=2, seed=1)  # ragged: left padding
    assert (batch["attention_mask"] == 0).any()
    trace, completion = trace_generate(model, batch, max_new_tokens=6)
    ref = reference_trace(
        model, batch, completion, trace.mask, layers=[model.config.get_text_config().num_hidden_layers - 1]
    )
    assert_close_to_reference(trace, ref)
    assert trace.r_vis.shape == trace.mask.shape == completion.shape
    assert (trace.v_vis[:, 0] == 0).all() and (trace.v_txt[:, 0] == 0).all()
    # post_image + image cover everything the last query sees after the last image: ratios sum to <= 1
    assert (trace.r_vis + trace.r_txt <= 1 + 1e-6).all()


def test_options_layers_heads_all_text_per_layer(qwen):
    batch = tiny_batch(qwen, 2, images_per_prompt=1, seed=2)
    config = TraceConfig(layers=(0, -1), heads=(1, 2), text_span="all_text", per_layer=True)
    trace, completion = trace_generate(qwen, batch, max_new_tokens=5, config=config)
    assert trace.layers == (0, 3)
    ref = reference_trace(
        qwen, batch, completion, trace.mask, layers=[0, 3], heads=[1, 2], text_span="all_text"
    )
    assert_close_to_reference(trace, ref)
    # all_text: image and text together hold all the attention mass of the row
    total = (trace.r_vis + trace.r_txt)[trace.mask]
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    assert (trace.r_vis[~trace.mask] == 0).all()  # past a completion's end: 0, whatever the batch
    for j, layer in enumerate(trace.layers):
        one = reference_trace(
            qwen, batch, completion, trace.mask, layers=[layer], heads=[1, 2], text_span="all_text"
        )
        for k in SIGNAL_NAMES:
            assert torch.allclose(
                trace.per_layer[k][..., j].double()[trace.mask], one[k][trace.mask], atol=1e-4
            )
    # the ratios of the layer mean are the mean of the per-layer ratios (they are linear in the row)
    assert torch.allclose(trace.r_vis, trace.per_layer["r_vis"].mean(-1), atol=1e-6)


def test_sampled_generation_and_qwen2_vl():
    model = tiny_qwen2_vl(seed=3)
    batch = tiny_batch(model, 2, images_per_prompt=2, seed=3)
    torch.manual_seed(0)
    trace, completion = trace_generate(model, batch, max_new_tokens=5, do_sample=True, temperature=1.5)
    ref = reference_trace(model, batch, completion, trace.mask, layers=[3])
    assert_close_to_reference(trace, ref)


def test_offline_equals_online(qwen, llava):
    for model in (qwen, llava):
        batch = tiny_batch(model, 3, images_per_prompt=2, seed=4)
        config = TraceConfig(layers="all", per_layer=True, image_rows=True)
        online, completion = trace_generate(model, batch, max_new_tokens=6, config=config)
        offline = trace_offline(model, batch, completion, online.mask, config=config)
        assert torch.equal(online.token_ids, offline.token_ids)
        assert torch.equal(online.mask, offline.mask)
        for k in SIGNAL_NAMES:
            assert torch.allclose(
                getattr(online, k)[online.mask], getattr(offline, k)[online.mask], atol=1e-5
            )
            assert torch.allclose(
                online.per_layer[k][online.mask], offline.per_layer[k][online.mask], atol=1e-5
            )
        assert torch.allclose(online.image_rows[online.mask], offline.image_rows[online.mask], atol=1e-5)
        assert offline.metadata["mode"] == "offline" and online.metadata["mode"] == "online"


def _rows(inputs: dict, start: int, stop: int) -> dict:
    """Samples `start:stop` of a Qwen-VL forward's inputs (one image per sample, all the same size)."""
    n = inputs["image_grid_thw"].shape[0]
    per_image = inputs["pixel_values"].shape[0] // n
    out = {k: v[start:stop] for k, v in inputs.items() if k not in ("pixel_values", "position_ids")}
    out["pixel_values"] = inputs["pixel_values"][start * per_image : stop * per_image]
    out["position_ids"] = inputs["position_ids"][:, start:stop]
    return out


def test_offline_tracer_rides_along_a_training_forward(qwen):
    """Row chunks, train mode, gradient, backward: trace_offline's numbers, the output unchanged."""
    batch = tiny_batch(qwen, 4, images_per_prompt=1, question_lengths=[3, 7, 5, 9], seed=6)
    _, completion = trace_generate(qwen, batch, max_new_tokens=7)
    for config in (TraceConfig(layers="all", per_layer=True, image_rows=True), TraceConfig(layers=(1, 3))):
        want = trace_offline(qwen, batch, completion, config=config)
        tracer = OfflineTracer(qwen, batch, completion, config=config)
        with torch.no_grad():
            plain = qwen(**tracer.inputs).logits
        qwen.train()
        try:
            with tracer:
                chunks = ((0, 1), (1, 3), (3, 4))
                logits = torch.cat([qwen(**_rows(tracer.inputs, a, b)).logits for a, b in chunks])
                logits.sum().backward()
        finally:
            qwen.eval()
            qwen.zero_grad(set_to_none=True)
        torch.testing.assert_close(logits.detach(), plain, atol=1e-5, rtol=1e-5)
        got = tracer.trace()
        assert torch.equal(got.mask, want.mask) and got.metadata["mode"] == "offline"
        for k in SIGNAL_NAMES:
            torch.testing.assert_close(getattr(got, k), getattr(want, k), atol=1e-6, rtol=0)
            if config.per_layer:
                torch.testing.assert_close(got.per_layer[k], want.per_layer[k], atol=1e-6, rtol=0)
        if config.image_rows:
            torch.testing.assert_close(got.image_rows, want.image_rows, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="covered 0 of 4"):
        OfflineTracer(qwen, batch, completion).trace()
    with (
        pytest.raises(RuntimeError, match="no cache"),
        OfflineTracer(qwen, batch, completion),
        torch.no_grad(),
    ):
        qwen(**batch)  # the prompt alone: not prompt ++ completion


def test_tracing_does_not_change_generation(qwen):
    batch = tiny_batch(qwen, 3, images_per_prompt=2, seed=5)
    plain = qwen.generate(**batch, max_new_tokens=8, do_sample=False)
    _, completion = trace_generate(qwen, batch, max_new_tokens=8, config=TraceConfig(layers="all"))
    assert torch.equal(plain[:, batch["input_ids"].shape[1] :], completion)


def test_eos_mask_and_token_text():
    model = tiny_qwen2_5_vl()
    batch = tiny_batch(model, 3, images_per_prompt=2, seed=0)
    model.generation_config.eos_token_id = None
    plain = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1] :]
    eos = int(plain[0, 2])  # pretend sample 0's third token ends its completion
    trace, completion = trace_generate(
        model, batch, max_new_tokens=6, tokenizer=tiny_tokenizer(), eos_token_id=eos
    )
    first = (completion == eos).long().argmax(-1)
    for i in range(3):
        n = int(first[i]) + 1 if (completion[i] == eos).any() else completion.shape[1]
        assert trace.mask[i].tolist() == [t < n for t in range(completion.shape[1])]
    assert trace.mask[0].sum() <= 3 and not trace.mask[0, -1]
    assert trace.token_text[0][0] == f"t{int(completion[0, 0])}"
    assert trace.samples[0]["completion_length"] == int(trace.mask[0].sum())


def test_tracer_context_manager_and_finish(qwen):
    batch = tiny_batch(qwen, 2, seed=6)
    with Tracer(qwen, TraceConfig()) as tr:
        out = qwen.generate(**batch, max_new_tokens=4, do_sample=False)
    unfinished = tr.trace
    trace = tr.finish(out)
    assert torch.equal(trace.token_ids, out[:, batch["input_ids"].shape[1] :])
    assert (unfinished.token_ids[:, -1] == -1).all()
    assert torch.equal(unfinished.token_ids[:, :-1], trace.token_ids[:, :-1])
    assert torch.equal(unfinished.r_vis, trace.r_vis)
    with pytest.raises(RuntimeError, match="nothing traced"):
        with Tracer(qwen) as empty:
            pass
        empty.trace  # noqa: B018


def test_gqa_and_mha_agree_with_eager():
    for kv in (1, 4):
        model = tiny_qwen2_5_vl(num_kv_heads=kv, seed=7)
        batch = tiny_batch(model, 2, seed=7)
        trace, completion = trace_generate(model, batch, max_new_tokens=4)
        assert_close_to_reference(trace, reference_trace(model, batch, completion, trace.mask, layers=[3]))


def test_distance_option(qwen):
    batch = tiny_batch(qwen, 2, seed=8)
    fr, completion = trace_generate(qwen, batch, max_new_tokens=4)
    hel = trace_offline(qwen, batch, completion, fr.mask, config=TraceConfig(distance="hellinger"))
    assert torch.allclose(fr.r_vis, hel.r_vis, atol=1e-6)
    # Hellinger on the same distributions: 2·arccos(BC) vs sqrt(1 − BC), so H = sqrt(1 − cos(FR/2))
    assert torch.allclose(hel.v_vis, torch.sqrt((1 - torch.cos(fr.v_vis / 2)).clamp_min(0)), atol=1e-4)


def test_bad_inputs_name_the_sample(qwen):
    batch = tiny_batch(qwen, 3, seed=9)
    no_image = dict(batch)
    no_image["input_ids"] = batch["input_ids"].clone()
    no_image["input_ids"][1][no_image["input_ids"][1] == TINY_TOKENS.image] = 9
    no_image["mm_token_type_ids"] = (no_image["input_ids"] == TINY_TOKENS.image).long()
    no_image["image_grid_thw"] = batch["image_grid_thw"][[0, 2]]
    no_image["pixel_values"] = torch.cat([batch["pixel_values"][:24], batch["pixel_values"][48:]])
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] have no image tokens"):
        trace_generate(qwen, no_image, max_new_tokens=2)
    with pytest.warns(UserWarning, match=r"\[1\]"):
        trace, _ = trace_generate(
            qwen, no_image, max_new_tokens=3, config=TraceConfig(on_missing_image="warn")
        )
    assert (trace.r_vis[1] == 0).all() and (trace.v_vis[1] == 0).all() and (trace.r_vis[0] > 0).all()

    grid = dict(batch, image_grid_thw=batch["image_grid_thw"].flip(0).clone())
    grid["image_grid_thw"][0] = torch.tensor([1, 4, 8])
    with pytest.raises(ValueError, match="sample 0 has 6 image tokens"):
        trace_generate(qwen, grid, max_new_tokens=2)
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        trace_generate(qwen, {k: v for k, v in batch.items() if k != "mm_token_type_ids"}, max_new_tokens=2)

    completion = torch.full((3, 4), 20)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2] = False
    with pytest.raises(ValueError, match="sample 2 has an empty completion"):
        trace_offline(qwen, batch, completion, mask)
    with pytest.raises(ValueError, match="empty completion"):
        trace_offline(qwen, batch, completion[:, :0])


def test_empty_completions_name_the_sample(qwen):
    from dyco_probe.tracing.attention import attention_hooks

    batch = tiny_batch(qwen, 3, seed=9)
    completion, mask = torch.full((3, 4), 20), torch.ones(3, 4, dtype=torch.bool)
    mask[2] = False
    with pytest.raises(ValueError, match=r"sample 2 \(id 'q-2'\) has an empty completion"):
        trace_offline(qwen, batch, completion, mask, sample_ids=["q-0", "q-1", "q-2"])

    # Online, steps are shared by the batch: a generate that stops in its prefill, before the
    # traced attention, leaves every sample empty.
    def stop(call):
        raise RuntimeError("stopped in the prefill")

    with attention_hooks(qwen, stop), Tracer(qwen, sample_ids=["q-0", "q-1", "q-2"]) as tr:
        with pytest.raises(RuntimeError, match="stopped in the prefill"):
            qwen.generate(**batch, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match=r"sample 0 \(id 'q-0'\) has an empty completion.* 3 samples"):
        tr.trace  # noqa: B018
    tr.sample_ids = None
    with pytest.raises(ValueError, match=r"^sample 0 has an empty completion"):
        tr.finish(batch["input_ids"])


def test_nan_attention_names_the_sample(qwen):
    from dyco_probe.tracing.attention import attention_hooks

    batch = tiny_batch(qwen, 2, seed=10)

    def poison(call):  # corrupt sample 1's queries at the probed layer
        call.query[1] = float("nan")

    with attention_hooks(qwen, poison, layers=[3]):
        with pytest.raises(FloatingPointError, match="sample 1, token 0"):
            trace_generate(qwen, batch, max_new_tokens=2)


def test_trace_indexing_pandas_and_parquet_round_trip(qwen, tmp_path):
    batch = tiny_batch(qwen, 3, images_per_prompt=2, seed=11)
    config = TraceConfig(layers=(2, 3), per_layer=True, image_rows=True)
    trace, completion = trace_generate(
        qwen, batch, max_new_tokens=5, config=config, tokenizer=tiny_tokenizer(), sample_ids=["a", "b", "c"]
    )
    assert len(trace) == 3 and trace.r_vis.shape == (3, 5)
    record = trace[1, 2]
    assert record.token_id == int(completion[1, 2]) and record.r_vis == pytest.approx(
        float(trace.r_vis[1, 2])
    )
    assert record.per_layer[3]["v_txt"] == pytest.approx(float(trace.per_layer["v_txt"][1, 2, 1]))
    assert record.image_row.shape == (10,) and record.image_row.sum() == pytest.approx(record.r_vis, abs=1e-6)
    sample = trace[0]
    assert len(sample) == int(trace.mask[0].sum()) and sample.meta["sample_id"] == "a"
    assert torch.equal(sample.r_txt, trace.r_txt[0, : len(sample)])
    assert [r.t for r in sample] == list(range(len(sample)))
    assert trace[1:].batch_size == 2 and trace[[2]].samples[0]["sample_id"] == "c"

    frame = trace.to_pandas()
    assert len(frame) == 2 * int(trace.mask.sum()) and set(frame["layer"]) == {2, 3}
    flat = trace.to_pandas(per_layer=False)
    assert len(flat) == int(trace.mask.sum())
    assert flat["r_vis"].to_numpy() == pytest.approx(trace.r_vis[trace.mask].numpy())

    path = tmp_path / "trace.parquet"
    trace.save(path)
    back = Trace.load(path)
    for k in (*SIGNAL_NAMES, "token_ids", "mask", "image_rows", "image_rows_mask"):
        assert torch.equal(getattr(back, k), getattr(trace, k)), k
    for k in SIGNAL_NAMES:
        assert torch.equal(back.per_layer[k], trace.per_layer[k])
    assert back.token_text == trace.token_text and back.layers == trace.layers
    assert back.samples == trace.samples
    meta = back.metadata
    assert meta["settings"]["layers"] == [2, 3] and meta["versions"]["torch"] == torch.__version__
    assert {"transformers", "torch", "nnsight", "transformer-lens"} <= set(meta["versions"])
    assert meta["model_type"] == "qwen2_5_vl" and meta["backend"] == "native"
    # roles and scores can be recomputed from the saved trace
    assert torch.equal(back.roles(), trace.roles())
    assert torch.equal(back.score()["s"], trace.score()["s"])


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_online_trace_is_the_same_whatever_the_chunk(chunk, qwen, monkeypatch):
    """Online rows are buffered and processed `chunk` steps at a time; block boundaries (where the
    dynamics read the previous block's last distributions) must not change a number."""
    import dyco_probe.tracing.signals as signals

    batch = tiny_batch(qwen, 3, images_per_prompt=2, seed=1)
    config = TraceConfig(layers="all", per_layer=True, image_rows=True)
    whole, completion = trace_generate(qwen, batch, max_new_tokens=7, min_new_tokens=7, config=config)
    monkeypatch.setattr(signals, "DEFAULT_CHUNK", chunk)
    chunked, again = trace_generate(qwen, batch, max_new_tokens=7, min_new_tokens=7, config=config)
    assert torch.equal(completion, again)
    ref = reference_trace(qwen, batch, completion, chunked.mask, layers=[0, 1, 2, 3])
    assert_close_to_reference(chunked, ref)
    for k in SIGNAL_NAMES:
        assert torch.allclose(getattr(whole, k), getattr(chunked, k), atol=1e-6), k
        assert torch.allclose(whole.per_layer[k], chunked.per_layer[k], atol=1e-6), k
    assert torch.allclose(whole.image_rows, chunked.image_rows, atol=1e-6)
    offline = trace_offline(qwen, batch, completion, chunked.mask, config=config)
    for k in SIGNAL_NAMES:
        assert torch.allclose(getattr(offline, k)[chunked.mask], getattr(chunked, k)[chunked.mask], atol=1e-5)


def test_step_signals_rejects_a_row_of_the_wrong_length(qwen):
    from dyco_probe.spans import spans_for_model
    from dyco_probe.tracing.signals import StepSignals

    batch = tiny_batch(qwen, 2, images_per_prompt=1, seed=2)
    signals = StepSignals(spans_for_model(qwen, batch, image_token_id=TINY_TOKENS.image), chunk=4)
    length = batch["input_ids"].shape[1]
    signals.step(torch.rand(2, 1, length))
    with pytest.raises(RuntimeError, match="step 2: attention row has"):
        signals.step(torch.rand(2, 1, length + 3))
    with pytest.raises(RuntimeError, match="rows have"):
        signals.steps(torch.rand(2, 1, 3, length + 1))
