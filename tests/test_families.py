"""The newer families (Qwen3-VL, Gemma 3, InternVL, Idefics3, SmolVLM, LLaVA-OneVision, and the hybrid
Qwen3.5) on tiny random configs built from their own transformers config classes (GQA text decoders)
with their real processors: image spans, online tracing against eager attention, image knockout, the
other backends, Gemma 3's mask, Qwen3.5's linear-attention layers, and loading from a directory."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dyco_probe.interventions import Intervention, intervene
from dyco_probe.models.adapters import adapter_for
from dyco_probe.models.layouts import onevision_newline_flags
from dyco_probe.spans import image_positions, spans_for_model
from dyco_probe.testing_families import FAMILIES, HYBRID_FAMILIES, tiny_family
from dyco_probe.tracing import (
    SIGNAL_NAMES,
    TraceConfig,
    Tracer,
    attention_hooks,
    trace_generate,
    trace_offline,
)
from dyco_probe.tracing.attention import _text_decoder
from dyco_probe.tracing.backends import get_backend

torch.set_num_threads(1)

# Offline backends besides native and eager, per family (the rest raise NotImplementedError, saying why).
NNSIGHT = {"qwen3_vl", "internvl", "idefics3", "smolvlm", "llava_onevision"}  # not Gemma 3: its mask
# TL 4.3 has no InternVL or SmolVLM adapter; nnsight does not rebuild Qwen3.5's gated queries
TRANSFORMER_LENS = {"qwen3_vl", "gemma3", "idefics3", "llava_onevision", "qwen3_5"}
ALL = FAMILIES + HYBRID_FAMILIES
TOL = 1e-5


def picture(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def prompt_batch(handle):
    """Three prompts: one image, two images of other shapes, one image; ragged, so left-padded."""
    prompts = [
        handle.prompt("<image> circle 5 , square 4 . compute red + blue", 1),
        handle.prompt("<image> compute <image> green - red", 2),
        handle.prompt("<image> ring 3", 1),
    ]
    images = [[picture(112, 112, 0)], [picture(96, 64, 1), picture(60, 120, 2)], [picture(40, 90, 3)]]
    return dict(handle.encode(prompts, images))


def other_pixels(batch, seed=99):
    """The same batch with other pixels (padding tiles stay all-zero: Idefics3 drops those)."""
    pixels = batch["pixel_values"]
    noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed))
    return {**batch, "pixel_values": torch.where(pixels != 0, noise, pixels)}


def decoder_inputs(model, batch):
    """The text decoder's input embeddings (text embeddings with the vision features merged in)."""
    got = {}
    hook = _text_decoder(model).register_forward_pre_hook(
        lambda m, a, k: got.__setitem__("x", k["inputs_embeds"].detach().clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return got["x"]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def snapshot(model):
    return {
        "dicts": {name: set(m.__dict__) for name, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "attn": [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")],
    }


@pytest.fixture(scope="module", params=ALL)
def case(request):
    handle = tiny_family(request.param)
    batch = prompt_batch(handle)
    assert (batch["attention_mask"] == 0).any()  # left padding
    return request.param, handle, batch


# -- image spans ------------------------------------------------------------------------------------


def test_image_span_is_exactly_the_columns_whose_input_depends_on_the_pixels(case):
    """Markers, tile separators, row/column tags and LLaVA-OneVision's row ends are not image."""
    family, handle, batch = case
    model = handle.model
    spans = spans_for_model(model, batch)
    moved = (decoder_inputs(model, batch) - decoder_inputs(model, other_pixels(batch))).abs().amax(-1) > 0
    assert torch.equal(spans.image, moved)
    assert (spans.num_image_tokens > 0).all()
    placeholders = (batch["input_ids"] == handle.image_token_id) & spans.valid
    row_ends = placeholders & ~spans.image
    assert bool(row_ends.any()) == (family == "llava_onevision")
    # interventions and patching find the same image columns
    assert torch.equal(image_positions(model, batch) & spans.valid, spans.image)
    if family in ("qwen3_vl", "qwen3_5", "gemma3", "llava_onevision"):  # inputs say how many images
        assert spans.num_images.tolist() == [1, 2, 1]
    texts = [handle.tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
    markers = {"<fake_token_around_image>", "<row_1_col_1>", "<global-img>", "<img>", "</img>"}
    markers |= {"<start_of_image>", "<end_of_image>", "<|vision_start|>", "<|vision_end|>"}
    for i, row in enumerate(texts):
        for j, tok in enumerate(row):
            if tok in markers:
                assert not spans.image[i, j] and spans.text_mask(j, "all_text")[i, j]


def test_onevision_row_ends_agree_from_image_sizes_and_from_encoded_features():
    """`generate` encodes the images before its prefill: the row ends are then read off the features."""
    handle = tiny_family("llava_onevision")
    batch = prompt_batch(handle)
    core = handle.model.model
    with torch.no_grad():
        encoded = core.get_image_features(
            batch["pixel_values"],
            batch["image_sizes"],
            batch_num_images=batch["batch_num_images"],
            return_dict=True,
        )
    from_sizes = onevision_newline_flags(handle.model, batch)
    from_features = onevision_newline_flags(handle.model, {"mm_encoder_outputs": {"image": encoded}})
    assert [f.tolist() for f in from_sizes] == [f.tolist() for f in from_features]
    assert sum(int(f.sum()) for f in from_sizes) > 3  # single images: rows of crops; multi-image: one each
    with pytest.raises(ValueError, match="image_sizes"):
        spans_for_model(
            handle.model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        )


# -- tracing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [None, "all"], ids=["last_layer", "all_layers"])
def test_online_trace_equals_eager_recomputation(case, layers):
    family, handle, batch = case
    model = handle.model
    config = TraceConfig(layers=layers, per_layer=True, image_rows=True)
    plain = model.generate(**batch, max_new_tokens=8, do_sample=False)
    online, completion = trace_generate(model, batch, config=config, max_new_tokens=8)
    assert torch.equal(completion, plain[:, batch["input_ids"].shape[1] :])  # tracing changes nothing
    offline = trace_offline(model, batch, completion, online.mask, config=config, backend="eager")
    mask = online.mask
    for k in SIGNAL_NAMES:
        assert float((getattr(offline, k) - getattr(online, k))[mask].abs().max()) < TOL, k
        assert float((offline.per_layer[k] - online.per_layer[k])[mask].abs().max()) < TOL, k
    assert float((offline.image_rows - online.image_rows)[mask].abs().max()) < TOL
    if family == "gemma3" and layers is None:  # a local last layer: the images leave its window
        assert (online.r_vis[mask] > 0).any() and (online.r_vis[mask] == 0).any()
    else:
        assert (online.r_vis[mask] > 0).all()


@pytest.mark.parametrize("backend", ["native", "nnsight", "transformer_lens"])
def test_other_backends_agree_where_they_support_the_family(case, backend):
    family, handle, batch = case
    model = handle.model
    config = TraceConfig(layers="all", per_layer=True)
    online, completion = trace_generate(model, batch, config=config, max_new_tokens=5)
    supported = (
        backend == "native" or family in {"nnsight": NNSIGHT, "transformer_lens": TRANSFORMER_LENS}[backend]
    )
    options = {"tokenizer": handle.tokenizer} if backend == "transformer_lens" else {}
    before = snapshot(model)
    if not supported:
        with pytest.raises(NotImplementedError):
            trace_offline(model, batch, completion, online.mask, config=config, backend=backend, **options)
        return
    offline = trace_offline(model, batch, completion, online.mask, config=config, backend=backend, **options)
    assert snapshot(model) == before
    for k in SIGNAL_NAMES:
        assert float((offline.per_layer[k] - online.per_layer[k])[online.mask].abs().max()) < TOL, k


# -- knockout ---------------------------------------------------------------------------------------


def test_image_knockout_at_every_layer_makes_the_output_independent_of_the_pixels(case):
    family, handle, batch = case
    model = handle.model
    other = other_pixels(batch)
    text = spans_for_model(model, batch).valid & ~image_positions(model, batch)
    base = logits(model, batch)
    before = snapshot(model)
    assert not torch.allclose(base[text], logits(model, other)[text], atol=1e-4)  # the pixels matter...
    with intervene(model, Intervention.knockout("image")) as log:
        a, b = logits(model, batch), logits(model, other)
        ga = model.generate(**batch, max_new_tokens=6, do_sample=False)
        gb = model.generate(**other, max_new_tokens=6, do_sample=False)
    assert log.calls > 0
    if family in HYBRID_FAMILIES:  # Qwen3.5's linear-attention layers carry the image on: no knockout there
        assert not torch.allclose(a[text], b[text], atol=1e-4)
    else:
        assert torch.equal(a[text], b[text])  # ...and not at all once no query can see an image key
        assert torch.equal(ga, gb)
    assert snapshot(model) == before  # unpatched afterwards
    assert torch.equal(logits(model, batch), base)


def test_qwen3_5_linear_attention_layers_cannot_be_traced_or_biased():
    from dyco_probe.tracing.attention import attention_layers, linear_attention_layers

    handle = tiny_family("qwen3_5")
    model, batch = handle.model, prompt_batch(handle)
    assert attention_layers(model) == (1, 3) and linear_attention_layers(model) == (0, 2)
    message = (
        r"layer\(s\) \[0\] of Qwen3_5ForConditionalGeneration use linear attention .*layers are \[1, 3\]"
    )
    with pytest.raises(ValueError, match=message):
        trace_generate(model, batch, config=TraceConfig(layers=(0, 1)), max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        with intervene(model, Intervention.knockout("image", layers=[0])):
            pass
    with pytest.raises(ValueError, match=message):
        trace_offline(model, batch, torch.ones(3, 1, dtype=torch.long), config=TraceConfig(layers=(-4,)))
    trace, _ = trace_generate(model, batch, config=TraceConfig(layers="all"), max_new_tokens=2)
    assert tuple(trace.layers) == (1, 3)  # "all": the softmax-attention layers


# -- Gemma 3: bidirectional image blocks and sliding windows -----------------------------------------


@pytest.fixture(scope="module")
def gemma():
    handle = tiny_family("gemma3")
    return handle, prompt_batch(handle)


def test_gemma3_mask_is_the_models_own(gemma):
    """Logits with the dyco_probe attention function active equal sdpa's: passed through (tracing),
    and recomputed explicitly with the tracer's mask on every row of every layer (a zero bias)."""
    handle, batch = gemma
    model = handle.model
    text = model.config.get_text_config()
    assert text._attn_implementation == "sdpa"
    assert set(text.layer_types) == {"sliding_attention", "full_attention"}
    assert batch["input_ids"].shape[1] > text.sliding_window  # the windows cut
    base = logits(model, batch)
    seen = []

    def observe(call):
        call.request_probs(torch.arange(call.num_queries), seen.append)

    with attention_hooks(model, observe):
        assert torch.equal(logits(model, batch), base)
    assert len(seen) == text.num_hidden_layers

    def zero(call):
        call.add_logit_bias(torch.zeros(1))

    with attention_hooks(model, zero):
        explicit = logits(model, batch)
        tokens = model.generate(**batch, max_new_tokens=10, do_sample=False)  # decode past the window
    valid = batch["attention_mask"].bool()
    assert float((explicit - base)[valid].abs().max()) < TOL
    assert torch.equal(tokens, model.generate(**batch, max_new_tokens=10, do_sample=False))


def test_gemma3_rows_of_every_query_match_eager_attention(gemma):
    """Every query row of every layer: image tokens see later tokens of their own image, local layers
    see only their window."""
    handle, batch = gemma
    model = handle.model
    length = batch["input_ids"].shape[1]
    window = model.config.get_text_config().sliding_window
    kwargs = dict(layers=(0, 1, 2, 3), heads=None, query_columns=torch.arange(length))
    ref = get_backend("eager")(model, batch, **kwargs)
    rows = get_backend("native")(model, batch, **kwargs)
    valid = batch["attention_mask"].bool()
    assert float((rows - ref).abs()[valid[:, None, :, None].expand_as(rows)].max()) < TOL
    image = spans_for_model(model, batch).image
    i, q = (int(x) for x in image.nonzero()[0])  # the first image token of a sample
    assert (rows[i, :, q, q + 1] > 0).all()  # sees the next image token: bidirectional
    layer_types = model.config.get_text_config().layer_types
    last = length - 1
    far = torch.arange(length) <= last - window
    for layer, kind in enumerate(layer_types):
        beyond = rows[:, layer, last][:, far & valid.all(0)]
        assert (beyond == 0).all() if kind == "sliding_attention" else (beyond > 0).any()


# -- loading ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL)
def test_load_from_a_saved_tiny_checkpoint(family, tmp_path, monkeypatch):
    import dyco_probe as dp
    from dyco_probe.testing import save_tiny_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = save_tiny_checkpoint(family, tmp_path / family)
    handle = dp.load(path)
    assert handle.adapter.name == family and not handle.model.training
    assert getattr(handle.processor, "video_processor", None) is None  # image-only, no torchvision
    assert type(handle.processor.image_processor).__name__.endswith("Pil")
    ref = tiny_family(family)
    a, b = prompt_batch(handle), prompt_batch(ref)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert torch.allclose(logits(handle.model, a), logits(ref.model, b), atol=1e-6)
    examples = dp.synthetic_examples("test", 2)
    result = dp.evaluate(handle, examples, max_new_tokens=4, progress=False, batch_size=2)
    assert result.n == 2


def test_unsupported_architecture_lists_every_family(tmp_path):
    import dyco_probe as dp

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError) as err:
        dp.load(tmp_path)
    for model_type in ("qwen2_5_vl", "qwen2_vl", "llava", *ALL):
        assert model_type in str(err.value)
        assert adapter_for(model_type).name == model_type


def test_tracer_during_generate_sees_every_family_column_layout(case):
    """A `Tracer` opened around a plain `generate` (as the RL loop does: no spans given up front)
    finds the same spans as `trace_generate`."""
    _, handle, batch = case
    with Tracer(handle.model, TraceConfig(image_rows=True)) as tracer:
        out = handle.model.generate(**batch, max_new_tokens=4, do_sample=False)
    online, _ = trace_generate(handle.model, batch, config=TraceConfig(image_rows=True), max_new_tokens=4)
    trace = tracer.finish(out)
    assert [s["num_image_tokens"] for s in trace.samples] == [s["num_image_tokens"] for s in online.samples]
    assert torch.allclose(trace.r_vis, online.r_vis, atol=1e-6)
