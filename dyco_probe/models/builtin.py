"""The built-in model: a tiny Qwen2.5-VL-architecture model with a word-level tokenizer trained on the
synthetic task's text, built from a config (nothing is downloaded), trained by ``dyco-probe pretrain``
and shipped in ``dyco_probe/builtin/``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from dyco_probe.models.processor import ImageOnlyQwen2_5_VLProcessor, pil_image_processor

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
UNK = "<unk>"

# Qwen-style chat template in the word-level tokenizer's whitespace convention.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"


def task_corpus(n: int = 4000) -> list[str]:
    """Text the tokenizer is trained on: questions and chains of thought of the synthetic task
    under several difficulty settings, plus every integer an answer can take."""
    from dyco_probe.task.problems import TaskConfig, generate_problem

    configs = [
        TaskConfig(),
        TaskConfig(n_shapes=8, n_colours=8, min_objects=4, max_objects=8, min_hops=1, max_hops=4),
    ]
    lines = ["user assistant system"]
    for i in range(n):
        p = generate_problem(i, configs[i % len(configs)])
        lines += [p.question, p.completion]
    lines.append(" ".join(str(k) for k in range(-99, 100)))
    return lines


def build_tokenizer(corpus: list[str] | None = None):
    """Train a word-level tokenizer on ``corpus`` (default: the task corpus) and wrap it as a
    ``PreTrainedTokenizerFast`` with the Qwen2.5-VL special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    trainer = trainers.WordLevelTrainer(special_tokens=[*SPECIAL_TOKENS, UNK], min_frequency=1)
    tok.train_from_iterator(corpus if corpus is not None else task_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=list(SPECIAL_TOKENS),
        clean_up_tokenization_spaces=False,
    )
    fast.padding_side = "left"
    return fast


@dataclass(frozen=True)
class BuiltinArchitecture:
    """Sizes of the built-in model (a Qwen2.5-VL in miniature)."""

    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    rope_theta: float = (
        1000000.0  # Qwen2.5-VL's own; leaves most rotary pairs slow enough for content look-ups
    )
    vision_depth: int = 2
    vision_hidden: int = 64
    vision_heads: int = 4
    vision_intermediate: int = 256
    max_positions: int = 512

    def to_dict(self) -> dict:
        return asdict(self)


def build_config(tokenizer, arch: BuiltinArchitecture = BuiltinArchitecture()):
    """A ``Qwen2_5_VLConfig`` for the built-in model, with token ids taken from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = arch.hidden_size // arch.num_heads
    half = head_dim // 2
    t_sec = half // 4
    mrope = [t_sec, (half - t_sec) // 2, half - t_sec - (half - t_sec) // 2]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=arch.hidden_size,
            intermediate_size=arch.intermediate_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_heads,
            num_key_value_heads=arch.num_kv_heads,
            max_position_embeddings=arch.max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta, "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=arch.vision_depth,
            hidden_size=arch.vision_hidden,
            intermediate_size=arch.vision_intermediate,
            num_heads=arch.vision_heads,
            out_hidden_size=arch.hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[arch.vision_depth - 1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_processor(tokenizer, max_pixels: int = 28 * 28 * 256) -> ImageOnlyQwen2_5_VLProcessor:
    """The image-only processor of the built-in model (PIL image processor + word-level tokenizer)."""
    return ImageOnlyQwen2_5_VLProcessor(
        image_processor=pil_image_processor(min_pixels=56 * 56, max_pixels=max_pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_untrained(arch: BuiltinArchitecture = BuiltinArchitecture(), seed: int = 0):
    """A freshly initialised built-in model with its processor: ``(model, processor)``."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(build_config(tokenizer, arch))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor
