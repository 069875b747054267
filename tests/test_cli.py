"""The command line: `python -m funchess demo`, `python -m funchess bench`, and its place in the package.

The demo and the bench run in subprocesses, as a user runs them; their printed numbers and files
are checked against funchess computed here from the same weights. Timing is never asserted. The
package tests check that `funchess.cli` sits on top of the library's public face, with no import
circles, and that the library runs without the command line's extra (matplotlib, tqdm).
"""

from __future__ import annotations

import ast
import io
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
from funchess.cli import _device, main
from funchess.cli.demo import Spectrum, hessian_spectrum, train
from funchess.cli.models import DEMOS
from funchess.cli.pictures import plot_hessian, plot_spectrum
from funchess.cli.progress import Bar, drawn

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "funchess" / "cli"


def _cli(*args: str, timeout: float = 300, code: str | None = None) -> subprocess.CompletedProcess[str]:
    # One torch thread: these models are tiny, and on a busy 2-core machine two threads only add noise.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = ["-c", code, *args] if code is not None else ["-m", "funchess", *args]
    return subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


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


def _one_line_error(err: str, *pieces: str) -> None:
    """A usage error as promised: one line on stderr, no traceback, saying what to do."""
    assert err.count("\n") == 1 and err.startswith("funchess: error: "), err
    assert "Traceback" not in err
    for piece in pieces:
        assert piece in err, (piece, err)


# ----------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("demo") / "new" / "folder"  # created, parents too
    return _cli("demo", "--quick", "--out", str(out)), out  # progress on, but stderr is a pipe here


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
    # stderr is not a terminal: no progress bar, so no carriage-return redraws in logs
    assert "\r" not in proc.stderr and "training mlp" not in proc.stderr, proc.stderr[-500:]


def test_demo_prints_what_the_library_returns(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = demo_run
    assert proc.returncode == 0, proc.stderr
    saved = torch.load(out / "model.pt")
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
    # this Hessian is numerically singular: no condition number, the spread of the nonzero part instead
    mags = eig.abs()
    nonzero = mags[mags >= 1e-7 * mags.max()]
    assert len(nonzero) < len(eig) and not re.search(r"^  condition number", proc.stdout, re.MULTILINE)
    assert _printed(proc.stdout, "extreme nonzero |λ| ratio") == pytest.approx(
        float(nonzero.max() / nonzero.min()), rel=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["condition_number"] is None and summary["near_zero_eigenvalues"] == len(eig) - len(nonzero)


def test_demo_transformer_in_process_as_vector_graphics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The model with the most blocks (14, some of them exactly zero: the key bias of attention)."""
    torch.set_num_threads(1)
    argv = ["demo", "--model", "transformer", "--steps", "3", "--format", "svg", "--out", str(tmp_path)]
    assert main(argv) == 0  # progress on, but pytest's stderr is not a terminal
    out, err = capsys.readouterr()
    assert "attn.in_proj_weight" in out and "funchess.eigsh" in out and "\r" not in err
    for name in ("hessian.svg", "spectrum.svg"):
        text = (tmp_path / name).read_text()
        assert "<svg" in text[:1000] and str(tmp_path / name) in out
        assert "Hessian of the training loss" in text  # text stays text, and no "funchess demo:" prefix
        assert "funchess demo" not in text
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_pictures_in_every_format(fmt: str, tmp_path: Path) -> None:
    """Both pictures of a small Hessian with a zero block, in each format, with mathtext labels."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    M = A @ A.T / 30
    M[:, 20:24] = 0  # an exactly zero parameter block: log colours and the near-zero band must cope
    M[20:24, :] = 0
    names, shapes = ["w", "b", "v"], [(4, 5), (4,), (6,)]  # "b" is the zero block
    eig = torch.linalg.eigvalsh(M)
    hess = plot_hessian(M, names, shapes, tmp_path / f"h.{fmt}", "a title")
    spec = plot_spectrum(eig, 1e-7 * float(eig.abs().max()), tmp_path / f"s.{fmt}", "a title", "dense eigvalsh")
    heads = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}
    for path in (hess, spec):
        assert path.read_bytes()[:4] == heads[fmt][:4] and path.stat().st_size > 5_000
    if fmt == "svg":
        assert "<text" in hess.read_text()  # text stays text in vector output (editable, searchable)


@pytest.mark.parametrize("model", ["mlp", "cnn", "transformer"])
def test_demo_models_train_deterministically(model: str) -> None:
    runs = []
    for _ in range(2):
        problem = DEMOS[model](3).to(torch.float64)
        runs.append(train(problem, 5, progress=False))
    assert runs[0] == runs[1]  # same seed, same losses
    assert runs[0][-1] < runs[0][0]  # and training lowers the loss
    assert 500 <= problem.num_params <= 1500  # small enough for a dense Hessian and its eigenvalues


def test_condition_number_only_where_it_means_something() -> None:
    singular = Spectrum(torch.tensor([-1e-18, 0.0, 1e-3, 2.0], dtype=torch.float64), "test")
    assert singular.near_zero == 2 and singular.condition is None
    assert singular.nonzero_ratio == pytest.approx(2000.0)
    regular = Spectrum(torch.tensor([-4.0, 1.0, 2.0], dtype=torch.float64), "test")
    assert regular.near_zero == 0 and regular.condition == pytest.approx(4.0) == regular.nonzero_ratio
    # a float32 Hessian resolves less: its eigenvalues below ~sqrt(N) eps max |λ| are rounding noise
    M = torch.diag(torch.tensor([1e-6, 1e-3, 1.0, 2.0] * 25, dtype=torch.float64))
    assert hessian_spectrum(M).condition == pytest.approx(2e6)
    coarse = hessian_spectrum(M.float())
    assert coarse.relative_tolerance == pytest.approx(10 * torch.finfo(torch.float32).eps)
    assert coarse.near_zero == 25 and coarse.condition is None and coarse.nonzero_ratio == pytest.approx(2e3)


# ----------------------------------------------------------------------------- progress bars


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal_and_honest_about_totals() -> None:
    pytest.importorskip("tqdm")
    assert drawn(True, _Terminal()) and not drawn(False, _Terminal()) and not drawn(True, io.StringIO())
    term = _Terminal()
    with Bar(range(5), desc="steps", enabled=True, stream=term) as bar:
        for _ in bar:
            bar.note("loss 1.0")
    assert bar.done == 5 and "5/5" in term.getvalue() and "100%" in term.getvalue()
    term = _Terminal()
    with pytest.raises(RuntimeError), Bar(range(5), desc="steps", enabled=True, stream=term) as bar:
        for i in bar:
            if i == 2:
                raise RuntimeError("stopped")
    final = term.getvalue().rsplit("\r", 1)[-1]
    assert bar.done == 2 and "2/5" in final and "5/5" not in term.getvalue()  # closed where it stopped
    quiet = io.StringIO()
    lines: list[str] = []
    with Bar(range(3), desc="steps", enabled=True, stream=quiet, print_fn=lines.append) as bar:
        for i in bar:
            bar.write(f"line {i}")
    assert quiet.getvalue() == "" and lines == ["line 0", "line 1", "line 2"]  # no bar: plain lines


# ----------------------------------------------------------------------------- options and errors


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"funchess {funchess.__version__}\n"
    for command in ("demo", "bench"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "--no-progress" in text and "--out" in text and "--device" in text
    assert "--format {png,pdf,svg}" in (main(["demo", "--help"]), capsys.readouterr().out)[1]
    assert main(["demo", "--format", "jpg"]) == 2  # argparse's own usage error, as a status
    assert "invalid choice: 'jpg'" in capsys.readouterr().err


def test_python_dash_m_funchess_is_the_console_script() -> None:
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout == f"funchess {funchess.__version__}\n", proc.stderr
    shim = (ROOT / "funchess" / "__main__.py").read_text().strip().splitlines()
    assert shim == ["from funchess.cli import main", "", "raise SystemExit(main())"]


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
    assert main(["bench", "--list", "--no-progress"]) == 0
    assert "mlp-tiny" in capsys.readouterr().out


def test_output_that_is_a_file_or_unwritable_is_a_one_line_error(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "results.txt"
    afile.write_text("keep me")
    assert main(["demo", "--out", str(afile)]) == 2
    _one_line_error(capsys.readouterr().err, f"funchess demo --out {afile}: expected a folder to write into, "
                                             f"got an existing file")
    assert afile.read_text() == "keep me"
    assert main(["demo", "--out", str(afile / "pictures")]) == 2  # a folder inside a file: cannot exist
    _one_line_error(capsys.readouterr().err, "expected a folder that can be created", "NotADirectoryError")
    assert main(["bench", "--quick", "--out", str(afile)]) == 2  # checked before minutes of benchmarking
    _one_line_error(capsys.readouterr().err, "funchess bench --out")
    proc = _cli("demo", "--out", str(afile))  # the whole process: status 2, no traceback
    assert proc.returncode == 2 and proc.stdout == ""
    _one_line_error(proc.stderr, "got an existing file")


@pytest.mark.parametrize("missing", ["matplotlib", "tqdm"])
def test_without_the_cli_extra_one_line_says_what_to_install(missing: str, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    _one_line_error(capsys.readouterr().err, f"funchess demo needs {missing}", 'pip install "funchess[cli]"')
    assert not (tmp_path / "demo").exists()  # nothing was started
    assert main(["bench", "--quick", "--out", str(tmp_path / "bench")]) == 2
    _one_line_error(capsys.readouterr().err, f"funchess bench needs {missing}", 'pip install "funchess[cli]"')
    assert main(["--version"]) == 0 and main(["bench", "--list"]) == 0  # these need no extra


def test_without_the_cli_extra_the_process_exits_with_status_2() -> None:
    code = ("import sys, runpy; sys.modules['matplotlib'] = sys.modules['tqdm'] = None; "
            "sys.argv = ['funchess', 'demo']; runpy.run_module('funchess', run_name='__main__')")
    proc = _cli(code=code)
    assert proc.returncode == 2 and proc.stdout == ""
    _one_line_error(proc.stderr, "funchess demo needs matplotlib and tqdm, which are not installed",
                    'pip install "funchess[cli]"')


def test_device_errors_are_funchess_errors() -> None:
    with pytest.raises(funchess.InvalidArgumentError, match=r"--device tpu0: expected a torch device such as 'cpu'"):
        _device("funchess demo", "tpu0")
    with pytest.raises(funchess.InvalidArgumentError, match=r"--device meta: expected 'cpu' or a CUDA device"):
        _device("funchess demo", "meta")
    if not torch.cuda.is_available():
        with pytest.raises(funchess.InvalidArgumentError, match=r"--device cuda: expected a machine with CUDA"):
            _device("funchess bench", "cuda")


# ----------------------------------------------------------------------------- its place in the package


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(level, module, names) of every import in a file, those inside functions too."""
    found: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or "", [a.name for a in node.names]))
    return found


def test_the_command_line_uses_only_the_public_face() -> None:
    public = set(funchess.__all__) | {"testing", "__version__"}
    for path in sorted(CLI.glob("*.py")):
        assert not re.search(r"funchess\._[a-z]", path.read_text()), f"{path.name} reaches into a private module"
        for level, module, names in _imports(path):
            where = f"{path.name}: from {'.' * level}{module} import {names}"
            assert level <= 1, where  # within funchess.cli only; never `from .. import`
            if level == 0 and module == "funchess":
                assert set(names) <= public, where
            elif level == 0 and module.startswith("funchess."):
                assert module == "funchess.testing" or module.startswith("funchess.cli"), where


def test_the_command_line_has_no_import_circles() -> None:
    modules = {p.stem for p in CLI.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in CLI.glob("*.py"):
        deps = set()
        for level, module, names in _imports(path):
            if level == 1:
                deps |= {module} if module else set(names) & modules
            elif module.startswith("funchess.cli."):
                deps.add(module.split(".")[2])
        graph[path.stem] = deps - {path.stem}
    assert "__init__" not in set().union(*graph.values())  # the entry point is at the top

    done: set[str] = set()

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, f"import circle: {' -> '.join((*stack, node))}"
        if node not in done:
            for dep in graph.get(node, ()):
                visit(dep, (*stack, node))
            done.add(node)

    for node in graph:
        visit(node, ())


def test_the_library_never_imports_the_command_line_or_its_extra() -> None:
    for path in (ROOT / "funchess").glob("*.py"):
        if path.name == "__main__.py":
            continue
        for _, module, names in _imports(path):
            assert "cli" not in module.split(".") and "cli" not in names, f"{path.name} imports the command line"
    # torch itself imports tqdm when it is installed (torch.hub): count only what funchess adds
    code = ("import sys, torch\n"
            "extra = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'tqdm'})\n"
            "before = extra()\n"
            "import funchess\n"
            "print([m for m in sys.modules if m.startswith('funchess.cli')], extra() == before)\n"
            "import funchess.cli\n"
            "print(extra() == before)\n")
    proc = _cli(code=code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[] True", "True"]  # `import funchess.cli` loads no extra either


def test_core_dependencies_are_torch_and_optree_and_the_extras_cover_the_tests() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0] for r in reqs}

    assert names(project["dependencies"]) == {"torch", "optree"}
    extras = project["optional-dependencies"]
    assert names(extras["cli"]) == {"matplotlib", "tqdm"}
    assert names(extras["cli"]) | {"scipy", "pytest", "hypothesis"} <= names(extras["test"])
    assert project["scripts"]["funchess"] == "funchess.cli:main"


# ----------------------------------------------------------------------------- bench


def test_bench_quick_runs_every_method_and_checks_it(tmp_path: Path) -> None:
    from funchess.cli.methods import METHODS

    proc = _cli("bench", "--quick", "--problems", "mlp-tiny", "--dtype", "float64", "--min-time", "0",
                "--threads", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "\r" not in proc.stderr  # progress on, stderr a pipe: quiet
    data = json.loads((tmp_path / "results.json").read_text())
    got = {(r["section"], r["method"]): r for r in data["results"]}
    assert set(got) == {(m.section, m.name) for m in METHODS}  # every method of every section, once
    for (section, name), r in got.items():
        if r["status"] == "not installed":
            continue
        assert r["status"] == "ok", (section, name, r["status"], r["message"])
        assert r["error"] <= r["tolerance"] and r["time"] > 0 and r["peak_memory"] >= 0
    assert f"{'hessian':10s} {'mlp-tiny':20s} float64" in proc.stdout  # one line per method, as it goes
    md = (tmp_path / "results.md").read_text()
    assert "## hessian: mlp-tiny, float64" in md and "| `funchess.hessian` |" in md
    assert "## Headline" in md
    assert _png_size(tmp_path / "bench.png")[0] >= 800
