"""Every example script runs: ``--help``, then a small run that writes its outputs.

Each script runs in a subprocess from a temporary working directory, with
``MPLBACKEND=Agg`` and one thread, so it behaves as it would for a user. The notebook is
executed with nbclient (skipped when nbclient or ipykernel is missing).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOK = EXAMPLES / "notebooks" / "getting_started.ipynb"


#: Per script: the arguments of the smoke run (``{out}`` is an existing, empty output
#: folder) and the files it must write there, or None for a study whose smallest run takes
#: minutes (only ``--help`` is run). Our examples run on their defaults; the eight-schools
#: study is shrunk through its options.
SMOKE_RUNS: dict[str, tuple[list[str], list[str]] | None] = {
    "energy_2d.py": (["--out", "{out}"], ["energy_2d.png", "energy_2d.json"]),
    "logistic_regression.py": (
        ["--out", "{out}"],
        ["logistic_regression.png", "logistic_regression.json"],
    ),
    "vae_mnist.py": (
        ["--out", "{out}"],
        ["checkpoint.pt", "metrics.json", "eval_test.json", "samples.png"],
    ),
    "eight_schools.py": (
        ["--steps", "200", "--nuts-samples", "50", "--psis-samples", "500"]
        + ["--png", "{out}/eight_schools.png"],
        ["eight_schools.png"],
    ),
    "neutra.py": (
        ["--fit-steps", "20", "--warmup", "10", "--samples", "10", "--max-tree-depth", "4"]
        + ["--full-mass", "--plain-matched", "--jit", "--json", "{out}/neutra.json"],
        ["neutra.json"],
    ),
    "robust_posteriors.py": None,  # NUTS references for four models: minutes at the least
}


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _scripts() -> list[str]:
    return sorted(path.name for path in EXAMPLES.glob("*.py"))


def test_every_example_has_a_smoke_run():
    assert _scripts(), "no examples found"
    missing = set(_scripts()) - set(SMOKE_RUNS)
    assert not missing, f"add a smoke run to SMOKE_RUNS for {sorted(missing)}"


#: The script whose --help runs in the fast set; each costs an interpreter start and the
#: imports (3-18 s on a loaded machine), so the others run in the full run.
FAST_HELP = "robust_posteriors.py"


@pytest.mark.parametrize(
    "script",
    [s if s == FAST_HELP else pytest.param(s, marks=pytest.mark.slow) for s in _scripts()],
)
def test_example_help(script, tmp_path):
    result = _run([str(EXAMPLES / script), "--help"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


@pytest.mark.parametrize("script", sorted(name for name, run in SMOKE_RUNS.items() if run))
@pytest.mark.slow
def test_example_small_run_writes_its_outputs(script, tmp_path):
    if not (EXAMPLES / script).exists():
        pytest.skip(f"examples/{script} is not in this checkout")
    args, outputs = SMOKE_RUNS[script]
    out = tmp_path / "out"
    out.mkdir()
    result = _run([str(EXAMPLES / script), *(a.format(out=out) for a in args)], tmp_path)
    assert result.returncode == 0, (
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    for name in outputs:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"{script} did not write {name}"


@pytest.mark.slow
def test_notebook_runs_and_is_stored_without_outputs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "clear the outputs"
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the kernel inherits the environment
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    text = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert "k-hat" in text
