"""Notes and look-up forms in generated chains: which look-ups cite the note instead of reading the
image, and accuracy by subset (no note, true note, false note).

A look-up of the noted object is *copied* when the chain writes ``KEY note VALUE`` and *read* when it
writes ``KEY VALUE`` (``dyco_probe.task.problems``). Trusting a false note gives a wrong answer; reading
the image gives the right one when the image is read correctly.
"""

from __future__ import annotations

from collections.abc import Sequence

from dyco_probe.evaluation import wilson_interval
from dyco_probe.task.problems import LOOKUP_COPIED, SUBSETS, Problem, Word, label_words

__all__ = [
    "lookup_tokens",
    "lookup_words",
    "note_attention_rows",
    "note_summary",
    "noted_lookup",
    "rate_with_ci",
]


def lookup_words(problem: Problem, completion: str) -> list[Word]:
    """The value words of every look-up in a completion (read or copied), in order."""
    return [w for w in label_words(completion.split(), problem) if w.lookup]


def noted_lookup(problem: Problem, completion: str) -> str:
    """How a completion answers the look-up of the noted object: ``"copied"``, ``"read"``, or ``""``
    (no note, or the chain never looks the object up)."""
    forms = [w.lookup for w in lookup_words(problem, completion) if w.note]
    return forms[0] if forms else ""


def note_summary(problems: Sequence[Problem], completions: Sequence[str], correct: Sequence[bool]) -> dict:
    """Accuracy per subset (``accuracy_no_note``, ...; ``n_no_note``, ...) and how often the noted
    look-up is copied (``copy_rate_true_note``, ``copy_rate_false_note``: share of the subset's
    completions that cite the note; ``copy_rate``: over both)."""
    out: dict = {}
    copies = {"true_note": 0, "false_note": 0}
    for subset in SUBSETS:
        rows = [i for i, p in enumerate(problems) if p.subset == subset]
        out[f"n_{subset}"] = len(rows)
        out[f"accuracy_{subset}"] = sum(bool(correct[i]) for i in rows) / len(rows) if rows else float("nan")
        if subset in copies:
            copies[subset] = sum(noted_lookup(problems[i], completions[i]) == LOOKUP_COPIED for i in rows)
            out[f"copy_rate_{subset}"] = copies[subset] / len(rows) if rows else float("nan")
    noted = out["n_true_note"] + out["n_false_note"]
    out["copy_rate"] = (copies["true_note"] + copies["false_note"]) / noted if noted else float("nan")
    return out


def rate_with_ci(k: int, n: int) -> dict:
    """A proportion with its 95% Wilson interval."""
    lo, hi = wilson_interval(k, n)
    return {"value": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi, "n": n}


# -- look-up tokens of traced completions ---------------------------------------------------------


def lookup_tokens(trace, problems: Sequence[Problem], tokenizer, *, scorer=None, note_attention=None):
    """One row per look-up value token of a trace's completions, with the token's signals.

    Columns: ``sample``, ``t`` (0-based token index), ``key``, ``value``, ``lookup`` (``"read"`` /
    ``"copied"``), ``note`` (``"true"`` / ``"false"`` for the noted object's look-up, else ``""``),
    ``value_correct`` (the value is the object's true one), ``fr_role`` (the Fisher–Rao rule's role),
    ``delta`` (``v_vis − v_txt``), ``s`` (``s_t`` under the Fisher–Rao roles), ``r_vis_norm``
    (``r_vis / (r_vis + r_txt)``), ``r_vis``, ``r_txt``; with image rows in the trace, ``named_share``
    (share of the token's image attention on the named object's image token) and ``peak_on_named``
    (that token is the image attention's maximum); with ``note_attention`` (``[B, T]``, e.g. from
    ``note_attention_rows``), ``on_note`` (attention on the note's value).
    """
    import pandas as pd

    from dyco_probe.labellers import ground_truth_alignments
    from dyco_probe.roles import ROLE_NAMES
    from dyco_probe.scoring import ScorerConfig, score_tokens
    from dyco_probe.task.alignment import cell_image_tokens

    scored = score_tokens(
        trace.r_vis, trace.r_txt, trace.v_vis, trace.v_txt, trace.mask, scorer or ScorerConfig()
    )
    aligned = ground_truth_alignments(trace, [_AsExample(p) for p in problems], tokenizer=tokenizer)
    rows = []
    for i, (p, a) in enumerate(zip(problems, aligned)):
        cols = trace.mask[i].bool().nonzero().flatten().tolist()
        n_img = int((trace.samples[i] if trace.samples else {}).get("num_image_tokens", 0))
        key = None
        for t, k, lookup, note in zip(cols, a.word_index, a.lookup, a.note):
            if k < 0:
                continue
            word = a.words[k]
            if not lookup:
                if word.text in (p.keys or ()):
                    key = word.text
                continue
            row = {
                "sample": i,
                "t": t,
                "key": key,
                "value": word.text,
                "lookup": lookup,
                "note": note,
                "value_correct": key is not None and p.value_of(key) == word.text,
                "fr_role": ROLE_NAMES[int(scored["roles"][i, t])],
                "delta": float(trace.v_vis[i, t] - trace.v_txt[i, t]),
                "s": float(scored["s"][i, t]),
                "r_vis_norm": float(scored["r_vis_n"][i, t]),
                "r_vis": float(trace.r_vis[i, t]),
                "r_txt": float(trace.r_txt[i, t]),
            }
            if trace.image_rows is not None and word.cells and n_img:
                image = trace.image_rows[i, t, :n_img].double()
                named = cell_image_tokens(word.cells, p.config.grid, n_img)
                row["named_share"] = float(image[named].sum() / image.sum().clamp_min(1e-12))
                row["peak_on_named"] = int(image.argmax()) in named
            if note_attention is not None:
                row["on_note"] = float(note_attention[i, t])
            rows.append(row)
    columns = ["sample", "t", "key", "value", "lookup", "note", "value_correct", "fr_role", "delta", "s"]
    columns += ["r_vis_norm", "r_vis", "r_txt"]
    return pd.DataFrame(rows, columns=list(dict.fromkeys(columns + [k for r in rows for k in r])))


class _AsExample:
    """A problem in the shape ``ground_truth_alignments`` matches examples by."""

    def __init__(self, problem: Problem):
        self.id, self.problem = problem.id, problem


def note_attention_rows(handle, problems: Sequence[Problem], completion_ids, *, batch_size: int = 32):
    """``[B, T]``: the last layer's attention (mean over heads) from the query of each completion token
    on the note's value in the question (0 without a note), teacher-forced on the given completions
    (token ids, one list per problem; ``T`` is the longest)."""
    import torch

    from dyco_probe.completions import model_inputs, packed_batch
    from dyco_probe.pretrain import forward_with_last_layer_attention, prompt_for
    from dyco_probe.task.problems import NOTE

    completion_ids = [list(map(int, c)) for c in completion_ids]
    out = torch.zeros(len(problems), max(len(c) for c in completion_ids))
    note_id = handle.tokenizer.convert_tokens_to_ids(NOTE)
    with torch.no_grad():
        for lo in range(0, len(problems), batch_size):
            chunk = range(lo, min(lo + batch_size, len(problems)))
            batch = packed_batch(
                handle,
                [prompt_for(handle, problems[i]) for i in chunk],
                [[problems[i].render()] for i in chunk],
                [completion_ids[i] for i in chunk],
            )
            ids = batch["input_ids"]
            _, probs = forward_with_last_layer_attention(handle.model, model_inputs(batch))
            mean = probs.mean(1)
            for row, i in enumerate(chunk):
                start = ids.shape[1] - len(completion_ids[i])
                at = (ids[row, :start] == note_id).nonzero().flatten()
                if problems[i].note is None or len(at) != 1:
                    continue
                queries = torch.arange(start - 1, ids.shape[1] - 1)
                out[i, : len(queries)] = mean[row, queries, int(at[0]) + 2].float()
    return out
