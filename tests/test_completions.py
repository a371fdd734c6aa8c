"""dyco_probe.completions: ids, the completion mask, the one sampler, teacher-forced inputs, log-probabilities."""

import pytest
import torch

from dyco_probe.api import trace
from dyco_probe.completions import (
    completion_logprobs,
    completion_mask,
    eos_token_ids,
    forward_inputs,
    packed_batch,
    pad_token_id,
    placeholder_ids,
    sample,
    teacher_forced_inputs,
    token_logprobs,
)
from dyco_probe.data import synthetic_examples
from dyco_probe.testing import TINY_TOKENS, mini_builtin, tiny_batch, tiny_qwen2_5_vl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl(seed=4)


@pytest.fixture(scope="module")
def batch(qwen):
    return tiny_batch(qwen, 3, images_per_prompt=2, seed=14)


def test_completion_mask_ends_at_the_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert completion_mask(ids, [2]).tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]
    assert completion_mask(ids, []).all() and completion_mask(ids[:, :0], [2]).shape == (3, 0)


def test_ids_come_from_the_configs_in_order(qwen):
    assert eos_token_ids(qwen) == [TINY_TOKENS.eos]
    assert eos_token_ids(qwen, eos_token_id=[9, 4, 9]) == [9, 4]  # given ids win, without repeats
    assert pad_token_id(qwen) == TINY_TOKENS.pad
    assert {TINY_TOKENS.image, TINY_TOKENS.vision_start, TINY_TOKENS.vision_end} <= set(placeholder_ids(qwen))


def test_greedy_sample_is_generate_without_placeholders(qwen, batch):
    out = sample(qwen, batch, max_new_tokens=10)
    plain = qwen.generate(**batch, max_new_tokens=10, do_sample=False)[:, batch["input_ids"].shape[1] :]
    assert torch.equal(out.ids, plain[:, : out.ids.shape[1]])
    assert torch.equal(out.mask, completion_mask(out.ids, [TINY_TOKENS.eos]))
    assert out.ids.shape[1] == int(out.mask.sum(-1).max())  # trimmed to the longest completion
    ended = (out.ids == TINY_TOKENS.eos).any(-1)
    assert torch.equal(out.truncated, ~ended)
    assert out.row(0) == out.ids[0][out.mask[0]].tolist()


def test_sampling_draws_from_the_full_distribution_and_never_a_placeholder(qwen, batch):
    """top-k 0: the sampler passes no top-k cut (nor the model's own), whatever generate's default."""
    seen = {}
    original = qwen.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    qwen.generate = spy
    try:
        torch.manual_seed(0)
        out = sample(qwen, batch, max_new_tokens=8, do_sample=True, temperature=1.3, num_return_sequences=2)
    finally:
        del qwen.generate
    assert seen["top_k"] == 0 and seen["temperature"] == 1.3 and seen["do_sample"]
    assert set(placeholder_ids(qwen)) <= set(seen["suppress_tokens"])
    assert out.ids.shape[0] == 6 and not torch.isin(out.ids, torch.tensor(placeholder_ids(qwen))).any()


def test_dp_trace_samples_with_the_rl_loops_rule():
    handle = mini_builtin()
    seen = {}
    original = handle.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    handle.model.generate = spy
    try:
        trace(handle, synthetic_examples("test", 2), max_new_tokens=4, do_sample=True, seed=0, progress=False)
    finally:
        del handle.model.generate
    assert seen["top_k"] == 0 and set(placeholder_ids(handle.model)) <= set(seen["suppress_tokens"])


def test_teacher_forced_logprobs_agree_across_the_two_layouts():
    """The generation layout (prompt left-padded, completion after it) and packed rows give the same
    log-probabilities of the same completion tokens."""
    handle = mini_builtin()
    examples = synthetic_examples("test", 3)
    images = [ex.load_images() for ex in examples]
    prompts = [handle.prompt(ex.question, len(ims)) for ex, ims in zip(examples, images)]
    tok = handle.tokenizer
    rows = [
        tok(ex.completion, add_special_tokens=False)["input_ids"][: 4 + k] for k, ex in enumerate(examples)
    ]
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    inputs = teacher_forced_inputs(handle.model, handle.encode(prompts, images), ids, mask)
    assert inputs["input_ids"].shape[1] == handle.encode(prompts, images)["input_ids"].shape[1] + 6
    assert "position_ids" in inputs  # Qwen's 3-D mRoPE, as generate makes them
    a = token_logprobs(handle.model, inputs, ids)
    with torch.no_grad():
        b, b_mask = completion_logprobs(handle.model, packed_batch(handle, prompts, images, rows))
    assert torch.equal(b_mask, mask[:, : b_mask.shape[1]])
    assert torch.allclose(a[mask], b[b_mask], atol=1e-4)


def test_forward_inputs_tells_a_prefill_from_a_decode_step():
    class Cache:
        def get_seq_length(self):
            return 7

    ids = torch.zeros(1, 3, dtype=torch.long)
    assert forward_inputs((ids,), {}) == (ids, None, 0)
    got = forward_inputs((), {"input_ids": ids, "attention_mask": "m", "past_key_values": Cache()})
    assert got[1] == "m" and got[2] == 7
