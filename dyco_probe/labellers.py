"""Role labellers: a `Trace` (plus, for the ground truth, its examples) -> roles `[B, T]`.

    from dyco_probe.labellers import get_labeller, compare_roles

    roles = get_labeller("fisher_rao")(trace)                                  # docs/method.md#token-roles, the default
    truth = get_labeller("ground_truth")(trace, examples=examples, tokenizer=tok)
    compare_roles(roles, truth, trace.mask)                                    # precision / recall / F1

Every labeller is called as `labeller(trace, *, examples=None, tokenizer=None, handle=None, **options)`
and returns a `[B, T]` long tensor of `dyco_probe.roles.Role` codes (masked tokens neutral); `handle` (a
`ModelHandle`) is read only by the labellers that run the model:

- `fisher_rao`: the paper's rule, `label_roles` on the trace's `v_vis`, `v_txt` (options `tau_vis`,
  `tau_txt`).
- `hellinger`, `l2`, `jensen_shannon`, `symmetric_kl`: the same rule on dynamics measured with that
  distance. A trace stores `v` for the one distance it was traced with, and not the full attention
  distributions `v` would be recomputed from (the text span alone is the whole sequence), so these
  labellers need a trace made with `TraceConfig(distance=...)`; they refuse any other rather than
  silently read Fisher–Rao dynamics. Tracing the same completions again teacher-forced
  (`dyco_probe.api.trace_completions`) is one forward per batch. The thresholds keep the published
  numbers by default; they are in each distance's own units (ranges differ: see `distances.py`).
- `ratio_threshold`: the naive baseline without dynamics: visual where the normalised visual ratio
  `r̃_vis > theta`, text where `r̃_vis < theta_txt` (default `theta_txt = theta`, so every token gets
  a role), neutral in between. The first token is labelled too (its ratio exists).
- `ground_truth`: the synthetic task's roles (`dyco_probe.task.alignment`), for traces of synthetic
  examples; the problems come from `examples` or, for a saved trace, from the samples' `synthetic` record.
- `visual_dependency`: counterfactual, without attention: how much each token's next-token distribution
  changes when the image is taken away (VPPO, PAPO; `dyco_probe.counterfactual`). Visual where the
  score is above `visual_above`, text below `text_below`, neutral between. Runs the model (`handle`) on
  the trace's tokens, teacher-forced, with the real and a counterfactual image (`counterfactual`:
  `blank`, `patches`, `swap`; `divergence`: `kl`, `k3`); the examples come as for `ground_truth`.

Validation helpers: `compare_roles` (per-role precision, recall, F1 against a reference) and
`attention_peak_share` (do visual tokens' image attention peak on the relevant image token?).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .dependency import check_thresholds, dependency_roles
from .distances import DISTANCES
from .roles import ROLE_NAMES, TAU_TXT, TAU_VIS, Role, label_roles

__all__ = [
    "DEPENDENCY_DEFAULTS",
    "LABELLERS",
    "attention_peak_share",
    "check_options",
    "compare_roles",
    "dynamics_rule",
    "examples_for",
    "fisher_rao",
    "get_labeller",
    "ground_truth",
    "ground_truth_alignments",
    "parse_options",
    "problems_for",
    "ratio_threshold",
    "relevant_image_tokens",
    "trace_distance",
    "visual_dependency",
]


def trace_distance(trace) -> str:
    """The distance a trace's `v_vis`, `v_txt` were computed with (from its settings)."""
    return (trace.metadata or {}).get("settings", {}).get("distance", "fisher_rao")


def dynamics_rule(
    trace,
    distance: str = "fisher_rao",
    *,
    tau_vis: float = TAU_VIS,
    tau_txt: float = TAU_TXT,
    examples=None,
    tokenizer=None,
    handle=None,
) -> Tensor:
    """docs/method.md#token-roles on the trace's dynamics, which must have been measured with `distance`."""
    have = trace_distance(trace)
    if have != distance:
        raise ValueError(
            f"this trace's v_vis/v_txt were measured with {have!r}; the {distance!r} rule needs a trace made "
            f"with TraceConfig(distance={distance!r}) (e.g. dyco_probe.api.trace_completions on the same "
            "completions)"
        )
    return label_roles(trace.v_vis, trace.v_txt, trace.mask, tau_vis=tau_vis, tau_txt=tau_txt)


def fisher_rao(
    trace, *, tau_vis: float = TAU_VIS, tau_txt: float = TAU_TXT, examples=None, tokenizer=None, handle=None
) -> Tensor:
    """The paper's rule (docs/method.md#token-roles) with Fisher–Rao dynamics and the published thresholds."""
    return dynamics_rule(trace, "fisher_rao", tau_vis=tau_vis, tau_txt=tau_txt)


def ratio_threshold(
    trace,
    *,
    theta: float = 0.5,
    theta_txt: float | None = None,
    examples=None,
    tokenizer=None,
    handle=None,
) -> Tensor:
    """Naive baseline: visual where `r̃_vis > theta`, text where `r̃_vis < theta_txt` (default `theta`)."""
    low = theta if theta_txt is None else theta_txt
    if low > theta:
        raise ValueError(f"need theta_txt <= theta, got theta={theta}, theta_txt={low}")
    r = trace.r_vis_norm
    roles = torch.where(r > theta, int(Role.VISUAL), torch.where(r < low, int(Role.TEXT), int(Role.NEUTRAL)))
    return torch.where(trace.mask.bool() & ~torch.isnan(r), roles, int(Role.NEUTRAL)).long()


# -- ground truth ------------------------------------------------------------------------------------


def examples_for(trace, examples: Sequence | None = None) -> list:
    """The `Example` of every row of `trace`.

    From `examples` (matched by the samples' `example_id` / `sample_id`, else by position when there
    are as many examples as rows), or, without examples, rebuilt from the samples' `synthetic` record
    (seed and task config, written by `dyco_probe.api`).
    """
    samples = trace.samples or [{} for _ in range(trace.batch_size)]
    if examples is None:
        from .data import example_from_problem
        from .task.problems import TaskConfig, generate_problem

        out = []
        for i, s in enumerate(samples):
            syn = s.get("synthetic")
            if not syn:
                raise ValueError(
                    f"sample {i} has no 'synthetic' record: pass the examples (its problem and images are "
                    "not in the trace)"
                )
            problem = generate_problem(
                int(syn["seed"]), TaskConfig.from_dict(syn["config"]), s.get("example_id")
            )
            out.append(example_from_problem(problem))
        return out
    examples = list(examples)
    by_id = {str(ex.id): ex for ex in examples}
    ids = [str(s.get("example_id", s.get("sample_id"))) for s in samples]
    if samples and all(i in by_id for i in ids):
        return [by_id[i] for i in ids]
    if len(examples) == trace.batch_size:
        return examples
    raise ValueError(
        f"cannot match {len(examples)} examples to the trace's {trace.batch_size} samples (ids differ)"
    )


def problems_for(trace, examples: Sequence | None = None) -> list:
    """The synthetic `Problem` of every row of `trace` (rows matched to examples as `examples_for`)."""
    chosen = examples_for(trace, examples)
    missing = [ex.id for ex in chosen if ex.problem is None]
    if missing:
        raise ValueError(
            f"example {missing[0]!r} is not from the synthetic task: it has no ground-truth roles"
        )
    return [ex.problem for ex in chosen]


def ground_truth_alignments(trace, examples=None, *, tokenizer, subwords: str = "all") -> list:
    """`dyco_probe.task.alignment.TokenRoles` of every row's completion tokens (masked ones dropped)."""
    from .task.alignment import align_roles

    if tokenizer is None:
        raise ValueError("ground truth needs the model's tokenizer (token ids -> words)")
    problems = problems_for(trace, examples)
    out = []
    for i, problem in enumerate(problems):
        ids = trace.token_ids[i][trace.mask[i].bool()].tolist()
        out.append(align_roles(tokenizer, ids, problem, subwords=subwords))
    return out


def ground_truth(trace, *, examples=None, tokenizer=None, handle=None, subwords: str = "all") -> Tensor:
    """Ground-truth roles of the synthetic task, aligned to the trace's tokens."""
    roles = torch.zeros(trace.token_ids.shape, dtype=torch.long)
    for i, aligned in enumerate(
        ground_truth_alignments(trace, examples, tokenizer=tokenizer, subwords=subwords)
    ):
        cols = trace.mask[i].bool().nonzero().flatten()
        roles[i, cols] = torch.tensor(aligned.roles, dtype=torch.long)
    return roles


def relevant_image_tokens(trace, alignments: Sequence, token_grid: tuple[int, int] | None = None) -> Tensor:
    """`[B, T, N]` bool: the image tokens (of the first image, packed as in `trace.image_rows`) showing
    each token's relevant cells; all False for tokens without relevant cells."""
    from .task.alignment import cell_image_tokens

    n = trace.image_rows.shape[-1] if trace.image_rows is not None else 0
    n = max([n] + [int(s.get("num_image_tokens", 0)) for s in trace.samples])
    out = torch.zeros((*trace.token_ids.shape, n), dtype=torch.bool)
    samples = trace.samples or [{} for _ in range(trace.batch_size)]
    for i, aligned in enumerate(alignments):
        cols = trace.mask[i].bool().nonzero().flatten().tolist()
        grid = _grid_of(trace, i)
        count = int(samples[i].get("num_image_tokens", n))
        for t, cells in zip(cols, aligned.cells):
            if cells:
                out[i, t, cell_image_tokens(cells, grid, count, token_grid)] = True
    return out


def _grid_of(trace, i: int) -> int:
    syn = (trace.samples[i] if trace.samples else {}).get("synthetic") or {}
    return int(syn.get("config", {}).get("grid", 4))


# -- visual dependency (counterfactual) -----------------------------------------------------------------

# Chosen on the built-in model's greedy completions of 300 `val` examples, validated on `test`
# (docs/visual_dependency.md, `python -m analyses.validate_labellers --only dependency`).
DEPENDENCY_DEFAULTS = {
    "counterfactual": "blank",
    "divergence": "kl",
    "visual_above": 0.1,
    "text_below": 0.05,
    "mask_fraction": 0.5,
}


def visual_dependency(
    trace,
    *,
    handle=None,
    examples=None,
    tokenizer=None,
    visual_above: float = DEPENDENCY_DEFAULTS["visual_above"],
    text_below: float = DEPENDENCY_DEFAULTS["text_below"],
    counterfactual: str = DEPENDENCY_DEFAULTS["counterfactual"],
    divergence: str = DEPENDENCY_DEFAULTS["divergence"],
    mask_fraction: float = DEPENDENCY_DEFAULTS["mask_fraction"],
    patch_size: int | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 32,
) -> Tensor:
    """Counterfactual roles: visual where the token's visual dependency is above `visual_above`, text
    where it is below `text_below` (nats), neutral between.

    The score (`dyco_probe.counterfactual.visual_dependency_scores`) is the divergence between the
    next-token distributions with the real image and with a counterfactual one, from a teacher-forced
    forward of both on the trace's tokens: one forward of `2 × batch_size` rows per batch. Needs the
    model (`handle`) and the examples (as for `ground_truth`: given, or rebuilt from a synthetic
    trace's records). Thresholds in the wrong order and unknown options are refused before any forward.
    """
    from .counterfactual import check_counterfactual, visual_dependency_scores

    check_thresholds(visual_above, text_below)
    check_counterfactual(counterfactual, divergence, mask_fraction, patch_size)
    if handle is None:
        raise ValueError("visual_dependency runs the model: pass handle= (a dyco_probe ModelHandle)")
    score = visual_dependency_scores(
        handle,
        examples_for(trace, examples),
        trace.token_ids,
        trace.mask,
        counterfactual=counterfactual,
        divergence=divergence,
        mask_fraction=mask_fraction,
        patch_size=patch_size,
        seed=seed,
        temperature=temperature,
        batch_size=batch_size,
    )
    return dependency_roles(score, trace.mask, visual_above, text_below)


# -- validation ---------------------------------------------------------------------------------------


def compare_roles(pred: Tensor, truth: Tensor, mask: Tensor, *, neutral: str = "included") -> dict:
    """Precision, recall and F1 of predicted roles against reference roles, per role.

    Args:
        pred, truth: `[B, T]` `Role` codes.
        mask: `[B, T]` real tokens.
        neutral: `"included"`: every real token counts, three classes (visual, text, neutral);
            `"excluded"`: only tokens whose reference role is visual or text count, two classes (a token
            predicted neutral is a miss; precision is over those tokens only).

    Returns:
        `{"roles": {name: {"precision", "recall", "f1", "support", "predicted"}}, "macro_f1", "accuracy",
        "tokens"}`. Precision (recall) is NaN for a role never predicted (never present); F1 is
        `2·tp / (predicted + support)`, 0 for a present role never predicted; the macro F1 averages
        the roles present in the reference.
    """
    if neutral not in ("included", "excluded"):
        raise ValueError(f"neutral must be 'included' or 'excluded', got {neutral!r}")
    keep = mask.bool()
    if neutral == "excluded":
        keep = keep & (truth != int(Role.NEUTRAL))
    p, r = pred[keep], truth[keep]
    classes = [Role.VISUAL, Role.TEXT] + ([Role.NEUTRAL] if neutral == "included" else [])
    out = {}
    for role in classes:
        tp = int(((p == role) & (r == role)).sum())
        n_pred, n_true = int((p == role).sum()), int((r == role).sum())
        prec = tp / n_pred if n_pred else float("nan")
        rec = tp / n_true if n_true else float("nan")
        f1 = 2 * tp / (n_pred + n_true) if n_pred + n_true else float("nan")  # harmonic mean of P and R
        out[ROLE_NAMES[role]] = {
            "precision": prec,
            "recall": rec,
            "f1": f1,
            "support": n_true,
            "predicted": n_pred,
        }
    f1s = [v["f1"] for v in out.values() if v["support"]]
    macro = sum(f1s) / len(f1s) if f1s else float("nan")
    tokens = int(keep.sum())
    return {
        "roles": out,
        "macro_f1": macro,
        "accuracy": float((p == r).float().mean()) if tokens else float("nan"),
        "tokens": tokens,
    }


def attention_peak_share(trace, relevant: Tensor, roles: Tensor | None = None) -> dict:
    """Share of tokens whose attention over the image peaks on a relevant image token.

    Counted over real tokens that have relevant image tokens (and, if `roles` is given, whose role there
    is visual). Needs a trace with `image_rows` (`TraceConfig(image_rows=True)`).

    Returns `{"share", "chance", "tokens"}`; `chance` is the mean of `|relevant| / num_image_tokens`
    over the counted tokens (1/16 for one relevant cell of the built-in 4x4 image).
    """
    if trace.image_rows is None:
        raise ValueError("attention_peak_share needs image rows: trace with TraceConfig(image_rows=True)")
    rows = trace.image_rows
    n = rows.shape[-1]
    rel = relevant[..., :n]
    valid_keys = trace.image_rows_mask[:, None, :].expand_as(rows)
    keep = trace.mask.bool() & rel.any(-1)
    if roles is not None:
        keep = keep & (roles == int(Role.VISUAL))
    peak = rows.masked_fill(~valid_keys, float("-inf")).argmax(-1, keepdim=True)
    hit = rel.gather(-1, peak).squeeze(-1)
    counts = trace.image_rows_mask.sum(-1)[:, None].expand_as(keep).float()
    tokens = int(keep.sum())
    if not tokens:
        return {"share": float("nan"), "chance": float("nan"), "tokens": 0}
    return {
        "share": float(hit[keep].float().mean()),
        "chance": float((rel.sum(-1).float() / counts)[keep].mean()),
        "tokens": tokens,
    }


# -- registry ------------------------------------------------------------------------------------------

Labeller = Callable[..., Tensor]


def _distance_labeller(distance: str) -> Labeller:
    fn = functools.partial(dynamics_rule, distance=distance)
    fn.__name__ = distance
    fn.__doc__ = f"docs/method.md#token-roles with {distance} dynamics (needs a trace made with TraceConfig(distance={distance!r}))."
    return fn


LABELLERS: dict[str, Labeller] = {
    "fisher_rao": fisher_rao,
    **{d: _distance_labeller(d) for d in DISTANCES if d != "fisher_rao"},
    "ratio_threshold": ratio_threshold,
    "ground_truth": ground_truth,
    "visual_dependency": visual_dependency,
}


def get_labeller(name: str) -> Labeller:
    """A labeller by name; raises `ValueError` listing the valid names."""
    try:
        return LABELLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown labeller {name!r}; valid: {', '.join(LABELLERS)}") from None


def check_options(name: str, options: dict) -> None:
    """Raise `ValueError`, before any work, for an unknown labeller, options it does not take, and (for
    `visual_dependency`) thresholds in the wrong order or an unknown counterfactual or divergence."""
    from .counterfactual import check_counterfactual

    params = set(inspect.signature(get_labeller(name)).parameters) - {
        "trace",
        "examples",
        "tokenizer",
        "handle",
    }
    unknown = sorted(set(options) - params)
    if unknown:
        raise ValueError(f"labeller {name!r} takes no option(s) {unknown}; its options: {sorted(params)}")
    if name == "visual_dependency":
        o = {**DEPENDENCY_DEFAULTS, **options}
        check_thresholds(float(o["visual_above"]), float(o["text_below"]))
        check_counterfactual(
            o["counterfactual"], o["divergence"], float(o["mask_fraction"]), o.get("patch_size")
        )


def parse_options(text: str) -> dict[str, float | str]:
    """Labeller options from the command line, ``name=value,...``: numbers as floats, the rest as text."""
    out: dict[str, float | str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"expected name=value, got {part!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            out[name.strip()] = value.strip()
    return out
