"""Does the built-in model truly look at the image? (`analyses/builtin_model_check.py`)

`model_check(settings)` measures, on the synthetic test split: answer accuracy with the real, blank
and swapped images, by subset of the questions (no note, true note, false note) with how often the
noted look-up is copied; per look-up accuracy teacher-forced on the gold chain with the real and a
blank image, against two guesses that do not read the image (`guess_baselines`); and how often the
last layer's attention from a look-up query peaks on the relevant image token (`lookup_statistics`).
It writes `builtin_model_check.{md,json}`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from dyco_probe.data import example_from_problem
from dyco_probe.evaluation import evaluate, wilson_interval
from dyco_probe.models.loading import load
from dyco_probe.pretrain import forward_with_last_layer_attention, language_batch
from dyco_probe.task.notes import note_summary, noted_lookup
from dyco_probe.task.problems import LOOKUP_COPIED, NOTE, ROLE_VISUAL, SUBSETS, make_split


@torch.no_grad()
def lookup_statistics(
    handle, problems, blank: bool = False, batch_size: int = 50, noted: bool | None = None
) -> dict:
    """Teacher-forced look-up accuracy (gold chain: every look-up read; the value the model would read,
    i.e. its choice among the words other than the ``note`` decision) and last-layer attention on the
    relevant image token; ``noted``: only the look-ups of noted objects (True) or of the others
    (False), all when None."""
    from dyco_probe.generation import blank_image

    hits = peaks = n = 0
    share = 0.0
    n_image_tokens = None
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        words = [w for p in chunk for w in p.chain if w.role == ROLE_VISUAL]  # the order of the hints
        if blank:
            chunk = [_blanked(p, blank_image) for p in chunk]
        batch = language_batch(handle, chunk, 1.0)
        outputs, probs = forward_with_last_layer_attention(handle.model, batch.inputs)
        logits = outputs.logits.clone()
        note_id = handle.tokenizer.convert_tokens_to_ids(NOTE)
        if note_id != handle.tokenizer.unk_token_id:
            logits[..., note_id] = float("-inf")  # the read value, given that the model reads
        ids = batch.inputs["input_ids"]
        mean = probs.mean(1)
        for (i, q, k), w in zip(batch.lookups, words, strict=True):
            if noted is not None and bool(w.note) != noted:
                continue
            image_cols = (ids[i] == handle.image_token_id).nonzero().flatten()
            n_image_tokens = len(image_cols)
            row = mean[i, q, image_cols]
            hits += int(logits[i, q].argmax() == ids[i, q + 1])
            peaks += int(image_cols[row.argmax()] == k)
            share += float(row[(image_cols == k).nonzero()[0, 0]] / row.sum())
            n += 1
    if n == 0:
        return {"lookups": 0}
    return {
        "lookups": n,
        "lookup_accuracy": hits / n,
        "lookup_accuracy_ci95": wilson_interval(hits, n),
        "attention_peak_rate": peaks / n,
        "attention_peak_rate_ci95": wilson_interval(peaks, n),
        "attention_share_on_relevant": share / n,
        "chance": 1 / n_image_tokens,
    }


class _Blanked:
    """A problem whose rendered image is blank (same chain, same ground truth)."""

    def __init__(self, problem, blank):
        self._p, self._blank = problem, blank

    def __getattr__(self, name):
        return getattr(self._p, name)

    def render(self):
        return self._blank(self._p.render())


def _blanked(problem, blank):
    return _Blanked(problem, blank)


def guess_baselines(problems, seed: int = 0) -> dict:
    """Expected accuracy of the two image-free guesses, per look-up (exact expectation for the first,
    simulation with random tie-breaks for the second)."""
    rng = random.Random(seed)
    no_image, majority, n = 0.0, 0, 0
    for p in problems:
        value_attr = "colour" if p.key_attribute == "shape" else "shape"
        vocab = p.config.colours if value_attr == "colour" else p.config.shapes
        named = set()
        for w in p.chain:
            if w.role != ROLE_VISUAL:
                continue
            remaining = [v for v in vocab if v not in named]
            no_image += 1 / len(remaining)
            counts = {v: sum(getattr(o, value_attr) == v for o in p.objects) for v in remaining}
            top = max(counts.values())
            majority += int(rng.choice([v for v, c in counts.items() if c == top]) == w.text)
            named.add(w.text)
            n += 1
    return {"best_guess_without_image": no_image / n, "majority_attribute_guess": majority / n}


@dataclass
class ModelCheck:
    """The check's options (`analyses/builtin_model_check.py`'s, with its defaults)."""

    model: str = "builtin"
    n: int = 500
    out: str = "figures/builtin_model_check"  # the write-up, without suffix


def model_check(args) -> str:
    """Measure, write `builtin_model_check.{md,json}` and return the Markdown."""
    torch.manual_seed(0)
    handle = load(args.model)
    problems = make_split("test", args.n)
    examples = [example_from_problem(p) for p in problems]
    answer, subsets = {}, {}
    for mode in ("normal", "blank", "swap"):
        res = evaluate(handle, examples, image_mode=mode, progress=True)
        answer[mode] = {
            "accuracy": res.accuracy,
            "ci95": res.accuracy_ci,
            "samples_per_second": res.samples_per_second,
        }
        completions = [r["completion"] for r in res.records]
        correct = [r["correct"] for r in res.records]
        notes = note_summary(problems, completions, correct)
        subsets[mode] = {}
        for subset in SUBSETS:
            rows = [i for i, p in enumerate(problems) if p.subset == subset]
            k = sum(bool(correct[i]) for i in rows)
            entry = {
                "n": len(rows),
                "accuracy": notes[f"accuracy_{subset}"],
                "ci95": wilson_interval(k, len(rows)),
            }
            if subset != "no_note":
                c = sum(noted_lookup(problems[i], completions[i]) == LOOKUP_COPIED for i in rows)
                entry.update(copy_rate=c / max(len(rows), 1), copy_rate_ci95=wilson_interval(c, len(rows)))
            subsets[mode][subset] = entry
    report = {
        "model": args.model,
        "n": args.n,
        "answer_accuracy": answer,
        "answer_accuracy_by_subset": subsets,
        "false_note_copy_rate": subsets["normal"]["false_note"].get("copy_rate"),
        "lookups_real_image": lookup_statistics(handle, problems),
        "lookups_unnoted_real_image": lookup_statistics(handle, problems, noted=False),
        "lookups_noted_real_image": lookup_statistics(handle, problems, noted=True),
        "lookups_blank_image": lookup_statistics(handle, problems, blank=True),
        "guesses": guess_baselines(problems),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    a, r, b, g = answer, report["lookups_real_image"], report["lookups_blank_image"], report["guesses"]
    u, nl = report["lookups_unnoted_real_image"], report["lookups_noted_real_image"]

    def ci(x):
        return f"{x[0]:.3f}-{x[1]:.3f}"

    def copy_cell(e):
        return f"{e['copy_rate']:.3f} ({ci(e['copy_rate_ci95'])})" if "copy_rate" in e else "-"

    def lookup_row(name, x):
        if not x.get("lookups"):
            return f"| {name} | - |"
        return f"| {name} ({x['lookups']}) | {x['lookup_accuracy']:.3f} ({ci(x['lookup_accuracy_ci95'])}) |"

    lines = [
        f"# Does the built-in model look? ({args.model}, {args.n} test problems, {r['lookups']} look-ups)",
        "",
        "| answer accuracy | value | 95% CI |",
        "| --- | ---: | --- |",
        *[f"| {m} images | {a[m]['accuracy']:.3f} | {ci(a[m]['ci95'])} |" for m in a],
        "",
        "By subset (greedy; *copied*: the chain cites the note at the noted look-up instead of reading "
        "the image):",
        "",
        "| images | subset | n | accuracy (95% CI) | copied (95% CI) |",
        "| --- | --- | ---: | --- | --- |",
        *[
            f"| {m} | {sub} | {e['n']} | {e['accuracy']:.3f} ({ci(e['ci95'])}) | {copy_cell(e)} |"
            for m in subsets
            for sub, e in subsets[m].items()
        ],
        "",
        "| per look-up (teacher-forced on the gold chain, which reads every look-up; the model's pick "
        "among values, the `note` decision left out) | accuracy |",
        "| --- | ---: |",
        lookup_row("model, real image, all look-ups", r),
        lookup_row("model, real image, un-noted look-ups", u),
        lookup_row("model, real image, noted look-ups (when it reads)", nl),
        lookup_row("model, blank image", b),
        f"| best guess without the image | {g['best_guess_without_image']:.3f} |",
        f"| majority-attribute guess | {g['majority_attribute_guess']:.3f} |",
        "",
        "| last-layer attention from the look-up query (mean over heads) | value | chance |",
        "| --- | ---: | ---: |",
        f"| peaks on the relevant image token | {r['attention_peak_rate']:.3f} ({ci(r['attention_peak_rate_ci95'])}) | {r['chance']:.3f} |",
        f"| share of image attention on the relevant token | {r['attention_share_on_relevant']:.3f} | {r['chance']:.3f} |",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)
