"""Batched generation of examples with left padding (``dyco_probe.completions.sample``), and the image
modes used as controls (blank, swapped)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dyco_probe.completions import sample

IMAGE_MODES = ("normal", "blank", "swap")


@dataclass
class Generation:
    """One completion of one example.

    ``completion_ids`` holds the generated tokens o_1..o_T, the end-of-sequence token included when
    one was generated (``truncated`` is True when none was, within ``max_new_tokens``).
    """

    example_id: str
    prompt: str
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool
    sample_index: int = 0


def blank_image(image):
    """A blank image of the same size as ``image`` (the synthetic task's background colour)."""
    from dyco_probe.task.render import blank_like

    return blank_like(image)


def images_for(examples: Sequence, mode: str = "normal") -> list[list]:
    """The images each example is shown under an image mode.

    ``normal``: its own; ``blank``: blank images of the same sizes; ``swap``: the images of the next
    example (a derangement over the list; each example must have as many images as its neighbour).
    """
    if mode not in IMAGE_MODES:
        raise ValueError(f"unknown image mode {mode!r}; choose one of {', '.join(IMAGE_MODES)}")
    own = [ex.load_images() for ex in examples]
    if mode == "normal":
        return own
    if mode == "blank":
        return [[blank_image(im) for im in ims] for ims in own]
    if len(own) < 2:
        raise ValueError("image mode 'swap' needs at least two examples")
    out = []
    for i, ex in enumerate(examples):
        donor = own[(i + 1) % len(own)]
        if len(donor) != len(own[i]):
            raise ValueError(
                f"cannot swap images into example {ex.id!r}: it has {len(own[i])} image(s), its donor {len(donor)}"
            )
        out.append(donor)
    return out


def generate(
    handle,
    examples: Sequence,
    *,
    max_new_tokens: int = 96,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_samples: int = 1,
    batch_size: int = 32,
    image_mode: str = "normal",
    seed: int | None = None,
    progress: bool = True,
    wrap: Callable | None = None,
) -> list[Generation]:
    """Generate completions for ``examples`` in left-padded batches.

    Args:
        handle: a :class:`~dyco_probe.models.loading.ModelHandle`.
        do_sample, temperature, top_p, top_k: greedy, or sampled (``top_k`` 0: the full
            distribution); the sampler is ``dyco_probe.completions.sample`` (image placeholders are
            never generated).
        num_samples: completions per example (sampled: set ``do_sample``).
        image_mode: ``normal``, ``blank`` or ``swap`` (see :func:`images_for`).
        wrap: optional ``wrap(batch_inputs, run) -> sequences`` around each batch's ``generate``
            call; tracing uses it to observe the call.

    Returns one :class:`Generation` per example and sample, in example order.
    """
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    if num_samples > 1 and not do_sample:
        raise ValueError("num_samples > 1 needs do_sample=True (greedy completions would be identical)")
    if seed is not None:
        torch.manual_seed(seed)
    images = images_for(examples, image_mode)
    prompts = [handle.prompt(ex.question, len(ims)) for ex, ims in zip(examples, images)]
    tok = handle.tokenizer
    out: list[Generation] = []
    bar = tqdm(total=len(examples) * num_samples, desc="generate", unit="completion", disable=not progress)
    for start in range(0, len(examples), batch_size):
        sl = slice(start, start + batch_size)
        batch = handle.encode(prompts[sl], images[sl])
        sampled = sample(
            handle.model,
            batch,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            num_return_sequences=num_samples,
            tokenizer=tok,
            wrap=wrap,
        )
        for row in range(sampled.ids.shape[0]):
            i = start + row // num_samples
            ids = sampled.row(row)
            mask = batch["attention_mask"][row // num_samples].bool()
            prompt_ids = batch["input_ids"][row // num_samples][mask].tolist()
            out.append(
                Generation(
                    example_id=examples[i].id,
                    prompt=prompts[i],
                    completion=tok.decode(ids, skip_special_tokens=True).strip(),
                    prompt_ids=prompt_ids,
                    completion_ids=ids,
                    truncated=bool(sampled.truncated[row]),
                    sample_index=row % num_samples,
                )
            )
        bar.update(sampled.ids.shape[0])
    bar.close()
    return out
