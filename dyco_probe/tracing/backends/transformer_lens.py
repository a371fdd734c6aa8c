"""Offline rows from a TransformerLens 4.3 `TransformerBridge`: `blocks.{l}.attn.hook_pattern`.

TransformerLens 4.3 supports two of the families we trace through its bridge
(`Qwen2_5_VLArchitectureAdapter`, `LlavaArchitectureAdapter`; attention runs in eager mode so the
pattern hook fires). It has no adapter for Qwen2-VL (`Qwen2VLForConditionalGeneration`): that raises
`NotImplementedError`; use the native, nnsight or eager backend there. Models built from a config
carry no `config.architectures`, which the bridge needs; it is filled in on the copy. Two things in its
boot path are in the way, and `boot_bridge` neutralises them for the duration of the boot only:

- the Qwen2.5-VL adapter lists `torchvision` in `required_libraries` and refuses to construct without
  it; torchvision is only needed by the HF image *processor*, which we never use (we feed pixel
  tensors), so the check is skipped for torchvision alone;
- `load_modality_processor` loads an `AutoProcessor` for multimodal models and, when that fails,
  calls `_ensure_torchvision()`, which runs `pip install torchvision`. We replace both with no-ops
  (the bridge gets no processor) and keep huggingface_hub offline while booting.

The bridge takes over the modules of the model it is booted on, so by default it is booted on a deep
copy (switched to eager attention); the caller's model is never touched. Booting from a local
directory loads the checkpoint there instead. The bridge also needs a tokenizer object although
token ids are passed directly: the given one (copied), one saved in the directory, or a word-level
stand-in with the model's vocabulary size.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os

import torch
from torch import Tensor

from . import head_mean

__all__ = ["boot_bridge", "rows", "torchvision_install_disabled"]


@contextlib.contextmanager
def torchvision_install_disabled():
    """While active, TransformerLens neither installs torchvision nor requires it, and the hub is offline."""
    import huggingface_hub.constants as hub_constants
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
    from transformer_lens.model_bridge.sources.transformers import helpers, source

    def check_without_torchvision(adapter) -> None:
        missing = [
            lib
            for lib in type(adapter).required_libraries
            if lib != "torchvision" and importlib.util.find_spec(lib) is None
        ]
        if missing:
            raise ImportError(f"{type(adapter).__name__} needs {', '.join(missing)}")

    saved = [
        (helpers, "_ensure_torchvision", helpers._ensure_torchvision),
        (helpers, "load_modality_processor", helpers.load_modality_processor),
        (source, "load_modality_processor", source.load_modality_processor),
        (
            ArchitectureAdapter,
            "_check_required_libraries",
            ArchitectureAdapter.__dict__["_check_required_libraries"],
        ),
        (hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE),
    ]
    env = os.environ.get("HF_HUB_OFFLINE")
    try:
        helpers._ensure_torchvision = lambda: False
        helpers.load_modality_processor = source.load_modality_processor = lambda *args, **kwargs: None
        ArchitectureAdapter._check_required_libraries = check_without_torchvision
        hub_constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env


def _bridge_tokenizer(tokenizer, vocab_size: int):
    if tokenizer is None:
        from ...testing import tiny_tokenizer

        tokenizer = tiny_tokenizer(vocab_size)
    else:
        tokenizer = copy.deepcopy(tokenizer)
    # TransformerLens re-loads a tokenizer by name unless it already adds BOS; ours never tokenizes.
    tokenizer.init_kwargs = {**tokenizer.init_kwargs, "name_or_path": "dyco_probe", "add_bos_token": True}
    return tokenizer


def _check_supported(architecture: str) -> None:
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    if architecture not in SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(
            f"TransformerLens has no TransformerBridge adapter for {architecture} (e.g. Qwen2-VL is not "
            "supported in 4.3; Qwen2.5-VL and LLaVA are); use the native, nnsight or eager backend"
        )


def boot_bridge(model_or_path, *, tokenizer=None, device: str | None = None):
    """A `TransformerBridge` for an instantiated model (booted on a deep copy) or a local checkpoint directory."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.utilities.attn_implementation import force_eager_attention

    with torchvision_install_disabled():
        if isinstance(model_or_path, (str, os.PathLike)):
            path = str(model_or_path)
            if tokenizer is None:
                with contextlib.suppress(Exception):
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(path)
            if tokenizer is None:
                from transformers import AutoConfig

                vocab = AutoConfig.from_pretrained(path).get_text_config().vocab_size
            else:
                vocab = len(tokenizer)
            return TransformerBridge.boot_transformers(
                path, tokenizer=_bridge_tokenizer(tokenizer, vocab), device=device or "cpu"
            )
        _check_supported(type(model_or_path).__name__)
        model = copy.deepcopy(model_or_path)
        force_eager_attention(model, per_layer=True)
        if not getattr(model.config, "architectures", None):  # unset on models built from a config
            model.config.architectures = [type(model).__name__]
        vocab = model.config.get_text_config().vocab_size
        device = device or str(next(model.parameters()).device)
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        return TransformerBridge.boot_transformers(
            name, hf_model=model, tokenizer=_bridge_tokenizer(tokenizer, vocab), device=device
        )


def rows(
    model, inputs: dict, *, layers, heads, query_columns: Tensor, bridge=None, tokenizer=None, **options
) -> Tensor:
    """Rows from the bridge's attention patterns; `bridge` reuses one booted with `boot_bridge`."""
    if options:
        raise TypeError(f"unexpected options for the transformer_lens backend: {sorted(options)}")
    bridge = boot_bridge(model, tokenizer=tokenizer) if bridge is None else bridge
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in layers}
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        _, cache = bridge.run_with_cache(inputs["input_ids"], names_filter=lambda n: n in names, **rest)
    out = []
    for layer in layers:
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        cols = query_columns.to(pattern.device)
        out.append(head_mean(pattern[:, :, cols].float(), heads))
    return torch.stack(out, dim=1)
