"""Cost of online tracing: traced `generate` vs plain sdpa `generate`, and vs eager + `output_attentions`.

    python benchmarks/tracing_overhead.py                          # ~45M random Qwen2.5-VL, 128 new tokens
    python benchmarks/tracing_overhead.py --model tiny --new-tokens 32
    python benchmarks/tracing_overhead.py --model builtin          # dyco_probe.load("builtin"), when shipped
    python benchmarks/tracing_overhead.py --model /path/to/ckpt    # a local checkpoint directory
    python benchmarks/tracing_overhead.py --model pkg.module:make  # make() -> model (or an object with .model)
    python benchmarks/tracing_overhead.py --append                 # add the results to benchmarks/RESULTS.md
    python benchmarks/tracing_overhead.py --scaling --append       # only the context-length scaling table

Time: the three methods run on the same prompts, interleaved (plain, traced, eager, plain, ...) after a
warm-up, every completion forced to `--new-tokens` tokens (`min_new_tokens`). Reported are median
wall-clock and process CPU times (`time.process_time`, all threads) and the medians of the per-repeat
ratios. On a shared machine the CPU-time ratio is the steadier figure: other processes stretch wall
time but not the CPU time this process spends.

Memory: CPU tensors are allocated outside Python's allocator, so `tracemalloc` does not see them.
Each method therefore runs once more in a fresh child process, where a sampling thread reads the
resident set size from `/proc/self/statm` every millisecond; reported is the peak during the run
minus the resident size just before it (activations, KV cache, recorded attention, allocator slack).
The tracer's own retained state (previous-step distributions, span-mask buffers and per-token
outputs) is also counted exactly, in bytes per sample, for several model depths and sequence lengths:
it is what must not grow with the number of layers.

Scaling (`--scaling`): at the sizes real users run, ~256 or ~1,024 image tokens and 128 / 512 / 2,048
generated tokens, with the hidden size shrunk so it runs on a CPU (`--scaling-hidden`, default 128,
4 layers): traced vs plain `generate` wall time (interleaved, medians), and the tracer's retained
bytes per sample, at the end and at their peak during generation (buffered rows included), next to
the KV cache the model itself keeps. The same lengths are traced with every layer probed at two
depths to show that the tracer's state does not depend on depth.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dyco_probe.testing import tiny_batch, tiny_qwen2_5_vl  # noqa: E402
from dyco_probe.tracing import TraceConfig, Tracer  # noqa: E402

# ~45M parameters: 8 text layers of width 512 (8 heads, 2 KV heads), a 20k vocabulary, tiny vision tower.
RANDOM_45M = dict(
    num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=2, intermediate_size=1536, vocab_size=20000
)


def build_model(spec: str, attn_implementation: str = "sdpa", **overrides):
    """`random-45m`, `tiny`, `builtin`, a checkpoint directory, or `module:callable`."""
    if spec in ("random-45m", "tiny"):
        kwargs = dict(RANDOM_45M) if spec == "random-45m" else {}
        kwargs.update(overrides)
        return tiny_qwen2_5_vl(seed=0, attn_implementation=attn_implementation, **kwargs)
    if ":" in spec and not os.path.isdir(spec):
        module, name = spec.split(":", 1)
        made = getattr(importlib.import_module(module), name)()
        model = getattr(made, "model", made)
        model.set_attn_implementation(attn_implementation)
        return model.eval()
    import dyco_probe

    load = getattr(dyco_probe, "load", None)
    if load is None:
        from dyco_probe.models.loading import load
    return load(spec, attn_implementation=attn_implementation).model


def make_batch(model, batch_size: int, question_length: int):
    return tiny_batch(
        model,
        batch_size,
        images_per_prompt=1,
        image_sizes=[(112, 112)],
        question_lengths=[question_length] * batch_size,
    )


def run_method(method: str, model, batch, new_tokens: int, layers) -> None:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        if method == "plain":
            model.generate(**batch, **kwargs)
        elif method == "traced":
            with Tracer(model, TraceConfig(layers=layers)) as tracer:
                out = model.generate(**batch, **kwargs)
            tracer.finish(out)
        elif method == "eager_attentions":  # the usual way: every attention matrix of every step
            model.generate(**batch, **kwargs, output_attentions=True, return_dict_in_generate=True)
        else:
            raise ValueError(method)


def timings(args) -> dict:
    torch.manual_seed(0)
    model = build_model(args.model)
    eager = build_model(args.model, attn_implementation="eager")
    batch = make_batch(model, args.batch_size, args.question_length)
    methods = {"plain": model, "traced": model, "eager_attentions": eager}
    for method, m in methods.items():  # warm-up
        run_method(method, m, batch, min(8, args.new_tokens), args.layers)
    wall = {k: [] for k in methods}
    cpu = {k: [] for k in methods}
    for _ in range(args.repeats):
        for method, m in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run_method(method, m, batch, args.new_tokens, args.layers)
            wall[method].append(time.perf_counter() - start)
            cpu[method].append(time.process_time() - start_cpu)

    def ratio(times, k):
        return statistics.median(a / b for a, b in zip(times[k], times["plain"]))

    return {
        "params": sum(p.numel() for p in model.parameters()),
        "prompt_length": batch["input_ids"].shape[1],
        "wall_s": {k: statistics.median(v) for k, v in wall.items()},
        "cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "wall_ratio": {k: ratio(wall, k) for k in methods},
        "cpu_ratio": {k: ratio(cpu, k) for k in methods},
        "raw": {"wall": wall, "cpu": cpu},
    }


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(args) -> None:
    model = build_model(
        args.model, attn_implementation="eager" if args.child == "eager_attentions" else "sdpa"
    )
    batch = make_batch(model, args.batch_size, args.question_length)
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    base = _rss_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run_method(args.child, model, batch, args.new_tokens, args.layers)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_mb())
    print(json.dumps({"base_rss_mb": base, "peak_rss_mb": peak[0], "increase_mb": peak[0] - base}))


def memory(args) -> dict:
    out = {}
    for method in ("plain", "traced", "eager_attentions"):
        cmd = [sys.executable, __file__, "--child", method, *sys.argv[1:]]
        cmd = [c for c in cmd if c != "--append"]
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
        )
        out[method] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def tracer_state(args) -> list[dict]:
    """Bytes the tracer retains per sample after the last step, for several depths and lengths."""
    rows = []
    for num_layers in (4, 8):
        model = tiny_qwen2_5_vl(num_layers=num_layers)
        for new_tokens in (32, 128):
            batch = make_batch(model, 2, 16)
            with Tracer(model, TraceConfig(layers="all")) as tracer:
                model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            nbytes = tracer._signals.state_nbytes()
            rows.append(
                {
                    "layers": num_layers,
                    "probed": "all",
                    "seq_len": batch["input_ids"].shape[1] + new_tokens,
                    "bytes_per_sample": nbytes // 2,
                }
            )
    return rows


SCALING_IMAGE_TOKENS = (256, 1024)
SCALING_NEW_TOKENS = (128, 512, 2048)


def scaling_batch(model, batch_size: int, image_tokens: int):
    """One square image of `image_tokens` merged tokens per prompt (28 x 28 pixels per token) and a
    32-token question."""
    side = math.isqrt(image_tokens) * 28
    return tiny_batch(
        model, batch_size, images_per_prompt=1, image_sizes=[(side, side)], question_lengths=[32] * batch_size
    )


def traced_state(model, batch, new_tokens: int, layers) -> tuple[int, int]:
    """`(bytes at the end, peak bytes during generation)` the tracer retains per sample."""
    from dyco_probe.tracing.signals import StepSignals

    peak = [0]
    step = StepSignals.step

    def counting(self, rows):
        step(self, rows)
        peak[0] = max(peak[0], self.state_nbytes())

    StepSignals.step = counting
    try:
        with Tracer(model, TraceConfig(layers=layers)) as tracer:
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        tracer.trace  # noqa: B018 - builds the trace: every buffered row processed
        end = tracer._signals.state_nbytes()
    finally:
        StepSignals.step = step
    b = batch["input_ids"].shape[0]
    return end // b, max(peak[0], end) // b


def kv_cache_bytes(model, columns: int) -> int:
    """Bytes of the text model's KV cache per sample over `columns` columns."""
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return text.num_hidden_layers * 2 * columns * text.num_key_value_heads * head_dim * itemsize


def scaling(args) -> dict:
    model = tiny_qwen2_5_vl(
        seed=0,
        hidden_size=args.scaling_hidden,
        num_layers=args.scaling_layers,
        num_heads=4,
        num_kv_heads=2,
        vision_depth=1,
        vision_hidden_size=32,
    )
    rows = []
    for image_tokens in SCALING_IMAGE_TOKENS:
        batch = scaling_batch(model, args.batch_size, image_tokens)
        prompt = batch["input_ids"].shape[1]
        for method in ("plain", "traced"):  # warm-up
            run_method(method, model, batch, 4, args.layers)
        for new_tokens in SCALING_NEW_TOKENS:
            wall = {"plain": [], "traced": []}
            for _ in range(args.scaling_repeats):
                for method in wall:
                    start = time.perf_counter()
                    run_method(method, model, batch, new_tokens, args.layers)
                    wall[method].append(time.perf_counter() - start)
            end, peak = traced_state(model, batch, new_tokens, args.layers)
            rows.append(
                {
                    "image_tokens": image_tokens,
                    "prompt": prompt,
                    "new_tokens": new_tokens,
                    "plain_s": statistics.median(wall["plain"]),
                    "traced_s": statistics.median(wall["traced"]),
                    "ratio": statistics.median(a / b for a, b in zip(wall["traced"], wall["plain"])),
                    "bytes_end": end,
                    "bytes_peak": peak,
                    "kv_bytes": kv_cache_bytes(model, prompt + new_tokens),
                    "raw": wall,
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "raw"}), file=sys.stderr, flush=True)
    depth = []
    for num_layers in (2, 8):  # every layer probed: the state must not depend on how many
        deep = tiny_qwen2_5_vl(
            seed=0,
            hidden_size=args.scaling_hidden,
            num_layers=num_layers,
            num_heads=4,
            num_kv_heads=2,
            vision_depth=1,
            vision_hidden_size=32,
        )
        batch = scaling_batch(deep, args.batch_size, SCALING_IMAGE_TOKENS[-1])
        for new_tokens in (SCALING_NEW_TOKENS[0], SCALING_NEW_TOKENS[-1]):
            end, peak = traced_state(deep, batch, new_tokens, "all")
            depth.append(
                {
                    "layers": num_layers,
                    "columns": batch["input_ids"].shape[1] + new_tokens,
                    "bytes_end": end,
                    "bytes_peak": peak,
                    "kv_bytes": kv_cache_bytes(deep, batch["input_ids"].shape[1] + new_tokens),
                }
            )
    params = sum(p.numel() for p in model.parameters())
    return {"rows": rows, "depth": depth, "params": params}


def scaling_markdown(args, result: dict, load_start: str) -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load_end = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    kb = lambda n: f"{n / 1024:.1f}"  # noqa: E731
    lines = [
        f"## Tracing cost vs context length — {now}",
        "",
        f"Machine: {platform.node()} ({_cpu()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}), "
        f"Python {platform.python_version()}, torch {torch.__version__}; shared with other jobs, load average "
        f"{load_start} at start, {load_end} at end (1/5/15 min). No GPU.",
        f"Model: random Qwen2.5-VL shrunk to run here ({result['params'] / 1e6:.2f}M parameters: "
        f"{args.scaling_layers} text layers of width {args.scaling_hidden}, 4 heads, 2 KV heads, float32), batch "
        f"{args.batch_size}, one square image and a 32-token question per prompt, greedy, every completion forced "
        f"to its length, probed layers {args.layers or 'last'}; plain and traced `generate` interleaved, "
        f"{args.scaling_repeats} repeats, medians.",
        "",
        "| image tokens | prompt | new tokens | plain (s) | traced (s) | traced / plain | tracer KB / sample "
        "(end) | (peak) | KV cache KB / sample |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| {r['image_tokens']} | {r['prompt']} | {r['new_tokens']} | {r['plain_s']:.2f} | {r['traced_s']:.2f} | "
            f"{r['ratio']:.3f} | {kb(r['bytes_end'])} | {kb(r['bytes_peak'])} | {kb(r['kv_bytes'])} |"
            for r in result["rows"]
        ],
        "",
        f"Every layer probed, {SCALING_IMAGE_TOKENS[-1]} image tokens, two depths (tracer state per sample):",
        "",
        "| text layers | columns (prompt + new) | tracer KB (end) | (peak) | KV cache KB |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| {d['layers']} | {d['columns']} | {kb(d['bytes_end'])} | {kb(d['bytes_peak'])} | {kb(d['kv_bytes'])} |"
            for d in result["depth"]
        ],
        "",
        "raw seconds: "
        + "; ".join(
            f"{r['image_tokens']}/{r['new_tokens']}: plain {[round(x, 2) for x in r['raw']['plain']]}, "
            f"traced {[round(x, 2) for x in r['raw']['traced']]}"
            for r in result["rows"]
        ),
        "",
    ]
    return "\n".join(lines)


def _cpu() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    return cpu


def markdown(args, t: dict, mem: dict, state: list[dict]) -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"## Tracing overhead — {now}",
        "",
        f"Machine: {platform.node()} ({cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}), "
        f"Python {platform.python_version()}, torch {torch.__version__}, load average {load} (1/5/15 min). "
        f"{'GPU: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'No GPU.'}",
        f"Model: `{args.model}` ({t['params'] / 1e6:.1f}M parameters), batch {args.batch_size}, prompt "
        f"{t['prompt_length']} tokens (16 image tokens), {args.new_tokens} new tokens, greedy, probed layers "
        f"{args.layers or 'last'}; {args.repeats} interleaved repeats after a warm-up.",
        "",
        "| method | wall (s) | CPU (s) | wall ratio | CPU ratio | peak RSS increase (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| {label} | {t['wall_s'][k]:.3f} | {t['cpu_s'][k]:.3f} | {t['wall_ratio'][k]:.3f} | "
            f"{t['cpu_ratio'][k]:.3f} | {mem[k]['increase_mb']:.1f} |"
            for k, label in (
                ("plain", "plain sdpa generate"),
                ("traced", "traced generate (native)"),
                ("eager_attentions", "eager + output_attentions"),
            )
        ],
        "",
        "Tracer state retained per sample (all layers probed, mean over layers; exact byte count):",
        "",
        "| text layers | sequence length | bytes per sample |",
        "| ---: | ---: | ---: |",
        *[f"| {r['layers']} | {r['seq_len']} | {r['bytes_per_sample']} |" for r in state],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random-45m")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--question-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--layers", default=None, help="probed layers: 'all' or comma-separated (default: last)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    parser.add_argument("--scaling", action="store_true", help="only the context-length scaling table")
    parser.add_argument("--scaling-hidden", type=int, default=128)
    parser.add_argument("--scaling-layers", type=int, default=4)
    parser.add_argument("--scaling-repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layers and args.layers != "all":
        args.layers = tuple(int(x) for x in args.layers.split(","))
    if args.child:
        memory_child(args)
        return
    if args.scaling:
        load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        text = scaling_markdown(args, scaling(args), load_start)
        print(text)
        if args.append:
            with (ROOT / "benchmarks" / "RESULTS.md").open("a") as f:
                f.write("\n" + text)
        return
    t = timings(args)
    mem = memory(args)
    state = tracer_state(args)
    text = markdown(args, t, mem, state)
    print(json.dumps(t["raw"]), file=sys.stderr)
    print(text)
    if args.append:
        results = ROOT / "benchmarks" / "RESULTS.md"
        if not results.exists():
            results.write_text(
                "# Benchmark results\n\nAppended by the scripts in `benchmarks/`; newest last.\n\n"
            )
        with results.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
