"""Labellers against the synthetic task's ground truth: the numbers (`analyses/validate_labellers.py`
writes them up, `dyco_probe.studies.labeller_validation`).

- `role_agreement`: the Fisher–Rao rule (published thresholds) and the ratio baseline against the
  ground truth of one trace, JSON-ready (the demo's and the report's quick check);
- `collect`: the traces the full validation reads (online, and teacher-forced per distance, layer
  and head), cached by weights, split, size and token budget;
- scores: `score_rows` (P / R / F1 per role, macro F1 with a bootstrap interval), `sweep` and
  `theta_sweep` (thresholds), `held_out` (thresholds chosen on one half, scored on the other),
  `visual_token_peaks` (where each labeller's visual tokens look), `overlap` (two labellers' visual
  tokens), `dependency_scores` (the counterfactual labeller's scores, cached).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dyco_probe.models.loading import checkpoint_dir, weights_digest
from dyco_probe.roles import PUBLISHED_TAU, tau_label

DISTANCES = ("fisher_rao", "hellinger", "l2", "jensen_shannon", "symmetric_kl")
TAU_TXT_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# negative tau_vis moves the visual boundary below zero (allowed while tau_vis >= -tau_txt)
TAU_VIS_GRID = (-0.1, -0.05, -0.02, -0.01, -0.005) + TAU_TXT_GRID
THETA_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))
BOOTSTRAP = 500
COUNTERFACTUALS = ("blank", "patches", "swap")
DIVERGENCES = ("kl", "k3")
# dependency thresholds (nats), for visual_above and text_below alike
DEPENDENCY_GRID = (0.0, 1e-4, 1e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
PUBLISHED_SETTING = f"{tau_label()} (published)"  # how tables name the Fisher–Rao rule at the defaults


# -- the quick check: one trace against the ground truth ----------------------------------------------


def _finite(x):
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def role_agreement(trace, tokenizer, *, examples=None, theta: float = 0.5) -> dict:
    """The token-role rule (docs/method.md#token-roles) (Fisher–Rao, published thresholds) and the ratio baseline against the synthetic
    task's ground-truth roles, neutral tokens excluded and included (`labellers.compare_roles`), and,
    for traces with image rows, where ground-truth visual tokens' image attention peaks
    (`labellers.attention_peak_share`). JSON-ready (NaN -> None)."""
    from dyco_probe.labellers import (
        attention_peak_share,
        compare_roles,
        get_labeller,
        ground_truth_alignments,
        relevant_image_tokens,
    )
    from dyco_probe.roles import ROLE_NAMES

    aligned = ground_truth_alignments(trace, examples, tokenizer=tokenizer)
    truth = get_labeller("ground_truth")(trace, examples=examples, tokenizer=tokenizer)
    mask = trace.mask.bool()
    labellers = {
        "fisher_rao": (PUBLISHED_SETTING, get_labeller("fisher_rao")(trace)),
        "ratio_threshold": (f"theta {theta}", get_labeller("ratio_threshold")(trace, theta=theta)),
    }
    out = {
        "against": "ground_truth",
        "samples": trace.batch_size,
        "tokens": int(mask.sum()),
        "truth_fractions": {n: float((truth[mask] == i).float().mean()) for i, n in enumerate(ROLE_NAMES)},
        "labellers": {},
    }
    for name, (setting, pred) in labellers.items():
        out["labellers"][name] = {
            "setting": setting,
            "fractions": {n: float((pred[mask] == i).float().mean()) for i, n in enumerate(ROLE_NAMES)},
            **{n: compare_roles(pred, truth, trace.mask, neutral=n) for n in ("excluded", "included")},
        }
    if trace.image_rows is not None:
        out["attention_peak"] = attention_peak_share(trace, relevant_image_tokens(trace, aligned), truth)
    return _finite(out)


def labeller_table(agreement: dict):
    """`role_agreement`'s result as a long table with the columns of `labeller_validation.csv`
    (`analyses/validate_labellers.py`), so `viz.plot_labeller_validation` draws both."""
    import pandas as pd

    rows = []
    for name, res in agreement.get("labellers", {}).items():
        for neutral in ("excluded", "included"):
            scores = res[neutral]
            for role, v in scores["roles"].items():
                rows.append(
                    {
                        "labeller": name,
                        "setting": res.get("setting", ""),
                        "neutral": neutral,
                        "role": role,
                        **{k: _nan(v.get(k)) for k in ("precision", "recall", "f1")},
                        "support": v.get("support"),
                        "predicted": v.get("predicted"),
                        "macro_f1": _nan(scores.get("macro_f1")),
                        "macro_f1_lo": math.nan,
                        "macro_f1_hi": math.nan,
                        "accuracy": _nan(scores.get("accuracy")),
                        "tokens": scores.get("tokens"),
                    }
                )
    return pd.DataFrame(rows)


def _nan(x):
    return math.nan if x is None else float(x)


# -- traces -------------------------------------------------------------------------------------------


def cached(path: Path, make):
    from dyco_probe.tracing import Trace

    if path.exists():
        return Trace.load(path)
    tr = make()
    tr.save(path)
    return tr


def collect(args) -> dict:
    """The online trace (with image rows) and teacher-forced traces of the same tokens per distance and layer."""
    from dyco_probe.api import trace, trace_completions
    from dyco_probe.data import synthetic_examples
    from dyco_probe.models.loading import load
    from dyco_probe.tracing import TraceConfig

    # traces depend on the weights and the data: one cache folder per (weights, split, n, budget)
    key = f"{weights_digest(args.model)}-{args.split}-{args.n}-{args.max_new_tokens}"
    runs = Path(args.runs) / key / args.completions
    progress = getattr(args, "progress", True)
    runs.mkdir(parents=True, exist_ok=True)
    handle = load(args.model)
    examples = synthetic_examples(args.split, args.n)

    def online():
        if args.completions == "gold":  # the gold chains, teacher-forced
            gold = [ex.completion for ex in examples]
            config = TraceConfig(image_rows=True)
            return trace_completions(
                handle, examples, gold, config=config, batch_size=args.batch_size, progress=progress
            ).trace
        return trace(
            handle,
            examples,
            config=TraceConfig(image_rows=True),
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            parts=runs / "online.parts",
            progress=progress,
        ).trace

    main = cached(runs / "traced.parquet", online)
    if args.only == "dependency":
        return {"handle": handle, "examples": examples, "online": main, "runs": runs}
    ids = [main.token_ids[i][main.mask[i]].tolist() for i in range(main.batch_size)]

    def offline(config):
        return lambda: (
            trace_completions(
                handle, examples, ids, config=config, batch_size=args.batch_size, progress=progress
            ).trace
        )

    by_distance = {
        d: cached(runs / f"offline_{d}.parquet", offline(TraceConfig(distance=d))) for d in DISTANCES
    }
    layers = range(handle.num_layers)
    by_layer = {
        layer: cached(
            runs / f"offline_layer{layer}.parquet", offline(TraceConfig(layers=(layer,), image_rows=True))
        )
        for layer in layers
    }
    by_layer["all"] = cached(
        runs / "offline_layer_all.parquet", offline(TraceConfig(layers="all", image_rows=True))
    )
    last = handle.num_layers - 1
    for head in range(handle.num_heads):  # the heads of the probed (last) layer, one at a time
        by_layer[f"{last}/h{head}"] = cached(
            runs / f"offline_layer{last}_head{head}.parquet",
            offline(TraceConfig(layers=(last,), heads=(head,), image_rows=True)),
        )
    return {
        "handle": handle,
        "examples": examples,
        "online": main,
        "runs": runs,
        "by_distance": by_distance,
        "by_layer": by_layer,
    }


# -- metrics ------------------------------------------------------------------------------------------


def bootstrap_macro(pred, truth, mask, neutral: str, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the macro F1 over examples resampled with replacement."""
    from dyco_probe.labellers import compare_roles

    g = torch.Generator().manual_seed(seed)
    b = pred.shape[0]
    values = []
    for _ in range(BOOTSTRAP):
        idx = torch.randint(0, b, (b,), generator=g)
        values.append(compare_roles(pred[idx], truth[idx], mask[idx], neutral=neutral)["macro_f1"])
    values = sorted(v for v in values if not math.isnan(v))
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def score_rows(name: str, setting: str, pred, truth, mask) -> list[dict]:
    from dyco_probe.labellers import compare_roles

    rows = []
    for neutral in ("excluded", "included"):
        res = compare_roles(pred, truth, mask, neutral=neutral)
        lo, hi = bootstrap_macro(pred, truth, mask, neutral)
        for role, v in res["roles"].items():
            rows.append(
                {
                    "labeller": name,
                    "setting": setting,
                    "neutral": neutral,
                    "role": role,
                    **{k: v[k] for k in ("precision", "recall", "f1", "support", "predicted")},
                    "macro_f1": res["macro_f1"],
                    "macro_f1_lo": lo,
                    "macro_f1_hi": hi,
                    "accuracy": res["accuracy"],
                    "tokens": res["tokens"],
                }
            )
    return rows


def macro(pred, truth, mask, neutral: str) -> float:
    from dyco_probe.labellers import compare_roles

    return compare_roles(pred, truth, mask, neutral=neutral)["macro_f1"]


def sweep(trace, truth, rows_subset=None) -> list[dict]:
    """Macro F1 of the role rule (docs/method.md#token-roles) over the (tau_vis, tau_txt) grid (on `rows_subset` of the samples)."""
    from dyco_probe.roles import label_roles

    idx = torch.arange(trace.batch_size) if rows_subset is None else rows_subset
    v_vis, v_txt, mask, t = trace.v_vis[idx], trace.v_txt[idx], trace.mask[idx], truth[idx]
    out = []
    for tau_vis in TAU_VIS_GRID:
        for tau_txt in TAU_TXT_GRID:
            if tau_vis < -tau_txt:
                continue
            pred = label_roles(v_vis, v_txt, mask, tau_vis=tau_vis, tau_txt=tau_txt)
            out.append(
                {
                    "rule": "dynamics",
                    "tau_vis": tau_vis,
                    "tau_txt": tau_txt,
                    "macro_f1_excluded": macro(pred, t, mask, "excluded"),
                    "macro_f1_included": macro(pred, t, mask, "included"),
                    "visual_fraction": float((pred[mask] == 1).float().mean()),
                    "text_fraction": float((pred[mask] == 2).float().mean()),
                }
            )
    return out


def theta_sweep(trace, truth, rows_subset=None) -> list[dict]:
    from dyco_probe.labellers import ratio_threshold

    idx = torch.arange(trace.batch_size) if rows_subset is None else rows_subset
    sub = trace.select(idx.tolist())
    out = []
    for theta in THETA_GRID:
        pred = ratio_threshold(sub, theta=theta)
        out.append(
            {
                "rule": "ratio",
                "theta": theta,
                "macro_f1_excluded": macro(pred, truth[idx], sub.mask, "excluded"),
                "macro_f1_included": macro(pred, truth[idx], sub.mask, "included"),
            }
        )
    return out


def held_out(trace, truth, key: str) -> dict:
    """Thresholds chosen on one half of the samples, scored on the other half, both ways; the published
    defaults scored on the same halves."""
    from dyco_probe.roles import label_roles

    b = trace.batch_size
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(0))
    halves = (perm[: b // 2], perm[b // 2 :])
    tuned, default, chosen = [], [], []
    neutral = key.rsplit("_", 1)[-1]
    for fit, test in (halves, halves[::-1]):
        best = max(sweep(trace, truth, fit), key=lambda r: r[key])
        chosen.append((best["tau_vis"], best["tau_txt"]))
        v_vis, v_txt, mask, t = trace.v_vis[test], trace.v_txt[test], trace.mask[test], truth[test]
        tuned.append(macro(label_roles(v_vis, v_txt, mask, *chosen[-1]), t, mask, neutral))
        default.append(macro(label_roles(v_vis, v_txt, mask, *PUBLISHED_TAU), t, mask, neutral))
    return {"chosen": chosen, "tuned": sum(tuned) / 2, "default": sum(default) / 2}


def visual_token_peaks(trace, relevant, objects, predictions, truth) -> list[dict]:
    """For each `(labeller, setting, roles)`: how many tokens it calls visual, how many of those have a
    relevant image token (a look-up: only ground-truth visual tokens have one), and, over those, the share
    whose image attention peaks on a relevant image token (`attention_peak_share`) and on any object's cell.
    The labeller's other visual tokens name no object, so their peak says nothing about a look-up: they
    are counted (with their true roles), not scored."""
    from dyco_probe.labellers import attention_peak_share
    from dyco_probe.roles import Role

    has_relevant = relevant.any(-1)
    objects = objects & has_relevant[..., None]  # the same tokens as the relevant-token share
    out = []
    for name, setting, pred in predictions:
        called = trace.mask.bool() & (pred == int(Role.VISUAL))
        unrelated = called & ~has_relevant
        peak = attention_peak_share(trace, relevant, pred)
        on_object = attention_peak_share(trace, objects, pred)
        out.append(
            {
                "labeller": name,
                "setting": setting,
                "visual_tokens": int(called.sum()),
                "with_relevant": int((called & has_relevant).sum()),
                "without_relevant": int(unrelated.sum()),
                "without_relevant_share": float(unrelated.sum() / called.sum())
                if called.any()
                else float("nan"),
                "without_relevant_text": int((unrelated & (truth == int(Role.TEXT))).sum()),
                "without_relevant_neutral": int((unrelated & (truth == int(Role.NEUTRAL))).sum()),
                "peak_share": peak["share"],
                "chance": peak["chance"],
                "object_share": on_object["share"],
                "object_chance": on_object["chance"],
                "tokens": peak["tokens"],
            }
        )
    return out


def overlap(pred_a, pred_b, truth, mask) -> dict:
    """How two labellers' visual tokens overlap, among true visual and other tokens."""
    from dyco_probe.roles import Role

    a, b = pred_a == int(Role.VISUAL), pred_b == int(Role.VISUAL)
    out = {}
    for name, group in (("true_visual", truth == int(Role.VISUAL)), ("other", truth != int(Role.VISUAL))):
        g = mask.bool() & group
        out[name] = {
            "tokens": int(g.sum()),
            "both": int((g & a & b).sum()),
            "only_first": int((g & a & ~b).sum()),
            "only_second": int((g & ~a & b).sum()),
            "neither": int((g & ~a & ~b).sum()),
        }
    return out


# -- visual dependency (counterfactual labeller) ------------------------------------------------------


def counterfactual_name(cf: str, args) -> str:
    return f"patches {args.mask_fraction}" if cf == "patches" else cf


def dependency_setting(cf: str, div: str, args, thresholds) -> str:
    return f"{counterfactual_name(cf, args)}, {div}, {thresholds[0]:g} / {thresholds[1]:g}"


def dependency_scores(args, data) -> dict:
    """`{(counterfactual, divergence): [B, T] score}` of the online trace's tokens, cached in the runs folder."""
    from dyco_probe.counterfactual import visual_dependency_scores

    online, out = data["online"], {}
    for cf in args.counterfactuals:
        for div in args.divergences:
            extra = f"_{args.mask_fraction}" if cf == "patches" else ""
            path = data["runs"] / f"dependency_{cf}{extra}_{div}.pt"
            if not path.exists():
                score = visual_dependency_scores(
                    data["handle"],
                    data["examples"],
                    online.token_ids,
                    online.mask,
                    counterfactual=cf,
                    divergence=div,
                    mask_fraction=args.mask_fraction,
                    batch_size=args.batch_size,
                )
                torch.save(score, path)
            out[(cf, div)] = torch.load(path)
    return out


# -- provenance ---------------------------------------------------------------------------------------


def training_note(model: str) -> str | None:
    """A caveat when the model's pretraining recipe supervised attention to the relevant image token."""
    path = checkpoint_dir(model) / "recipe.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text()).get("config", {})
    if not config.get("attention_hint_weight"):
        return None
    return (
        f"Caveat: this model's pretraining asked head {config.get('attention_hint_head', 0)} of the last layer to "
        f"attend from each look-up query to this very token, with a weight fading to zero over the first "
        f"{config.get('attention_hint_until', 0):.0%} of the language steps; the last layer's peak share (and that "
        "head's) is partly trained in, so it validates the tracer's bookkeeping (rows, image-token order, cells) "
        "more than it discovers anything, while the other layers and heads were never supervised."
        + (
            f" Head {config['table_hint_head']} of the last layer got the same hint from each table look-up "
            "(the number copied from the question) to the question's entry, so the last layer's text attention "
            "at those text-role tokens is partly trained in as well."
            if config.get("table_hint_head") is not None
            else ""
        )
    )


# -- write-up helpers ---------------------------------------------------------------------------------


def f3(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def table(rows: list[dict], neutral: str) -> list[str]:
    roles = ["visual", "text"] + (["neutral"] if neutral == "included" else [])
    head = (
        "| labeller | setting | "
        + " | ".join(f"{r} P / R / F1" for r in roles)
        + " | macro F1 [95% CI] | accuracy |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    keys = list(dict.fromkeys((r["labeller"], r["setting"]) for r in rows))
    for name, setting in keys:
        sel = {
            r["role"]: r
            for r in rows
            if (r["labeller"], r["setting"]) == (name, setting) and r["neutral"] == neutral
        }
        first = next(iter(sel.values()))
        cells = [f"{f3(sel[r]['precision'])} / {f3(sel[r]['recall'])} / {f3(sel[r]['f1'])}" for r in roles]
        ci = f"{f3(first['macro_f1'])} [{f3(first['macro_f1_lo'])}, {f3(first['macro_f1_hi'])}]"
        lines.append(f"| {name} | {setting} | " + " | ".join(cells) + f" | {ci} | {f3(first['accuracy'])} |")
    return lines


def verdict(a: dict, b: dict) -> str:
    """How row `a`'s macro F1 compares with row `b`'s, by their bootstrap intervals."""
    if a["macro_f1_lo"] > b["macro_f1_hi"]:
        return "above"
    if a["macro_f1_hi"] < b["macro_f1_lo"]:
        return "below"
    return "not distinguishable from"
