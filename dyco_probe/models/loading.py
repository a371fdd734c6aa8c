"""Loading models from local directories (never the network) into one handle: model, processor and
family adapter."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dyco_probe.models.adapters import FamilyAdapter, adapter_for
from dyco_probe.models.builtin import BUILTIN_DIR


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or corrupt."""


@dataclass
class ModelHandle:
    """A loaded vision-language model with everything dyco_probe needs to drive it.

    Attributes:
        model: the ``transformers`` model, in eval mode.
        processor: its processor (tokenizer + image processor; image-only where the stock one needs
            torchvision or num2words for video).
        adapter: the family adapter (prompt format, image token).
        source: ``"builtin"`` or the checkpoint path.
    """

    model: object
    processor: object
    adapter: FamilyAdapter
    source: str
    info: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_token_id(self) -> int:
        return self.adapter.image_token_id(self.model)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return int(self.adapter.text_config(self.model).num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.adapter.text_config(self.model).num_attention_heads)

    def prompt(self, question: str, n_images: int | None = None) -> str:
        """The chat-formatted prompt for one question (``<image>`` tags mark image positions)."""
        return self.adapter.prompt(self.processor, question, n_images)

    def encode(self, prompts: list[str], images: list[list], completions: list[str] | None = None):
        """Encode a batch of prompts (and optionally completions appended to them) with their images,
        left-padded, on the model's device. Returns the processor's ``BatchFeature``; Qwen families
        include ``mm_token_type_ids``."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        texts = list(prompts)
        if completions is not None:
            texts = [p + " " + c if c else p for p, c in zip(prompts, completions)]
        flat = [im for ims in images for im in ims]
        given = [list(ims) for ims in images] if self.adapter.nested_images and flat else flat
        batch = self.processor(
            images=given or None, text=texts, return_tensors="pt", padding=True, padding_side="left"
        )
        if self.adapter.uses_mm_token_type_ids and "mm_token_type_ids" not in batch:
            batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        return batch.to(self.device)


def checkpoint_dir(source: str | os.PathLike) -> Path:
    """The directory of ``"builtin"`` or a checkpoint path (not checked: see ``resolve_checkpoint``)."""
    return BUILTIN_DIR if str(source) == "builtin" else Path(source).expanduser()


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """The directory of ``"builtin"`` or a local checkpoint; a ``CheckpointError`` says what is wrong
    when it does not hold a transformers checkpoint."""
    path = checkpoint_dir(source)
    if str(source) == "builtin":
        if not (path / "config.json").exists():
            raise CheckpointError(
                f"the built-in checkpoint is missing from {path}; rebuild it with `dyco-probe pretrain --out {path}`"
            )
        return path
    if not path.is_dir():
        raise CheckpointError(
            f"{source!r} is not a local checkpoint directory (dyco_probe never downloads: pass 'builtin' or a path)"
        )
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json: not a transformers checkpoint")
    return path


def check_device(device: str | None) -> None:
    """Raise a `ValueError` saying why, unless `device` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``,
    or ``None`` for the CPU) can be used on this machine."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device {device!r} is not a device torch knows (e.g. cpu, cuda, cuda:1): {e}"
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device {device!r}: CUDA is not available here ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: Apple's MPS backend is not available here; use --device cpu")


def weights_sha256(source: str | os.PathLike) -> str | None:
    """Hex sha256 of a checkpoint's ``model.safetensors`` (``"builtin"`` or a directory), to tell
    trained versions apart in caches and reports; ``None`` when there is no such file."""
    import hashlib

    path = checkpoint_dir(source) / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def weights_digest(source: str | os.PathLike, length: int = 12, missing: str = "unknown") -> str:
    """The first ``length`` hex digits of ``weights_sha256`` (``missing`` without weights): what
    cache folders and write-ups name a checkpoint's weights by."""
    digest = weights_sha256(source)
    return missing if digest is None else digest[:length]


def load_tokenizer(source: str | os.PathLike):
    """The tokenizer of ``"builtin"`` or a local checkpoint directory (no model is loaded)."""
    return _load_tokenizer(checkpoint_dir(source))


def _load_tokenizer(path: Path):
    """`AutoTokenizer`, except that a tokenizer saved as the generic `TokenizersBackend` is loaded as
    one: for some model types (qwen3_5) transformers imposes the family's own BPE tokenizer class,
    which would rebuild another vocabulary's pre-tokenizer around a word-level one."""
    from transformers import AutoTokenizer, TokenizersBackend

    config = path / "tokenizer_config.json"
    saved = json.loads(config.read_text()).get("tokenizer_class") if config.exists() else None
    if saved == "TokenizersBackend":
        return TokenizersBackend.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_processor(path: Path, adapter: FamilyAdapter):
    from transformers import AutoImageProcessor, AutoProcessor

    if adapter.image_only_processor:
        import inspect

        from dyco_probe.models.processor import image_only_processor_class

        cls = image_only_processor_class(adapter.name)
        tokenizer = _load_tokenizer(path)
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
        chat_template = getattr(tokenizer, "chat_template", None)
        for name in ("chat_template.jinja", "chat_template.json"):
            f = path / name
            if f.exists():
                text = f.read_text()
                chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        processor_cfg = path / "processor_config.json"
        saved = json.loads(processor_cfg.read_text()) if processor_cfg.exists() else {}
        if chat_template is None:
            chat_template = saved.get("chat_template")
        # the processor's own settings (image_seq_len, num_image_tokens...), as a stock load reads them
        accepted = set(inspect.signature(cls.__init__).parameters) | set(
            inspect.signature(cls.__mro__[1].__init__).parameters
        )
        accepted -= {"self", "image_processor", "tokenizer", "video_processor", "chat_template", "kwargs"}
        options = {k: v for k, v in saved.items() if k in accepted}
        return cls(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **options
        )
    return AutoProcessor.from_pretrained(path, local_files_only=True)


def load(
    source: str | os.PathLike = "builtin",
    *,
    device: str | None = None,
    dtype: str | None = None,
    attn_implementation: str = "sdpa",
) -> ModelHandle:
    """Load ``"builtin"`` or a local checkpoint directory into a :class:`ModelHandle`.

    Args:
        source: ``"builtin"`` (the shipped tiny Qwen2.5-VL) or a path to a local checkpoint of a
            supported family (``dyco_probe.models.adapters.ADAPTERS``: Qwen2.5-VL, Qwen2-VL, LLaVA,
            Qwen3-VL, Gemma 3, InternVL, Idefics3, SmolVLM, LLaVA-OneVision), e.g. a downloaded
            Qwen2.5-VL-3B-Instruct.
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``...
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.
        attn_implementation: attention for the whole model; tracing swaps in its own function for
            the text model only, while it is active.

    Never touches the network: ``HF_HUB_OFFLINE`` is set and files are read locally only.
    """
    import torch
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_device(device)
    path = resolve_checkpoint(source)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'} is unreadable: {e}") from e
    adapter = adapter_for(config.get("model_type", "<missing model_type>"))
    torch_dtype = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        None: torch.float32,
    }
    if dtype not in torch_dtype:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}")
    model_cls = getattr(transformers, adapter.model_class)
    try:
        model = model_cls.from_pretrained(
            path, local_files_only=True, dtype=torch_dtype[dtype], attn_implementation=attn_implementation
        )
        processor = _load_processor(path, adapter)
    except Exception as e:  # noqa: BLE001 - safetensors, json, missing files: all mean a bad checkpoint
        raise CheckpointError(f"could not load the checkpoint at {path}: {type(e).__name__}: {e}") from e
    model.eval()
    if device:
        model.to(device)
    info = {"path": str(path), "model_type": config.get("model_type"), "dtype": str(torch_dtype[dtype])}
    return ModelHandle(model=model, processor=processor, adapter=adapter, source=str(source), info=info)
