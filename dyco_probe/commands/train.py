"""``dyco-probe train``: RLVR with DyCo reweighting (GRPO, Dr. GRPO, DAPO, GSPO, SAPO).

Every field of ``dyco_probe.rl.RLConfig`` is an option (``--prompts-per-step 4``, ``--dyco token``,
``--no-dynamic-sampling``...), with the dataclass's default; ``--out`` names the run directory and
``--resume`` continues a killed run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

from dyco_probe.commands import add_command, emit

# Options whose flag or help differs from the plain field name.
_RENAMED = {"out_dir": "--out", "num_generations": "--num-generations"}
_CHOICES = {
    "algo": ("grpo", "dr_grpo", "dapo", "gspo", "sapo"),
    "dyco": ("token", "sequence", "off"),
    "normalise_over": ("group", "batch"),
    "dtype": ("float32", "bfloat16", "float16"),
}
_HELP = {
    "reward_weights": "reward functions and weights, e.g. accuracy=1,format=0.5",
    "trace_layers": "probed layers: 'all', or comma-separated indices (unset: the last layer)",
    "threads": "torch threads (the command uses 1 unless told: on a busy machine more threads can be many times slower)",
    "beta": "KL coefficient ('auto': 0.04, and 0 for dapo)",
    "mask_truncated": "leave completions without EOS out of the loss (unset: only for dapo)",
    "role_options": "options of the --roles labeller, e.g. counterfactual=patches,visual_above=0.5",
}
_FIELD_DOC = re.compile(r"^ {8}([a-z_0-9]+(?:, [a-z_0-9]+)*): (.*)$")


def _field_help() -> dict[str, str]:
    """Per-field help from ``RLConfig``'s docstring (``name[, name]: text`` entries)."""
    from dyco_probe.rl import RLConfig

    out: dict[str, str] = {}
    names: list[str] = []
    for line in (RLConfig.__doc__ or "").splitlines():
        m = _FIELD_DOC.match(line)
        if m:
            names = m.group(1).split(", ")
            for n in names:
                out[n] = m.group(2).strip()
        elif line.startswith(" " * 12) and names:
            for n in names:
                out[n] += " " + line.strip()
        else:
            names = []
    return out


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


def _parse_layers(text: str):
    if text in ("", "none", "last"):
        return None
    if text == "all":
        return "all"
    return tuple(int(x) for x in text.split(","))


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "auto", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_config_args(p: argparse.ArgumentParser) -> None:
    """One option per ``RLConfig`` field (defaults from the dataclass)."""
    from dyco_probe.rl import RLConfig

    defaults = RLConfig()
    docs = {**_field_help(), **_HELP}
    for f in dataclasses.fields(RLConfig):
        if f.name == "resume":
            continue
        flag = _RENAMED.get(f.name, "--" + f.name.replace("_", "-"))
        default = getattr(defaults, f.name)
        help_ = docs.get(f.name, "").replace("``", "").replace("%", "%%")
        kw: dict = {"dest": f.name, "default": default}
        typ = str(f.type)
        if f.name == "reward_weights":
            kw["type"] = _parse_weights
        elif f.name == "role_options":
            kw["type"] = _parse_options
        elif f.name == "trace_layers":
            kw["type"] = _parse_layers
        elif f.name == "adam_betas":
            kw.update(type=float, nargs=2, metavar=("BETA1", "BETA2"))
        elif typ.startswith("bool | None"):
            kw["action"] = argparse.BooleanOptionalAction
        elif typ.startswith("bool"):
            kw["action"] = argparse.BooleanOptionalAction
        elif typ.startswith("int"):
            kw["type"] = _parse_optional(int) if "None" in typ else int
        elif typ.startswith("float"):
            kw["type"] = _parse_optional(float) if "None" in typ else float
        else:
            kw["type"] = _parse_optional(str) if "None" in typ else str
        if f.name in _CHOICES:
            kw["choices"] = _CHOICES[f.name]
        elif f.name == "roles":
            from dyco_probe.labellers import LABELLERS

            kw["choices"] = tuple(LABELLERS)
        shown = "unset" if default is None else default
        p.add_argument(flag, help=f"{help_} (default: {shown})".strip(), **kw)


def config_from_args(args):
    """The ``RLConfig`` of parsed arguments."""
    from dyco_probe.rl import RLConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RLConfig) if hasattr(args, f.name)}
    values["resume"] = args.resume
    if values.get("threads") is None:
        values["threads"] = 1
    return RLConfig(**values)


def run(args) -> int:
    from dyco_probe.rl import train

    config = config_from_args(args)
    result = train(config, progress=not args.quiet)
    first, last = result.initial_eval, result.final_eval
    text = f"trained {config.algo} with DyCo {config.dyco} for {result.steps} steps; run in {result.out_dir}"
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
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_args(p)
