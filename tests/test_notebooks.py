"""The notebooks of `analyses/` run top to bottom (tiny settings, a tiny random checkpoint) and are
committed without outputs."""

import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "analyses").glob("*.ipynb"))


def test_the_four_notebooks_are_there_and_committed_clean():
    assert [p.name for p in NOTEBOOKS] == [
        "01_token_analysis.ipynb",
        "02_labeller_validation.ipynb",
        "03_interventions.ipynb",
        "04_rl_curves.ipynb",
    ]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"
        assert "DYCO_MODEL" in book.cells[1].source  # the parameters cell comes first


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    from dyco_probe.testing import save_tiny_checkpoint

    base = tmp_path_factory.mktemp("notebooks")
    ckpt = save_tiny_checkpoint("qwen2_5_vl", base / "ckpt")
    env = {
        "DYCO_MODEL": str(ckpt),
        "DYCO_NOTEBOOK_N": "4",
        "DYCO_MAX_NEW_TOKENS": "12",
        "DYCO_N_BOOT": "50",
        "DYCO_NOTEBOOK_OUT": str(base / "out"),
        "DYCO_FIGURES": str(base / "figures"),
        "DYCO_RL_STEPS": "2",
        "DYCO_RL_PROMPTS": "2",
        "DYCO_RL_GENERATIONS": "2",
        "DYCO_RL_VARIANTS": "off,token",
        "DYCO_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    return env, base


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tiny_env, monkeypatch):
    from nbclient import NotebookClient

    env, base = tiny_env
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    book = nbformat.read(path, as_version=4)
    client = NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "analyses")}}
    )
    client.execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # figures were drawn
    out = base / "out"
    if path.stem.startswith("01"):
        assert (out / "figures" / "nb01_token_analysis_overview.pdf").exists()
        assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs)
    if path.stem.startswith("03"):
        assert list(out.glob("03_sweep_*/results.parquet"))
    if path.stem.startswith("04"):
        assert len(list(out.glob("04_rl_*/grpo-*/metrics.jsonl"))) == 2
