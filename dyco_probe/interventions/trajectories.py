"""Reference trajectories: what every intervention on a batch of examples is measured against.

`prepare_trajectories(handle, examples)` encodes the prompts, takes a trajectory per example (the
model's greedy completion, or the example's gold completion), finds its gold answer tokens,
and computes the unintervened log-probabilities. Token roles are computed on demand per source, any
labeller of `dyco_probe.labellers` (`get_labeller`):

- `"ground_truth"`: the synthetic task's word roles (`dyco_probe.task.alignment`), no forward pass;
- every other labeller (`"fisher_rao"`, `"ratio_threshold"`, `"hellinger"`, ...) runs on a
  teacher-forced trace of the trajectory (`trace_offline`, one per distance: the labellers named
  after a distance need a trace measured with it); `"visual_dependency"` also runs the model on the
  trajectory with the real and a counterfactual image (it gets the handle).

Then `teacher_forced(spec, selection)` and `free_running(spec, selection)` give per-sample effects.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..completions import eos_token_ids, pad_token_id
from ..distances import DISTANCES
from ..labellers import LABELLERS, get_labeller
from ..rewards import answers_match, extract_answer
from ..spans import Spans, spans_for_model
from ..task.alignment import token_char_spans
from .attention import intervene
from .queries import ground_truth_roles, token_columns
from .readouts import (
    generate_greedy,
    prefix_cache,
    regenerate,
    teacher_forced_inputs,
    token_logprobs,
    token_logprobs_from_prefix,
)
from .spec import Intervention

__all__ = ["ROLE_SOURCES", "TRAJECTORIES", "Trajectories", "check_role_source", "prepare_trajectories"]

ROLE_SOURCES = tuple(LABELLERS)  # the labellers' registry; `check_role_source` validates a name
TRAJECTORIES = ("greedy", "gold")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass
class Trajectories:
    """A batch of examples with their reference trajectories (see the module docstring).

    Attributes:
        examples, indices: the examples and their dataset indices (the keys of matched controls).
        prompts, images: what `handle.encode` got.
        prompt_inputs: the encoded prompt batch (left-padded to `prompt_length` columns).
        completion_ids, completion_mask: `[B, T]` trajectory tokens (right-padded) and real tokens.
        texts: decoded trajectories.
        answer_mask: `[B, T]` the answer tokens (between the answer tags) where that answer is the gold
            answer, else all False.
        correct: `[B]` the trajectory's answer is the gold answer.
        base_logp: `[B, T]` unintervened `log p(o_{t+1})`.
        kind: `"greedy"` or `"gold"`.
        max_new_tokens: the completion budget of free-running readouts.
    """

    handle: object
    examples: list
    indices: list[int]
    prompts: list[str]
    images: list[list]
    prompt_inputs: dict
    completion_ids: Tensor
    completion_mask: Tensor
    texts: list[str]
    answer_mask: Tensor
    correct: Tensor
    base_logp: Tensor
    kind: str
    max_new_tokens: int
    trace_config: object = None
    roles_cache: dict = field(default_factory=dict)
    baseline_cache: dict = field(default_factory=dict)
    _spans: Spans | None = None
    _traces: dict = field(default_factory=dict)
    _inputs: tuple | None = None  # (prompt_inputs they were built from, teacher-forced inputs)
    _prefix: tuple | bool | None = None  # (cache, unintervened log-probs from it), False: not usable

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def model(self):
        return self.handle.model

    @property
    def prompt_length(self) -> int:
        return self.prompt_inputs["input_ids"].shape[1]

    @property
    def spans(self) -> Spans:
        if self._spans is None:
            self._spans = spans_for_model(self.model, self.prompt_inputs)
        return self._spans

    def inputs(self) -> dict:
        """Teacher-forced model inputs of `prompt ++ trajectory` (built once per prompt encoding)."""
        if self._inputs is None or self._inputs[0] is not self.prompt_inputs:
            inputs = teacher_forced_inputs(
                self.model, self.prompt_inputs, self.completion_ids, self.completion_mask
            )
            self._inputs = (self.prompt_inputs, inputs)
        return dict(self._inputs[1])

    def _prompt_prefix(self) -> tuple | None:
        """`(cache, base log-probs)`: the KV cache of the columns before the first completion query,
        computed once for every intervention on this batch, and the unintervened log-probabilities
        of a forward from it; None where the model cannot continue from a cache (then each readout
        runs the whole sequence). Accepted only if it reproduces `base_logp`."""
        if self._prefix is None:
            self._prefix = False
            length = self.prompt_length - 1
            inputs = self.inputs()
            try:
                cache = prefix_cache(self.model, inputs, length)
                if cache is not None:
                    base = token_logprobs_from_prefix(
                        self.model, inputs, self.completion_ids, cache, length
                    ).cpu()
                    mask = self.completion_mask.cpu().bool()
                    if bool(((base - self.base_logp).abs()[mask] < 1e-4).all()):
                        self._prefix = (cache, base)
            except (TypeError, ValueError, RuntimeError, NotImplementedError):
                pass  # a family whose cache cannot be cropped or continued: whole-sequence readouts
        return self._prefix or None

    # -- roles ---------------------------------------------------------------------------------

    def roles(self, source: str, **options) -> Tensor:
        """`[B, T]` `Role` values of the trajectory tokens from the labeller `source` (a name known to
        `dyco_probe.labellers.get_labeller`); `options` go to the labeller (e.g. `tau_vis`, `theta`)."""
        check_role_source(source)
        key = (source, *sorted(options.items())) if options else source
        if key not in self.roles_cache:
            if source == "ground_truth" and not options:  # word roles of the task: no trace needed
                problems = [ex.problem for ex in self.examples]
                roles = ground_truth_roles(
                    self.handle.tokenizer, self.completion_ids.cpu(), self.completion_mask.cpu(), problems
                )
            else:
                roles = get_labeller(source)(
                    self.trace(source),
                    examples=self.examples,
                    tokenizer=self.handle.tokenizer,
                    handle=self.handle,
                    **options,
                )
            self.roles_cache[key] = roles.cpu()
        return self.roles_cache[key]

    def trace(self, source: str = "fisher_rao"):
        """The teacher-forced trace of the trajectories that the labeller `source` reads (`trace_config`,
        measured with the distance `source` is named after, if it is one); cached per distance."""
        from ..tracing import TraceConfig, trace_offline

        config = self.trace_config or TraceConfig()
        if source in DISTANCES and config.distance != source:
            config = dataclasses.replace(config, distance=source)
        if config.distance not in self._traces:
            self._traces[config.distance] = trace_offline(
                self.model, self.prompt_inputs, self.completion_ids, self.completion_mask, config=config
            )
        return self._traces[config.distance]

    # -- subsets -------------------------------------------------------------------------------

    def select(self, rows: Sequence[int]) -> Trajectories:
        """The samples `rows` (prompts re-encoded, completion tensors cut to their longest)."""
        rows = list(rows)
        prompt_inputs = self.handle.encode([self.prompts[i] for i in rows], [self.images[i] for i in rows])
        mask = self.completion_mask[rows]
        t = int(mask.sum(-1).max())
        return Trajectories(
            handle=self.handle,
            examples=[self.examples[i] for i in rows],
            indices=[self.indices[i] for i in rows],
            prompts=[self.prompts[i] for i in rows],
            images=[self.images[i] for i in rows],
            prompt_inputs=prompt_inputs,
            completion_ids=self.completion_ids[rows, :t],
            completion_mask=mask[:, :t],
            texts=[self.texts[i] for i in rows],
            answer_mask=self.answer_mask[rows, :t],
            correct=self.correct[rows],
            base_logp=self.base_logp[rows, :t],
            kind=self.kind,
            max_new_tokens=self.max_new_tokens,
            trace_config=self.trace_config,
            roles_cache={k: v[rows, :t] for k, v in self.roles_cache.items()},
            baseline_cache=self.baseline_cache,
        )

    def with_images(self, images: Sequence[Sequence]) -> Trajectories:
        """The same prompts and trajectories shown other images (of the same sizes); base_logp recomputed."""
        other = self.select(range(len(self)))
        other.images = [list(x) for x in images]
        other.prompt_inputs = self.handle.encode(other.prompts, other.images)
        if other.prompt_inputs["input_ids"].shape != self.prompt_inputs["input_ids"].shape or not torch.equal(
            other.prompt_inputs["input_ids"].cpu(), self.prompt_inputs["input_ids"].cpu()
        ):
            raise ValueError("the other images change the prompt layout (they must have the same sizes)")
        other.base_logp = token_logprobs(other.model, other.inputs(), other.completion_ids).cpu()
        other.baseline_cache = {}
        return other

    # -- readouts ------------------------------------------------------------------------------

    def teacher_forced(self, spec: Intervention, selection: Tensor, *, patch=None) -> dict[str, list]:
        """Per-sample teacher-forced effects of `spec` on the `selection` tokens (`[B, T]`).

        Returns lists of length B: `n_targets`, `t0` (first selected token), `dlogp_answer` (summed
        over the gold answer tokens), `logp_answer_base`, `dlogp_target` (mean over the selected
        tokens: each intervened query's own next token), `dlogp_after` (mean over tokens from `t0`
        on), `n_answer_targets` (selected tokens that are gold answer tokens: an intervention at the
        last layer only moves `dlogp_answer` through them, as a query's last-layer output reaches no
        other column). Samples without selected tokens get NaN. `patch`: a context manager factory
        `patch(queries) -> context` used instead of `intervene` (activation patching).
        """
        selection = selection.to(torch.bool).cpu() & self.completion_mask.cpu()
        queries = token_columns(selection, self.prompt_length, self.prompt_length + selection.shape[1])
        inputs = self.inputs()
        prefix = self._prompt_prefix() if patch is None else None
        base = self.base_logp
        if prefix is not None:  # the prompt before the first completion query is the same for every spec
            cache, base = prefix
            with intervene(self.model, spec, queries, spans=self.spans, completion_start=self.prompt_length):
                logp = token_logprobs_from_prefix(
                    self.model, inputs, self.completion_ids, cache, self.prompt_length - 1
                ).cpu()
        else:
            context = (
                patch(queries)
                if patch is not None
                else intervene(
                    self.model, spec, queries, spans=self.spans, completion_start=self.prompt_length
                )
            )
            with context:
                logp = token_logprobs(self.model, inputs, self.completion_ids).cpu()
        return _teacher_forced_metrics(logp, base, selection, self.completion_mask.cpu(), self.answer_mask)

    def free_running(self, spec: Intervention, selection: Tensor) -> dict[str, list]:
        """Per-sample free-running effects: regenerate from the first selected token under `spec`.

        Returns lists of length B: `n_targets`, `t0`, `correct_ref` (the trajectory's answer),
        `correct_base` (regenerated from the same prefix without intervention), `correct_int`
        (with it), `dacc = correct_int - correct_base`, `changed` (the intervened completion differs
        from the unintervened one) and `answer_int`. NaN / None without selected tokens.
        """
        selection = selection.to(torch.bool).cpu() & self.completion_mask.cpu()
        counts = selection.sum(-1)
        b = len(self)
        out = {
            k: [math.nan] * b
            for k in ("n_targets", "t0", "correct_ref", "correct_base", "correct_int", "dacc", "changed")
        }
        out["answer_int"] = [None] * b
        out["n_targets"] = [int(c) for c in counts]
        out["correct_ref"] = [float(c) for c in self.correct.tolist()]
        rows = [i for i in range(b) if counts[i] > 0]
        if not rows:
            return out
        sub = self.select(rows) if len(rows) < b else self
        sel = selection[rows][:, : sub.completion_ids.shape[1]]
        t0 = sel.float().argmax(-1)
        ids, mask = regenerate(
            sub.model,
            sub.prompt_inputs,
            sub.completion_ids,
            t0,
            max_new_tokens=self.max_new_tokens,
            spec=spec,
            selection=sel,
        )
        base_ids = sub._baseline(t0)
        for j, i in enumerate(rows):
            text = _decode(self.handle, ids[j], mask[j])
            answer = extract_answer(text)
            correct = float(answers_match(answer, self.examples[i].answer))
            base_text, base_correct = base_ids[j]
            out["t0"][i] = int(t0[j])
            out["correct_int"][i] = correct
            out["correct_base"][i] = base_correct
            out["dacc"][i] = correct - base_correct
            out["changed"][i] = float(text != base_text)
            out["answer_int"][i] = answer
        return out

    def _baseline(self, t0: Tensor) -> list[tuple[str, float]]:
        """Unintervened regeneration from each prefix, cached per (dataset index, prefix length)."""
        keys = [(self.indices[j], int(t0[j])) for j in range(len(self))]
        todo = [j for j, k in enumerate(keys) if k not in self.baseline_cache]
        if todo:
            sub = self.select(todo) if len(todo) < len(self) else self
            ids, mask = regenerate(
                sub.model, sub.prompt_inputs, sub.completion_ids, t0[todo], max_new_tokens=self.max_new_tokens
            )
            for r, j in enumerate(todo):
                text = _decode(self.handle, ids[r], mask[r])
                correct = float(answers_match(extract_answer(text), self.examples[j].answer))
                self.baseline_cache[keys[j]] = (text, correct)
        return [self.baseline_cache[k] for k in keys]


def check_role_source(source: str) -> str:
    """`source` if it names a labeller of `dyco_probe.labellers`; else a ValueError listing the valid names."""
    try:
        get_labeller(source)
    except ValueError:
        raise ValueError(
            f"unknown role source {source!r}; valid (the labellers of dyco_probe.labellers): "
            f"{', '.join(LABELLERS)}"
        ) from None
    return source


def _decode(handle, ids: Tensor, mask: Tensor) -> str:
    return handle.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True).strip()


def _nanmean(values: Tensor, mask: Tensor) -> Tensor:
    n = mask.sum(-1)
    total = torch.where(mask, values, torch.zeros(())).sum(-1)
    return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, math.nan))


def _teacher_forced_metrics(logp, base, selection, mask, answer_mask) -> dict[str, list]:
    d = (logp - base).double()
    mask = mask.bool()
    counts = selection.sum(-1)
    has = counts > 0
    t = torch.arange(selection.shape[1])
    t0 = torch.where(has, selection.float().argmax(-1), torch.full_like(counts, -1))
    after = mask & (t[None, :] >= t0[:, None]) & has[:, None]
    answer = answer_mask.bool() & mask
    has_answer = answer.any(-1)
    nan = torch.full((len(counts),), math.nan, dtype=torch.float64)
    dlogp_answer = torch.where(has_answer & has, torch.where(answer, d, 0).sum(-1), nan)
    base_answer = torch.where(has_answer, torch.where(answer, base.double(), 0).sum(-1), nan)
    return {
        "n_targets": counts.tolist(),
        "t0": [int(x) if x >= 0 else math.nan for x in t0.tolist()],
        "dlogp_answer": dlogp_answer.tolist(),
        "logp_answer_base": base_answer.tolist(),
        "dlogp_target": torch.where(has, _nanmean(d, selection & mask), nan).tolist(),
        "dlogp_after": torch.where(has, _nanmean(d, after), nan).tolist(),
        "n_answer_targets": (selection.bool() & answer).sum(-1).tolist(),
    }


def _answer_tokens(text: str, spans: list[tuple[int, int]], gold: str) -> tuple[list[int], bool]:
    """Token indices of the last answer span of `text` and whether that answer is `gold`."""
    found = list(_ANSWER.finditer(text))
    if not found:
        return [], False
    m = found[-1]
    a, b = m.start(1), m.end(1)
    inner = text[a:b]
    a += len(inner) - len(inner.lstrip())
    b -= len(inner) - len(inner.rstrip())
    tokens = [t for t, (s, e) in enumerate(spans) if s < b and a < e and e > s]
    return tokens, answers_match(m.group(1).strip(), gold)


def prepare_trajectories(
    handle,
    examples: Sequence,
    indices: Sequence[int] | None = None,
    *,
    trajectory: str = "greedy",
    max_new_tokens: int = 96,
    trace_config=None,
) -> Trajectories:
    """Encode `examples`, take their trajectories and the unintervened log-probabilities.

    Args:
        handle: a `ModelHandle` (model, processor, tokenizer).
        indices: dataset indices of the examples (default 0..B-1); matched random controls and the
            free-running baseline cache are keyed by them.
        trajectory: `"greedy"` (the model's own greedy completion) or `"gold"` (`example.completion`
            followed by EOS).
        max_new_tokens: generation budget (greedy trajectories and free-running readouts).
        trace_config: `TraceConfig` of the traces that role labellers read (default: the defaults of docs/method.md).
    """
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory {trajectory!r}; valid: {', '.join(TRAJECTORIES)}")
    examples = list(examples)
    indices = list(range(len(examples))) if indices is None else [int(i) for i in indices]
    model = handle.model
    images = [ex.load_images() for ex in examples]
    prompts = [handle.prompt(ex.question, len(ims)) for ex, ims in zip(examples, images)]
    prompt_inputs = handle.encode(prompts, images)
    if trajectory == "greedy":
        ids, mask = generate_greedy(model, prompt_inputs, max_new_tokens)
    else:
        tok = handle.tokenizer
        rows = []
        for ex in examples:
            if not ex.completion:
                raise ValueError(f"example {ex.id!r} has no gold completion (trajectory='gold')")
            rows.append(tok(ex.completion, add_special_tokens=False)["input_ids"] + eos_token_ids(model)[:1])
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad_token_id(model), dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        ids, mask = ids.to(prompt_inputs["input_ids"].device), mask.to(prompt_inputs["input_ids"].device)
    texts, answer_rows, correct = [], [], []
    answer_mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, ex in enumerate(examples):
        n = int(mask[i].sum())
        text, spans = token_char_spans(handle.tokenizer, ids[i, :n].tolist())
        tokens, gold = _answer_tokens(text, spans, ex.answer)
        if gold:
            answer_mask[i, tokens] = True
        texts.append(text.strip())
        correct.append(answers_match(extract_answer(text), ex.answer))
        answer_rows.append(tokens)
    inputs = teacher_forced_inputs(model, prompt_inputs, ids, mask)
    base_logp = token_logprobs(model, inputs, ids).cpu()
    return Trajectories(
        handle=handle,
        examples=examples,
        indices=indices,
        prompts=prompts,
        images=images,
        prompt_inputs=prompt_inputs,
        completion_ids=ids,
        completion_mask=mask,
        texts=texts,
        answer_mask=answer_mask,
        correct=torch.tensor(correct, dtype=torch.bool),
        base_logp=base_logp,
        kind=trajectory,
        max_new_tokens=max_new_tokens,
        trace_config=trace_config,
    )
