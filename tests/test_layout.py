"""The house's arrows: nothing in the library imports the command line, the demo or the scripts."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dyco_probe"
SURFACES = ("dyco_probe.commands", "dyco_probe.cli", "dyco_probe.demo", "analyses")


def imported(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def test_no_import_runs_back_up_the_house():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("commands/") or rel in ("cli.py", "demo.py", "__main__.py"):
            continue
        up = sorted(n for n in imported(path) if n.startswith(SURFACES))
        assert not up, f"dyco_probe/{rel} imports {up}"
