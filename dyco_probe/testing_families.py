"""Tiny random models of the newer families, with their real (image-only) processors.

`tiny_family(name)` returns a `ModelHandle`: a random model built from the family's own transformers
config classes (grouped-query attention where the family has it) and the family's stock processor
(or its image-only subclass, `dyco_probe.models.processor`) around the synthetic task's word-level
tokenizer, extended with the family's special tokens. Prompts go through the processor, so the
image layout (tiles, thumbnails, row/column markers, newline features) is the family's own:

    handle = tiny_family("idefics3")
    batch = handle.encode([handle.prompt("<image> how many?", 1)], [[image]])

`save_tiny_checkpoint(name, path)` (in `dyco_probe.testing`) writes the same model and processor to
a directory that `dyco_probe.load` reads. Everything runs on a CPU in well under a second.
"""

from __future__ import annotations

import copy
import functools

import torch

__all__ = ["FAMILIES", "HYBRID_FAMILIES", "family_arch", "tiny_family", "tiny_family_parts"]

FAMILIES = ("qwen3_vl", "gemma3", "internvl", "idefics3", "smolvlm", "llava_onevision")
HYBRID_FAMILIES = ("qwen3_5",)  # some layers are linear attention: no attention row there

# Text decoder of every tiny family: 4 layers, 4 query heads over 2 key/value heads (GQA).
_TEXT = dict(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)


def family_arch(name: str) -> dict:
    """The text decoder sizes of a tiny family (the same for all)."""
    if name not in FAMILIES + HYBRID_FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES + HYBRID_FAMILIES)}")
    return dict(_TEXT)


@functools.lru_cache(maxsize=1)
def _base_tokenizer():
    from dyco_probe.models.builtin import build_tokenizer

    return build_tokenizer()


def _tokenizer(named: dict[str, str] | None = None, extra: list[str] = ()):
    """The task tokenizer plus special tokens: `named` ones become attributes (`tok.image_token`)."""
    tok = copy.deepcopy(_base_tokenizer())
    tokens = list((named or {}).values()) + [t for t in extra if t not in (named or {}).values()]
    if tokens:
        tok.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    if named:
        tok._set_model_specific_special_tokens(named)
    tok.padding_side = "left"
    return tok


def _template(image_text: str) -> str:
    """The built-in model's chat template with `image_text` where an image goes."""
    from dyco_probe.models.builtin import CHAT_TEMPLATE

    return CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|> ", image_text + " ")


def _ids(tok) -> dict[str, int]:
    return dict(pad=tok.pad_token_id, eos=tok.eos_token_id, bos=tok.pad_token_id)


def _text_kwargs(tok, **extra) -> dict:
    t = _TEXT
    return dict(
        vocab_size=len(tok),
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_layers"],
        num_attention_heads=t["num_heads"],
        num_key_value_heads=t["num_kv_heads"],
        head_dim=t["head_dim"],
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **extra,
    )


def _siglip(image_size: int, patch_size: int = 7, **kw) -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        **kw,
    )


# -- one builder per family: (config, processor) ----------------------------------------------------


def _qwen3_vl():
    from transformers import Qwen3VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from dyco_probe.models.processor import image_only_processor_class

    tok = _tokenizer()
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    text = _text_kwargs(
        tok,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],  # of head_dim / 2 = 8, interleaved as in Qwen3-VL's [24, 20, 20]
            "mrope_interleaved": True,
        },
    )
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=_TEXT["hidden_size"],
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],  # DeepStack: features added at text layers 0 and 1
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 16},  # 4 to 16 tokens per image
    )
    processor = image_only_processor_class("qwen3_vl")(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    return config, processor


def _qwen3_5():
    """Qwen3.5: the Qwen3-VL layout and processor; Gated DeltaNet layers 0 and 2, softmax attention in 1 and 3."""
    from transformers import Qwen3_5Config

    qwen3_vl, processor = _qwen3_vl()
    text = qwen3_vl.text_config.to_dict()
    text = {k: v for k, v in text.items() if k not in ("model_type", "architectures", "transformers_version")}
    text.update(
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )
    vision = qwen3_vl.vision_config.to_dict()
    vision = {k: v for k, v in vision.items() if k not in ("model_type", "deepstack_visual_indexes")}
    config = Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        image_token_id=qwen3_vl.image_token_id,
        video_token_id=qwen3_vl.video_token_id,
        vision_start_token_id=qwen3_vl.vision_start_token_id,
        vision_end_token_id=qwen3_vl.vision_end_token_id,
        tie_word_embeddings=True,
    )
    return config, processor


def _gemma3():
    from transformers import Gemma3Config
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

    named = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tok = _tokenizer(named)
    image_size, tokens_per_image = 28, 4  # 4x4 patches of 7 pixels, pooled 2x2 into 4 soft tokens
    text = _text_kwargs(
        tok,
        query_pre_attn_scalar=_TEXT["head_dim"],
        sliding_window=12,  # shorter than a prompt: the local layers really are local
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=_siglip(image_size, vision_use_head=False),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.convert_tokens_to_ids(named["eoi_token"]),
        image_token_index=tok.image_token_id,
        tie_word_embeddings=True,
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=_template("<start_of_image>"),
        image_seq_length=tokens_per_image,
    )
    return config, processor


def _internvl():
    from transformers import InternVLConfig
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from dyco_probe.models.processor import image_only_processor_class

    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tok = _tokenizer(named)
    tile, patch = 28, 7  # 4x4 patches per tile, pixel-shuffled (ratio 0.5) into 4 tokens
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=[tile, tile],
            patch_size=[patch, patch],
        ),
        text_config=dict(model_type="qwen2", **_text_kwargs(tok)),
        image_token_id=tok.context_image_token_id,
        image_seq_length=4,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = image_only_processor_class("internvl")(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=_template("<IMG_CONTEXT>"),
        image_seq_length=4,
    )
    return config, processor


def _rows_cols() -> list[str]:
    return [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]


def _idefics3_like(smol: bool):
    tile, patch = 28, 7  # 4x4 patches per tile, pixel-shuffled (scale factor 2) into 4 tokens
    if smol:
        from transformers import SmolVLMConfig as Config
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil as ImageProc,
        )

        from dyco_probe.models.processor import image_only_processor_class

        Processor = image_only_processor_class("smolvlm")
    else:
        from transformers import Idefics3Config as Config
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil as ImageProc,
        )
        from transformers.models.idefics3.processing_idefics3 import Idefics3Processor as Processor

    named = {
        "fake_image_token": "<fake_token_around_image>",
        "image_token": "<image>",
        "end_of_utterance_token": "<end_of_utterance>",
        "global_image_token": "<global-img>",
    }
    tok = _tokenizer(named, extra=_rows_cols())
    config = Config(
        vision_config=_siglip(tile, patch),
        text_config=dict(model_type="llama", **_text_kwargs(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        tie_word_embeddings=True,
    )
    image_processor = ImageProc(
        size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=True
    )
    processor = Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=4, chat_template=_template("<image>")
    )
    return config, processor


def _llava_onevision():
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from dyco_probe.models.processor import image_only_processor_class

    tok = _tokenizer({"image_token": "<image>", "video_token": "<video>"})
    image_size, patch = 28, 7  # 16 features per crop; anyres crops on a 2x2 grid at most
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    config = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model", **_siglip(image_size, patch, vision_use_head=False)
        ),
        text_config=dict(model_type="qwen2", **_text_kwargs(tok)),
        image_token_index=tok.image_token_id,
        video_token_index=tok.video_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_2",  # small budget: large images are pooled down, as in the real model
        tie_word_embeddings=True,
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints
    )
    processor = image_only_processor_class("llava_onevision")(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=_template("<image>"),
        num_image_tokens=(image_size // patch) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_2",
    )
    return config, processor


_BUILDERS = {
    "qwen3_vl": _qwen3_vl,
    "gemma3": _gemma3,
    "internvl": _internvl,
    "idefics3": lambda: _idefics3_like(False),
    "smolvlm": lambda: _idefics3_like(True),
    "llava_onevision": _llava_onevision,
    "qwen3_5": _qwen3_5,
}


def tiny_family_parts(name: str, seed: int = 0):
    """`(model, processor)` of a tiny random model of family `name` (float32, eval mode)."""
    import transformers

    from dyco_probe.models.adapters import adapter_for

    family_arch(name)
    config, processor = _BUILDERS[name]()
    adapter = adapter_for(config.model_type)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = getattr(transformers, adapter.model_class)(config)
        if name == "gemma3":  # its projector starts at zero: a random model's image would be blank
            torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.1)
    finally:
        torch.set_rng_state(state)
    model = model.float().eval()
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


def tiny_family(name: str, seed: int = 0):
    """A `ModelHandle` around `tiny_family_parts(name, seed)`."""
    from dyco_probe.models.adapters import adapter_for
    from dyco_probe.models.loading import ModelHandle

    model, processor = tiny_family_parts(name, seed)
    return ModelHandle(model, processor, adapter_for(model.config.model_type), f"tiny:{name}")
