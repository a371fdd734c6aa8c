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
    image_only_processor: bool = False  # the stock processor needs torchvision (or num2words) for video
    image_text: str = IMAGE_TAG  # what a prompt holds for one image before the processor expands it
    nested_images: bool = True  # the processor takes one list of images per prompt (else one flat list)

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
        if self.image_text != IMAGE_TAG:
            image_text = self.image_text
        body = " ".join(image_text if c["type"] == "image" else c["text"] for c in messages[0]["content"])
        if self.name == "llava":
            return f"USER: {body} ASSISTANT:"
        return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN2_5_VL = FamilyAdapter(
    "qwen2_5_vl", ("qwen2_5_vl",), "Qwen2_5_VLForConditionalGeneration", True, True, _QWEN_IMAGE, False
)
QWEN2_VL = FamilyAdapter(
    "qwen2_vl", ("qwen2_vl",), "Qwen2VLForConditionalGeneration", True, True, _QWEN_IMAGE, False
)
LLAVA = FamilyAdapter("llava", ("llava",), "LlavaForConditionalGeneration", False, nested_images=False)
# Newer families (docs/families.md: layouts and which positions count as image).
QWEN3_VL = FamilyAdapter(
    "qwen3_vl", ("qwen3_vl",), "Qwen3VLForConditionalGeneration", True, True, _QWEN_IMAGE
)
GEMMA3 = FamilyAdapter(
    "gemma3", ("gemma3",), "Gemma3ForConditionalGeneration", False, False, "<start_of_image>"
)
INTERNVL = FamilyAdapter(
    "internvl", ("internvl",), "InternVLForConditionalGeneration", False, True, "<IMG_CONTEXT>"
)
IDEFICS3 = FamilyAdapter("idefics3", ("idefics3",), "Idefics3ForConditionalGeneration", False)
SMOLVLM = FamilyAdapter("smolvlm", ("smolvlm",), "SmolVLMForConditionalGeneration", False, True)
LLAVA_ONEVISION = FamilyAdapter(
    "llava_onevision", ("llava_onevision",), "LlavaOnevisionForConditionalGeneration", False, True
)
# Hybrid: Gated DeltaNet (linear attention) layers with a softmax-attention layer every 4th.
QWEN3_5 = FamilyAdapter("qwen3_5", ("qwen3_5",), "Qwen3_5ForConditionalGeneration", True, True, _QWEN_IMAGE)
ADAPTERS = (
    QWEN2_5_VL,
    QWEN2_VL,
    LLAVA,
    QWEN3_VL,
    GEMMA3,
    INTERNVL,
    IDEFICS3,
    SMOLVLM,
    LLAVA_ONEVISION,
    QWEN3_5,
)
_FAMILY_NAMES = (
    "Qwen2.5-VL, Qwen2-VL, LLaVA, Qwen3-VL, Gemma 3, InternVL, Idefics3, SmolVLM, LLaVA-OneVision "
    "and Qwen3.5 (its softmax-attention layers)"
)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter of a ``config.model_type``; a clear error listing the supported ones otherwise."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(
        f"unsupported architecture {model_type!r}: dyco_probe supports "
        f"{', '.join(supported_model_types())} ({_FAMILY_NAMES} families)"
    )
