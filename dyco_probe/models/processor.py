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
