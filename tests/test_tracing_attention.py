"""The attention function: clean attach/detach, and the hook contract interventions build on."""

import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from dyco_probe.testing import TINY_TOKENS, tiny_batch, tiny_qwen2_5_vl
from dyco_probe.tracing import TraceConfig, Tracer, attention_hooks, trace_generate

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl(seed=4)


@pytest.fixture(scope="module")
def batch(model):
    return tiny_batch(model, 3, images_per_prompt=2, seed=14)


def state(model):
    return {
        "attn": [
            (n, m.config._attn_implementation) for n, m in model.named_modules() if hasattr(m, "config")
        ],
        "registry": (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)),
        "dicts": {n: set(m.__dict__) for n, m in model.named_modules()},
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
    }


def run(model, batch):
    with torch.no_grad():
        logits = model(**batch).logits
    tokens = model.generate(**batch, max_new_tokens=5, do_sample=False)
    return logits, tokens


def test_tracer_detaches_cleanly(model, batch):
    before_state, (logits, tokens) = state(model), run(model, batch)
    with Tracer(model, TraceConfig(layers="all", per_layer=True)) as tr:
        assert model.config.get_text_config()._attn_implementation.startswith("dyco_probe")
        assert model.config.vision_config._attn_implementation == "sdpa"  # the vision tower is left alone
        inside = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert tr.finish(inside).r_vis.shape == (3, 5)
    assert torch.equal(inside, tokens)
    after_logits, after_tokens = run(model, batch)
    assert torch.equal(after_logits, logits) and torch.equal(after_tokens, tokens)
    assert state(model) == before_state

    with pytest.raises(KeyError):  # an exception inside the block detaches too
        with Tracer(model):
            raise KeyError("boom")
    assert state(model) == before_state


def test_request_probs_rows_are_softmax_rows(model, batch):
    got = {}
    with attention_hooks(
        model, lambda call: call.request_probs([0, -1], got.setdefault("p", []).append), layers=[2]
    ):
        with torch.no_grad():
            model(**batch)
    (probs,) = got["p"]
    b, h, r, k = probs.shape
    assert (b, h, r) == (3, 4, 2) and k == batch["input_ids"].shape[1]
    assert torch.allclose(probs[:, :, 1].sum(-1), torch.ones(b, h))
    padding = batch["attention_mask"] == 0
    assert (probs[:, :, 1][padding[:, None].expand(b, h, k)] == 0).all()  # padding keys: exactly zero


def test_zero_bias_is_a_no_op(model, batch):
    logits, tokens = run(model, batch)
    valid = batch["attention_mask"].bool()
    for rows in (None, [-1], [0, 2, -1]):

        def zero(call, rows=rows):  # decode steps have a single query row
            call.add_logit_bias(torch.zeros(1), rows=rows if rows is None or call.num_queries > 2 else [-1])

        with attention_hooks(model, zero):
            biased_logits, biased_tokens = run(model, batch)
        # fully masked (padding) query rows are the only ones whose output may differ
        assert torch.allclose(biased_logits[valid], logits[valid], atol=1e-5), rows
        assert torch.equal(biased_tokens, tokens), rows


def test_knockout_of_image_keys_makes_output_independent_of_pixels(model, batch):
    """docs/method.md#interventions: image keys knocked out for every query at every layer -> output ignores the pixels."""

    def knockout(call):
        image = batch["input_ids"] == TINY_TOKENS.image
        bias = torch.zeros(image.shape[0], 1, 1, call.num_keys)
        bias[..., : image.shape[1]] = torch.where(image, float("-inf"), 0.0)[:, None, None]
        call.add_logit_bias(bias)

    other = dict(batch, pixel_values=torch.randn_like(batch["pixel_values"]))
    text = batch["attention_mask"].bool() & (batch["input_ids"] != TINY_TOKENS.image)
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits[text], model(**other).logits[text], atol=1e-3)
        with attention_hooks(model, knockout):
            a, b = model(**batch).logits, model(**other).logits
    assert torch.allclose(a[text], b[text], atol=1e-6)
    with attention_hooks(model, knockout), Tracer(model) as tr:  # a tracer inside sees the knocked-out rows
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert (tr.trace.r_vis.abs() < 1e-7).all()


def test_log_lambda_scales_the_share(model, batch):
    """Adding log λ to keys with share p gives them λp / (λp + 1 − p), per head, at that layer."""
    image = (batch["input_ids"] == TINY_TOKENS.image).float()
    lam, head = 3.0, 1
    seen = {}

    def observe(name):
        def hook(call):
            call.request_probs([-1], lambda p: seen.__setitem__(name, p[:, :, 0]))

        return hook

    def scale(call):
        bias = torch.zeros(1, call.num_heads, 1, call.num_keys)
        bias[:, head] = math.log(lam)
        call.add_logit_bias(bias * image[:, None, None, :], rows=[-1])
        call.request_probs([-1], lambda p: seen.__setitem__("scaled", p[:, :, 0]))

    with torch.no_grad():
        with attention_hooks(model, observe("plain"), layers=[3]):
            model(**batch)
        with attention_hooks(model, scale, layers=[3]):
            out = model(**batch).logits
    p = (seen["plain"] * image[:, None]).sum(-1)
    q = (seen["scaled"] * image[:, None]).sum(-1)
    expected = lam * p / (lam * p + 1 - p)
    assert torch.allclose(q[:, head], expected[:, head], atol=1e-6)
    others = [h for h in range(4) if h != head]
    assert torch.allclose(seen["scaled"][:, others], seen["plain"][:, others], atol=1e-7)
    # only the biased row changes: the other query rows are the base implementation's, bit for bit
    with torch.no_grad():
        plain = model(**batch).logits
    assert torch.equal(out[:, :-1], plain[:, :-1]) and not torch.allclose(out[:, -1], plain[:, -1])


def test_hook_sees_the_call(model, batch):
    calls = []
    with attention_hooks(model, calls.append, layers=[0]):
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    prefill, step = calls[0], calls[1]
    length = batch["input_ids"].shape[1]
    assert prefill.layer_idx == 0 and prefill.num_queries == length and prefill.num_keys == length
    assert prefill.query_columns.tolist() == list(range(length))
    assert step.num_queries == 1 and step.query_columns.tolist() == [length]
    assert prefill.key.shape[1] == 2 and prefill.query.shape[1] == 4  # GQA: 2 KV heads for 4 query heads
    assert len(calls) == 3  # 3 forwards x 1 hooked layer


def test_trace_generate_is_unchanged_by_an_outer_zero_bias(model, batch):
    plain, completion = trace_generate(model, batch, max_new_tokens=4)
    with attention_hooks(model, lambda call: call.add_logit_bias(torch.zeros(1), rows=[-1])):
        inner, same = trace_generate(model, batch, max_new_tokens=4)
    assert torch.equal(same, completion)
    assert torch.allclose(inner.r_vis, plain.r_vis, atol=1e-6) and torch.allclose(
        inner.v_txt, plain.v_txt, atol=1e-5
    )


def test_logits_and_output_edits(model, batch):
    seen = {}

    def hook(call):
        seen["logits"] = call.logits([-1])
        call.request_probs([-1], lambda p: seen.__setitem__("probs", p))

    with torch.no_grad(), attention_hooks(model, hook, layers=[1]):
        model(**batch)
    assert torch.allclose(torch.softmax(seen["logits"], -1), seen["probs"], atol=1e-7)

    with torch.no_grad():
        plain = model(**batch).logits
        with attention_hooks(model, lambda call: call.edit_output(lambda out: out), layers=[1]):
            same = model(**batch).logits
        assert torch.equal(same, plain)

        def zero_head_last_row(out):  # [B, Q, H, D]: patch head 2 of the last query row
            out = out.clone()
            out[:, -1, 2] = 0
            return out

        with attention_hooks(model, lambda call: call.edit_output(zero_head_last_row), layers=[3]):
            patched = model(**batch).logits
    assert torch.equal(patched[:, :-1], plain[:, :-1]) and not torch.allclose(patched[:, -1], plain[:, -1])


def test_an_eager_model_traces_like_an_sdpa_one(batch):
    sdpa, eager = tiny_qwen2_5_vl(seed=4), tiny_qwen2_5_vl(seed=4, attn_implementation="eager")
    a, completion = trace_generate(sdpa, batch, max_new_tokens=4, config=TraceConfig(layers="all"))
    b, same = trace_generate(eager, batch, max_new_tokens=4, config=TraceConfig(layers="all"))
    assert torch.equal(completion, same)
    assert torch.allclose(a.r_vis, b.r_vis, atol=1e-5) and torch.allclose(a.v_txt, b.v_txt, atol=1e-5)
    assert eager.config.get_text_config()._attn_implementation == "eager"
