"""``make demo``: the whole story on the built-in model, in about a quarter of an hour on a 2-core CPU.

    python -m dyco_probe.demo                       # writes runs/demo/, ends with runs/demo/report.html
    python -m dyco_probe.demo --fresh               # start over
    python -m dyco_probe.demo --model /path/ckpt    # another checkpoint (synthetic task)

The built-in model carries a planted failure (the positive control): questions may hold a note about
one object, and the model sometimes copies the note's value instead of reading the image, so a false
note gives a wrong answer. The demo shows the failure, which signals see it, and its repair by RL.

Stages, each printing what it does, the command-line equivalent, its findings and its time:

1. **trace**: greedy completions of the synthetic test split, traced online (last layer, all heads,
   with each token's attention over the image); accuracy overall and by subset (no note, true note,
   false note), how often false notes are copied, and accuracy under blank and swapped images;
2. **roles**: the paper's Fisher–Rao rule and a ratio baseline against the task's ground-truth roles,
   then the full labeller validation (`analyses/validate_labellers.py`: every distance, layer and
   head, a threshold sweep);
3. **tokens**: token-level analysis of correct vs incorrect trajectories (role fractions, `s_t`,
   switch rate, AUROC of the sample score);
4. **control**: sampled completions of noted problems; for each per-token signal (Fisher–Rao role,
   `s_t`, the image-attention ratio, attention on the named cell and on the note), how well it tells a
   look-up copied from the note from one read from the image (`analyses/positive_control.py`);
5. **interventions**: the headline experiment: knock out image attention of visual-role tokens and
   text-history attention of text-role tokens, against matched random tokens
   (`analyses/interventions_headline.py`);
6. **rl**: GRPO with DyCo off and with token-level DyCo, same seed and data: does RL repair the
   failure (false-note accuracy up, copies down, no-note accuracy kept)?
7. **report**: one self-contained HTML page of it all (`dyco-probe report`).

Everything lands in the run directory (layout: ``dyco_probe.rundir``); ``run.json`` records the
settings and each stage's time. A rerun skips finished stages and resumes interrupted ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from pathlib import Path

STAGES = ("trace", "roles", "tokens", "control", "interventions", "rl", "report")

# The defaults are sized for the built-in model on a 2-core CPU (16 minutes measured with another job
# running, 11 of them the two RL runs of 150 steps, which repair the planted failure);
# --quick shrinks everything to check the pipeline in seconds.
DEFAULTS = dict(
    n=200,
    max_new_tokens=96,
    batch_size=32,
    n_interventions=32,
    n_control=40,
    control_samples=8,
    rl_steps=150,
    rl_eval=150,
    rl_jobs=2,
    rl_prompts=8,
    rl_generations=8,
    rl_max_new_tokens=72,
    n_boot=1000,
    labeller_completions="generated",
)
QUICK = dict(
    n=8,
    max_new_tokens=24,
    batch_size=4,
    n_interventions=4,
    n_control=4,
    control_samples=2,
    rl_steps=2,
    rl_eval=4,
    rl_jobs=1,
    rl_prompts=2,
    rl_generations=2,
    rl_max_new_tokens=12,
    n_boot=100,
    labeller_completions="gold",  # ground truth exists for the gold chains whatever the model writes
)


class Demo:
    """The stages over one run directory, with the narrative and the record in ``run.json``."""

    def __init__(self, args):
        from dyco_probe.rundir import RunDirectory

        self.args = args
        self.run = RunDirectory(args.out)
        self.settings = {
            "model": args.model,
            **{k: getattr(args, k) for k in DEFAULTS},
            "seed": args.seed,
            "threads": args.threads,
        }
        self.record = self.run.settings()
        self._handle = None
        self.t_start = time.perf_counter()

    # -- bookkeeping -----------------------------------------------------------------------------

    def open(self) -> None:
        if self.args.fresh and self.run.root.exists():
            shutil.rmtree(self.run.root)
            self.record = {}
        old = self.record.get("settings")
        if old is not None and old != self.settings:
            changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            raise SystemExit(
                f"{self.run.root} holds a demo run with other settings ({', '.join(changed)}); "
                f"rerun with --fresh, or choose another --out"
            )
        self.run.root.mkdir(parents=True, exist_ok=True)
        self.record.setdefault("settings", self.settings)
        self.record.setdefault("stages", {})
        self.save()

    def save(self) -> None:
        tmp = self.run.run_json.with_suffix(".json.partial")
        tmp.write_text(json.dumps(self.record, indent=2, default=str) + "\n")
        tmp.replace(self.run.run_json)

    def done(self, stage: str) -> bool:
        return bool(self.record["stages"].get(stage, {}).get("done"))

    @property
    def handle(self):
        if self._handle is None:
            from dyco_probe.models.loading import load

            self._handle = load(self.args.model)
        return self._handle

    def say(self, text: str = "") -> None:
        print(("      " + text) if text else "", flush=True)

    def stage(self, k: int, name: str, what: str, func, equivalent: str | None = None) -> None:
        print(f"\n[{k}/{len(STAGES)}] {name}: {what}", flush=True)
        if equivalent:
            self.say(f"same as: {equivalent}")
        if name in self.args.skip:
            self.say("skipped (--skip)")
            return
        if self.done(name) and name != "report":
            previous = self.record["stages"][name]
            self.say(f"already done in an earlier run ({previous['seconds']:.1f} s); findings:")
            for line in previous.get("findings", []):
                self.say(line)
            return
        t0 = time.perf_counter()
        findings = func() or []
        seconds = time.perf_counter() - t0
        for line in findings:
            self.say(line)
        self.say(f"done in {seconds:.1f} s")
        self.record["stages"][name] = {"done": True, "seconds": round(seconds, 2), "findings": findings}
        self.save()

    # -- stages ----------------------------------------------------------------------------------

    def trace(self) -> list[str]:
        from dyco_probe.api import trace
        from dyco_probe.data import synthetic_examples
        from dyco_probe.evaluation import evaluate
        from dyco_probe.tracing import TraceConfig

        a = self.args
        examples = synthetic_examples("test", a.n)
        parts = self.run.root / "trace.parquet.parts"
        result = trace(
            self.handle,
            examples,
            config=TraceConfig(image_rows=True),
            max_new_tokens=a.max_new_tokens,
            batch_size=a.batch_size,
            parts=parts,
            progress=not a.quiet,
        )
        result.save(self.run.trace)
        shutil.rmtree(parts, ignore_errors=True)
        s = result.summary()
        controls = {}
        for mode in ("blank", "swap"):
            res = evaluate(
                self.handle,
                examples,
                image_mode=mode,
                max_new_tokens=a.max_new_tokens,
                batch_size=a.batch_size,
                progress=False,
            )
            controls[mode] = res.accuracy
        self.record["image_controls"] = controls
        roles = s["role_fractions"]
        lines = [
            f"accuracy {s['accuracy']:.3f} on {s['samples']} problems (format {s['format_rate']:.3f}); with blank "
            f"images {controls['blank']:.3f}, with another problem's image {controls['swap']:.3f}",
            *self._subset_lines([ex.problem for ex in examples], result.records),
            f"{s['tokens']} completion tokens; roles (docs/method.md#token-roles, Fisher–Rao): visual {roles['visual']:.3f}, "
            f"text {roles['text']:.3f}, neutral {roles['neutral']:.3f}",
        ]
        for wanted in (True, False):  # one correct and one incorrect trajectory, when there are
            k = next((i for i, r in enumerate(result.records) if r["correct"] == wanted), None)
            if k is None:
                continue
            ex, rec = examples[k], result.records[k]
            lines += [
                f"{'a correct' if wanted else 'an incorrect'} one: {ex.question.replace('<image>', '[image]')}",
                f"  model: {rec['completion']}",
                f"  gold:  {ex.completion}",
            ]
        return lines + [f"-> {self.run.trace}"]

    def _subset_lines(self, problems, records) -> list[str]:
        """Accuracy by subset and the false-note copy rate (tasks with notes only)."""
        from dyco_probe.task.notes import note_summary

        if not any(p is not None and p.note is not None for p in problems):
            return []
        n = note_summary(problems, [r["completion"] for r in records], [r["correct"] for r in records])
        self.record["subsets"] = n
        return [
            f"by subset: no note {_f(n['accuracy_no_note'])} (n={n['n_no_note']}), true note "
            f"{_f(n['accuracy_true_note'])} (n={n['n_true_note']}), false note {_f(n['accuracy_false_note'])} "
            f"(n={n['n_false_note']})",
            f"the planted failure: {_f(n['copy_rate_false_note'])} of false notes are copied instead of "
            f"reading the image (true notes: {_f(n['copy_rate_true_note'])})",
        ]

    def control(self) -> list[str]:
        from dyco_probe.positive_control import copy_vs_read, detection, verdict
        from dyco_probe.task.problems import make_split

        a = self.args
        pool = make_split("test", 4 * a.n_control)
        noted = [p for p in pool if p.note is not None][: a.n_control]
        if not noted:
            return ["no noted problems in this task: nothing planted to detect"]
        table, _ = copy_vs_read(
            self.handle, noted, a.control_samples, seed=a.seed, batch_size=a.batch_size, progress=not a.quiet
        )
        table.to_csv(self.run.control_lookups, index=False)
        det = detection(table, n_boot=a.n_boot)
        self.run.control.write_text(json.dumps(det, indent=2, default=float) + "\n")
        n = table[table["note"] != ""]
        lines = [
            f"{len(noted)} noted problems x {a.control_samples} samples: {int((n['lookup'] == 'read').sum())} "
            f"noted look-ups read from the image, {int((n['lookup'] == 'copied').sum())} copied from the note",
            "AUROC for telling read from copied (0.5: blind), 95% CI over prompts:",
        ]
        for d in det.values():
            lines.append(
                f"  {d['description']}: {_f(d['auroc'])} [{_f(d['ci_low'])}, {_f(d['ci_high'])}] -> {verdict(d)}"
            )
        return lines + [f"-> {self.run.root}/control.json, control_lookups.csv"]

    def roles(self) -> list[str]:
        from dyco_probe.studies.labeller_validation import LabellerValidation, validate_labellers
        from dyco_probe.studies.labellers import role_agreement
        from dyco_probe.tracing import Trace

        agreement = role_agreement(Trace.load(self.run.trace), self.handle.tokenizer)
        self.run.roles.write_text(json.dumps(agreement, indent=2) + "\n")
        lines = ["true roles: " + ", ".join(f"{k} {v:.3f}" for k, v in agreement["truth_fractions"].items())]
        for name, res in agreement["labellers"].items():
            ex = res["excluded"]
            f1 = {r: v["f1"] for r, v in ex["roles"].items()}
            lines.append(
                f"{name} ({res['setting']}): macro F1 {_f(ex['macro_f1'])} (visual {_f(f1.get('visual'))}, "
                f"text {_f(f1.get('text'))}; neutral tokens excluded)"
            )
        peak = agreement.get("attention_peak")
        if peak and peak.get("tokens"):
            lines.append(
                f"image attention of true visual tokens peaks on the named object for {_f(peak['share'])} "
                f"of them (chance {_f(peak['chance'])})"
            )
        lines.append(f"-> {self.run.roles}")
        a = self.args
        self.say("full validation: every labeller and distance, each layer and head, a threshold sweep ...")
        settings = LabellerValidation(
            model=a.model,
            n=a.n,
            batch_size=a.batch_size,
            max_new_tokens=a.max_new_tokens,
            completions=a.labeller_completions,
            out=str(self.run.labellers),
            runs=str(self.run.labellers / "traces"),
            progress=False,
        )
        failed = self._analysis("validate_labellers", validate_labellers, settings)
        lines.append(failed or f"-> {self.run.labellers}/labeller_validation.md, .csv, figures")
        return lines

    def _analysis(self, name: str, run, *args, **kwargs) -> str | None:
        """Run one analysis of `dyco_probe.studies` (what `analyses/<name>.py` runs). None when it ran;
        when it failed, a warning line (its traceback is kept in `<run>/<name>.log`; the demo goes on:
        one analysis failing should not cost the others)."""
        try:
            run(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported, and the other stages still run
            log = self.run.root / f"{name}.log"
            log.write_text(traceback.format_exc())
            return f"WARNING: analyses/{name}.py failed ({type(e).__name__}: {e}); its traceback is in {log}"
        return None

    def tokens(self) -> list[str]:
        from dyco_probe.analysis import analyse_tokens
        from dyco_probe.tracing import Trace
        from dyco_probe.viz import save_token_analysis_figures

        analysis = analyse_tokens(Trace.load(self.run.trace), n_boot=self.args.n_boot)
        save_token_analysis_figures(analysis, self.run.figures)
        h = analysis.headline()
        au = h["auroc_sample_score"]
        lines = []
        for g in ("correct", "incorrect"):
            fr = h["role_fractions"][g]
            lines.append(
                f"{g:9s}: visual {_f(fr['visual'])}, text {_f(fr['text'])}; mean s_t {_f(h['mean_s'][g])}; "
                f"role-switch rate {_f(h['switch_rate'][g])}"
            )
        lines.append(
            f"sample score vs correctness: AUROC {_f(au['auroc'])} (95% CI {_f(au['ci_low'])} to {_f(au['ci_high'])})"
        )
        return lines + [f"-> {self.run.figures}/token_analysis_*.png/.pdf"]

    def interventions(self) -> list[str]:
        from dyco_probe.studies.interventions import HeadlineSettings, headline

        a = self.args
        folder = str(self.run.interventions)
        settings = HeadlineSettings(
            model=a.model,
            n=a.n_interventions,
            batch_size=min(16, a.n_interventions),
            max_new_tokens=min(64, a.max_new_tokens),
            runs=folder,
            figures=folder,
            quiet=True,
            n_boot=a.n_boot,
        )
        failed = self._analysis("interventions_headline", headline, settings, say=lambda line: None)
        if failed:
            return [failed]
        return _headline_findings(self.run.interventions) + [f"-> {folder}/interventions_headline.md, .png"]

    def rl(self) -> list[str]:
        from dyco_probe.rl import RLConfig

        a = self.args
        configs = []
        for dyco in ("off", "token"):
            out = self.run.rl / f"grpo-{dyco}"
            configs.append(
                RLConfig(
                    out_dir=str(out),
                    model=a.model,
                    seed=a.seed,
                    steps=a.rl_steps,
                    n_eval=a.rl_eval,
                    eval_every=max(1, a.rl_steps // 3),
                    eval_max_new_tokens=a.max_new_tokens,
                    prompts_per_step=a.rl_prompts,
                    num_generations=a.rl_generations,
                    max_new_tokens=a.rl_max_new_tokens,
                    dyco=dyco,
                    trace_when_off=True,  # the baseline's role and s_t metrics, advantages unchanged
                    checkpoint_every=10,
                    threads=a.threads,
                    resume=(out / "checkpoint.pt").exists(),
                )
            )
        t0 = time.perf_counter()
        jobs = max(1, min(a.rl_jobs, len(configs)))
        self.say(
            f"training grpo with DyCo off and token ({a.rl_steps} steps each, {jobs} at a time; "
            f"progress in {self.run.rl}/grpo-*/metrics.jsonl) ..."
        )
        if jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                results = list(pool.map(_train, configs))
        else:
            results = [_train(c, progress=not a.quiet) for c in configs]
        lines = []
        for config, (first, last) in zip(configs, results):
            lines.append(
                f"DyCo {config.dyco:5s}: held-out accuracy {first['accuracy']:.3f} -> {last['accuracy']:.3f} "
                f"(95% CI {last['accuracy_ci_low']:.3f}-{last['accuracy_ci_high']:.3f}, n={last['n']})"
            )
            if "accuracy_false_note" in last:
                lines.append(
                    "             "
                    + ", ".join(
                        f"{k.removeprefix('accuracy_').replace('_', ' ')} {_f(first[k])} -> {_f(last[k])}"
                        for k in (
                            "accuracy_no_note",
                            "accuracy_true_note",
                            "accuracy_false_note",
                            "copy_rate",
                        )
                    )
                )
        return lines + [
            f"both runs in {time.perf_counter() - t0:.0f} s; one seed: an illustration. "
            "analyses/rl_comparison.py compares over seeds (figures/rl_comparison.md)",
            f"-> {self.run.rl}/grpo-off, grpo-token",
        ]

    def report(self) -> list[str]:
        from dyco_probe.report import build_report, report_status

        path = build_report(self.run.root, n_boot=self.args.n_boot)
        status = report_status(path)
        missing = [t for t, ok in status.items() if not ok]
        lines = [f"sections: {', '.join(t for t, ok in status.items() if ok)}"]
        if missing:
            lines.append(f"not in this run: {', '.join(missing)}")
        return lines + [f"-> {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained, opens offline)"]


def _train(config, progress: bool = False) -> tuple[dict, dict]:
    """One RL run (in a worker process or inline): its first and last evaluations."""
    from dyco_probe.rl import train

    result = train(config, progress=progress)
    return result.initial_eval, result.final_eval


def _f(x) -> str:
    return "–" if x is None or x != x else f"{x:.3f}"


def _s(x) -> str:
    return "–" if x is None or x != x else f"{x:+.3f}"


def _headline_findings(folder: Path) -> list[str]:
    """Two lines from the headline table: knockout at all layers on the role's tokens vs the random control."""
    import math

    import pandas as pd

    path = folder / "interventions_headline.csv"
    if not path.exists():
        return []
    table = pd.read_csv(path)
    lines = []
    for experiment in table["experiment"].unique():
        for readout in ("dacc", "dlogp_answer"):
            rows = table[
                (table["experiment"] == experiment)
                & (table["readout"] == readout)
                & (table["layers"].astype(str) == "all")
                & (table["role_source"] == "fisher_rao")
                & (table["target"] == table["role"])
            ]
            if rows.empty:
                continue
            r = rows.iloc[0]
            diff = r.get("diff_vs_random", math.nan)
            label = "Δ accuracy" if readout == "dacc" else "Δ log p(answer)"
            lines.append(
                f"{experiment}, all layers, Fisher–Rao {r['role']} tokens: {label} {_s(r['mean'])} "
                f"[{_s(r['ci_low'])}, {_s(r['ci_high'])}]; vs matched random tokens {_s(diff)}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dyco_probe.demo",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("Stages,") :],
    )
    parser.add_argument("--model", default="builtin", help="'builtin' or a checkpoint directory")
    parser.add_argument("--out", default="runs/demo", help="run directory")
    parser.add_argument("--fresh", action="store_true", help="remove the run directory first")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the pipeline in seconds")
    parser.add_argument("--skip", nargs="*", default=[], choices=STAGES, help="stages to leave out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a shared CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for k, v in DEFAULTS.items():
        parser.add_argument(
            "--" + k.replace("_", "-"),
            type=type(v),
            default=None,
            help=f"default {v} ({QUICK[k]} with --quick)",
        )
    args = parser.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading and saving bars: noise in the narrative
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    demo = Demo(args)
    demo.open()
    m = args.model
    print(f"dyco_probe demo: model {m}, run directory {demo.run.root} (a rerun skips finished stages)")
    demo.stage(
        1,
        "trace",
        f"greedy completions of {args.n} synthetic test problems, traced online",
        demo.trace,
        f"dyco-probe trace --model {m} --split test --n {args.n} --image-rows --out {demo.run.trace}",
    )
    demo.stage(
        2,
        "roles",
        "label every token and validate the labellers against the task's ground truth",
        demo.roles,
        f"dyco-probe roles --trace {demo.run.trace} --against ground_truth; "
        f"python -m analyses.validate_labellers --n {args.n} --out {demo.run.labellers}",
    )
    demo.stage(
        3,
        "tokens",
        "token-level analysis of correct vs incorrect trajectories",
        demo.tokens,
        f"python -m analyses.token_analysis --trace {demo.run.trace}",
    )
    demo.stage(
        4,
        "control",
        f"the planted failure: copied vs read look-ups on {args.n_control} noted problems x "
        f"{args.control_samples} samples",
        demo.control,
        f"python -m analyses.positive_control --n-noted {args.n_control} --samples {args.control_samples}",
    )
    demo.stage(
        5,
        "interventions",
        f"knock out image / text-history attention by token role on {args.n_interventions} problems",
        demo.interventions,
        f"python -m analyses.interventions_headline --n {args.n_interventions} --runs {demo.run.interventions} "
        f"--figures {demo.run.interventions}",
    )
    demo.stage(
        6,
        "rl",
        f"GRPO for {args.rl_steps} steps with DyCo off and with token-level DyCo",
        demo.rl,
        f"dyco-probe train --dyco token --steps {args.rl_steps} --out {demo.run.rl}/grpo-token",
    )
    demo.stage(7, "report", "write the HTML report", demo.report, f"dyco-probe report --run {demo.run.root}")
    total = time.perf_counter() - demo.t_start
    demo.record["last_wall_seconds"] = round(total, 1)
    demo.save()
    times = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in demo.record["stages"].items())
    print(f"\nfinished in {total:.0f} s this time (stages when run: {times})")
    print(f"open {demo.run.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
