import json

import pytest
import torch

from dyco_probe.data import synthetic_examples
from dyco_probe.evaluation import evaluate
from dyco_probe.models.adapters import adapter_for, split_image_tags
from dyco_probe.models.loading import CheckpointError, load
from dyco_probe.testing import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {fam: save_tiny_checkpoint(fam, root / fam) for fam in ("qwen2_5_vl", "qwen2_vl", "llava")}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "llava"])
def test_each_family_loads_from_a_local_directory_and_generates(checkpoints, family, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    handle = load(checkpoints[family])
    assert handle.adapter.name == family
    assert not handle.model.training
    examples = synthetic_examples("test", 3)
    res = evaluate(handle, examples, max_new_tokens=4, progress=False, batch_size=2)
    assert res.n == 3 and len(res.generations) == 3
    assert all(1 <= len(g.completion_ids) <= 4 for g in res.generations)
    # the prompt carries one image placeholder per image
    batch = handle.encode([handle.prompt(examples[0].question, 1)], [examples[0].load_images()])
    assert int((batch["input_ids"] == handle.image_token_id).sum()) > 0
    if family != "llava":
        assert "mm_token_type_ids" in batch


def test_left_padding_gives_the_same_greedy_completion_as_alone(checkpoints):
    handle = load(checkpoints["qwen2_5_vl"])
    examples = synthetic_examples("test", 3)
    together = evaluate(handle, examples, max_new_tokens=6, progress=False, batch_size=3).generations
    alone = [evaluate(handle, [ex], max_new_tokens=6, progress=False).generations[0] for ex in examples]
    assert [g.completion_ids for g in together] == [g.completion_ids for g in alone]


def test_dtype_option(checkpoints):
    handle = load(checkpoints["qwen2_5_vl"], dtype="bfloat16")
    assert next(handle.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load(checkpoints["qwen2_5_vl"], dtype="float8")


def test_unsupported_architecture_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError) as err:
        load(tmp_path)
    for name in ("qwen2_5_vl", "qwen2_vl", "llava"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="unsupported architecture"):
        adapter_for("gpt2")


def test_missing_and_corrupt_checkpoints(tmp_path, checkpoints):
    with pytest.raises(CheckpointError, match="not a local checkpoint directory"):
        load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="never downloads"):
        load("Qwen/Qwen2.5-VL-3B-Instruct")
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["qwen2_5_vl"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="could not load"):
        load(broken)


def test_image_tags():
    assert split_image_tags("<image> a <image>b") == [None, "a", None, "b"]
    adapter = adapter_for("qwen2_5_vl")
    msgs = adapter.messages("no tag here", n_images=2)
    assert [c["type"] for c in msgs[0]["content"]] == ["image", "image", "text"]
    with pytest.raises(ValueError, match="2 <image> tags but 1 images"):
        adapter.messages("<image> <image> q", n_images=1)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_generation_never_emits_image_placeholders(checkpoints, family):
    """A loaded checkpoint forgets the suppressed ids a model was built with; sampled completions must
    still never hold an image placeholder, which the teacher-forced forward would read as an image."""
    from dyco_probe.completions import placeholder_ids
    from dyco_probe.generation import generate

    handle = load(checkpoints[family])
    assert handle.image_token_id in placeholder_ids(handle.model)
    with torch.no_grad():  # make the placeholder the likeliest token everywhere
        handle.model.lm_head.weight[handle.image_token_id] = handle.model.lm_head.weight.abs().max() * 50
    gens = generate(
        handle,
        synthetic_examples("test", 2),
        max_new_tokens=6,
        do_sample=True,
        num_samples=2,
        seed=0,
        progress=False,
    )
    ids = [t for g in gens for t in g.completion_ids]
    assert ids and handle.image_token_id not in ids
