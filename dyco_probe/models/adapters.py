"""One small adapter per model family: how prompts with images are written and encoded, and which
token marks an image position. Span finding itself (docs/method.md#sequences-and-spans) lives in ``dyco_probe.spans``."""

from __future__ import annotations

import re
from dataclasses import dataclass

IMAGE_TAG = "<image>"  # the VLM-R1 jsonl placeholder for one image
_TAG_RE = re.compile(re.escape(IMAGE_TAG))


def split_image_tags(question: str) -> list[str | None]:
    """Split a VLM-R1 question into text chunks and image slots (``None``), in order."""
    parts: list[str | None] = []
    for i, chunk in enumerate(_TAG_RE.split(question)):
        if i > 0:
            parts.append(None)
        if chunk.strip():
            parts.append(chunk.strip())
    return parts


@dataclass(frozen=True)
class FamilyAdapter:
    """What dyco_probe needs to know about a model family."""

    name: str
    model_types: tuple[str, ...]
    model_class: str  # transformers class name
    uses_mm_token_type_ids: bool

    def image_token_id(self, model) -> int:
        cfg = model.config
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(cfg, attr, None)
            if value is not None:
                return int(value)
        raise ValueError(f"{type(model).__name__} config has no image_token_id")

    def text_config(self, model):
        return model.config.get_text_config()

    def messages(self, question: str, n_images: int | None = None) -> list[dict]:
        """Chat messages for one user turn. ``<image>`` tags mark where images go; a question with
        none gets its ``n_images`` images in front of the text."""
        parts = split_image_tags(question)
        n_tags = sum(p is None for p in parts)
        if n_images is not None and n_tags == 0 and n_images > 0:
            parts = [None] * n_images + parts
        elif n_images is not None and n_tags != n_images:
            raise ValueError(f"question has {n_tags} {IMAGE_TAG} tags but {n_images} images were given")
        content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
        return [{"role": "user", "content": content}]

    def prompt(self, processor, question: str, n_images: int | None = None) -> str:
        """The prompt string (chat template applied, generation prompt added) for one question."""
        messages = self.messages(question, n_images)
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._fallback_prompt(processor, messages)

    def _fallback_prompt(self, processor, messages) -> str:
        image_text = getattr(processor, "image_token", IMAGE_TAG)
        if self.name in ("qwen2_5_vl", "qwen2_vl"):
            image_text = "<|vision_start|><|image_pad|><|vision_end|>"
        body = " ".join(image_text if c["type"] == "image" else c["text"] for c in messages[0]["content"])
        if self.name == "llava":
            return f"USER: {body} ASSISTANT:"
        return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


QWEN2_5_VL = FamilyAdapter("qwen2_5_vl", ("qwen2_5_vl",), "Qwen2_5_VLForConditionalGeneration", True)
QWEN2_VL = FamilyAdapter("qwen2_vl", ("qwen2_vl",), "Qwen2VLForConditionalGeneration", True)
LLAVA = FamilyAdapter("llava", ("llava",), "LlavaForConditionalGeneration", False)
ADAPTERS = (QWEN2_5_VL, QWEN2_VL, LLAVA)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter of a ``config.model_type``; a clear error listing the supported ones otherwise."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(
        f"unsupported architecture {model_type!r}: dyco_probe supports "
        f"{', '.join(supported_model_types())} (Qwen2.5-VL, Qwen2-VL and LLaVA families)"
    )
