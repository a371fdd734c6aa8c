"""Tiny random vision-language models and batches for tests, examples and benchmarks.

Everything here is built from a config (never downloaded) and runs on a CPU in milliseconds:

    model = tiny_qwen2_5_vl()
    batch = tiny_batch(model, batch_size=3, images_per_prompt=2)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)

All tiny models share one token layout (`TINY_TOKENS`): a few special ids at the bottom of the
vocabulary, ordinary text ids above them; generation never emits the special ids other than EOS. Batches are built directly as tensors, so no tokenizer or
image processor is involved; `tiny_tokenizer()` gives a matching tokenizer when token text is wanted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "MINI_BUILTIN_ARCH",
    "TINY_TOKENS",
    "TinyTokens",
    "mini_builtin",
    "tiny_batch",
    "tiny_llava",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "tiny_tokenizer",
]


@dataclass(frozen=True)
class TinyTokens:
    """Special token ids shared by every tiny model; text ids are `first_text` and above."""

    pad: int = 0
    bos: int = 1
    eos: int = 2
    image: int = 3
    video: int = 4
    vision_start: int = 5
    vision_end: int = 6
    first_text: int = 7


TINY_TOKENS = TinyTokens()

# Qwen-VL patches: 14x14 pixels, 2 frames per temporal patch, 2x2 patches merged into one token.
_QWEN_PATCH = 14
_QWEN_TEMPORAL_PATCH = 2
_QWEN_MERGE = 2


def _mrope_section(head_dim: int) -> list[int]:
    """Split the rotary half-dimension into (temporal, height, width) sections, as Qwen's 16/24/24 of 64."""
    half = head_dim // 2
    spatial = 3 * half // 8
    return [half - 2 * spatial, spatial, spatial]


def _text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size):
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=4096,
        bos_token_id=TINY_TOKENS.bos,
        eos_token_id=TINY_TOKENS.eos,
        pad_token_id=TINY_TOKENS.pad,
    )


def _finish(model, seed_state):
    torch.set_rng_state(seed_state)
    model = model.float().eval()
    model.generation_config.pad_token_id = TINY_TOKENS.pad
    model.generation_config.eos_token_id = TINY_TOKENS.eos
    model.generation_config.bos_token_id = TINY_TOKENS.bos
    # A random model would now and then emit placeholder ids, which a teacher-forced forward would
    # then read as images; real VLMs practically never do.
    model.generation_config.suppress_tokens = [
        TINY_TOKENS.pad,
        TINY_TOKENS.bos,
        TINY_TOKENS.image,
        TINY_TOKENS.video,
        TINY_TOKENS.vision_start,
        TINY_TOKENS.vision_end,
    ]
    return model


def tiny_qwen2_5_vl(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int | None = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 256,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
):
    """A random Qwen2.5-VL (float32, eval mode). Defaults: 4 text layers, hidden 128, 4 heads, 2 KV heads (GQA)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = _text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": _mrope_section(hidden_size // num_heads),
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            num_heads=2,
            out_hidden_size=hidden_size,
            patch_size=_QWEN_PATCH,
            spatial_merge_size=_QWEN_MERGE,
            temporal_patch_size=_QWEN_TEMPORAL_PATCH,
            window_size=112,
            fullatt_block_indexes=[vision_depth - 1],
        ),
        image_token_id=TINY_TOKENS.image,
        video_token_id=TINY_TOKENS.video,
        vision_start_token_id=TINY_TOKENS.vision_start,
        vision_end_token_id=TINY_TOKENS.vision_end,
        attn_implementation=attn_implementation,
    )
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    return _finish(Qwen2_5_VLForConditionalGeneration(config), state)


def tiny_qwen2_vl(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int | None = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 256,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
):
    """A random Qwen2-VL (float32, eval mode), same text shapes as `tiny_qwen2_5_vl`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = _text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": _mrope_section(hidden_size // num_heads),
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=vision_depth,
            embed_dim=vision_hidden_size,
            hidden_size=hidden_size,
            mlp_ratio=2,
            num_heads=2,
            patch_size=_QWEN_PATCH,
            spatial_merge_size=_QWEN_MERGE,
            temporal_patch_size=_QWEN_TEMPORAL_PATCH,
        ),
        image_token_id=TINY_TOKENS.image,
        video_token_id=TINY_TOKENS.video,
        vision_start_token_id=TINY_TOKENS.vision_start,
        vision_end_token_id=TINY_TOKENS.vision_end,
        attn_implementation=attn_implementation,
    )
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    return _finish(Qwen2VLForConditionalGeneration(config), state)


def tiny_llava(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int | None = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 256,
    image_size: int = 42,
    patch_size: int = 14,
):
    """A random LLaVA (CLIP tower + Llama decoder, float32, eval mode); each image is (image_size/patch_size)^2 tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        **_text_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size)
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=TINY_TOKENS.image,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        attn_implementation=attn_implementation,
    )
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    return _finish(LlavaForConditionalGeneration(config), state)


def _is_qwen(model) -> bool:
    return getattr(model.config, "model_type", "") in ("qwen2_vl", "qwen2_5_vl")


def _special_ids(model) -> dict[str, int | None]:
    """Special ids from the model config, falling back to `TINY_TOKENS` (so any Qwen-VL / LLaVA config works)."""
    config, text = model.config, model.config.get_text_config()
    gen = getattr(model, "generation_config", None)

    def first(*values):
        return next((int(v) for v in values if isinstance(v, int)), None)

    return {
        "pad": first(getattr(gen, "pad_token_id", None), text.pad_token_id, TINY_TOKENS.pad),
        "bos": first(text.bos_token_id, TINY_TOKENS.bos),
        "image": first(getattr(config, "image_token_id", None), getattr(config, "image_token_index", None)),
        "video": first(getattr(config, "video_token_id", None)),
        "vision_start": first(getattr(config, "vision_start_token_id", None)),
        "vision_end": first(getattr(config, "vision_end_token_id", None)),
        "eos": first(getattr(gen, "eos_token_id", None), text.eos_token_id),
    }


def tiny_batch(
    model,
    batch_size: int = 2,
    *,
    images_per_prompt: int = 1,
    question_lengths: list[int] | tuple[int, int] = (4, 9),
    prefix_length: int = 2,
    image_sizes: list[tuple[int, int]] | None = None,
    padding_side: str = "left",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Model inputs for a batch of random prompts, as tensors, ready for `model(**batch)` / `model.generate(**batch)`.

    Each prompt is `prefix text, image, text, image, ..., question text`; Qwen images are wrapped in
    vision-start/end tokens, LLaVA prompts start with BOS. Special ids come from the model's config,
    so any Qwen-VL or LLaVA model works; text ids are random non-special ids. `question_lengths` is either one length per
    sample or a `(low, high)` range drawn per sample (ragged prompts, hence padding). `image_sizes` is
    `(height, width)` in pixels per image of a prompt (Qwen only: multiples of 28; default 56x84, i.e. 6
    tokens, then 56x56, i.e. 4 tokens). LLaVA images are the tower's fixed size.

    Returns `input_ids`, `attention_mask`, `pixel_values`, and for Qwen also `image_grid_thw` and
    `mm_token_type_ids` (0 text, 1 image), which Qwen needs for its 3-D positions.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    gen = torch.Generator().manual_seed(seed)
    ids = _special_ids(model)
    vocab = model.config.get_text_config().vocab_size
    qwen = _is_qwen(model)

    if isinstance(question_lengths, tuple):
        low, high = question_lengths
        question_lengths = torch.randint(low, high + 1, (batch_size,), generator=gen).tolist()
    if len(question_lengths) != batch_size:
        raise ValueError(f"got {len(question_lengths)} question lengths for batch_size={batch_size}")

    special = {v for v in ids.values() if v is not None}
    first = TINY_TOKENS.first_text if vocab > TINY_TOKENS.first_text else 0
    allowed = torch.tensor([i for i in range(first, vocab) if i not in special])

    def text(n: int) -> list[int]:
        return allowed[torch.randint(0, len(allowed), (n,), generator=gen)].tolist()

    if qwen:
        sizes = image_sizes or [(56, 84), (56, 56)][:images_per_prompt]
        if len(sizes) < images_per_prompt:
            sizes = sizes + [sizes[-1]] * (images_per_prompt - len(sizes))
        for h, w in sizes:
            if h % (_QWEN_PATCH * _QWEN_MERGE) or w % (_QWEN_PATCH * _QWEN_MERGE):
                raise ValueError(f"Qwen image sizes must be multiples of 28 pixels, got {h}x{w}")
        grids = [(1, h // _QWEN_PATCH, w // _QWEN_PATCH) for h, w in sizes[:images_per_prompt]]
        tokens_per_image = [t * gh * gw // _QWEN_MERGE**2 for t, gh, gw in grids]
    else:
        vision = model.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        tokens_per_image = [n] * images_per_prompt

    rows = []
    for i in range(batch_size):
        row = ([] if qwen else [ids["bos"]]) + text(prefix_length)
        for k, n in enumerate(tokens_per_image):
            if k:
                row += text(2)
            image = [ids["image"]] * n
            row += [ids["vision_start"], *image, ids["vision_end"]] if qwen else image
        rows.append(row + text(question_lengths[i]))

    length = max(len(r) for r in rows)
    input_ids = torch.full((batch_size, length), ids["pad"], dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
        input_ids[i, cols] = torch.tensor(r)
        attention_mask[i, cols] = 1

    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    n_images = batch_size * images_per_prompt
    if qwen:
        patch_dim = 3 * _QWEN_TEMPORAL_PATCH * _QWEN_PATCH**2
        grid_thw = torch.tensor(grids * batch_size, dtype=torch.long)
        n_patches = int(grid_thw.prod(-1).sum())
        batch["pixel_values"] = torch.randn(n_patches, patch_dim, generator=gen)
        batch["image_grid_thw"] = grid_thw
        batch["mm_token_type_ids"] = ((input_ids == ids["image"]) & attention_mask.bool()).long()
    else:
        size = model.config.vision_config.image_size
        batch["pixel_values"] = torch.randn(n_images, 3, size, size, generator=gen)
    return batch


def tiny_tokenizer(vocab_size: int = 256):
    """A word-level fast tokenizer over the tiny vocabulary: id k is the word `t{k}`, specials are named."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = TINY_TOKENS
    names = {
        tok.pad: "<pad>",
        tok.bos: "<s>",
        tok.eos: "</s>",
        tok.image: "<image>",
        tok.video: "<video>",
        tok.vision_start: "<vision_start>",
        tok.vision_end: "<vision_end>",
    }
    vocab = {names.get(i, f"t{i}"): i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def save_tiny_checkpoint(family: str, path, seed: int = 0):
    """Write a complete tiny random checkpoint of a model family to ``path`` (config, weights,
    tokenizer, processor files), as a real local checkpoint directory would look.

    ``family`` is ``"qwen2_5_vl"``, ``"qwen2_vl"``, ``"llava"`` or one of the newer families of
    ``dyco_probe.testing_families.FAMILIES`` (``"qwen3_vl"``, ``"gemma3"``, ``"internvl"``,
    ``"idefics3"``, ``"smolvlm"``, ``"llava_onevision"``, and the hybrid ``"qwen3_5"``). The tokenizer is the synthetic task's
    word-level one, so the checkpoint can be driven with the synthetic examples. Returns ``path``.
    """
    from dyco_probe.testing_families import FAMILIES, HYBRID_FAMILIES, tiny_family_parts

    if family in FAMILIES + HYBRID_FAMILIES:
        from pathlib import Path

        model, processor = tiny_family_parts(family, seed)
        model.save_pretrained(path)
        processor.save_pretrained(path)
        return Path(path)
    from pathlib import Path

    from dyco_probe.models.builtin import (
        CHAT_TEMPLATE,
        BuiltinArchitecture,
        build_config,
        build_processor,
        build_tokenizer,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    arch = BuiltinArchitecture(**{**MINI_BUILTIN_ARCH, "num_kv_heads": 1, "vision_depth": 2})  # GQA
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    if family in ("qwen2_5_vl", "qwen2_vl"):
        config = build_config(tokenizer, arch)
        processor = build_processor(tokenizer)
        if family == "qwen2_5_vl":
            from transformers import Qwen2_5_VLForConditionalGeneration as cls
        else:
            from transformers import Qwen2VLConfig
            from transformers import Qwen2VLForConditionalGeneration as cls

            text = config.text_config.to_dict()
            vision = dict(
                depth=2,
                embed_dim=32,
                hidden_size=arch.hidden_size,
                mlp_ratio=2,
                num_heads=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
            )
            config = Qwen2VLConfig(
                text_config={k: v for k, v in text.items() if k not in ("model_type", "architectures")},
                vision_config=vision,
                image_token_id=config.image_token_id,
                video_token_id=config.video_token_id,
                vision_start_token_id=config.vision_start_token_id,
                vision_end_token_id=config.vision_end_token_id,
                tie_word_embeddings=True,
            )
        model = cls(config)
    elif family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        from transformers.models.llava.processing_llava import LlavaProcessor

        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        image_size = 56
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=14,
            projection_dim=32,
        )
        text = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=arch.hidden_size,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            bos_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=(image_size // 14) ** 2,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        template = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|> ", "<image> ")
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            chat_template=template,
            num_additional_image_tokens=1,
        )
    else:
        raise ValueError(
            f"unknown family {family!r}; choose qwen2_5_vl, qwen2_vl, llava or one of {', '.join(FAMILIES)}"
        )
    torch.set_rng_state(state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


MINI_BUILTIN_ARCH = dict(
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    vision_depth=1,
    vision_hidden=32,
    vision_heads=2,
    vision_intermediate=64,
)


def mini_builtin(seed: int = 0, suppress_special: bool = True):
    """The built-in architecture in miniature (``MINI_BUILTIN_ARCH``), untrained, as a ``ModelHandle``
    on the synthetic task's tokenizer; with ``suppress_special`` it never emits image placeholders or
    other special tokens (EOS excepted), so its generations are valid completions."""
    from dyco_probe.models.adapters import QWEN2_5_VL
    from dyco_probe.models.builtin import SPECIAL_TOKENS, BuiltinArchitecture, build_untrained
    from dyco_probe.models.loading import ModelHandle

    model, processor = build_untrained(BuiltinArchitecture(**MINI_BUILTIN_ARCH), seed=seed)
    model.eval()
    if suppress_special:
        tok = processor.tokenizer
        model.generation_config.suppress_tokens = [
            tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS if t != "<|im_end|>"
        ]
    return ModelHandle(model, processor, QWEN2_5_VL, "untrained")
