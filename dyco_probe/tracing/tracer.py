"""Tracing a model: online during `generate` (`Tracer`, `trace_generate`) or teacher-forced (`trace_offline`).

Online, the tracer asks the shared attention function (`attention.py`) for one row per probed layer
and forward pass, the last query's (the one whose logits produce the next token), and streams it
into `StepSignals`. A forward pre-hook on the model sees each forward's inputs: the prefill (no
cache yet) gives the prompt and hence the spans; each decode step gives the token fed back, `o_{t-1}`.

Offline, one forward over `prompt ++ completion` yields the rows of all completion queries at once
(from any backend) and the same `StepSignals` runs over them, so both modes agree. `OfflineTracer`
takes those rows from a forward the caller runs anyway (a training step's), instead of one of its own.
"""

from __future__ import annotations

import datetime
import functools
import platform
from collections.abc import Sequence

import torch
from torch import Tensor

from ..completions import completion_mask as eos_mask
from ..completions import eos_token_ids, forward_inputs, generation_position_ids, teacher_forced_inputs
from ..spans import Spans, image_token_id_of, spans_for_model
from .attention import _text_decoder, attention_hooks, attention_layers, check_attention_layers
from .backends import head_mean
from .config import TraceConfig
from .signals import StepSignals, reduce_rows
from .trace import SIGNAL_NAMES, Trace

__all__ = ["OfflineTracer", "Tracer", "trace_generate", "trace_offline"]

_QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5")


def _check_inputs(model, inputs: dict) -> None:
    if "input_ids" not in inputs:
        raise ValueError("tracing needs input_ids (the image spans are found from them)")
    if getattr(model.config, "model_type", "") in _QWEN_VL_TYPES and inputs.get("mm_token_type_ids") is None:
        raise ValueError(
            "Qwen-VL inputs need mm_token_type_ids (0 text, 1 image); without them the model silently "
            "falls back to 1-D positions"
        )


def _sample_name(i: int, sample_ids: Sequence | None) -> str:
    """How errors name a sample: its row, and its id when the caller gave ids."""
    if sample_ids is None or i >= len(sample_ids):
        return f"sample {i}"
    return f"sample {i} (id {sample_ids[i]!r})"


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("dyco-probe", "torch", "transformers", "nnsight", "transformer-lens"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            if pkg == "dyco-probe":
                from .. import __version__

                out[pkg] = __version__
    return out


class _Probe:
    """Resolved settings for one model: layers, heads, image token id, eos ids."""

    def __init__(self, model, config: TraceConfig, image_token_id, tokenizer, eos_token_id):
        self.model = model
        self.config = config
        self.num_layers = len(_text_decoder(model).layers)
        self.num_heads = model.config.get_text_config().num_attention_heads
        self.layers = config.resolve_layers(self.num_layers)
        if config.layers == "all":  # hybrid models (Qwen3.5): every layer that has softmax attention
            self.layers = attention_layers(model)
        check_attention_layers(model, self.layers)
        self.heads = config.resolve_heads(self.num_heads)
        self.image_token_id = image_token_id_of(model) if image_token_id is None else int(image_token_id)
        self.tokenizer = tokenizer
        self.eos = eos_token_ids(model, eos_token_id=eos_token_id)

    def spans(self, inputs: dict) -> Spans:
        _check_inputs(self.model, inputs)
        return spans_for_model(
            self.model,
            inputs,
            image_token_id=self.image_token_id,
            on_missing_image=self.config.on_missing_image,
        )

    def signals(self, spans: Spans) -> StepSignals:
        c = self.config
        return StepSignals(spans, c.text_span, c.distance, keep_image_rows=c.image_rows, eps=c.eps)

    def build(
        self,
        res: dict[str, Tensor],
        spans: Spans,
        token_ids: Tensor,
        mask: Tensor,
        mode: str,
        backend: str,
        sample_ids: Sequence | None,
    ) -> Trace:
        """The `Trace` from `StepSignals.result()` (or results of row chunks, concatenated)."""
        nan = res["nan"] & mask.to(res["nan"].device)
        if bool(nan.any()):
            i, t = (int(x) for x in nan.nonzero()[0])
            raise FloatingPointError(
                f"NaN in the attention row of sample {i}, token {t} (layer(s) {self.layers})"
            )
        # positions past a completion's end hold 0, whatever else shared its batch
        keep = mask.to(res[SIGNAL_NAMES[0]].device)[..., None]
        res = {**res, **{k: res[k].masked_fill(~keep, 0.0) for k in SIGNAL_NAMES}}
        values = {k: res[k][..., 0] for k in SIGNAL_NAMES}
        per_layer = {k: res[k][..., 1:] for k in SIGNAL_NAMES} if self.config.per_layer else None
        texts = None
        if self.tokenizer is not None:
            texts = [[self.tokenizer.decode([int(x)]) for x in row] for row in token_ids.tolist()]
        b = token_ids.shape[0]
        if sample_ids is not None and len(sample_ids) != b:
            raise ValueError(f"got {len(sample_ids)} sample ids for {b} samples")
        samples = []
        for i, summary in enumerate(spans.summary()):
            sid = i if sample_ids is None else sample_ids[i]
            sid = sid if isinstance(sid, (int, str)) else str(sid)
            samples.append({"sample_id": sid, **summary, "completion_length": int(mask[i].sum())})
        return Trace(
            token_ids=token_ids.cpu(),
            mask=mask.cpu(),
            **{k: v.cpu() for k, v in values.items()},
            token_text=texts,
            layers=self.layers,
            per_layer=None if per_layer is None else {k: v.cpu() for k, v in per_layer.items()},
            image_rows=res["image_rows"].cpu() if "image_rows" in res else None,
            image_rows_mask=res["image_rows_mask"].cpu() if "image_rows_mask" in res else None,
            samples=samples,
            metadata=self.metadata(mode, backend),
        )

    def metadata(self, mode: str, backend: str) -> dict:
        config = self.model.config
        return {
            "model": getattr(config, "_name_or_path", "") or None,
            "model_class": type(self.model).__name__,
            "model_type": getattr(config, "model_type", None),
            "mode": mode,
            "backend": backend,
            "settings": self.config.to_dict(),
            "layers": list(self.layers),
            "heads": None if self.heads is None else list(self.heads),
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "image_token_id": self.image_token_id,
            "eos_token_id": self.eos,
            "versions": dict(_versions()),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }


class Tracer:
    """Context manager that traces every `generate` call on `model` inside it (online, native).

        with Tracer(model, TraceConfig(), image_token_id=...) as tr:
            out = model.generate(**inputs, max_new_tokens=64)
        trace = tr.finish(out)      # or tr.trace: same, with the last token's id unknown (-1)

    Each prefill (a forward without cache) starts a new trace; `tr.trace` is the latest. The last
    generated token is never fed back to the model, so its id comes from `finish(sequences)`; its
    signals (from the previous position's query) are recorded like the others. Beam search is not
    supported (it reorders the cache). On exit the model is exactly as before.
    """

    def __init__(
        self,
        model,
        config: TraceConfig | None = None,
        *,
        image_token_id: int | None = None,
        tokenizer=None,
        eos_token_id: int | Sequence[int] | None = None,
        sample_ids: Sequence | None = None,
    ):
        self.model = model
        self.probe = _Probe(model, config or TraceConfig(), image_token_id, tokenizer, eos_token_id)
        self.sample_ids = sample_ids
        self._attn_ctx = None
        self._pre_hook = None
        self._spans: Spans | None = None
        self._signals: StepSignals | None = None
        self._fed: list[Tensor] = []
        self._rows: list[Tensor] = []
        self._row_sum: Tensor | None = None
        self._active = False

    @property
    def config(self) -> TraceConfig:
        return self.probe.config

    def __enter__(self) -> Tracer:
        self._attn_ctx = attention_hooks(self.model, self._on_attention, layers=self.probe.layers)
        self._attn_ctx.__enter__()
        try:
            self._pre_hook = self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        except BaseException:
            self._attn_ctx.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        if self._attn_ctx is not None:
            self._attn_ctx.__exit__(*exc)
            self._attn_ctx = None

    # -- hooks ---------------------------------------------------------------------------------

    def _on_forward(self, module, args, kwargs) -> None:
        input_ids, _, past = forward_inputs(args, kwargs)
        if input_ids is None:  # an embeddings-only forward: not traced
            self._active = False
        elif past == 0:
            inputs = {**kwargs, "input_ids": input_ids}
            self._spans = self.probe.spans(inputs)
            self._signals = self.probe.signals(self._spans)
            self._fed = []
            self._active = True
        elif self._active:
            if input_ids.shape[0] != self._spans.batch_size:
                raise RuntimeError("the batch changed during generation (beam search is not supported)")
            self._fed.append(input_ids[:, -1].detach())
        self._rows, self._row_sum = [], None

    def _on_attention(self, call) -> None:
        if not self._active:
            return
        call.request_probs([call.num_queries - 1], functools.partial(self._on_row, call.layer_idx))

    def _on_row(self, layer: int, probs: Tensor) -> None:
        row = head_mean(probs[:, :, 0], self.probe.heads)  # [B, K]
        if self.config.per_layer:
            self._rows.append(row)
        else:  # a running sum keeps memory independent of the number of probed layers
            self._row_sum = row if self._row_sum is None else self._row_sum + row
        if layer == self.probe.layers[-1]:
            if self.config.per_layer:
                block = reduce_rows(torch.stack(self._rows, dim=1), per_layer_output=True)
            else:
                n = len(self.probe.layers)
                block = (self._row_sum if n == 1 else self._row_sum / n)[:, None]
            self._signals.step(block)
            self._rows, self._row_sum = [], None

    # -- results -------------------------------------------------------------------------------

    @property
    def trace(self) -> Trace:
        """The latest generation's trace; the last token's id is -1 unless `finish` was called."""
        return self._build(None)

    def finish(self, sequences) -> Trace:
        """The latest generation's trace, with token ids from `generate`'s output (ids or a `GenerateOutput`)."""
        sequences = getattr(sequences, "sequences", sequences)
        return self._build(sequences)

    def _build(self, sequences: Tensor | None) -> Trace:
        if self._signals is None or self._spans is None:
            raise RuntimeError("nothing traced: call model.generate inside the Tracer context")
        steps = self._signals.num_steps
        b, length = self._spans.batch_size, self._spans.prompt_length
        if steps == 0:  # steps are shared by the batch: every sample is empty, name the first
            raise ValueError(
                f"{_sample_name(0, self.sample_ids)} has an empty completion: no generation step was "
                f"traced for any of the {b} samples (did generate stop in its prefill?)"
            )
        device = self._spans.image.device
        fed = torch.stack(self._fed[: steps - 1], dim=1) if steps > 1 else torch.zeros(b, 0, dtype=torch.long)
        fed = fed.to(device)
        last = torch.full((b, 1), -1, dtype=torch.long, device=device)
        if sequences is not None:
            if sequences.shape[1] < length + steps:
                raise ValueError(f"sequences have {sequences.shape[1]} columns, expected {length + steps}")
            last = sequences[:, length + steps - 1 : length + steps].to(device)
        token_ids = torch.cat([fed, last], dim=1)
        mask = eos_mask(token_ids, self.probe.eos)  # needs only o_1..o_{T-1}
        return self.probe.build(
            self._signals.result(), self._spans, token_ids, mask, "online", "native", self.sample_ids
        )


def trace_generate(
    model,
    inputs: dict,
    *,
    image_token_id: int | None = None,
    tokenizer=None,
    config: TraceConfig | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    sample_ids: Sequence | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    **generate_kwargs,
) -> tuple[Trace, Tensor]:
    """Generate from `inputs` and trace it online.

    Args:
        model: a Hugging Face VLM (Qwen2-VL / Qwen2.5-VL / LLaVA, or any model whose text decoder uses
            `AttentionInterface`).
        inputs: model inputs (`input_ids`, `attention_mask`, `pixel_values`, and for Qwen
            `image_grid_thw` and `mm_token_type_ids`).
        image_token_id: the image placeholder id (default: from the model config).
        tokenizer: optional, for token text.
        config: what to record.
        max_new_tokens, do_sample, **generate_kwargs: passed to `model.generate` (no beam search).
        sample_ids: optional ids stored with each sample.
        eos_token_id: end-of-sequence id(s): `generate` stops there and the trace's mask ends there
            (default: the model's generation config).

    Returns:
        `(trace, completion_ids)`, the latter `[B, T]` (generate's output without the prompt).
    """
    if generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError("beam search is not supported by the tracer")
    if eos_token_id is not None:  # the same ids end generation and the traced completion
        generate_kwargs["eos_token_id"] = eos_token_id
    with Tracer(
        model,
        config,
        image_token_id=image_token_id,
        tokenizer=tokenizer,
        eos_token_id=eos_token_id,
        sample_ids=sample_ids,
    ) as tracer:
        tracer.probe.spans(inputs)  # check the inputs before generate trips over them
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
    sequences = getattr(out, "sequences", out)
    trace = tracer.finish(sequences)
    return trace, sequences[:, inputs["input_ids"].shape[1] :]


def trace_offline(
    model,
    prompt_inputs: dict,
    completion_ids: Tensor,
    completion_mask: Tensor | None = None,
    *,
    image_token_id: int | None = None,
    tokenizer=None,
    config: TraceConfig | None = None,
    backend: str = "native",
    sample_ids: Sequence | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    **backend_options,
) -> Trace:
    """Trace given completions teacher-forced: one forward over `prompt ++ completion`.

    Args:
        model, image_token_id, tokenizer, config, sample_ids: as for `trace_generate`.
        prompt_inputs: the prompt batch, as passed to `generate` (prompts padded to one length).
        completion_ids: `[B, T]` completion tokens, right-padded, from any source.
        completion_mask: `[B, T]` real tokens; default: up to and including the first EOS (as online).
        backend: `"native"` (default), `"eager"`, `"nnsight"` or `"transformer_lens"`; see
            `dyco_probe.tracing.backends`. `backend_options` go to it (e.g. `bridge=` for
            transformer_lens).

    Returns:
        The `Trace`, equal (to float tolerance) to the online trace of the same tokens.
    """
    from .backends import get_backend

    rows_fn = get_backend(backend)
    probe = _Probe(model, config or TraceConfig(), image_token_id, tokenizer, eos_token_id)
    spans, completion_ids, completion_mask, inputs = _teacher_forced(
        probe, prompt_inputs, completion_ids, completion_mask, sample_ids
    )
    rows = rows_fn(
        model,
        _with_positions(model, inputs),
        layers=probe.layers,
        heads=probe.heads,
        query_columns=_completion_queries(spans, completion_ids),
        **backend_options,
    )
    rows = reduce_rows(rows.to(torch.float32), probe.config.per_layer)  # [B, G, T, K]
    signals = probe.signals(spans)
    signals.steps(rows)
    return probe.build(
        signals.result(), spans, completion_ids, completion_mask, "offline", backend, sample_ids
    )


class OfflineTracer:
    """Context manager that traces given completions teacher-forced, riding along forwards the caller runs.

    `trace_offline` runs a forward of its own; this one takes the rows from forwards that run anyway
    (a training step's log-probability pass, or the loss forward itself): each forward of `model`
    inside the block over the `L + T` columns of `prompt ++ completion` (no cache) hands over the
    probed layers' attention rows of the completion queries through the shared attention function,
    as the native backend does. The forward's output is unchanged and the rows carry no gradient. The
    batch may come as consecutive row chunks, one forward each, in order; each chunk is turned into
    signals as soon as its last probed layer has run, so only one chunk's rows are held.

        tracer = OfflineTracer(model, prompt_inputs, completion_ids)
        with tracer:
            model(**tracer.inputs)    # or any forward over the same columns, e.g. with labels, grad on
        trace = tracer.trace()        # the trace_offline(model, prompt_inputs, completion_ids) numbers

    The numbers are `trace_offline`'s when the forward sees what `tracer.inputs` holds (in particular
    the attention mask `prompt mask ++ completion_mask`; the caller checks that). Backward passes are
    not traced: gradient checkpointing recomputes after the block has ended.

    Args: as for `trace_offline` (native backend only).
    """

    def __init__(
        self,
        model,
        prompt_inputs: dict,
        completion_ids: Tensor,
        completion_mask: Tensor | None = None,
        *,
        image_token_id: int | None = None,
        tokenizer=None,
        config: TraceConfig | None = None,
        sample_ids: Sequence | None = None,
        eos_token_id: int | Sequence[int] | None = None,
    ):
        self.model = model
        self.probe = _Probe(model, config or TraceConfig(), image_token_id, tokenizer, eos_token_id)
        self.sample_ids = sample_ids
        self.spans, self.completion_ids, self.completion_mask, self._inputs = _teacher_forced(
            self.probe, prompt_inputs, completion_ids, completion_mask, sample_ids
        )
        self.query_columns = _completion_queries(self.spans, self.completion_ids)
        self._ctx = None
        self._done = 0  # samples whose rows have been turned into signals
        self._rows: list[Tensor] = []  # the current chunk's rows, one per probed layer so far
        self._results: list[dict[str, Tensor]] = []

    @functools.cached_property
    def inputs(self) -> dict:
        """The forward's inputs over `prompt ++ completion`, as `trace_offline` would run it."""
        return _with_positions(self.model, self._inputs)

    def __enter__(self) -> OfflineTracer:
        self._ctx = attention_hooks(self.model, self._on_attention, layers=self.probe.layers)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
            self._ctx = None

    def _on_attention(self, call) -> None:
        columns = self.spans.prompt_length + self.completion_ids.shape[1]
        if call.num_queries != columns or call.num_columns != columns:
            raise RuntimeError(
                f"OfflineTracer: a forward over {call.num_queries} queries / {call.num_columns} columns, "
                f"expected prompt ++ completion = {columns} (no cache)"
            )
        call.request_probs(self.query_columns, functools.partial(self._on_rows, call.layer_idx))

    def _on_rows(self, layer: int, probs: Tensor) -> None:
        row = head_mean(probs, self.probe.heads)  # [b, T, K]
        if self.probe.config.per_layer or not self._rows:
            self._rows.append(row)
        else:  # a running sum: one [b, T, K] buffer whatever the number of probed layers
            self._rows[0] = self._rows[0] + row
        if layer != self.probe.layers[-1]:
            return
        if self.probe.config.per_layer:
            rows = torch.stack(self._rows, dim=1)  # [b, n_layers, T, K]
        else:
            rows = (self._rows[0] / len(self.probe.layers))[:, None]
        self._rows = []
        start, stop = self._done, self._done + rows.shape[0]
        if stop > self.spans.batch_size:
            raise RuntimeError(f"OfflineTracer: more rows than the {self.spans.batch_size} samples traced")
        spans = _slice_spans(self.spans, start, stop)
        signals = self.probe.signals(spans)
        signals.steps(reduce_rows(rows, self.probe.config.per_layer))
        self._results.append(signals.result())
        self._done = stop

    def trace(self) -> Trace:
        """The trace of every sample; raises unless forwards inside the block covered the whole batch."""
        if self._done != self.spans.batch_size:
            raise RuntimeError(
                f"OfflineTracer: forwards covered {self._done} of {self.spans.batch_size} samples"
            )
        res = _concat_results(self._results)
        mask = self.completion_mask
        return self.probe.build(
            res, self.spans, self.completion_ids, mask, "offline", "native", self.sample_ids
        )


def _slice_spans(spans: Spans, start: int, stop: int) -> Spans:
    if start == 0 and stop == spans.batch_size:
        return spans
    return Spans(*(getattr(spans, f)[start:stop] for f in ("image", "valid", "last_image", "num_images")))


def _concat_results(results: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """`StepSignals.result()` of consecutive row chunks as one batch (image rows padded to the widest)."""
    if len(results) == 1:
        return results[0]
    out = {}
    for key in results[0]:
        parts = [r[key] for r in results]
        if key in ("image_rows", "image_rows_mask"):
            width = max(p.shape[-1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts]
        out[key] = torch.cat(parts, dim=0)
    return out


def _completion_queries(spans: Spans, completion_ids: Tensor) -> Tensor:
    """`[T]` columns of the queries whose logits produce `o_1 .. o_T`: `L - 1 .. L + T - 2`."""
    length = spans.prompt_length
    return torch.arange(length - 1, length - 1 + completion_ids.shape[1], device=completion_ids.device)


def _teacher_forced(probe: _Probe, prompt_inputs: dict, completion_ids: Tensor, completion_mask, sample_ids):
    """Check a teacher-forced batch and lay it out: `(spans, completion_ids, completion_mask, inputs)`,
    `inputs` the forward's over `prompt ++ completion` (without position ids: `_with_positions`)."""
    spans = probe.spans(prompt_inputs)
    prompt_ids = prompt_inputs["input_ids"]
    b, length = prompt_ids.shape
    completion_ids = completion_ids.to(prompt_ids.device)
    if completion_ids.ndim != 2 or completion_ids.shape[0] != b:
        raise ValueError(f"completion_ids must be [{b}, T], got {tuple(completion_ids.shape)}")
    steps = completion_ids.shape[1]
    if completion_mask is None:
        completion_mask = eos_mask(completion_ids, probe.eos)
    completion_mask = completion_mask.to(device=prompt_ids.device, dtype=torch.bool)
    empty = (~completion_mask.any(-1)).nonzero().flatten().tolist() if steps else list(range(b))
    if empty:
        raise ValueError(f"{_sample_name(empty[0], sample_ids)} has an empty completion")
    placeholder = (
        ((completion_ids == probe.image_token_id) & completion_mask).any(-1).nonzero().flatten().tolist()
    )
    if placeholder:
        raise ValueError(
            f"the completion of sample {placeholder[0]} contains the image placeholder id {probe.image_token_id}; "
            "a teacher-forced forward would read it as an image"
        )

    inputs = teacher_forced_inputs(
        probe.model, prompt_inputs, completion_ids, completion_mask, positions=False
    )
    return spans, completion_ids, completion_mask, inputs


def _with_positions(model, inputs: dict) -> dict:
    """`inputs` with position ids as `generate` makes them (Qwen-VL's mRoPE from the image grids)."""
    position_ids = generation_position_ids(model, inputs["input_ids"], inputs)
    return inputs if position_ids is None else {**inputs, "position_ids": position_ids}
