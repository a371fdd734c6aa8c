"""The ``dyco-probe`` command line. Thin: every command calls the library.

Each command lives in ``dyco_probe/commands/<name>.py`` with ``register(subparsers)`` adding its parser
(whose ``func`` default runs it). Every command takes ``--json``: it then prints one JSON object as its
last line, and ``--quiet`` to hide progress bars.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

COMMANDS = ("eval", "export", "pretrain", "trace", "roles", "sweep", "train", "report")


def build_parser() -> argparse.ArgumentParser:
    from dyco_probe import __version__

    parser = argparse.ArgumentParser(
        prog="dyco-probe",
        description="Cross-modal attention tracing, role labelling, scoring and interventions for VLMs.",
    )
    parser.add_argument("--version", action="version", version=f"dyco-probe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dyco_probe.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"dyco_probe.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from dyco_probe.commands import quiet_libraries

        quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume where supported", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        if getattr(args, "json", False):
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        print(f"dyco-probe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
