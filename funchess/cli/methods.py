"""The benchmark's methods: a registry of ways to compute each section's quantity, and the
oracle check every answer goes through.

Sections:

- "hessian": the full Hessian. funchess (default and explicit modes), the nested double-backward
  loop (extrapolated from a timed subset of rows when slow), `torch.autograd.functional.hessian`
  (`vectorize` False/True), `torch.func.hessian`, `jacrev(jacrev)` with chunking, curvlinops.
- "hvp": one Hessian-vector product, as a multiple of one gradient.
- "diagonal": the Hessian's diagonal (BackPACK's `DiagHessian` against funchess).
- "ggn-diagonal": the GGN's diagonal (BackPACK's `DiagGGNExact` against funchess).
- "per-sample": one Hessian per sample (loops against `vmap`).
- "per-sample-diagonal", "per-sample-ggn-diagonal": every sample's Hessian or GGN diagonal
  (BackPACK's `BatchDiagHessian` / `BatchDiagGGNExact` against funchess).

A new method is one `Method(...)` entry in `METHODS` (a new problem is one entry in
`funchess.cli.models.PROBLEMS`). Every output is checked by `check` against the float64 oracle of
`funchess.testing`, so a wrong answer is flagged, never hidden.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from funchess import (
    ggn_diagonal,
    hessian,
    hessian_diagonal,
    hvp,
    per_sample_ggn_diagonal,
    per_sample_hessian,
    per_sample_hessian_diagonal,
    ravel,
    to_matrix,
    unravel,
)

from .measure import sync
from .models import Problem

__all__ = ["Method", "METHODS", "SECTIONS", "TOLERANCE", "CHUNK", "Sizes", "find_method", "check", "block_starts"]

SECTIONS = ("hessian", "hvp", "diagonal", "ggn-diagonal", "per-sample", "per-sample-diagonal", "per-sample-ggn-diagonal")
#: Largest relative error (of rows `H e_i` and products `H v`) that counts as correct.
TOLERANCE = {"float32": 1e-3, "float64": 1e-8}
CHUNK = 256  # the chunk size given to peers that take one (USERS.md: 64-256 is best on CPU)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Method:
    """One way of computing a section's quantity.

    Attributes:
        name: shown in the tables (unique within its section).
        section: one of `SECTIONS`.
        build: `build(problem, probe)` prepares the computation and returns a zero-argument
            callable that runs it (this call is timed). `probe` is the direction for "hvp" methods.
            For `partial` methods the callable takes a time budget in seconds and returns
            `(output, rows_done, setup_seconds, rows_seconds)`.
        output: turns the callable's result into the section's common form: an `(N, N)` matrix
            ("hessian"), a length-N vector ("hvp", the diagonals), a `(B, N, N)` stack ("per-sample")
            or a `(B, N)` stack (the per-sample diagonals).
        memory: estimated peak bytes, from the problem's sizes (see `Sizes`); methods whose
            estimate exceeds the memory limit are skipped.
        requires: modules that must be importable (else the method is listed as not installed).
        applies: which problems the method supports at all (e.g. BackPACK's layer whitelist).
        partial: the method can stop after some rows and be extrapolated (the nested loop).
        loop: one Python-level pass per row or sample (counting its FLOPs is slow).
        core: also run on the largest problems (`CORE_ONLY` in `funchess.cli.bench`, where only the
            default funchess entry and the main peers run).
        unit: the section's unit of time (the gradient in "hvp"): ratios are taken to it.
        quantity: what the output is when it is not the section's quantity ("gradient").
        note: a footnote for the table.
    """

    name: str
    section: str
    build: Callable[[Problem, Any], Callable[..., Any]]
    output: Callable[[Any], Tensor] = lambda out: out
    memory: Callable[[Sizes], float] = lambda s: 0.0
    requires: tuple[str, ...] = ()
    applies: Callable[[Problem], bool] = lambda p: True
    partial: bool = False
    loop: bool = False
    core: bool = False
    unit: bool = False
    quantity: str = ""
    note: str = ""

    @property
    def computes(self) -> str:
        """What the output is: the section's quantity unless `quantity` says otherwise."""
        return self.quantity or self.section


@dataclass
class Sizes:
    """What memory estimates need: parameter count, bytes per entry, batch, and the number of
    activation entries of one forward pass (all layers, whole batch)."""

    n: int
    itemsize: int
    batch: int
    activations: int

    @property
    def hessian(self) -> float:
        return float(self.n) ** 2 * self.itemsize

    def chunk(self, rows: int) -> float:
        """Working set of `rows` simultaneous double-backward passes: about 1.5 activation copies
        each (fitted to torch.func.hessian's RSS on MLPs of 8k and 20k parameters, USERS.md)."""
        return 1.5 * min(rows, self.n) * self.activations * self.itemsize


def _params_of(problem: Problem) -> tuple[Any, dict[str, Tensor]]:
    return problem.function()


def _matrix_from_tuple(blocks: Any, params: dict[str, Tensor]) -> Tensor:
    names = list(params)
    return to_matrix({a: {b: blocks[i][j] for j, b in enumerate(names)} for i, a in enumerate(names)})


# --- full Hessian ---------------------------------------------------------------------------


def _funchess_hessian(mode: str) -> Callable[[Problem, Any], Callable[[], Any]]:
    def build(problem: Problem, _: Any) -> Callable[[], Any]:
        f, params = _params_of(problem)
        fn = hessian(f, mode=mode)  # type: ignore[arg-type]
        return lambda: fn(params, problem.inputs, problem.targets)

    return build


def _nested_loop(problem: Problem, _: Any) -> Callable[[float], tuple[Tensor, int, float, float]]:
    """The textbook method: one backward with create_graph=True, then one backward per row."""
    model = copy.deepcopy(problem.model)
    leaves = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in leaves)

    def run(budget: float) -> tuple[Tensor, int, float, float]:
        t0 = time.perf_counter()
        H = torch.zeros(n, n, dtype=problem.dtype, device=problem.device)
        loss = problem.loss_fn(model(problem.inputs), problem.targets)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, leaves, create_graph=True)])
        sync(problem.device)
        t1 = time.perf_counter()
        done = n
        for i in range(n):
            row = torch.autograd.grad(g[i], leaves, retain_graph=True)
            H[i] = torch.cat([r.reshape(-1) for r in row])
            if budget and time.perf_counter() - t1 > budget and i + 1 < n:
                done = i + 1
                break
        sync(problem.device)
        return H, done, t1 - t0, time.perf_counter() - t1

    return run


def _autograd_functional(vectorize: bool) -> Callable[[Problem, Any], Callable[[], Any]]:
    def build(problem: Problem, _: Any) -> Callable[[], Any]:
        f, params = _params_of(problem)
        names = list(params)

        def g(*ts: Tensor) -> Tensor:
            return f(dict(zip(names, ts, strict=True)), problem.inputs, problem.targets)  # type: ignore[no-any-return]

        primals = tuple(params.values())
        return lambda: (torch.autograd.functional.hessian(g, primals, vectorize=vectorize), params)

    return build


def _torch_func_hessian(problem: Problem, _: Any) -> Callable[[], Any]:
    f, params = _params_of(problem)
    fn = torch.func.hessian(f)
    return lambda: fn(params, problem.inputs, problem.targets)


def _jacrev_jacrev(problem: Problem, _: Any) -> Callable[[], Any]:
    f, params = _params_of(problem)
    fn = torch.func.jacrev(torch.func.jacrev(f), chunk_size=CHUNK)
    return lambda: fn(params, problem.inputs, problem.targets)


def _loss_module(problem: Problem) -> nn.Module:
    import torch.nn.functional as F

    if problem.loss_fn is F.cross_entropy:
        return nn.CrossEntropyLoss()
    if problem.loss_fn is F.mse_loss:
        return nn.MSELoss()
    raise NotImplementedError(f"no loss module for {problem.loss_fn}")


def _curvlinops(columns: int | None) -> Callable[[Problem, Any], Callable[[], Any]]:
    def build(problem: Problem, _: Any) -> Callable[[], Any]:
        from curvlinops import HessianLinearOperator

        params = [p for p in problem.model.parameters() if p.requires_grad]
        op = HessianLinearOperator(
            problem.model, _loss_module(problem), params, [(problem.inputs, problem.targets)],
            check_deterministic=False,
        )
        n = sum(p.numel() for p in params)

        def run() -> Tensor:
            eye = torch.eye(n, dtype=problem.dtype, device=problem.device)
            if columns is None:
                return op @ eye  # type: ignore[no-any-return]
            out = torch.empty(n, n, dtype=problem.dtype, device=problem.device)
            for s in range(0, n, columns):
                out[:, s : s + columns] = op @ eye[:, s : s + columns]
            return out

        return run

    return build


# --- Hessian-vector products ------------------------------------------------------------------


def _loss_of(problem: Problem) -> tuple[Callable[[dict[str, Tensor]], Tensor], dict[str, Tensor]]:
    f, params = _params_of(problem)
    return (lambda p: f(p, problem.inputs, problem.targets)), params


def _grad_autograd(problem: Problem, _: Any) -> Callable[[], Any]:
    model = copy.deepcopy(problem.model)
    leaves = [p for p in model.parameters() if p.requires_grad]
    return lambda: torch.autograd.grad(problem.loss_fn(model(problem.inputs), problem.targets), leaves)


def _grad_func(problem: Problem, _: Any) -> Callable[[], Any]:
    loss, params = _loss_of(problem)
    g = torch.func.grad(loss)
    return lambda: g(params)


def _funchess_hvp(mode: str) -> Callable[[Problem, Any], Callable[[], Any]]:
    def build(problem: Problem, v: Any) -> Callable[[], Any]:
        loss, params = _loss_of(problem)
        product = hvp(loss, mode=mode)  # type: ignore[arg-type]
        return lambda: product(params, v)

    return build


def _double_backward(problem: Problem, v: Any) -> Callable[[], Any]:
    model = copy.deepcopy(problem.model)
    leaves = [p for p in model.parameters() if p.requires_grad]
    vs = list(v.values())

    def run() -> Any:
        loss = problem.loss_fn(model(problem.inputs), problem.targets)
        g = torch.autograd.grad(loss, leaves, create_graph=True)
        return torch.autograd.grad(g, leaves, grad_outputs=vs)

    return run


def _autograd_functional_hvp(problem: Problem, v: Any) -> Callable[[], Any]:
    loss, params = _loss_of(problem)
    names = list(params)

    def g(*ts: Tensor) -> Tensor:
        return loss(dict(zip(names, ts, strict=True)))

    primals, tangents = tuple(params.values()), tuple(v.values())
    return lambda: torch.autograd.functional.hvp(g, primals, tangents)[1]


def _jvp_grad(problem: Problem, v: Any) -> Callable[[], Any]:
    loss, params = _loss_of(problem)
    g = torch.func.grad(loss)
    return lambda: torch.func.jvp(g, (params,), (v,))[1]


def _vjp_grad(problem: Problem, v: Any) -> Callable[[], Any]:
    loss, params = _loss_of(problem)
    g = torch.func.grad(loss)

    def run() -> Any:
        pullback = torch.func.vjp(g, params)[1]
        return pullback(v)[0]

    return run


def _curvlinops_hvp(problem: Problem, v: Any) -> Callable[[], Any]:
    from curvlinops import HessianLinearOperator

    params = [p for p in problem.model.parameters() if p.requires_grad]
    op = HessianLinearOperator(
        problem.model, _loss_module(problem), params, [(problem.inputs, problem.targets)], check_deterministic=False
    )
    flat = ravel(v)
    return lambda: op @ flat


def _flat(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out.reshape(-1)
    leaves = list(out.values()) if isinstance(out, dict) else list(out)
    return torch.cat([t.reshape(-1) for t in leaves])


# --- diagonal ---------------------------------------------------------------------------------


def _backpack(extension: str, field: str) -> Callable[[Problem, Any], Callable[[], Any]]:
    """BackPACK's `extension`, read from each parameter's `field` (a `Batch...` one per sample)."""

    def build(problem: Problem, _: Any) -> Callable[[], Any]:
        from backpack import backpack, extend, extensions

        model = extend(copy.deepcopy(problem.model))
        lossf = extend(_loss_module(problem))
        leaves = [p for p in model.parameters() if p.requires_grad]
        batched, B = extension.startswith("Batch"), problem.batch_size

        def run() -> Tensor:
            loss = lossf(model(problem.inputs), problem.targets)
            with backpack(getattr(extensions, extension)()):
                loss.backward()
            out = torch.cat([getattr(p, field).reshape(B if batched else 1, -1) for p in leaves], 1)
            for p in leaves:
                p.grad = None
            # BackPACK's per-sample terms are those of the mean-reduced batch loss: 1/B of each
            # sample's own loss (a batch of one), which funchess and the oracle give
            return out * B if batched else out[0]

        return run

    return build


def _funchess(transform: Callable[..., Any]) -> Callable[[Problem, Any], Callable[[], Any]]:
    """`transform(f)(params, inputs, targets)` on the problem's loss."""

    def build(problem: Problem, _: Any) -> Callable[[], Any]:
        f, params = _params_of(problem)
        fn = transform(f)
        return lambda: fn(params, problem.inputs, problem.targets)

    return build


def _flat_samples(out: Any) -> Tensor:
    """A `(B, N)` stack from a per-sample tree (leaves `(B, *shape)`) or Tensor."""
    if isinstance(out, Tensor):
        return out
    leaves = list(out.values()) if isinstance(out, dict) else list(out)
    return torch.cat([t.reshape(t.shape[0], -1) for t in leaves], 1)


# --- per-sample Hessians ----------------------------------------------------------------------


def _one_sample(problem: Problem) -> tuple[Callable[..., Tensor], dict[str, Tensor]]:
    f, params = _params_of(problem)

    def f_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return f(p, x.unsqueeze(0), y.unsqueeze(0))  # type: ignore[no-any-return]

    return f_one, params


def _per_sample_loop(transform: Callable[..., Any]) -> Callable[[Problem, Any], Callable[[], Any]]:
    def build(problem: Problem, _: Any) -> Callable[[], Any]:
        f_one, params = _one_sample(problem)
        fn = transform(f_one)
        n, B = sum(p.numel() for p in params.values()), problem.batch_size

        def run() -> Tensor:
            out = torch.empty(B, n, n, dtype=problem.dtype, device=problem.device)
            for i in range(B):
                out[i] = to_matrix(fn(params, problem.inputs[i], problem.targets[i]))
            return out

        return run

    return build


def _per_sample_vmap(transform: Callable[..., Any]) -> Callable[[Problem, Any], Callable[[], Any]]:
    def build(problem: Problem, _: Any) -> Callable[[], Any]:
        f_one, params = _one_sample(problem)
        fn = torch.func.vmap(transform(f_one), in_dims=(None, 0, 0))
        return lambda: fn(params, problem.inputs, problem.targets)

    return build


def _funchess_per_sample(problem: Problem, _: Any) -> Callable[[], Any]:
    f, params = _params_of(problem)
    fn = per_sample_hessian(f)
    return lambda: to_matrix(fn(params, problem.inputs, problem.targets), batch_dims=1)


def _stack_batched(out: Any) -> Tensor:
    """A `(B, N, N)` stack from a batched Hessian pytree `H[a][b]` of shape `(B, *a, *b)`."""
    if isinstance(out, Tensor):
        return out
    names = list(out)
    sizes = []
    for a in names:
        diag = out[a][a]
        k = (diag.dim() - 1) // 2
        sizes.append(math.prod(diag.shape[1 : 1 + k]))
    B = out[names[0]][names[0]].shape[0]
    rows = [
        torch.cat([out[a][b].reshape(B, sizes[i], sizes[j]) for j, b in enumerate(names)], 2)
        for i, a in enumerate(names)
    ]
    return torch.cat(rows, 1)


# --- sizes for memory estimates ---------------------------------------------------------------


def _h(k: float) -> Callable[[Sizes], float]:
    return lambda s: k * s.hessian + s.chunk(1)


def _hc(k: float, rows: int) -> Callable[[Sizes], float]:
    return lambda s: k * s.hessian + s.chunk(rows)


def _all_rows(k: float) -> Callable[[Sizes], float]:
    return lambda s: k * s.hessian + s.chunk(s.n)


def _ps(k: float, vectorised: bool) -> Callable[[Sizes], float]:
    return lambda s: k * s.batch * s.hessian + (s.chunk(s.n) if vectorised else 0.0)


BENCH_EXTRA = "pip install funchess[bench]"

#: The methods, in table order. funchess's own entries come first in each section.
METHODS: list[Method] = [
    # full Hessian
    Method("funchess.hessian", "hessian", _funchess_hessian("auto"), to_matrix, _hc(1.0, CHUNK), core=True,
           note="default: mode='auto' (rev-rev, falling back to fwd-rev), rows chunked into one preallocated matrix"),
    Method("funchess.hessian rev-rev", "hessian", _funchess_hessian("rev-rev"), to_matrix, _hc(1.0, CHUNK)),
    Method("funchess.hessian fwd-rev", "hessian", _funchess_hessian("fwd-rev"), to_matrix, _hc(1.0, CHUNK)),
    Method("nested loop (autograd.grad)", "hessian", _nested_loop, lambda out: out, _h(1.0), partial=True, loop=True,
           core=True,
           note="one torch.autograd.grad(create_graph=True), then one backward per row"),
    Method("autograd.functional.hessian", "hessian", _autograd_functional(False),
           lambda out: _matrix_from_tuple(*out), _h(2.0), loop=True),
    Method("autograd.functional.hessian vectorize", "hessian", _autograd_functional(True),
           lambda out: _matrix_from_tuple(*out), _all_rows(2.0)),
    Method("torch.func.hessian", "hessian", _torch_func_hessian, to_matrix, _all_rows(1.5), core=True),
    Method(f"torch.func jacrev(jacrev) chunk {CHUNK}", "hessian", _jacrev_jacrev, to_matrix, _hc(3.0, CHUNK),
           core=True),
    Method("curvlinops H @ I", "hessian", _curvlinops(None), lambda out: out, _all_rows(4.0),
           requires=("curvlinops",), note="curvlinops.HessianLinearOperator @ torch.eye(N)"),
    Method(f"curvlinops H @ I, {CHUNK} columns at a time", "hessian", _curvlinops(CHUNK), lambda out: out,
           _hc(3.0, CHUNK), requires=("curvlinops",), core=True),
    # Hessian-vector products (and the gradient they are measured against)
    Method("gradient (autograd.grad)", "hvp", _grad_autograd, _flat, unit=True, quantity="gradient",
           note="the unit: HVP times are given as multiples of this gradient"),
    Method("gradient (torch.func.grad)", "hvp", _grad_func, _flat, quantity="gradient"),
    Method("funchess.hvp", "hvp", _funchess_hvp("auto"), _flat),
    Method("funchess.hvp rev-rev", "hvp", _funchess_hvp("rev-rev"), _flat),
    Method("funchess.hvp fwd-rev", "hvp", _funchess_hvp("fwd-rev"), _flat),
    Method("double backward (autograd.grad)", "hvp", _double_backward, _flat),
    Method("autograd.functional.hvp", "hvp", _autograd_functional_hvp, _flat),
    Method("torch.func jvp(grad)", "hvp", _jvp_grad, _flat, note="forward-over-reverse"),
    Method("torch.func vjp(grad)", "hvp", _vjp_grad, _flat, note="reverse-over-reverse"),
    Method("curvlinops H @ v", "hvp", _curvlinops_hvp, _flat, requires=("curvlinops",)),
    # diagonal
    Method("funchess.hessian_diagonal", "diagonal", _funchess(hessian_diagonal), _flat, lambda s: s.chunk(CHUNK),
           note="exact diagonal: the module-aware sweep on chains of known modules, else block by block; O(N) memory"),
    Method("BackPACK DiagHessian", "diagonal", _backpack("DiagHessian", "diag_h"), _flat, requires=("backpack",),
           note="BackPACK supports a whitelist of layers"),
    Method("funchess.ggn_diagonal", "ggn-diagonal", _funchess(ggn_diagonal), _flat, lambda s: s.chunk(CHUNK),
           note="exact GGN diagonal: the loss Hessian's factor pulled back through known modules, else "
                "per-sample Jacobian columns"),
    Method("BackPACK DiagGGNExact", "ggn-diagonal", _backpack("DiagGGNExact", "diag_ggn_exact"), _flat,
           requires=("backpack",)),
    # per-sample Hessians
    Method("funchess.per_sample_hessian", "per-sample", _funchess_per_sample, lambda out: out, _ps(1.0, False)),
    Method("vmap(funchess.hessian)", "per-sample", _per_sample_vmap(hessian), _stack_batched, _ps(1.0, False)),
    Method("loop of funchess.hessian", "per-sample", _per_sample_loop(hessian), lambda out: out, _ps(1.0, False),
           loop=True),
    Method("vmap(torch.func.hessian)", "per-sample", _per_sample_vmap(torch.func.hessian), _stack_batched,
           _ps(3.0, True)),
    Method("loop of torch.func.hessian", "per-sample", _per_sample_loop(torch.func.hessian), lambda out: out,
           _ps(1.0, False), loop=True),
    # per-sample diagonals
    Method("funchess.per_sample_hessian_diagonal", "per-sample-diagonal", _funchess(per_sample_hessian_diagonal),
           _flat_samples, lambda s: s.batch * s.n * s.itemsize + s.chunk(CHUNK)),
    Method("BackPACK BatchDiagHessian", "per-sample-diagonal", _backpack("BatchDiagHessian", "diag_h_batch"),
           _flat_samples, requires=("backpack",)),
    Method("funchess.per_sample_ggn_diagonal", "per-sample-ggn-diagonal", _funchess(per_sample_ggn_diagonal),
           _flat_samples, lambda s: s.batch * s.n * s.itemsize + s.chunk(CHUNK)),
    Method("BackPACK BatchDiagGGNExact", "per-sample-ggn-diagonal", _backpack("BatchDiagGGNExact", "diag_ggn_exact_batch"),
           _flat_samples, requires=("backpack",)),
]


def find_method(section: str, name: str) -> Method:
    for m in METHODS:
        if m.section == section and m.name == name:
            return m
    raise KeyError(f"no method {name!r} in section {section!r}")


# ----------------------------------------------------------------------------- the oracle check


def _probe(problem: Problem) -> dict[str, Tensor]:
    """The fixed direction `v` of the "hvp" section (and of the random checks): N(0, 1), seed 0."""
    _, params = problem.function()
    n = sum(p.numel() for p in params.values())
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=problem.dtype, device=problem.device)
    return unravel(flat, params)  # type: ignore[no-any-return]


def block_starts(params: dict[str, Tensor]) -> list[int]:
    """Where each parameter's rows start in the flat (`funchess.ravel`) order, and the total `N`.

    Example:
        >>> import torch
        >>> block_starts({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
        [0, 6, 9]
    """
    starts = [0]
    for p in params.values():
        starts.append(starts[-1] + p.numel())
    return starts


def _probe_rows(params: dict[str, Tensor], available: int) -> list[int]:
    """Rows to check: the first and last of every parameter block, plus a few random ones."""
    off = block_starts(params)
    rows = {o for o in off[:-1]} | {o - 1 for o in off[1:]}
    gen = torch.Generator().manual_seed(1)
    rows |= set(torch.randint(0, off[-1], (4,), generator=gen).tolist())
    picked = sorted(r for r in rows if r < available)
    return picked or [0]


def _worst(pairs: Sequence[tuple[Tensor, Tensor]]) -> float:
    """Largest relative error `|got - ref| / |ref|` (with a floor of 1e-3 of the largest |ref|)."""
    floor = 1e-3 * max(float(ref.norm()) for _, ref in pairs)
    worst = 0.0
    for got, ref in pairs:
        got = got.detach().to(device=ref.device, dtype=torch.float64)
        if not bool(torch.isfinite(got).all()):
            return math.inf
        worst = max(worst, float((got - ref).norm()) / max(float(ref.norm()), floor, 1e-300))
    return worst


def _reference_ggn_diagonal(f: Any, params: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> Tensor:
    """The GGN's diagonal from `funchess.testing.reference_ggn` (plain-autograd `J`, `H_z`)."""
    from funchess.testing import reference_ggn

    return to_matrix(reference_ggn(f.output, lambda z: f.loss_fn(z, targets), params, inputs)).diagonal()


def _bound(f: Callable[..., Tensor], problem: Problem) -> Callable[[dict[str, Tensor]], Tensor]:
    return lambda p: f(p, problem.inputs, problem.targets)


def check(method: Method, problem: Problem, value: Tensor, rows: int | None = None) -> float:
    """The largest relative error of `value` against the float64 oracle of `funchess.testing`.

    Rows `H e_i` (first/last row of every block and random ones) and products `H v` are compared
    with one plain double backward each on a float64 copy of the problem; "per-sample" checks the
    first and last sample, "hvp" the fixed probe direction, "gradient" a float64 gradient.
    """
    from funchess.testing import reference_hvp

    p64 = problem.to(torch.float64)
    f, params = p64.function()
    n = sum(p.numel() for p in params.values())

    def loss(p: dict[str, Tensor]) -> Tensor:
        return f(p, p64.inputs, p64.targets)  # type: ignore[no-any-return]

    def ref_hv(vec: Tensor, fn: Callable[[dict[str, Tensor]], Tensor] = loss) -> Tensor:
        return ravel(reference_hvp(fn, (params,), (unravel(vec, params),)))

    def basis(i: int) -> Tensor:
        e = torch.zeros(n, dtype=torch.float64, device=p64.device)
        e[i] = 1
        return e

    gen = torch.Generator().manual_seed(2)
    kind = method.computes
    if kind == "gradient":
        leaves = [p.detach().clone().requires_grad_(True) for p in params.values()]
        grads = torch.autograd.grad(loss(dict(zip(params, leaves, strict=True))), leaves)
        return _worst([(value, torch.cat([g.reshape(-1) for g in grads]))])
    if kind == "hvp":
        return _worst([(value, ref_hv(ravel(_probe(p64))))])
    if kind == "hessian":
        available = n if rows is None else rows
        pairs = [(value[i], ref_hv(basis(i))) for i in _probe_rows(params, available)]
        if available == n:
            for _ in range(2):
                v = torch.randn(n, generator=gen, dtype=torch.float64).to(p64.device)
                pairs.append((value @ v.to(value.dtype), ref_hv(v)))
        return _worst(pairs)
    if kind == "diagonal":
        idx = _probe_rows(params, n)
        ref = torch.stack([ref_hv(basis(i))[i] for i in idx])
        return _worst([(value[idx], ref)])
    if kind == "ggn-diagonal":
        idx = _probe_rows(params, n)
        ref = _reference_ggn_diagonal(f, params, p64.inputs, p64.targets)[idx]
        return _worst([(value[idx], ref)])
    if kind in ("per-sample-diagonal", "per-sample-ggn-diagonal"):
        idx = _probe_rows(params, n)
        pairs = []
        for s in sorted({0, p64.batch_size - 1}):
            one = p64.sample(s)
            f1, _ = one.function()
            if kind == "per-sample-diagonal":
                ref = torch.stack([ref_hv(basis(i), _bound(f1, one))[i] for i in idx])
            else:
                ref = _reference_ggn_diagonal(f1, params, one.inputs, one.targets)[idx]
            pairs.append((value[s][idx], ref))
        return _worst(pairs)
    if kind == "per-sample":
        pairs = []
        for s in sorted({0, p64.batch_size - 1}):
            one = p64.sample(s)
            f1, _ = one.function()
            v = torch.randn(n, generator=gen, dtype=torch.float64).to(p64.device)
            ref = ref_hv(v, _bound(f1, one))
            pairs.append((value[s] @ v.to(value.dtype), ref))
        return _worst(pairs)
    raise ValueError(f"unknown quantity {kind!r}")
