"""Per-token cross-modal attention tracing (docs/method.md#sequences-and-spans, #attention-signals, #modality-dynamics).

    from dyco_probe.tracing import TraceConfig, trace_generate, trace_offline, Tracer

    trace, completion = trace_generate(model, inputs, max_new_tokens=64)          # online, native
    same = trace_offline(model, inputs, completion, trace.mask)                    # teacher-forced
    ref = trace_offline(model, inputs, completion, trace.mask, backend="nnsight")  # or "transformer_lens", "eager"

    with Tracer(model, TraceConfig(layers="all", per_layer=True)) as tr:
        out = model.generate(**inputs, max_new_tokens=64)
    trace = tr.finish(out)

    with OfflineTracer(model, inputs, completion) as tr:                        # rides along a forward
        model(**tr.inputs)                                                      # the caller runs
    same = tr.trace()

The attention function under all of this (`attention_hooks`, `AttentionCall`) is the one
interventions build on: see `dyco_probe.tracing.attention`.
"""

from .attention import AttentionCall, AttentionHook, attention_hooks, explicit_attention_rows
from .backends import BACKENDS
from .config import TraceConfig
from .trace import SIGNAL_NAMES, SampleTrace, TokenRecord, Trace
from .tracer import OfflineTracer, Tracer, trace_generate, trace_offline

__all__ = [
    "BACKENDS",
    "SIGNAL_NAMES",
    "AttentionCall",
    "AttentionHook",
    "OfflineTracer",
    "SampleTrace",
    "TokenRecord",
    "Trace",
    "TraceConfig",
    "Tracer",
    "attention_hooks",
    "explicit_attention_rows",
    "trace_generate",
    "trace_offline",
]
