"""Counterfactual images and the visual dependency forwards (dyco_probe.counterfactual), and the
`visual_dependency` labeller on a miniature built-in model."""

import dataclasses

import pytest
import torch
from PIL import Image

from dyco_probe.counterfactual import (
    counterfactual_images,
    default_patch_size,
    dependency_auroc,
    dependency_from_inputs,
    mask_patches,
    visual_dependency_scores,
    with_images,
)
from dyco_probe.data import synthetic_examples
from dyco_probe.dependency import dependency_roles
from dyco_probe.labellers import DEPENDENCY_DEFAULTS, check_options, get_labeller

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def handle():
    from dyco_probe.testing import mini_builtin

    return mini_builtin()


@pytest.fixture(scope="module")
def examples():
    return synthetic_examples("test", 4)


@pytest.fixture(scope="module")
def traced(handle, examples):
    from dyco_probe.api import trace

    return trace(handle, examples, max_new_tokens=12, batch_size=4, progress=False)


def black_squares(image, size):
    w, h = image.size
    px = image.load()
    return {
        (r, c)
        for r in range(h // size)
        for c in range(w // size)
        if all(px[c * size + dx, r * size + dy] == (0, 0, 0) for dx in range(size) for dy in range(size))
    }


# -- images ------------------------------------------------------------------------------------------


def test_mask_patches_blacks_out_a_fraction_deterministically():
    image = Image.new("RGB", (112, 84), (200, 100, 50))  # 4 x 3 squares of 28 px
    out = mask_patches(image, 0.5, 28, seed=3)
    assert out.size == image.size and image.getpixel((0, 0)) == (200, 100, 50)  # the original is kept
    assert len(black_squares(out, 28)) == 6
    assert black_squares(mask_patches(image, 0.5, 28, seed=3), 28) == black_squares(out, 28)
    assert black_squares(mask_patches(image, 0.01, 28, seed=3), 28)  # at least one square
    assert len(black_squares(mask_patches(image, 1.0, 28, seed=0), 28)) == 12
    gray = mask_patches(Image.new("L", (30, 30), 255), 1.0, 7, seed=0)  # edge squares are smaller
    assert gray.mode == "L" and gray.getextrema() == (0, 0)


def test_counterfactual_images(examples):
    images = [ex.load_images() for ex in examples]
    keys = [ex.id for ex in examples]
    blank = counterfactual_images(images, "blank", keys=keys)
    assert [im.size for ims in blank for im in ims] == [im.size for ims in images for im in ims]
    assert all(len(set(ims[0].getextrema())) == 1 for ims in blank)  # one colour: (c, c) per band

    # rows of one example (same key) share their mask; other examples get others
    rows, row_keys = [images[0], images[0], images[1]], [keys[0], keys[0], keys[1]]
    masked = counterfactual_images(rows, "patches", keys=row_keys, mask_fraction=0.25, patch_size=28)
    squares = [black_squares(ims[0], 28) for ims in masked]
    assert squares[0] == squares[1] and len(squares[0]) == 4 and squares[0] != squares[2]
    again = counterfactual_images(rows, "patches", keys=row_keys, mask_fraction=0.25, patch_size=28, seed=1)
    assert black_squares(again[0][0], 28) != squares[0]  # the seed changes the masks

    # swap: the next distinct example's images, shared by the rows of one example
    swapped = counterfactual_images(rows, "swap", keys=row_keys)
    assert swapped[0][0] is images[1][0] and swapped[1][0] is images[1][0] and swapped[2][0] is images[0][0]


def test_counterfactuals_that_cannot_be_built_name_the_example(examples):
    images = [ex.load_images() for ex in examples[:2]]
    with pytest.raises(ValueError, match="example 'x' has no image"):
        counterfactual_images([images[0], []], "blank", keys=["a", "x"])
    with pytest.raises(ValueError, match="example 'test-0'.*no other"):
        counterfactual_images([images[0], images[0]], "swap", keys=["test-0", "test-0"])
    with pytest.raises(ValueError, match="cannot swap images into example 'a': it has 2 image.*donor 'b' 1"):
        counterfactual_images([images[0] * 2, images[1]], "swap", keys=["a", "b"])
    with pytest.raises(ValueError, match="example 'a': image 0 is a str"):
        counterfactual_images([["x.png"]], "blank", keys=["a"])
    with pytest.raises(ValueError, match="unknown counterfactual 'noise'"):
        counterfactual_images(images, "noise", keys=["a", "b"])
    with pytest.raises(ValueError, match="mask_fraction"):
        counterfactual_images(images, "patches", keys=["a", "b"], mask_fraction=0)


def test_default_patch_size_is_one_image_token(handle):
    assert default_patch_size(handle.processor) == 28


# -- forwards ----------------------------------------------------------------------------------------


def test_scores_are_the_divergence_of_the_two_teacher_forced_forwards(handle, examples, traced):
    from dyco_probe.interventions.readouts import teacher_forced_inputs, token_logprobs

    tr = traced.trace
    k3 = visual_dependency_scores(
        handle, examples, tr.token_ids, tr.mask, counterfactual="blank", divergence="k3"
    )
    kl = visual_dependency_scores(handle, examples, tr.token_ids, tr.mask, counterfactual="blank")
    assert k3.shape == kl.shape == tr.mask.shape
    assert (k3[~tr.mask] == 0).all() and (kl >= 0).all() and (kl[tr.mask] > 0).any()

    # k3 by hand: the completion's log-probabilities under each image, from two separate forwards
    images = [ex.load_images() for ex in examples]
    prompts = [handle.prompt(ex.question, 1) for ex in examples]
    blank = counterfactual_images(images, "blank", keys=[ex.id for ex in examples])
    logp = [
        token_logprobs(
            handle.model,
            teacher_forced_inputs(handle.model, handle.encode(prompts, ims), tr.token_ids, tr.mask),
            tr.token_ids,
        )
        for ims in (images, blank)
    ]
    d = logp[1] - logp[0]
    torch.testing.assert_close(k3, torch.where(tr.mask, torch.expm1(d) - d, 0.0), atol=1e-5, rtol=1e-4)

    # batching does not change the scores; identical images give zero
    small = visual_dependency_scores(
        handle, examples, tr.token_ids, tr.mask, counterfactual="blank", batch_size=3
    )
    torch.testing.assert_close(small, kl, atol=1e-5, rtol=1e-4)
    real = handle.encode(prompts, images)
    same = dependency_from_inputs(handle.model, real, real, tr.token_ids, tr.mask)
    assert same.abs().max() < 1e-5


def test_other_image_sizes_run_in_two_forwards(handle, examples, traced):
    tr = traced.trace
    prompts = [handle.prompt(ex.question, 1) for ex in examples]
    images = [ex.load_images() for ex in examples]
    small = [[im.resize((56, 56))] for im in (ims[0] for ims in images)]
    real, other = handle.encode(prompts, images), handle.encode(prompts, small)
    assert real["input_ids"].shape != other["input_ids"].shape
    score = dependency_from_inputs(handle.model, real, other, tr.token_ids, tr.mask, divergence="k3")
    assert score.shape == tr.mask.shape and (score[tr.mask] > 0).any()
    # re-encoding only the pixels (the TRL path) needs the same layout, and names the culprit
    with pytest.raises(ValueError, match="example 'test-1'.*another size"):
        with_images(
            real, handle.processor, [images[0], small[1], images[2], images[3]], [ex.id for ex in examples]
        )
    same = with_images(real, handle.processor, images, [ex.id for ex in examples])
    torch.testing.assert_close(same["pixel_values"], real["pixel_values"])


def test_an_image_the_processor_cannot_take_names_the_example(handle, examples, traced):
    tr = traced.trace

    class Picky:  # a processor that refuses all-black images
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def encode(self, prompts, images):
            if any(im.getextrema() == ((0, 0),) * 3 for ims in images for im in ims):
                raise OSError("cannot identify image content")
            return self.inner.encode(prompts, images)

    picky = Picky(handle)
    with pytest.raises(ValueError, match="example 'test-0': the processor cannot take its counterfactual"):
        visual_dependency_scores(
            picky, examples, tr.token_ids, tr.mask, counterfactual="patches", mask_fraction=1.0
        )


# -- the labeller ---------------------------------------------------------------------------------------


def test_visual_dependency_labeller(handle, examples, traced):
    tr = traced.trace
    options = {"counterfactual": "swap", "divergence": "k3", "visual_above": 1e-3, "text_below": 1e-4}
    roles = get_labeller("visual_dependency")(tr, handle=handle, examples=examples, **options)
    score = visual_dependency_scores(
        handle, examples, tr.token_ids, tr.mask, counterfactual="swap", divergence="k3"
    )
    assert torch.equal(roles, dependency_roles(score, tr.mask, 1e-3, 1e-4))
    # through the trace result (its handle and examples), and from a saved synthetic trace alone
    assert torch.equal(traced.roles("visual_dependency", **options), roles)
    rebuilt = get_labeller("visual_dependency")(tr, handle=handle, **options)
    assert torch.equal(rebuilt, roles)


def test_labeller_refuses_bad_options_before_any_forward(handle, examples, traced, monkeypatch):
    import dyco_probe.counterfactual as cf

    monkeypatch.setattr(cf, "visual_dependency_scores", lambda *a, **k: pytest.fail("ran the model"))
    labeller = get_labeller("visual_dependency")
    with pytest.raises(ValueError, match="wrong order"):
        labeller(traced.trace, handle=handle, visual_above=0.01, text_below=0.1)
    with pytest.raises(ValueError, match="unknown divergence"):
        labeller(traced.trace, handle=handle, divergence="tv")
    with pytest.raises(ValueError, match="pass handle="):
        labeller(traced.trace)
    with pytest.raises(ValueError, match="no option.*'tau_vis'"):
        check_options("visual_dependency", {"tau_vis": 0.1})
    with pytest.raises(ValueError, match="wrong order"):
        check_options("visual_dependency", {"text_below": DEPENDENCY_DEFAULTS["visual_above"] * 2})
    check_options("fisher_rao", {"tau_vis": 0.1})


def test_example_without_image_is_named(handle, examples, traced):
    bare = [dataclasses.replace(examples[0], images=[])] + list(examples[1:])
    with pytest.raises(ValueError, match="example 'test-0' has no image"):
        visual_dependency_scores(handle, bare, traced.trace.token_ids, traced.trace.mask)


def test_dependency_auroc_on_a_trace_and_on_trajectories(handle, examples, traced):
    from dyco_probe.interventions import prepare_trajectories

    tr = traced.trace
    score = visual_dependency_scores(handle, examples, tr.token_ids, tr.mask)
    high = tr.mask & (score > score[tr.mask].median())
    out = dependency_auroc(handle, tr, high, tr.mask & ~high, examples=examples, n_boot=20)
    assert out["auroc"] == 1.0 and out["n_pos"] == int(high.sum()) and torch.equal(out["score"], score)

    traj = prepare_trajectories(handle, examples, trajectory="gold", max_new_tokens=48)
    m = traj.completion_mask.cpu()
    first = torch.zeros_like(m)
    first[:, :3] = True
    out = dependency_auroc(handle, traj, first & m, ~first & m, n_boot=20, counterfactual="swap")
    assert 0 <= out["auroc"] <= 1 and out["n_pos"] == int((first & m).sum())
