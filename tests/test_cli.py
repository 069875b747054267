"""The command line: `python -m funchess demo` and `python -m funchess bench`.

The demo and the bench run in subprocesses, as a user runs them; their printed numbers and files
are checked against funchess computed here from the same weights. Timing is never asserted.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import funchess
from funchess.__main__ import _device, main

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # One torch thread: these models are tiny, and on a busy 2-core machine two threads only add noise.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "funchess", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _printed(out: str, label: str) -> float:
    m = re.search(rf"^  {re.escape(label)}\s+(\S+)", out, re.MULTILINE)
    assert m, f"{label!r} not in the summary:\n{out}"
    return float(m.group(1))


# ----------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("demo")
    return _cli("demo", "--quick", "--no-progress", "--out", str(out)), out


def test_demo_writes_valid_pictures_and_files(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = demo_run
    assert proc.returncode == 0, proc.stderr
    for name in ("hessian.png", "spectrum.png"):
        path = out / name
        assert str(path) in proc.stdout  # paths are printed at the end
        width, height = _png_size(path)
        assert width >= 1000 and height >= 400, (name, width, height)
        assert path.stat().st_size > 50_000  # a drawn picture, not an empty canvas
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "mlp" and summary["parameters"] == 795


def test_demo_prints_what_the_library_returns(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = demo_run
    assert proc.returncode == 0, proc.stderr
    saved = torch.load(out / "model.pt")
    from funchess._models import DEMOS

    problem = DEMOS[saved["model"]](saved["seed"]).to(torch.float64)
    problem.model.load_state_dict(saved["state_dict"])
    x, y = saved["inputs"], saved["targets"]
    f, params = funchess.functional(problem.model, problem.loss_fn)
    M = funchess.to_matrix(funchess.hessian(f)(params, x, y))
    eig = torch.linalg.eigvalsh(M)
    grad = torch.func.grad(f)(params, x, y)
    expected = {
        "loss": float(f(params, x, y)),
        "gradient norm": float(funchess.ravel(grad).norm()),
        "trace": float(M.trace()),
        "largest eigenvalue": float(eig[-1]),
        "smallest eigenvalue": float(eig[0]),
    }
    for label, value in expected.items():
        assert _printed(proc.stdout, label) == pytest.approx(value, rel=1e-6, abs=1e-12), label
    # the per-block table: ||H[a][a]||_F of the first block, printed with 5 significant digits
    first = next(iter(params))
    n = params[first].numel()
    row = re.search(rf"^{re.escape(first)}\s+\S+\s+{n}\s+(\S+)", proc.stdout, re.MULTILINE)
    assert row, proc.stdout
    assert float(row.group(1)) == pytest.approx(float(M[:n, :n].norm()), rel=1e-4)
    # the matrix-free estimate of the top eigenvalue agrees with the dense one
    m = re.search(r"^  largest eigenvalue\s+(\S+)\s+funchess\.eigsh", proc.stdout, re.MULTILINE)
    assert m and float(m.group(1)) == pytest.approx(float(eig[-1]), rel=1e-6)


def test_demo_transformer_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The model with the most blocks (14, some of them exactly zero: the key bias of attention)."""
    torch.set_num_threads(1)
    assert main(["demo", "--model", "transformer", "--steps", "3", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "attn.in_proj_weight" in out and "funchess.eigsh" in out
    for name in ("hessian.png", "spectrum.png"):
        assert _png_size(tmp_path / name)[0] >= 1000


@pytest.mark.parametrize("model", ["mlp", "cnn", "transformer"])
def test_demo_models_train_deterministically(model: str) -> None:
    from funchess._demo import train
    from funchess._models import DEMOS

    runs = []
    for _ in range(2):
        problem = DEMOS[model](3).to(torch.float64)
        runs.append(train(problem, 5, progress=False))
    assert runs[0] == runs[1]  # same seed, same losses
    assert runs[0][-1] < runs[0][0]  # and training lowers the loss
    assert 500 <= problem.num_params <= 1500  # small enough for a dense Hessian and its eigenvalues


# ----------------------------------------------------------------------------- errors


def test_command_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2  # no command: the help, and a usage status
    assert "demo" in capsys.readouterr().out
    assert main(["demo", "--steps", "-1", "--out", "unused"]) == 2
    assert re.search(r"funchess demo --steps -1: expected a non-negative number", capsys.readouterr().err)
    assert main(["bench", "--problems", "mlp-2k,nope"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"funchess bench --problems mlp-2k,nope: expected a comma-separated list of .*got 'nope'", err)
    assert main(["bench", "--sections", "speed"]) == 2
    assert "--sections speed: expected a comma-separated list of hessian, hvp" in capsys.readouterr().err


def test_device_errors_are_funchess_errors() -> None:
    with pytest.raises(funchess.InvalidArgumentError, match=r"--device tpu0: expected a torch device such as 'cpu'"):
        _device("funchess demo", "tpu0")
    with pytest.raises(funchess.InvalidArgumentError, match=r"--device meta: expected 'cpu' or a CUDA device"):
        _device("funchess demo", "meta")
    if not torch.cuda.is_available():
        with pytest.raises(funchess.InvalidArgumentError, match=r"--device cuda: expected a machine with CUDA"):
            _device("funchess bench", "cuda")


# ----------------------------------------------------------------------------- bench


def test_bench_quick_runs_every_method_and_checks_it(tmp_path: Path) -> None:
    from funchess._bench_methods import METHODS

    proc = _cli("bench", "--quick", "--problems", "mlp-tiny", "--dtype", "float64", "--min-time", "0",
                "--threads", "1", "--no-progress", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    got = {(r["section"], r["method"]): r for r in data["results"]}
    assert set(got) == {(m.section, m.name) for m in METHODS}  # every method of every section, once
    for (section, name), r in got.items():
        if r["status"] == "not installed":
            continue
        assert r["status"] == "ok", (section, name, r["status"], r["message"])
        assert r["error"] <= r["tolerance"] and r["time"] > 0 and r["peak_memory"] >= 0
    md = (tmp_path / "results.md").read_text()
    assert "## hessian: mlp-tiny, float64" in md and "| `funchess.hessian` |" in md
    assert "## Headline" in md
    assert _png_size(tmp_path / "bench.png")[0] >= 800
