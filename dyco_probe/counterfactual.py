"""Counterfactual images and the teacher-forced forwards that measure visual dependency (VPPO, PAPO).

    from dyco_probe.counterfactual import visual_dependency_scores

    score = visual_dependency_scores(handle, examples, completion_ids, mask, counterfactual="blank")

Each completion is run teacher-forced twice, in one batch: after its prompt with the real image(s) and
after the same prompt with a counterfactual image; the per-token divergence between the two next-token
distributions (`dyco_probe.dependency.next_token_divergence`) is the token's visual dependency score.
Counterfactuals (`COUNTERFACTUALS`):

- `"blank"`: a blank image of the same size (`dyco_probe.generation.blank_image`, the `blank` image mode);
- `"patches"`: the real image with a random `mask_fraction` of its `patch_size`-pixel squares blacked
  out (VPPO's degradation). The mask is drawn from `(seed, example key)`, so it does not depend on the
  batch, and every completion of one example sees the same one;
- `"swap"`: the images of another example (the next distinct one in the list, a derangement as the
  `swap` image mode's); its image count must match.

The math is in `dyco_probe.dependency`; the labeller built on it is `dyco_probe.labellers.visual_dependency`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from .dependency import DIVERGENCES, group_auroc, next_token_divergence

__all__ = [
    "COUNTERFACTUALS",
    "check_counterfactual",
    "counterfactual_images",
    "default_patch_size",
    "dependency_auroc",
    "dependency_from_inputs",
    "mask_patches",
    "visual_dependency_scores",
    "with_images",
]

COUNTERFACTUALS = ("blank", "patches", "swap")


def check_counterfactual(
    counterfactual: str, divergence: str = "kl", mask_fraction: float = 0.5, patch_size: int | None = None
) -> None:
    """Raise `ValueError` for an unknown counterfactual or divergence, or a mask fraction outside (0, 1]."""
    if counterfactual not in COUNTERFACTUALS:
        raise ValueError(f"unknown counterfactual {counterfactual!r}; valid: {', '.join(COUNTERFACTUALS)}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    if not 0 < mask_fraction <= 1:
        raise ValueError(f"mask_fraction must be in (0, 1], got {mask_fraction}")
    if patch_size is not None and int(patch_size) < 1:
        raise ValueError(f"patch_size must be >= 1 pixel, got {patch_size}")


# -- counterfactual images -----------------------------------------------------------------------------


def _key_seed(seed: int, key) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def mask_patches(image, fraction: float, patch_size: int, seed: int):
    """A copy of `image` with `round(fraction · n)` of its `n` squares of `patch_size` pixels (a grid
    from the top-left corner; edge squares may be smaller) blacked out, chosen at random from `seed`;
    at least one square when `fraction > 0`."""
    import numpy as np
    from PIL import ImageColor

    w, h = image.size
    cols, rows = -(-w // patch_size), -(-h // patch_size)
    n = cols * rows
    k = min(n, max(1, round(fraction * n)))
    chosen = np.random.default_rng(seed).choice(n, size=k, replace=False)
    try:
        black = ImageColor.getcolor("black", image.mode)
    except (ValueError, KeyError):  # palette and exotic modes: the zero value
        black = 0
    out = image.copy()
    for idx in sorted(int(i) for i in chosen):
        r, c = divmod(idx, cols)
        out.paste(
            black,
            (c * patch_size, r * patch_size, min(w, (c + 1) * patch_size), min(h, (r + 1) * patch_size)),
        )
    return out


def counterfactual_images(
    images: Sequence[Sequence],
    counterfactual: str,
    *,
    keys: Sequence,
    names: Sequence[str] | None = None,
    mask_fraction: float = 0.5,
    patch_size: int = 28,
    seed: int = 0,
) -> list[list]:
    """The counterfactual images of each row.

    Args:
        images: per row, its real (PIL) images.
        counterfactual: `"blank"`, `"patches"` or `"swap"` (module docstring).
        keys: per row, the identity of its example: rows with the same key share a donor (`swap`) and a
            mask (`patches`).
        names: per row, how errors name it (default: the keys).
        mask_fraction, patch_size, seed: `patches` only.

    Raises `ValueError` naming the example when a row has no image, an image is not a PIL image, or
    `swap` finds no donor with as many images.
    """
    from PIL import Image

    from .generation import blank_image

    check_counterfactual(counterfactual, mask_fraction=mask_fraction, patch_size=patch_size)
    if len(keys) != len(images):
        raise ValueError(f"{len(keys)} keys for {len(images)} rows")
    names = [str(k) for k in keys] if names is None else list(names)
    for ims, name in zip(images, names):
        if not ims:
            raise ValueError(f"example {name!r} has no image: a counterfactual image cannot be built for it")
        for k, im in enumerate(ims):
            if not isinstance(im, Image.Image):
                raise ValueError(
                    f"example {name!r}: image {k} is a {type(im).__name__}, not a PIL image (load it first)"
                )
    if counterfactual == "blank":
        return [[blank_image(im) for im in ims] for ims in images]
    if counterfactual == "patches":
        return [
            [
                mask_patches(im, mask_fraction, patch_size, _key_seed(seed, f"{key}/{k}"))
                for k, im in enumerate(ims)
            ]
            for ims, key in zip(images, keys)
        ]
    order = list(dict.fromkeys(keys))  # swap: the next distinct example's images
    if len(order) < 2:
        raise ValueError(
            f"counterfactual 'swap' needs at least two distinct examples; example {names[0]!r} has no other "
            "to take images from"
        )
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    out = []
    for ims, key, name in zip(images, keys, names):
        donor = first[order[(order.index(key) + 1) % len(order)]]
        if len(images[donor]) != len(ims):
            raise ValueError(
                f"cannot swap images into example {name!r}: it has {len(ims)} image(s), its donor "
                f"{names[donor]!r} {len(images[donor])}"
            )
        out.append(list(images[donor]))
    return out


def default_patch_size(processor) -> int:
    """Pixels per image token side: the image processor's `patch_size × merge_size` (28 for Qwen-VL
    families, one merged token: a cell of the built-in task's grid), else its `patch_size`, else 14."""
    ip = getattr(processor, "image_processor", processor)
    patch = getattr(ip, "patch_size", None)
    if isinstance(patch, dict):
        patch = patch.get("height")
    return int(patch or 14) * int(getattr(ip, "merge_size", None) or 1)


# -- forwards ------------------------------------------------------------------------------------------


def _logits(model, prompt_inputs: dict, completion_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """`[B, T, V]` logits of the distributions that produced each completion token, teacher-forced."""
    from .interventions.readouts import teacher_forced_inputs

    inputs = teacher_forced_inputs(model, prompt_inputs, completion_ids, completion_mask)
    t = completion_ids.shape[1]
    return model(**inputs, use_cache=False, logits_to_keep=t + 1).logits[:, :t]


def _stack(a: dict, b: dict) -> dict | None:
    """Two prompt batches as one (rows of `a` first), or `None` when their layouts differ."""
    if set(a) != set(b) or a["input_ids"].shape[1] != b["input_ids"].shape[1]:
        return None
    return {k: torch.cat([a[k], b[k]]) for k in a}


@torch.no_grad()
def dependency_from_inputs(
    model,
    real_inputs: dict,
    counterfactual_inputs: dict,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
) -> Tensor:
    """Visual dependency `[B, T]` of completions from two encoded prompt batches (left-padded, the
    layout of `generate`): the same prompts with the real and with the counterfactual images.

    Both run in one teacher-forced forward when their layouts match (same image sizes), else in two.
    The model is put in eval mode for the forward and restored after."""
    was_training = model.training
    model.eval()
    try:
        ids = completion_ids.to(real_inputs["input_ids"].device)
        mask = completion_mask.to(ids.device)
        both = _stack(real_inputs, counterfactual_inputs)
        if both is not None:
            logits = _logits(model, both, torch.cat([ids, ids]), torch.cat([mask, mask]))
            real, cf = logits.chunk(2)
        else:
            real = _logits(model, real_inputs, ids, mask)
            cf = _logits(model, counterfactual_inputs, ids, mask)
    finally:
        model.train(was_training)
    # a few rows at a time: the float32 log-softmaxes of [rows, T, vocab] are the largest tensors here
    step = 4
    return torch.cat(
        [
            next_token_divergence(
                real[i : i + step],
                cf[i : i + step],
                ids[i : i + step],
                mask[i : i + step],
                divergence=divergence,
                temperature=temperature,
            )
            for i in range(0, ids.shape[0], step)
        ]
    )


def with_images(prompt_inputs: dict, processor, images: Sequence[Sequence], names: Sequence[str]) -> dict:
    """`prompt_inputs` with its pixel inputs re-encoded from other `images` of the same layout (the
    token ids are kept). Raises `ValueError` naming the first example whose images the processor cannot
    take or whose image-token grid differs."""
    ip = getattr(processor, "image_processor", processor)
    flat = [im for ims in images for im in ims]
    try:
        pixels = ip(images=flat, return_tensors="pt")
    except Exception as e:  # noqa: BLE001 - name the culprit, whatever the processor raised
        _raise_for_culprit(lambda k: ip(images=list(images[k]), return_tensors="pt"), names, e)
        raise
    out = dict(prompt_inputs)
    for key, value in pixels.items():
        if key not in prompt_inputs:
            continue
        value = value.to(prompt_inputs[key].device)
        if key in ("image_grid_thw", "image_sizes") and not torch.equal(
            value.cpu(), prompt_inputs[key].cpu()
        ):
            bad = _first_layout_mismatch(value.cpu(), prompt_inputs[key].cpu(), images)
            raise ValueError(
                f"example {names[bad]!r}: its counterfactual image has another size than the real one "
                f"({key} differs), so the prompt layout would change"
            )
        out[key] = value.to(prompt_inputs[key].dtype) if value.is_floating_point() else value
    return out


def _first_layout_mismatch(a: Tensor, b: Tensor, images) -> int:
    row_of_image = [i for i, ims in enumerate(images) for _ in ims]
    for k in range(min(len(a), len(b))):
        if not torch.equal(a[k], b[k]):
            return row_of_image[k]
    return row_of_image[min(len(a), len(b)) - 1]


def _raise_for_culprit(encode_one, names: Sequence[str], error: Exception) -> None:
    """Re-encode row by row and raise a `ValueError` naming the first row that fails."""
    for k, name in enumerate(names):
        try:
            encode_one(k)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"example {name!r}: the processor cannot take its counterfactual image(s): {type(e).__name__}: {e}"
            ) from e


def _encode(handle, prompts: list[str], images: list[list], names: list[str]) -> dict:
    try:
        return handle.encode(prompts, images)
    except Exception as e:  # noqa: BLE001
        _raise_for_culprit(lambda k: handle.encode([prompts[k]], [images[k]]), names, e)
        raise


def visual_dependency_scores(
    handle,
    examples: Sequence,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    counterfactual: str = "blank",
    divergence: str = "kl",
    mask_fraction: float = 0.5,
    patch_size: int | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 32,
) -> Tensor:
    """Visual dependency `[B, T]` (nats, 0 on masked tokens, on the CPU) of completions of `examples`.

    Args:
        handle: a `ModelHandle`.
        examples: one `Example` per row (its question and images; rows of one example share its key).
        completion_ids, completion_mask: `[B, T]` completion tokens, right-padded.
        counterfactual: `"blank"`, `"patches"` or `"swap"` (module docstring).
        divergence: `"kl"` or `"k3"` (`dyco_probe.dependency`).
        mask_fraction, patch_size, seed: `patches`: share of squares blacked out, their side in pixels
            (default `default_patch_size`: one image token), and the seed of the masks.
        temperature: next-token distributions are `softmax(logits / temperature)`.
        batch_size: completions per forward (each forward holds `2 × batch_size` rows).
    """
    check_counterfactual(counterfactual, divergence, mask_fraction, patch_size)
    examples = list(examples)
    if len(examples) != completion_ids.shape[0]:
        raise ValueError(f"{len(examples)} examples for {completion_ids.shape[0]} completions")
    names = [str(ex.id) for ex in examples]
    images = [ex.load_images() for ex in examples]
    cf = counterfactual_images(
        images,
        counterfactual,
        keys=names,
        mask_fraction=mask_fraction,
        patch_size=int(patch_size) if patch_size else default_patch_size(handle.processor),
        seed=int(seed),
    )
    prompts = [handle.prompt(ex.question, len(ims)) for ex, ims in zip(examples, images)]
    out = torch.zeros(completion_ids.shape, dtype=torch.float32)
    for start in range(0, len(examples), batch_size):
        sl = slice(start, start + batch_size)
        mask = completion_mask[sl]
        t = int(mask.sum(-1).max()) if mask.numel() else 0
        if t == 0:
            continue
        real = _encode(handle, prompts[sl], images[sl], names[sl])
        other = _encode(handle, prompts[sl], cf[sl], names[sl])
        out[sl, :t] = dependency_from_inputs(
            handle.model,
            real,
            other,
            completion_ids[sl, :t],
            mask[:, :t],
            divergence=divergence,
            temperature=temperature,
        ).cpu()
    return out


def dependency_auroc(
    handle,
    source,
    positive: Tensor,
    negative: Tensor,
    *,
    examples: Sequence | None = None,
    clusters: Sequence | str | None = "example",
    n_boot: int = 1000,
    seed: int = 0,
    **options,
) -> dict:
    """How well the visual dependency score separates two groups of tokens (e.g. look-ups that read
    the image vs those that copied a note): AUROC (positives scoring high) with a bootstrap 95% interval.

    Args:
        handle: the `ModelHandle` the completions are scored with.
        source: a `Trace` (rows matched to `examples`, or rebuilt from its synthetic records, as
            `dyco_probe.labellers.examples_for`) or intervention `Trajectories` (its own examples).
        positive, negative: `[B, T]` bool token groups, laid out like the source's completion tokens.
        clusters: what the bootstrap resamples: `"example"` (default: every row's example id, so the
            completions and tokens of one example count once), one id per row, or `None` (tokens,
            stratified by group).
        n_boot, seed: bootstrap resamples and their seed.
        options: `visual_dependency_scores` options (counterfactual, divergence, ...).

    Returns:
        `group_auroc`'s `{"auroc", "ci_low", "ci_high", "n_pos", "n_neg"}` plus `"score"` (`[B, T]`).
    """
    if hasattr(source, "completion_ids"):  # intervention Trajectories
        rows, ids, mask = source.examples, source.completion_ids.cpu(), source.completion_mask.cpu()
    else:
        from .labellers import examples_for

        rows, ids, mask = examples_for(source, examples), source.token_ids, source.mask
    score = visual_dependency_scores(handle, rows, ids, mask, **options)
    mask = mask.bool()
    if isinstance(clusters, str):
        if clusters != "example":
            raise ValueError(f"clusters must be 'example', one id per row or None, got {clusters!r}")
        clusters = [str(ex.id) for ex in rows]
    out = group_auroc(
        score,
        positive.cpu().bool() & mask,
        negative.cpu().bool() & mask,
        clusters=clusters,
        n_boot=n_boot,
        seed=seed,
    )
    out["score"] = score
    return out
