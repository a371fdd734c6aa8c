import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dyco_probe.spans import find_spans, image_token_id_of, spans_for_model
from dyco_probe.testing import TINY_TOKENS, tiny_batch, tiny_llava, tiny_qwen2_5_vl

IMG = TINY_TOKENS.image
PAD = TINY_TOKENS.pad


def ids(rows, length=None):
    """Left-pad python rows into (input_ids, attention_mask)."""
    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), PAD)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, length - len(r) :] = torch.tensor(r)
        mask[i, length - len(r) :] = 1
    return out, mask


def test_spans_are_per_sample_with_left_padding():
    input_ids, mask = ids([[9, IMG, IMG, 8, 7], [9, 9, 9, IMG, 8, 7, 7]])
    spans = find_spans(input_ids, mask, image_token_id=IMG)
    assert spans.prompt_length == 7
    assert spans.image[0].nonzero().flatten().tolist() == [3, 4]
    assert spans.image[1].nonzero().flatten().tolist() == [3]
    assert spans.last_image.tolist() == [4, 3]
    # query at the last prompt column: post_image is everything after the last image, incl. the query
    assert spans.text_mask(6)[0].nonzero().flatten().tolist() == [5, 6]
    assert spans.text_mask(6)[1].nonzero().flatten().tolist() == [4, 5, 6]
    # all_text: every non-image, non-padding column up to the query
    assert spans.text_mask(6, "all_text")[0].nonzero().flatten().tolist() == [2, 5, 6]
    assert spans.text_mask(6, "all_text")[1].nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6]
    # completion columns are text for everyone
    assert spans.text_mask(8)[0].nonzero().flatten().tolist() == [5, 6, 7, 8]
    assert spans.image_mask(9)[:, 7:].sum() == 0


def test_padding_never_counts_even_if_it_is_the_image_id():
    input_ids, mask = ids([[IMG, 8], [9, 9, IMG, 8]])
    input_ids[0, 0] = IMG  # a padding column holding the image id
    spans = find_spans(input_ids, mask, image_token_id=IMG)
    assert spans.image[0].nonzero().flatten().tolist() == [2]


def test_several_images_and_summary():
    input_ids, mask = ids([[9, IMG, IMG, 8, IMG, IMG, 7], [9, IMG, IMG, 7]])
    spans = find_spans(input_ids, mask, image_token_id=IMG, tokens_per_image=2)
    assert spans.num_images.tolist() == [2, 1]
    assert spans.text_mask(6)[0].nonzero().flatten().tolist() == [6]
    summary = spans.summary()
    assert summary[1] == {
        "prompt_length": 4,
        "num_images": 1,
        "num_image_tokens": 2,
        "first_image_token": 1,
        "last_image_token": 2,
        "image_token_counts": [2],
        "image_grids": [None],  # 2 tokens per image form no square grid
    }
    assert summary[0]["last_image_token"] == 5
    assert summary[0]["image_token_counts"] == [2, 2]


def test_images_without_grid_are_the_runs_of_image_tokens_with_grids_from_rotary_positions():
    """What `generate` passes a Qwen-VL forward: no `image_grid_thw`, but 3-D rotary positions."""
    model = tiny_qwen2_5_vl()
    batch = tiny_batch(model, 3, images_per_prompt=2)
    exact = spans_for_model(model, batch).summary()
    position_ids, _ = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    inputs = {k: v for k, v in batch.items() if k not in ("image_grid_thw", "pixel_values")}
    from_positions = spans_for_model(model, {**inputs, "position_ids": position_ids}).summary()
    runs_only = spans_for_model(model, inputs).summary()
    for a, b, c in zip(exact, from_positions, runs_only):
        assert a["num_images"] == b["num_images"] == c["num_images"] == 2
        assert a["image_token_counts"] == b["image_token_counts"] == c["image_token_counts"]
        assert a["image_grids"] == b["image_grids"] and all(g is not None for g in a["image_grids"])
        assert c["image_grids"] == [None, None]


def test_missing_image_error_and_warning_name_the_sample():
    input_ids, mask = ids([[9, IMG, 8], [9, 9, 8]])
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\]"):
        find_spans(input_ids, mask, image_token_id=IMG)
    with pytest.warns(UserWarning, match=r"\[1\]"):
        spans = find_spans(input_ids, mask, image_token_id=IMG, on_missing_image="warn")
    assert spans.has_image.tolist() == [True, False]
    # without an image the post_image span starts at the first column
    assert spans.text_mask(2)[1].tolist() == [True, True, True]


def test_grid_checks_name_the_sample():
    model = tiny_qwen2_5_vl()
    batch = tiny_batch(model, 3, images_per_prompt=2)
    spans = spans_for_model(model, batch)
    assert spans.num_images.tolist() == [2, 2, 2]
    assert spans.num_image_tokens.tolist() == [10, 10, 10]

    bad = dict(batch, image_grid_thw=batch["image_grid_thw"].clone())
    bad["image_grid_thw"][2] = torch.tensor([1, 4, 4])  # sample 1's first image: 4 tokens instead of 6
    with pytest.raises(ValueError, match="sample 1 has 10 image tokens"):
        spans_for_model(model, bad)

    bad = dict(batch, pixel_values=batch["pixel_values"][:-8])
    with pytest.raises(ValueError, match="sample 2: image_grid_thw needs .* pixel_values has"):
        spans_for_model(model, bad)

    bad = dict(batch, image_grid_thw=torch.cat([batch["image_grid_thw"], batch["image_grid_thw"][:1]]))
    with pytest.raises(ValueError, match="7 images but the prompts use only 6"):
        spans_for_model(model, bad)


def test_llava_tokens_per_image_checks():
    model = tiny_llava()
    batch = tiny_batch(model, 2, images_per_prompt=2)
    assert image_token_id_of(model) == IMG
    assert spans_for_model(model, batch).num_images.tolist() == [2, 2]
    with pytest.raises(ValueError, match="pixel_values has 3 images"):
        spans_for_model(model, dict(batch, pixel_values=batch["pixel_values"][:3]))
    cut = dict(batch)
    cut["input_ids"] = batch["input_ids"].clone()
    cut["input_ids"][1, (batch["input_ids"][1] == IMG).nonzero()[0]] = 9
    with pytest.raises(ValueError, match="sample 1 has 17 image tokens"):
        spans_for_model(model, cut)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from([IMG, 8, 9]), min_size=2, max_size=8).filter(
            lambda r: IMG in r and r[-1] != IMG
        ),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from(["post_image", "all_text"]),
    st.integers(0, 3),
)
def test_text_span_properties(rows, convention, extra):
    input_ids, mask = ids(rows)
    spans = find_spans(input_ids, mask, image_token_id=IMG)
    query = spans.prompt_length - 1 + extra
    text = spans.text_mask(query, convention)
    image = spans.image_mask(query + 1)
    valid = torch.cat([mask.bool(), torch.ones(len(rows), extra, dtype=torch.bool)], 1)
    assert not (text & image).any()  # disjoint
    assert not (text & ~valid).any()  # no padding
    assert text[:, query].all()  # the query itself is text
    # X(q-1) is X(q) without column q: the span grows by one column per step
    prev = spans.text_mask(query - 1, convention, num_keys=query + 1)
    assert torch.equal(prev, text & (torch.arange(query + 1) < query))
    if convention == "all_text":
        assert torch.equal(text | image, valid[:, : query + 1])
    else:  # post_image: exactly the columns after the last image
        for i, r in enumerate(rows):
            after = len(r) - 1 - max(j for j, x in enumerate(r) if x == IMG)
            assert int(text[i, : spans.prompt_length].sum()) == after
