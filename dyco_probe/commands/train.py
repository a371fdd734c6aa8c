"""``dyco-probe train``: RLVR with DyCo reweighting (GRPO, Dr. GRPO, DAPO, GSPO, SAPO).

Every setting of ``dyco_probe.rl.RLConfig`` is an option (``--prompts-per-step 4``, ``--dyco token``,
``--no-dynamic-sampling``...), with the dataclass's default; ``--out`` names the run directory.
``--resume`` continues a killed run with the settings it was started with (its ``config.json``):
options given with it may change only what leaves the results as they are (``--steps``,
``--eval-every``, ``--threads``, ...; the change is recorded in ``metrics.jsonl``); any other option
that differs from the run's is an error.
"""

from __future__ import annotations

import argparse

from dyco_probe.commands import add_command, emit
from dyco_probe.layers import parse_layer_choice

# Options whose flag differs from the plain field name.
_RENAMED = {"out_dir": "--out", "num_generations": "--num-generations"}
_CHOICES = {
    "algo": ("grpo", "dr_grpo", "dapo", "gspo", "sapo"),
    "dyco": ("token", "sequence", "off"),
    "normalise_over": ("group", "batch"),
    "dtype": ("float32", "bfloat16", "float16"),
}
# One line per option (the default is appended); RLConfig's docstring has the details.
HELP = {
    "out_dir": "run directory: config, metrics, checkpoints, final model",
    "model": "'builtin' or a local checkpoint directory: the initial policy",
    "device": "cpu, cuda, cuda:1, ... (unset: cpu)",
    "dtype": "weights' dtype (unset: float32)",
    "seed": "seed of python, numpy and torch at the start of the run",
    "steps": "training steps, each one batch of prompts-per-step x num-generations samples",
    "threads": "torch CPU threads (unset: 1; on a busy machine more can be many times slower)",
    "data": "VLM-R1 jsonl of training examples (unset: the synthetic train split)",
    "n_train": "training examples: the first so many (unset: every line of --data, or 2000 synthetic ones)",
    "eval_data": "VLM-R1 jsonl of held-out examples (unset: the synthetic --eval-split)",
    "eval_split": "synthetic split of the held-out examples",
    "n_eval": "held-out examples: the first so many (unset: every line of --eval-data, or 200; 0: none)",
    "eval_every": "evaluate every so many steps, and always before the first and after the last (0: only then)",
    "eval_max_new_tokens": "longest completion in evaluation (greedy)",
    "eval_batch_size": "examples per generate call in evaluation",
    "prompts_per_step": "prompts per training step",
    "num_generations": "completions sampled per prompt (G, at least 2)",
    "max_new_tokens": "longest completion sampled in training",
    "temperature": "sampling temperature (the log-probabilities use it too)",
    "top_p": "nucleus sampling mass",
    "reward_weights": "reward functions and their weights, e.g. accuracy=1,format=0.5",
    "dyco": "DyCo reweighting: token (paper), sequence (published code) or off (baseline)",
    "alpha": "DyCo strength alpha",
    "normalise_over": "sequence-level DyCo: normalise scores over the group or the batch",
    "min_length": "sequence-level DyCo: completions shorter than this get score -1",
    "tau_vis": "role threshold: visual if v_vis - v_txt > tau_vis",
    "tau_txt": "role threshold: text if v_vis - v_txt < -tau_txt",
    "trace_layers": "probed layers: 'all' or comma-separated indices (unset: the last layer)",
    "trace_when_off": "with --dyco off, still trace and log role and s_t metrics (advantages unchanged)",
    "algo": "policy loss",
    "beta": "KL coefficient (unset or 'auto': 0.04, and 0 for dapo)",
    "eps": "clip range of grpo, dr_grpo (and sapo's ratio)",
    "eps_low": "dapo's lower clip range",
    "eps_high": "dapo's upper clip range",
    "gspo_eps_low": "gspo's lower clip range of the sequence ratio",
    "gspo_eps_high": "gspo's upper clip range of the sequence ratio",
    "sapo_tau_pos": "sapo's gate temperature for positive advantages",
    "sapo_tau_neg": "sapo's gate temperature for negative advantages",
    "num_iterations": "policy updates per batch (mu)",
    "grad_accum": "micro-batches per batch (same result, less memory)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "adam_betas": "AdamW betas",
    "warmup_steps": "optimiser steps of linear learning-rate warm-up",
    "max_grad_norm": "gradient-norm clipping",
    "freeze_vision": "keep the vision tower's weights fixed",
    "dynamic_sampling": "dapo's filter: drop groups whose rewards are all equal and sample more",
    "dynamic_sampling_rounds": "extra sampling rounds of dynamic sampling per step",
    "mask_truncated": "leave completions without EOS out of the loss (unset: only for dapo)",
    "roles": "where the token roles of the alignment score come from: a labeller of dyco_probe.labellers",
    "role_options": "options of the --roles labeller, e.g. counterfactual=patches,visual_above=0.5",
    "checkpoint_every": "steps between checkpoints (0: only at the end)",
    "tensorboard": "also log to TensorBoard under <out>/tb",
}


def _parse_weights(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected name=weight, got {part!r}")
        out[name.strip()] = float(value)
    return out


def _parse_options(text: str) -> dict[str, float | str]:
    from dyco_probe.labellers import parse_options

    try:
        return parse_options(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "auto", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, dict):
        return ",".join(f"{k}={v:g}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """One option per ``RLConfig`` setting (``RLConfig.settings()``), each with its own help and its
    default. An option not given is absent from the parsed arguments, so ``--resume`` can tell what was
    asked."""
    from dyco_probe.rl import RLConfig

    for name, typ, default in RLConfig.settings():
        if name == "resume":
            continue
        flag = _RENAMED.get(name, "--" + name.replace("_", "-"))
        kw: dict = {"dest": name, "default": argparse.SUPPRESS}
        if name == "reward_weights":
            kw["type"] = _parse_weights
        elif name == "role_options":
            kw["type"] = _parse_options
        elif name == "trace_layers":
            kw["type"] = parse_layer_choice
        elif name == "adam_betas":
            kw.update(type=float, nargs=2, metavar=("BETA1", "BETA2"))
        elif typ.startswith("bool"):
            kw["action"] = argparse.BooleanOptionalAction
        elif typ.startswith("int"):
            kw["type"] = _parse_optional(int) if "None" in typ else int
        elif typ.startswith("float"):
            kw["type"] = _parse_optional(float) if "None" in typ else float
        else:
            kw["type"] = _parse_optional(str) if "None" in typ else str
        if name in _CHOICES:
            kw["choices"] = _CHOICES[name]
        elif name == "roles":
            from dyco_probe.labellers import LABELLERS

            kw["choices"] = tuple(LABELLERS)
        text = HELP[name].replace("%", "%%")
        p.add_argument(flag, help=f"{text} (default: {_shown(default)})", **kw)


def config_from_args(args):
    """The ``RLConfig`` of parsed arguments: the options given over the defaults, or with
    ``--resume`` over the run's own settings (``RLConfig.from_run``)."""
    from dyco_probe.rl import RLConfig

    given = {name: getattr(args, name) for name, _, _ in RLConfig.settings() if hasattr(args, name)}
    given.pop("resume", None)
    if args.resume:
        out_dir = given.pop("out_dir", RLConfig.out_dir)
        return RLConfig.from_run(out_dir, **given)
    return RLConfig(**{"threads": 1, **given})


def run(args) -> int:
    from dyco_probe.rl import train

    config = config_from_args(args)
    result = train(config, progress=not args.quiet)
    first, last = result.initial_eval, result.final_eval
    text = f"trained {config.algo} with DyCo {config.dyco} for {result.steps} steps; run in {result.out_dir}"
    if result.resumed_from:
        text += f" (resumed from step {result.resumed_from} with the run's settings)"
    if first and last:
        text += (
            f"\nheld-out accuracy {first['accuracy']:.3f} -> {last['accuracy']:.3f} "
            f"(95% CI {last['accuracy_ci_low']:.3f}-{last['accuracy_ci_high']:.3f}, n={last['n']})"
        )
    emit(args, result.summary(), text)
    return 0


def register(sub) -> None:
    p = add_command(
        sub, "train", run, "RLVR with DyCo advantage reweighting (GRPO, Dr. GRPO, DAPO, GSPO, SAPO)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its own settings; only --steps, --eval-every, --threads, "
        "--device, --checkpoint-every, --tensorboard may change (default: start a new run)",
    )
    add_config_args(p)
