"""An image-only Qwen2.5-VL processor: the stock processor also builds a video processor, which needs
torchvision; this one takes the PIL image processor and a tokenizer and nothing else."""

from __future__ import annotations

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video path (no torchvision).

    Saves and loads with ``save_pretrained`` / ``from_pretrained`` from a local directory.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


def pil_image_processor(
    min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> Qwen2VLImageProcessorPil:
    """The PIL (torchvision-free) Qwen2-VL image processor with the given pixel budget."""
    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


# -- image-only processors of the other families --------------------------------------------------
# The stock processors of these families also build a video processor (torchvision) or need
# num2words for video prompts; these take the PIL image processor and a tokenizer and nothing else.
# Their image path is the stock one, unchanged.


def _image_only(base: type, name: str, doc: str) -> type:
    """A subclass of the processor ``base`` that never builds or needs a video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        base.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    # the base's signature (less the video processor): `save_pretrained` keeps the attributes it names
    import inspect

    sig = inspect.signature(base.__init__)
    __init__.__signature__ = sig.replace(
        parameters=[p for n, p in sig.parameters.items() if n != "video_processor"]
    )
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


def _qwen3_vl():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    return _image_only(
        Qwen3VLProcessor, "ImageOnlyQwen3VLProcessor", "Qwen3-VL processor without the video path."
    )


def _internvl():
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    return _image_only(
        InternVLProcessor, "ImageOnlyInternVLProcessor", "InternVL processor without the video path."
    )


def _llava_onevision():
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    return _image_only(
        LlavaOnevisionProcessor,
        "ImageOnlyLlavaOnevisionProcessor",
        "LLaVA-OneVision processor without video.",
    )


def _smolvlm():
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
        """SmolVLM processor without the video path: no video processor, no num2words (only its
        video prompts need it)."""

        def __init__(
            self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs
        ):
            kwargs.pop("video_processor", None)
            self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
            self.image_token = getattr(tokenizer, "image_token", "<image>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
            self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
            self.image_seq_len = image_seq_len
            self.video_token = getattr(tokenizer, "video_token", "<video>")
            ProcessorMixin.__init__(
                self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs
            )

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    ImageOnlySmolVLMProcessor.__module__ = __name__
    return ImageOnlySmolVLMProcessor


_FACTORIES = {
    "qwen3_vl": _qwen3_vl,
    "internvl": _internvl,
    "llava_onevision": _llava_onevision,
    "smolvlm": _smolvlm,
}
_CLASSES: dict[str, type] = {}


def image_only_processor_class(family: str) -> type:
    """The image-only processor class of ``family`` (``qwen3_vl``, ``qwen3_5``, ``internvl``,
    ``llava_onevision``, ``smolvlm``); Qwen2.5-VL / Qwen2-VL use :class:`ImageOnlyQwen2_5_VLProcessor`."""
    if family in ("qwen2_5_vl", "qwen2_vl"):
        return ImageOnlyQwen2_5_VLProcessor
    family = "qwen3_vl" if family == "qwen3_5" else family  # Qwen3.5 uses the Qwen3-VL processor
    if family not in _CLASSES:
        _CLASSES[family] = _FACTORIES[family]()
    return _CLASSES[family]
