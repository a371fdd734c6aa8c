"""Tracing at the level of a model handle and examples: generate (or take completions) and trace them.

    from dyco_probe.api import trace, trace_completions
    from dyco_probe.models.loading import load
    from dyco_probe.data import synthetic_examples

    handle = load("builtin")
    examples = synthetic_examples("test", 64)
    result = trace(handle, examples, max_new_tokens=96)           # greedy, traced online, batch by batch
    result.trace.r_vis, result.trace.roles(), result.summary()    # [B, T] signals, roles, a short summary
    result.trace.samples[0]       # example_id, answer, prediction, correct, completion, ...
    gold = trace_completions(handle, examples, [ex.completion for ex in examples])  # teacher-forced

One row of the trace per completion, in example order (with `num_samples > 1`, the samples of an
example are consecutive). Sample ids are the example ids; each sample's metadata holds the example id,
sample index, reference answer, predicted answer, correctness (`rewards.accuracy_reward`), format,
truncation, the completion text and, for synthetic examples, the problem's seed and task config (so
ground-truth roles can be rebuilt from a saved trace).

Long runs are resumable: with `parts=DIR` each batch's trace and generations are written to `DIR` as
they finish and found there again by a rerun with the same arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .completions import completion_ids_for, eos_token_ids, pad_token_id
from .files import write_text_atomic
from .generation import Generation, generate, images_for
from .rewards import accuracy_reward, extract_answer, format_reward
from .roles import ROLE_NAMES
from .tracing import SIGNAL_NAMES, Trace, TraceConfig, Tracer, trace_offline

__all__ = ["TraceResult", "concat_traces", "summarize", "trace", "trace_completions"]


@dataclass
class TraceResult:
    """A trace with what produced it.

    Attributes:
        trace: the `Trace`, one row per completion.
        examples: the example of each row.
        generations: the `Generation` of each row (`None` for completions given to `trace_completions`
            as text or ids).
        tokenizer: the model's tokenizer (ground-truth labelling needs it).
        handle: the `ModelHandle` that made the trace (labellers that run the model need it).
    """

    trace: Trace
    examples: list
    generations: list[Generation] | None = None
    tokenizer: object = field(default=None, repr=False)
    handle: object = field(default=None, repr=False)

    @property
    def records(self) -> list[dict]:
        """Per-sample metadata (`trace.samples`)."""
        return self.trace.samples

    @property
    def accuracy(self) -> float:
        return sum(r["correct"] for r in self.records) / max(len(self.records), 1)

    def roles(self, labeller: str = "fisher_rao", **options) -> Tensor:
        """Roles `[B, T]` from a labeller of `dyco_probe.labellers` (ground truth included)."""
        from .labellers import get_labeller

        return get_labeller(labeller)(
            self.trace, examples=self.examples, tokenizer=self.tokenizer, handle=self.handle, **options
        )

    def summary(self) -> dict:
        return summarize(self.trace)

    def save(self, path) -> None:
        """Write the trace (samples' metadata included) as parquet."""
        self.trace.save(path)


# -- traces -------------------------------------------------------------------------------------------


def concat_traces(traces: Sequence[Trace]) -> Trace:
    """Stack traces of the same settings along the samples, padding tokens (and image rows) to the longest."""
    traces = list(traces)
    if not traces:
        raise ValueError("nothing to concatenate")
    if len(traces) == 1:
        return traces[0]
    first = traces[0]
    if any(t.layers != first.layers for t in traces):
        raise ValueError("cannot concatenate traces of different probed layers")
    if any((t.per_layer is None) != (first.per_layer is None) for t in traces) or any(
        (t.image_rows is None) != (first.image_rows is None) for t in traces
    ):
        raise ValueError("cannot concatenate traces recorded with different settings")
    steps = max(t.num_tokens for t in traces)

    def pad(x: Tensor, length: int, dim: int = 1, value=0) -> Tensor:
        extra = length - x.shape[dim]
        if extra <= 0:
            return x
        shape = list(x.shape)
        shape[dim] = extra
        return torch.cat([x, torch.full(shape, value, dtype=x.dtype)], dim=dim)

    kwargs = {
        "token_ids": torch.cat([pad(t.token_ids, steps) for t in traces]),
        "mask": torch.cat([pad(t.mask, steps, value=False) for t in traces]),
        **{k: torch.cat([pad(getattr(t, k), steps) for t in traces]) for k in SIGNAL_NAMES},
        "layers": first.layers,
        "samples": [s for t in traces for s in (t.samples or [{} for _ in range(t.batch_size)])],
        "metadata": first.metadata,
    }
    if all(t.token_text is not None for t in traces):
        kwargs["token_text"] = [row + [""] * (steps - len(row)) for t in traces for row in t.token_text]
    if first.per_layer is not None:
        kwargs["per_layer"] = {
            k: torch.cat([pad(t.per_layer[k], steps) for t in traces]) for k in SIGNAL_NAMES
        }
    if first.image_rows is not None:
        n = max(t.image_rows.shape[-1] for t in traces)
        kwargs["image_rows"] = torch.cat([pad(pad(t.image_rows, steps), n, dim=2) for t in traces])
        kwargs["image_rows_mask"] = torch.cat([pad(t.image_rows_mask, n, value=False) for t in traces])
    return Trace(**kwargs)


def summarize(trace: Trace) -> dict:
    """Short numbers of a trace: sizes, mean signals over real tokens, role fractions (the role rule of
    docs/method.md#token-roles on the trace's own dynamics, published thresholds) and, when recorded, accuracy."""
    m = trace.mask.bool()
    roles = trace.roles()[m]
    out = {
        "samples": trace.batch_size,
        "tokens": int(m.sum()),
        "mean_tokens": round(float(m.sum(-1).float().mean()), 2),
        **{f"mean_{k}": round(float(getattr(trace, k)[m].mean()), 4) for k in SIGNAL_NAMES},
        "role_fractions": {
            name: round(float((roles == i).float().mean()), 4) for i, name in enumerate(ROLE_NAMES)
        },
        "distance": trace.metadata.get("settings", {}).get("distance", "fisher_rao"),
    }
    samples = trace.samples or []
    if samples and all("correct" in s for s in samples):
        out["accuracy"] = round(sum(bool(s["correct"]) for s in samples) / len(samples), 4)
        out["format_rate"] = round(sum(bool(s.get("format")) for s in samples) / len(samples), 4)
    return out


# -- helpers ------------------------------------------------------------------------------------------


def _shown(examples: list, image_mode: str) -> list:
    """Examples carrying the images they are shown: for `swap`, those of the next distinct example (a
    derangement over the list, as `generation.images_for`, kept lazy so batches can be cut anywhere;
    repeated examples, e.g. several samples each, share one donor)."""
    if image_mode != "swap":
        images_for(examples[:0], image_mode)  # validates the mode
        return examples
    order = list(dict.fromkeys(ex.id for ex in examples))
    if len(order) < 2:
        raise ValueError("image mode 'swap' needs at least two examples")
    first = {}
    for ex in examples:
        first.setdefault(ex.id, ex)
    donor_of = {i: first[order[(k + 1) % len(order)]] for k, i in enumerate(order)}
    out = []
    for ex in examples:
        donor = donor_of[ex.id]
        if len(donor.images) != len(ex.images):
            raise ValueError(
                f"cannot swap images into example {ex.id!r}: it has {len(ex.images)} image(s), its donor "
                f"{len(donor.images)}"
            )
        out.append(dataclasses.replace(ex, images=donor.images))
    return out


def _check_request(handle, config: TraceConfig, backend: str | None) -> None:
    """Fail on a bad request before any work is done or any file written: probed layers and heads
    out of the model's range, an unknown backend."""
    from .tracing.backends import get_backend

    config.resolve_layers(handle.num_layers)
    config.resolve_heads(handle.num_heads)
    if backend is not None:
        get_backend(backend)


def _synthetic_record(example) -> dict | None:
    problem = getattr(example, "problem", None)
    if problem is None:
        return None
    # JSON-normal (lists, not tuples) so the record reads the same before and after saving
    return json.loads(json.dumps({"seed": problem.seed, "config": problem.config.to_dict()}))


def _annotate(tr: Trace, rows: list, texts: list[str], extra: list[dict]) -> None:
    """Add per-sample metadata: ids, answers, correctness, format, completion text."""
    answers = [ex.answer for ex in rows]
    correct = accuracy_reward(texts, answers)
    fmt = format_reward(texts, answers)
    for i, (ex, text) in enumerate(zip(rows, texts)):
        tr.samples[i].update(
            {
                "sample_id": ex.id,
                "example_id": ex.id,
                "answer": ex.answer,
                "prediction": extract_answer(text),
                "correct": bool(correct[i]),
                "format": bool(fmt[i]),
                "completion": text,
                "synthetic": _synthetic_record(ex),
                **extra[i],
            }
        )


class _Parts:
    """Per-batch results on disk, so that a rerun with the same arguments resumes.

    The manifest (what the parts depend on) is written with the first part, so a run that fails
    before finishing a batch leaves nothing that could block a corrected rerun; a manifest without
    any finished part is replaced. Each file is written atomically and a part's `.done` marker last:
    a part is complete or absent.
    """

    def __init__(self, directory, manifest: dict):
        self.dir = None if directory is None else Path(directory)
        self.text = json.dumps(manifest, sort_keys=True, default=str)
        self.ready = False
        if self.dir is None:
            return
        path = self.dir / "manifest.json"
        if self.finished() and (path.read_text() if path.exists() else None) != self.text:
            raise ValueError(
                f"{self.dir} holds {len(self.finished())} finished batch(es) of a different run (other "
                "examples or settings); remove it (the CLI: --overwrite) or choose another output"
            )

    def finished(self) -> list[Path]:
        """The `.done` markers of finished parts."""
        return sorted(self.dir.glob("part-*.done")) if self.dir is not None and self.dir.is_dir() else []

    def load(self, k: int):
        if self.dir is None or not (self.dir / f"part-{k:05d}.done").exists():
            return None
        tr = Trace.load(self.dir / f"part-{k:05d}.parquet")
        gens = None
        gen_path = self.dir / f"part-{k:05d}.jsonl"
        if gen_path.exists():
            gens = [Generation(**json.loads(line)) for line in gen_path.read_text().splitlines() if line]
        return tr, gens

    def save(self, k: int, tr: Trace, gens: list[Generation] | None) -> None:
        if self.dir is None:
            return
        if not self.ready:
            if not self.finished():  # nothing to keep: a stale manifest of a failed run goes
                write_text_atomic(self.dir / "manifest.json", self.text)
            self.ready = True
        tr.save(self.dir / f"part-{k:05d}.parquet")
        if gens is not None:
            lines = [json.dumps(dataclasses.asdict(g)) for g in gens]
            write_text_atomic(self.dir / f"part-{k:05d}.jsonl", "\n".join(lines) + "\n")
        write_text_atomic(self.dir / f"part-{k:05d}.done", "")  # last: a part is complete or absent


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="completion", disable=not enabled)


# -- entry points ---------------------------------------------------------------------------------------


def trace(
    handle,
    examples: Sequence,
    *,
    config: TraceConfig | None = None,
    max_new_tokens: int = 96,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 32,
    image_mode: str = "normal",
    seed: int | None = None,
    backend: str | None = None,
    parts: str | Path | None = None,
    progress: bool = True,
) -> TraceResult:
    """Generate completions for `examples` and trace them, batch by batch.

    Args:
        handle: a `ModelHandle` (`dyco_probe.models.loading.load`).
        examples: `dyco_probe.data.Example`s.
        config: what the tracer records (default `TraceConfig()`: last layer, all heads, Fisher–Rao).
        max_new_tokens, do_sample, temperature, top_p, num_samples, image_mode: as for
            `dyco_probe.generation.generate` (`image_mode` `"blank"` / `"swap"` for controls); sampling
            is `dyco_probe.completions.sample`'s, the same as the RL loop's (no top-k cut, image
            placeholders never generated).
        batch_size: examples per `generate` call (each yields `batch_size * num_samples` rows).
        seed: sampling seed; batch `k` is seeded with `seed + k`, so a resumed run samples the same.
        backend: `None` (default): trace online during `generate` (nothing is recomputed). A backend
            name (`"native"`, `"eager"`, `"nnsight"`, `"transformer_lens"`): generate untraced, then
            trace the completions teacher-forced with that backend.
        parts: a directory for per-batch results (resumable runs).
        progress: show a progress bar.

    Returns:
        A `TraceResult` (trace, examples and generations, one per row).
    """
    examples = list(examples)
    if not examples:
        raise ValueError("trace needs at least one example")
    config = config or TraceConfig()
    _check_request(handle, config, backend)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if num_samples > 1 and not do_sample:
        raise ValueError("num_samples > 1 needs do_sample=True (greedy completions would be identical)")
    shown = _shown(examples, image_mode)
    gen_mode = "blank" if image_mode == "blank" else "normal"
    eos = sorted(eos_token_ids(handle.model, handle.tokenizer))
    settings = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        num_samples=num_samples,
        image_mode=image_mode,
        seed=seed,
        backend=backend,
    )
    store = _Parts(
        parts,
        {
            "examples": [ex.id for ex in examples],
            "batch_size": batch_size,
            "config": config.to_dict(),
            "model": handle.source,
            **settings,
        },
    )
    pieces, all_gens = [], []
    bar = _progress(len(examples) * num_samples, "trace", progress)
    for k, start in enumerate(range(0, len(examples), batch_size)):
        chunk = shown[start : start + batch_size]
        rows = [ex for ex in examples[start : start + batch_size] for _ in range(num_samples)]
        done = store.load(k)
        if done is not None:
            tr, gens = done
        else:
            captured = {}

            def wrap(batch, run, rows=rows, captured=captured):
                with Tracer(
                    handle.model,
                    config,
                    image_token_id=handle.image_token_id,
                    tokenizer=handle.tokenizer,
                    eos_token_id=eos,
                    sample_ids=[ex.id for ex in rows],
                ) as tracer:
                    sequences = run()
                captured["trace"] = tracer.finish(sequences)
                return sequences

            gens = generate(
                handle,
                chunk,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                num_samples=num_samples,
                batch_size=len(chunk),
                image_mode=gen_mode,
                seed=None if seed is None else seed + k,
                progress=False,
                wrap=wrap if backend is None else None,
            )
            if backend is None:
                tr = captured["trace"]
            else:
                tr = _trace_ids(
                    handle,
                    chunk,
                    rows_per_example=num_samples,
                    ids=[g.completion_ids for g in gens],
                    config=config,
                    backend=backend,
                    eos=eos,
                    image_mode=gen_mode,
                )
            extra = [
                {"sample_index": g.sample_index, "truncated": g.truncated, "image_mode": image_mode}
                for g in gens
            ]
            _annotate(tr, rows, [g.completion for g in gens], extra)
            store.save(k, tr, gens)
        pieces.append(tr)
        all_gens.extend(gens)
        bar.update(len(rows))
    bar.close()
    out = concat_traces(pieces)
    out.metadata = {**out.metadata, "model_source": handle.source, "generation": settings}
    rows = [ex for ex in examples for _ in range(num_samples)]
    return TraceResult(out, rows, all_gens, handle.tokenizer, handle)


def _trace_ids(
    handle,
    examples: list,
    *,
    rows_per_example: int = 1,
    ids: list[list[int]],
    config: TraceConfig,
    backend: str,
    eos: list[int],
    image_mode: str = "normal",
    **backend_options,
) -> Trace:
    """Teacher-forced trace of completion ids (`rows_per_example` consecutive rows per example)."""
    rows = [ex for ex in examples for _ in range(rows_per_example)]
    images = images_for(rows, image_mode)
    prompts = [handle.prompt(ex.question, len(ims)) for ex, ims in zip(rows, images)]
    inputs = handle.encode(prompts, images)
    steps = max(len(x) for x in ids)
    pad_id = pad_token_id(handle.model, handle.tokenizer)
    completion = torch.full((len(ids), steps), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), steps), dtype=torch.bool)
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"example {rows[i].id!r}: empty completion")
        completion[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    with torch.no_grad():
        return trace_offline(
            handle.model,
            inputs,
            completion.to(inputs["input_ids"].device),
            mask.to(inputs["input_ids"].device),
            image_token_id=handle.image_token_id,
            tokenizer=handle.tokenizer,
            config=config,
            backend=backend,
            sample_ids=[ex.id for ex in rows],
            eos_token_id=eos,
            **backend_options,
        )


def trace_completions(
    handle,
    examples: Sequence,
    completions: Sequence,
    *,
    config: TraceConfig | None = None,
    backend: str = "native",
    batch_size: int = 32,
    image_mode: str = "normal",
    add_eos: bool = True,
    parts: str | Path | None = None,
    progress: bool = True,
    **backend_options,
) -> TraceResult:
    """Trace given completions teacher-forced (`tracing.trace_offline`): from any source, any backend.

    Args:
        handle: a `ModelHandle`.
        examples: the examples, one per completion.
        completions: one per example: a text (tokenized, EOS appended if `add_eos`), a list of token
            ids (used as is), or a `Generation` (its ids). Generations may also come several per
            example (e.g. `trace(..., num_samples=4).generations`): they are then matched to `examples`
            by example id.
        config: what the tracer records (default `TraceConfig()`).
        backend: `"native"` (default), `"eager"`, `"nnsight"` or `"transformer_lens"`.
        batch_size: completions per forward.
        image_mode: `"normal"`, `"blank"` or `"swap"`: the images the completions are traced under.
        parts, progress: as for `trace`.
        backend_options: passed to the backend.

    Returns:
        A `TraceResult` whose trace matches (to float tolerance) an online trace of the same tokens.
    """
    examples, completions = list(examples), list(completions)
    config = config or TraceConfig()
    _check_request(handle, config, backend)
    if len(completions) != len(examples):
        if completions and all(isinstance(c, Generation) for c in completions):
            by_id = {ex.id: ex for ex in examples}
            missing = [c.example_id for c in completions if c.example_id not in by_id]
            if missing:
                raise ValueError(f"generation of unknown example {missing[0]!r}")
            examples = [by_id[c.example_id] for c in completions]
        else:
            raise ValueError(f"got {len(completions)} completions for {len(examples)} examples")
    if not examples:
        raise ValueError("trace_completions needs at least one completion")
    ids = []
    for c in completions:
        if isinstance(c, Generation):
            ids.append(list(c.completion_ids))
        elif isinstance(c, str):
            ids.append(completion_ids_for(handle, [c], add_eos=add_eos)[0])
        else:
            ids.append([int(x) for x in c])
    gens = list(completions) if all(isinstance(c, Generation) for c in completions) else None
    texts = [handle.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    shown = _shown(examples, image_mode)
    mode = "blank" if image_mode == "blank" else "normal"
    eos = sorted(eos_token_ids(handle.model, handle.tokenizer))
    store = _Parts(
        parts,
        {
            "examples": [ex.id for ex in examples],
            "completions": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
            "batch_size": batch_size,
            "config": config.to_dict(),
            "model": handle.source,
            "backend": backend,
            "image_mode": image_mode,
        },
    )
    pieces = []
    bar = _progress(len(examples), "trace", progress)
    for k, start in enumerate(range(0, len(examples), batch_size)):
        sl = slice(start, start + batch_size)
        done = store.load(k)
        if done is not None:
            tr = done[0]
        else:
            tr = _trace_ids(
                handle,
                shown[sl],
                ids=ids[sl],
                config=config,
                backend=backend,
                eos=eos,
                image_mode=mode,
                **backend_options,
            )
            extra = [
                {"sample_index": getattr(c, "sample_index", 0), "image_mode": image_mode}
                for c in completions[sl]
            ]
            _annotate(tr, examples[sl], texts[sl], extra)
            store.save(k, tr, None)
        pieces.append(tr)
        bar.update(tr.batch_size)
    bar.close()
    out = concat_traces(pieces)
    out.metadata = {**out.metadata, "model_source": handle.source, "image_mode": image_mode}
    return TraceResult(out, examples, gens, handle.tokenizer, handle)
