"""The positive control: which signals tell a look-up copied from a note from one read from the image.

The built-in model's task plants a known coordination failure (``dyco_probe.task.problems``): at the
look-up of a noted object a chain either reads the image (``triangle red``) or cites the note
(``triangle note blue``). Sampling several completions per noted problem gives both forms for the same
prompt; every value token's signals are then compared between the forms::

    from dyco_probe.positive_control import copy_vs_read, detection

    table, result = copy_vs_read(handle, noted_problems, samples=8)   # one row per look-up value token
    detection(table)["r_vis_norm"]["auroc"]                            # read vs copied, 0.5 = blind

``detection`` gives, per signal, the AUROC for telling read (positive) from copied value tokens with a
95% bootstrap interval over prompts (the samples of one prompt are resampled together), and the share
of prompts with both forms where the read tokens' mean is higher. ``analyses/positive_control.py``
writes the full report.
"""

from __future__ import annotations

import math

__all__ = [
    "INTERVENTIONS",
    "SIGNALS",
    "copy_vs_read",
    "detection",
    "note_interventions",
    "summarise_interventions",
    "verdict",
]

# per-token signals: column of dyco_probe.task.notes.lookup_tokens -> (description, sign); the AUROC
# is that of sign * value for "read" against "copied"
SIGNALS = {
    "fr_visual": ("Fisher–Rao role is visual (paper's rule, published thresholds)", 1),
    "delta": ("Fisher–Rao Δ = v_vis − v_txt", 1),
    "s": ("alignment score s_t (Fisher–Rao roles)", 1),
    "r_vis_norm": ("r_vis / (r_vis + r_txt)", 1),
    "ratio_visual": ("ratio-threshold labeller (θ = 0.5) says visual", 1),
    "named_share": ("share of image attention on the named object's cell", 1),
    "peak_on_named": ("image attention peaks on the named object's cell", 1),
    "on_note": ("attention on the note's value (lower = read)", -1),
    "visual_dependency": ("visual dependency (KL of next-token distributions, real vs blank image)", 1),
}


def copy_vs_read(
    handle, problems, samples: int = 8, *, seed: int = 0, batch_size: int = 16, progress: bool = True
):
    """Trace ``samples`` sampled completions (temperature 1) per problem, online, with image rows,
    plus each token's attention on the note; returns ``(table, trace result)``: one row per look-up
    value token (``dyco_probe.task.notes.lookup_tokens``, plus ``prompt``, ``ratio_visual``,
    ``fr_visual`` and ``trajectory_correct``)."""
    import dyco_probe as dp
    from dyco_probe.data import example_from_problem
    from dyco_probe.task.notes import lookup_tokens, note_attention_rows

    examples = [example_from_problem(p) for p in problems]
    res = dp.trace(
        handle,
        examples,
        config=dp.TraceConfig(image_rows=True),
        do_sample=True,
        num_samples=samples,
        temperature=1.0,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    trace = res.trace
    rows = [p for p in problems for _ in range(samples)]
    ids = [trace.token_ids[i][trace.mask[i].bool()].tolist() for i in range(len(trace))]
    on_note = note_attention_rows(handle, rows, ids)
    table = lookup_tokens(trace, rows, handle.tokenizer, note_attention=on_note)
    table["prompt"] = table["sample"] // samples
    table["ratio_visual"] = (table["r_vis_norm"] > 0.5).astype(float)
    table["fr_visual"] = (table["fr_role"] == "visual").astype(float)
    if "peak_on_named" in table:
        table["peak_on_named"] = table["peak_on_named"].astype(float)
    correct = {i: bool(r["correct"]) for i, r in enumerate(res.records)}
    table["trajectory_correct"] = table["sample"].map(correct)
    if len(table):
        import torch

        from dyco_probe.counterfactual import visual_dependency_scores

        dependency = visual_dependency_scores(
            handle, res.examples, trace.token_ids, trace.mask, batch_size=batch_size
        )
        rows, cols = (torch.tensor(table[c].to_numpy(dtype="int64")) for c in ("sample", "t"))
        table["visual_dependency"] = dependency[rows, cols].numpy()
    return table, res


def detection(table, n_boot: int = 1000) -> dict:
    """AUROC (read vs copied) per signal over the noted look-ups, with intervals over prompts."""
    import numpy as np

    from dyco_probe.analysis import auroc_ci

    noted = table[table["note"] != ""]
    read = (noted["lookup"] == "read").to_numpy()
    out = {}
    for name, (description, sign) in SIGNALS.items():
        if name not in noted:
            continue
        values = sign * noted[name].to_numpy(dtype=float)
        res = auroc_ci(values, read, n_boot=n_boot, clusters=noted["prompt"].to_numpy())
        both = same = 0
        for _, g in noted.groupby("prompt"):
            r, c = g[g["lookup"] == "read"][name], g[g["lookup"] == "copied"][name]
            if len(r) and len(c):
                both += 1
                same += int(sign * (r.mean() - c.mean()) > 0)
        out[name] = {
            "description": description,
            **res,
            "mean_read": float(np.nanmean(noted[name][read])) if read.any() else math.nan,
            "mean_copied": float(np.nanmean(noted[name][~read])) if (~read).any() else math.nan,
            "prompts_with_both": both,
            "prompts_read_higher": same,
        }
    return out


def verdict(res: dict) -> str:
    """``sees it`` (interval above 0.5; ``weakly`` below AUROC 0.7), ``blind``, ``inverted``."""
    lo, hi, a = res.get("ci_low", math.nan), res.get("ci_high", math.nan), res["auroc"]
    if math.isnan(a):
        return "not measurable"
    if lo > 0.5:
        return "sees it" if a >= 0.7 else "sees it weakly"
    if hi < 0.5:
        return "inverted"
    return "blind"


# -- interventions on the planted failure ---------------------------------------------------------

INTERVENTIONS = {
    # name -> (key span, where, description)
    "note@value": ("note", "value", "note knocked out at the noted look-up's value token"),
    "note@decision": ("note", "decision", "note knocked out at the token that decides the look-up's form"),
    "note@rest": ("note", "rest", "note knocked out at every completion token from the decision on"),
    "image@value": ("image", "value", "image knocked out at the noted look-up's value token"),
}


def note_interventions(handle, problems, *, max_new_tokens: int = 96, batch_size: int = 16, progress=True):
    """Knock out attention to the note, or to the image, at the noted look-up of chains that read or
    copy it, teacher-forced and free-running (all layers, all heads).

    Every noted problem is taken twice as a fixed trajectory: its gold chain (the look-up read from the
    image) and the chain that copies the note (``KEY note VALUE``, the rest following from it). Per
    trajectory and intervention (``INTERVENTIONS``), at the noted look-up's value token, at the token
    that decides its form (the value itself for a read look-up, ``note`` for a copied one), or at every
    completion token from that decision on (``dlogp_target`` then averages over them):
    ``dlogp_target`` (change of the intervened token's log-probability, teacher-forced), and,
    regenerating from that token, ``correct_base`` / ``correct_int`` (answer correct without / with
    the intervention) and ``dacc``. Returns a DataFrame, one row per trajectory and intervention.
    """
    import dataclasses

    import pandas as pd
    import torch

    from dyco_probe.data import example_from_problem
    from dyco_probe.interventions import Intervention, prepare_trajectories
    from dyco_probe.task.alignment import align_roles
    from dyco_probe.task.problems import NOTE

    note_id = handle.tokenizer.convert_tokens_to_ids(NOTE)
    rows = []
    items = []
    for k, p in enumerate(problems):
        ex = example_from_problem(p)
        items.append((k, p, "read", ex))
        copy = " ".join(p.chain_words(copied={p.note.key}))
        items.append((k, p, "copied", dataclasses.replace(ex, id=f"{ex.id}-copy", completion=copy)))
    bar = _bar(len(items), progress)
    for lo in range(0, len(items), batch_size):
        chunk = items[lo : lo + batch_size]
        traj = prepare_trajectories(
            handle,
            [it[3] for it in chunk],
            [lo + j for j in range(len(chunk))],
            trajectory="gold",
            max_new_tokens=max_new_tokens,
        )
        ids = traj.prompt_inputs["input_ids"].cpu()
        width = ids.shape[1]
        where = {}
        for j, (_, p, form, _) in enumerate(chunk):
            n = int(traj.completion_mask[j].sum())
            aligned = align_roles(handle.tokenizer, traj.completion_ids[j, :n].tolist(), p)
            value = next(t for t, note in enumerate(aligned.note) if note)
            at = (ids[j] == note_id).nonzero().flatten()
            # the note's distance from the prompt's end: the same in any batch (prompts are left-padded)
            where[j] = {
                "value": value,
                "decision": value if form == "read" else value - 1,
                "from_end": width - int(at[0]),
            }
        for name, (keys, at, _) in INTERVENTIONS.items():
            groups: dict[int, list[int]] = {}
            for j in where:
                groups.setdefault(where[j]["from_end"] if keys == "note" else 0, []).append(j)
            for from_end, members in groups.items():
                sub = traj.select(members)  # prompts re-encoded: columns from this batch's width
                col = sub.prompt_inputs["input_ids"].shape[1] - from_end
                if keys == "note" and not bool(
                    (sub.prompt_inputs["input_ids"][:, col].cpu() == note_id).all()
                ):
                    raise RuntimeError(f"the note's columns do not line up in a batch of {sub.indices}")
                spec = (
                    Intervention.knockout("positions", key_columns=(col, col + 1, col + 2))
                    if keys == "note"
                    else Intervention.knockout("image")
                )
                selection = torch.zeros(sub.completion_ids.shape, dtype=torch.bool)
                for r, j in enumerate(members):
                    if at == "rest":
                        selection[r, where[j]["decision"] :] = True
                    else:
                        selection[r, where[j][at]] = True
                tf = sub.teacher_forced(spec, selection)
                fr = sub.free_running(spec, selection)
                for r, j in enumerate(members):
                    _, p, form, _ = chunk[j]
                    rows.append(
                        {
                            "problem": p.id,
                            "note": "true" if p.note.true else "false",
                            "form": form,
                            "intervention": name,
                            "t": where[j]["decision" if at == "rest" else at],
                            "dlogp_target": tf["dlogp_target"][r],
                            "correct_ref": fr["correct_ref"][r],
                            "correct_base": fr["correct_base"][r],
                            "correct_int": fr["correct_int"][r],
                            "dacc": fr["dacc"][r],
                            "changed": fr["changed"][r],
                        }
                    )
        bar.update(len(chunk))
    bar.close()
    return pd.DataFrame(rows)


def summarise_interventions(frame, n_boot: int = 2000) -> list[dict]:
    """Mean readouts with bootstrap 95% intervals per (intervention, chain form, note truth)."""
    from dyco_probe.interventions.stats import bootstrap_ci

    out = []
    for (name, form, note), g in frame.groupby(["intervention", "form", "note"], sort=False):
        row = {
            "intervention": name,
            "description": INTERVENTIONS[name][2],
            "form": form,
            "note": note,
            "n": len(g),
        }
        for col in ("dlogp_target", "correct_base", "correct_int", "dacc"):
            mean, lo, hi = bootstrap_ci(g[col].to_numpy(float), n_boot=n_boot)
            row[col] = {"mean": mean, "ci_low": lo, "ci_high": hi}
        out.append(row)
    return out


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="note interventions", unit="trajectory", disable=not enabled)
