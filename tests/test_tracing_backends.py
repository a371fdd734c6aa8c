"""The offline backends (native, HF eager, nnsight, TransformerLens) agree, and leave the model alone."""

import pytest
import torch

from dyco_probe.testing import tiny_batch, tiny_llava, tiny_qwen2_5_vl
from dyco_probe.tracing import SIGNAL_NAMES, TraceConfig, trace_generate, trace_offline
from dyco_probe.tracing.backends import get_backend
from dyco_probe.tracing.backends.transformer_lens import boot_bridge

torch.set_num_threads(1)

CONFIG = TraceConfig(layers=(1, 3), heads=(0, 3), per_layer=True, image_rows=True)


def snapshot(model):
    """Everything a backend could leave behind on a model."""
    return {
        "dicts": {name: set(m.__dict__) for name, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "attn": [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_same_model(before, after):
    assert before["dicts"] == after["dicts"]
    assert before["hooks"] == after["hooks"]
    assert before["attn"] == after["attn"]
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava"])
def case(request):
    model = tiny_qwen2_5_vl(seed=1) if request.param == "qwen2_5_vl" else tiny_llava(seed=1)
    batch = tiny_batch(model, 3, images_per_prompt=2, seed=12)  # ragged prompts: left padding
    assert (batch["attention_mask"] == 0).any()
    online, completion = trace_generate(model, batch, max_new_tokens=6, config=CONFIG)
    return model, batch, online, completion


@pytest.mark.parametrize("backend", ["native", "eager", "nnsight", "transformer_lens"])
def test_backends_agree_with_online_tracing(case, backend):
    model, batch, online, completion = case
    before = snapshot(model)
    offline = trace_offline(model, batch, completion, online.mask, config=CONFIG, backend=backend)
    assert_same_model(before, snapshot(model))
    mask = online.mask
    for k in SIGNAL_NAMES:
        assert torch.allclose(getattr(offline, k)[mask], getattr(online, k)[mask], atol=1e-5), k
        assert torch.allclose(offline.per_layer[k][mask], online.per_layer[k][mask], atol=1e-5), k
    assert torch.allclose(offline.image_rows[mask], online.image_rows[mask], atol=1e-5)
    assert offline.metadata["backend"] == backend


def test_backend_rows_agree_over_every_query(case):
    """Not only the traced rows: every query row of every layer, against HF eager."""
    model, batch, _, _ = case
    length = batch["input_ids"].shape[1]
    inputs = dict(batch)
    inputs["position_ids"] = model._prepare_position_ids_for_generation(batch["input_ids"], dict(batch))
    kwargs = dict(layers=(0, 1, 2, 3), heads=None, query_columns=torch.arange(length))
    ref = get_backend("eager")(model, inputs, **kwargs)
    valid = batch["attention_mask"].bool()
    for name in ("native", "nnsight", "transformer_lens"):
        rows = get_backend(name)(model, inputs, **kwargs)
        assert rows.shape == ref.shape
        diff = (rows - ref).abs()[valid[:, None, :, None].expand_as(rows)]
        assert float(diff.max()) < 1e-5, name


def test_transformer_lens_boots_from_a_directory_without_torchvision(tmp_path):
    import importlib.util

    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
    from transformer_lens.model_bridge.sources.transformers import helpers

    assert importlib.util.find_spec("torchvision") is None
    ensure, check = helpers._ensure_torchvision, ArchitectureAdapter.__dict__["_check_required_libraries"]
    model = tiny_qwen2_5_vl(seed=2)
    model.save_pretrained(tmp_path)
    bridge = boot_bridge(tmp_path)
    # the patches are gone after the boot
    assert helpers._ensure_torchvision is ensure
    assert ArchitectureAdapter.__dict__["_check_required_libraries"] is check
    batch = tiny_batch(model, 2, seed=13)
    online, completion = trace_generate(model, batch, max_new_tokens=4)
    offline = trace_offline(model, batch, completion, online.mask, backend="transformer_lens", bridge=bridge)
    for k in SIGNAL_NAMES:
        assert torch.allclose(getattr(offline, k)[online.mask], getattr(online, k)[online.mask], atol=1e-5), k


def test_transformer_lens_refuses_qwen2_vl_clearly():
    from dyco_probe.testing import tiny_qwen2_vl

    with pytest.raises(NotImplementedError, match="Qwen2VLForConditionalGeneration"):
        boot_bridge(tiny_qwen2_vl())
