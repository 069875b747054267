"""funchess as laplace-torch's curvature backend: `Laplace(..., backend=FunchessGGN)`.

Three backends that subclass laplace's own interfaces and follow its conventions exactly (losses
summed over the batch, `factor` 0.5 for regression and 1 for classification, parameters in
`parameters_to_vector` order, `subnetwork_indices`, last-layer models, dict inputs):

- `FunchessGGN` (`laplace.curvature.GGNInterface`): the generalised Gauss-Newton matrix (or, with
  `stochastic=True`, the Monte-Carlo Fisher);
- `FunchessEF` (`EFInterface`): the empirical Fisher;
- `FunchessHessian` (`CurvatureInterface`): the exact Hessian, right where torch.func's is wrong
  (layer norm's mixed second derivatives) because it goes through `funchess.hessian`.

Every method is a composition of funchess's public functions on `funchess.functional(model,
likelihood's loss)`, so the module-aware fast routes apply where the model allows:

- `diag`: `funchess.ggn_diagonal` (GGN, MC Fisher), squared `funchess.per_sample_grad` (EF),
  `funchess.hessian_diagonal` (Hessian); laplace's dense `(batch, outputs, params)` Jacobians
  are never formed;
- `full`: outer products of `funchess.per_sample_ggn_factor`'s per-sample factors (GGN, MC
  Fisher) or of per-sample gradients (EF), slices of samples at a time, or, when a FLOP estimate
  prefers it (many outputs), `funchess.GGNOperator(...).as_matrix()`; `funchess.hessian`;
- `kron`: `funchess.kfac` with laplace's factor layout (curvlinops's: `[B, A]` per weight, `[B]`
  per bias, exact dense blocks for 1-D parameters of other modules);
- `eig_lowrank`: `funchess.eigsh` on `funchess.DatasetOperator` (GGN, Hessian).

Results that grow with the batch are planned against `max_memory` first: a sized
`funchess.MemoryBudgetError` comes before anything large is allocated.

Options go through `backend_kwargs`: `max_memory` (bytes or "4GiB"), `sample_chunk_size`
(samples per vectorised pass, default planned), `chunk_size` (Hessian rows per pass,
`FunchessHessian`), `low_rank` (eigenpairs for `eig_lowrank`), `generator` (MC Fisher draws).

Example:
    >>> import torch
    >>> from laplace import Laplace
    >>> from funchess.integrations.laplace import FunchessGGN
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> X, y = torch.randn(32, 2), torch.randn(32, 1)
    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)
    >>> la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="diag", backend=FunchessGGN)
    >>> la.fit(loader)
    >>> mean, var = la(torch.randn(5, 2), pred_type="glm")
    >>> tuple(var.shape)
    (5, 1, 1)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

try:
    from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
    from laplace.utils import Kron
except (ImportError, RuntimeError) as exc:  # RuntimeError: a CUDA torchvision next to a CPU torch
    raise ImportError(
        f"funchess.integrations.laplace needs laplace-torch, which failed to import ({exc}). "
        f"Install it with pip install 'funchess[laplace]'; if the error says 'operator "
        f"torchvision::nms does not exist', run pip uninstall torchvision (laplace does not use it)."
    ) from exc

import funchess

# Base modules, where the public API has no counterpart: `_checks` (the shared option checks, and
# `relabel`, which tells an inner funchess call's error as the backend method's), `_compose` (the
# one rule that every entry works under torch.no_grad() and torch.inference_mode()), `_memory` (the
# backend plans its own slices of samples: budgets, the sized MemoryBudgetError, and the probe that
# counts a sample's activations and FLOPs for the choice of route), `_safe_ops` (per-sample
# Jacobians are plain torch.func, which needs funchess's rerouting of fused kernels) and
# `_sample_columns` (slices of a batch and batches of one, as funchess's per-sample passes take them).
from .._checks import check_chunk_size, check_count, check_generator, relabel
from .._compose import differentiable, usable
from .._memory import Budget, budget_of, measure
from .._safe_ops import safe_ops
from .._sample_columns import batch_of_one, take

__all__ = ["FunchessGGN", "FunchessEF", "FunchessHessian"]

_EPS = 1e-6  # eigenvalues kept by eig_lowrank, as laplace's ASDL backend does
_FIXES = "Use fewer parameters (last_layer / subnetwork), or a diagonal or Kronecker structure"
# A vectorised pass of small products runs at a fraction of a large matrix product's FLOP rate;
# the rows route's cost is mostly one large product, the columns route's mostly such passes
# (calibrated on benchmarks/bench_laplace.py's problems).
_PASS_PENALTY = 4.0


def prefer_columns(P: int, B: int, rank: int, flops: int) -> bool:
    """Whether the GGN's `full` by GGN-vector products with basis vectors beats summing the outer
    products of the per-sample factors.

    Rows: `B * rank` per-sample pullbacks plus `P^2 * B * rank` multiply-adds; columns: per
    column, a forward-mode and a reverse pass over the batch (about 3 forwards each, `flops` per
    sample forward).
    """
    rows = 2.0 * P * P * B * rank + 2.0 * B * rank * flops
    columns = _PASS_PENALTY * P * B * 3.0 * flops
    return columns < rows


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _entry(method: _Method) -> _Method:
    """A backend method that works under `torch.no_grad()` and `torch.inference_mode()` (laplace
    may call it there): inference mode left, inference tensors among the arguments copied."""

    @functools.wraps(method)
    def entry(self: Any, *args: Any, **kwargs: Any) -> Any:
        with differentiable():
            return method(self, *usable(args), **kwargs)

    return cast(_Method, entry)


def _per_sample_rows(tree: dict[str, Tensor]) -> Tensor:
    """Leaves with a leading sample dimension as one `(B, P)` matrix (`funchess.ravel` order)."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tree.values()], 1)


class _Funchess(CurvatureInterface):
    """What the three backends share: the problem (full model or last layer), the subnetwork,
    full / diagonal / per-sample gradients / Jacobians through funchess's public functions,
    `kron` through `funchess.kfac`, and `eig_lowrank`."""

    _kind = "type-2"  # which curvature: "type-2" (GGN), "mc" (MC Fisher), "empirical", "hessian"
    _f: funchess.ModuleFunction | None = None  # the model function, made on first use

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        *,
        max_memory: int | float | str | None = None,
        sample_chunk_size: int | str = "auto",
        chunk_size: int | str = "auto",
        low_rank: int = 10,
        generator: torch.Generator | None = None,
    ) -> None:
        CurvatureInterface.__init__(self, model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        call = self._label("__init__", "model, likelihood, ...")
        self.sample_chunk = check_chunk_size(call, sample_chunk_size, "sample_chunk_size")
        check_chunk_size(call, chunk_size)
        budget_of(call, max_memory)
        self.max_memory, self.sample_chunk_size, self.chunk_size = max_memory, sample_chunk_size, chunk_size
        self.low_rank = check_count(call, "low_rank", low_rank, 1)
        self.generator = check_generator(call, generator)

    # ------------------------------------------------------------------ the problem

    def _label(self, method: str, args: str = "x, y") -> str:
        return f"funchess.integrations.laplace.{type(self).__name__}.{method}({args})"

    @contextlib.contextmanager
    def _told(self, call: str) -> Iterator[None]:
        """An inner funchess call's error, told as this method's (same type, its message kept)."""
        try:
            yield
        except funchess.FunchessError as exc:
            raise relabel(call, exc) from exc

    def _problem(self, x: Any) -> tuple[funchess.ModuleFunction, dict[str, Tensor], Any, Tensor]:
        """`(f, params, inputs, z)`: `f(params, inputs, y)` is laplace's loss (summed over the batch)
        as a function of `self.params_dict`'s parameters, as laplace calls the model (a dict input
        positionally); `z` the model output. For a last-layer model `f` is the last layer's and the
        inputs are the features, computed once."""
        with torch.no_grad():
            if self.last_layer:
                z, inputs = self.model.forward_with_features(x)  # type: ignore[operator]
                owner = cast(nn.Module, self.model.last_layer)
            else:
                owner, inputs = self.model, x
        if self._f is None or self._f.model is not owner:
            # backward hooks (BackPACK's `extend` leaves them) observe training's gradients: set aside
            self._f, _ = funchess.functional(owner, self.lossfunc, dict_inputs="positional", backward_hooks="skip")
        f = self._f
        params = {k: v.detach() for k, v in self.params_dict.items()}
        if not self.last_layer:
            with torch.no_grad():
                z = f.output(params, inputs)
        return f, params, inputs, z.detach()

    def _check(self, call: str, kwargs: dict[str, Any], allowed: tuple[str, ...] = ("N",)) -> None:
        unknown = [k for k in kwargs if k not in allowed]
        if unknown:
            raise funchess.InvalidArgumentError(
                f"{call}: got the unexpected keyword argument(s) {unknown}; this backend accepts "
                f"{list(allowed)}. Pass funchess options through backend_kwargs (max_memory, "
                f"sample_chunk_size, chunk_size, low_rank), and drop ASDL-specific "
                f"asdl_fisher_kwargs."
            )

    def _subnetwork(self, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """The parameters that hold subnetwork entries (the curvature is taken w.r.t. those only),
        and the subnetwork indices moved into the flattening of just those parameters."""
        if self.subnetwork_indices is None:
            return params, None
        device = next(iter(params.values())).device
        idx = self.subnetwork_indices.to(device=device, dtype=torch.long)
        sizes = torch.tensor([p.numel() for p in params.values()], device=device)
        ends = sizes.cumsum(0)
        which = torch.searchsorted(ends, idx, right=True)  # the parameter each index falls in
        used = torch.zeros(len(sizes), dtype=torch.bool, device=device)
        used[which] = True
        new_starts = (sizes * used).cumsum(0) - sizes * used
        kept = {k: p for (k, p), u in zip(params.items(), used.tolist()) if u}
        return kept, idx - (ends - sizes)[which] + new_starts[which]

    def _size(self) -> int:
        idx = self.subnetwork_indices
        return len(idx) if idx is not None else sum(p.numel() for p in self.params_dict.values())

    def _fits(self, call: str, what: str, nbytes: int, device: torch.device) -> Budget:
        """The budget, after a sized MemoryBudgetError if `nbytes` for `what` do not fit it."""
        budget = Budget(call, self.max_memory, device)
        budget.require(what, nbytes, _FIXES)
        return budget

    def _slices(self, call: str, what: str, B: int, result: int, per_sample: int, device: torch.device) -> int:
        """Samples per slice: `sample_chunk_size`, or as many as the budget holds next to the
        result; a sized MemoryBudgetError first when not even one sample fits."""
        budget = self._fits(call, what, result + per_sample, device)
        if self.sample_chunk is not None:
            return self.sample_chunk
        if budget.fits(result + B * per_sample):
            return B
        return max(1, min(B, (budget.value() - result) // max(per_sample, 1)))

    def _probe(self, f: funchess.ModuleFunction, params: dict[str, Tensor], inputs: Any) -> tuple[int, int]:
        """`(bytes autograd saves, FLOPs)` of one sample's forward."""
        fresh = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        one = take(inputs, 0, 1)
        with safe_ops():
            probe = measure(lambda: f.output(fresh, one))
        return probe.saved_bytes, probe.flops

    def _rows(self, call: str, what: str, x: Any, y: Tensor, entries: int) -> Iterator[tuple[Tensor, Tensor | None]]:
        """`(rows, signs)` per slice of samples: `rows` `(b, K, P)` with `curvature = sum rows_kᵀ
        sign_k rows_k` (subnetwork columns only); `signs` `(b, K)` or None (all +1). Then the
        loss is `self._loss`. `entries`: the size of what the caller keeps."""
        f, params, inputs, z = self._problem(x)
        kept, idx = self._subnetwork(params)
        self._loss = self.lossfunc(z, y).detach()
        B = len(y)
        K = 1 if self._kind == "empirical" else getattr(self, "num_samples", 1) if self._kind == "mc" else z[0].numel()
        itemsize = z.element_size()
        act, _ = self._probe(f, kept, inputs)
        step = self._slices(call, what, B, entries * itemsize, act + 4 * K * sum(p.numel() for p in kept.values()) * itemsize, z.device)
        with self._told(call):
            if self._kind == "empirical":
                rows_of = funchess.per_sample_grad(f, sample_chunk_size=self.sample_chunk_size)  # type: ignore[arg-type]
            else:
                factor = funchess.per_sample_ggn_factor(
                    f, samples=K if self._kind == "mc" else None, generator=self.generator,
                    sample_chunk_size=self.sample_chunk_size, max_memory=self.max_memory,  # type: ignore[arg-type]
                )
            for b0 in range(0, B, step):
                xs, ys = take(inputs, b0, b0 + step), y[b0 : b0 + step]
                if self._kind == "empirical":
                    rows, signs = _per_sample_rows(rows_of(kept, xs, ys)).unsqueeze(1), None
                else:
                    V = factor(kept, xs, ys)
                    rows, signs = V.matrix(), V.signs
                yield (rows if idx is None else rows[..., idx]), signs

    # ------------------------------------------------------------------ curvature

    def _curvature_diagonal(self, call: str, x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        """`(loss, diagonal)` of the summed loss's curvature (before `factor`): the one place the
        backends' diagonals are computed. GGN and MC Fisher: `funchess.ggn_diagonal` (exact,
        module-aware where the model is a chain of known modules; an unbiased estimate with
        `num_samples` draws for the MC Fisher); EF: the squared per-sample gradients, summed."""
        if self._kind == "empirical":
            diag: Tensor | None = None
            for rows, _ in self._rows(call, f"the diagonal of {self._size():,} parameters", x, y, self._size()):
                piece = rows.square().sum((0, 1))
                diag = piece if diag is None else diag + piece
            assert diag is not None
            return self._loss, diag
        f, params, inputs, z = self._problem(x)
        kept, idx = self._subnetwork(params)
        P, itemsize = sum(p.numel() for p in kept.values()), z.element_size()
        K = getattr(self, "num_samples", 1) if self._kind == "mc" else z[0].numel()
        # the result, and one sample's columns (what the generic route holds at the least)
        self._fits(call, f"the diagonal of {P:,} parameters", (1 + K) * P * itemsize, z.device)
        with self._told(call):
            d = funchess.ggn_diagonal(
                f, samples=K if self._kind == "mc" else None, generator=self.generator, max_memory=self.max_memory,
                sample_chunk_size=self.sample_chunk_size,  # type: ignore[arg-type]
            )(kept, inputs, y)
        flat = funchess.ravel(d)
        return self.lossfunc(z, y).detach(), flat if idx is None else flat[idx]

    @_entry
    def full(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """`(factor * loss, factor * H)`, `H` the `(P, P)` curvature of the batch's summed loss
        (restricted to the subnetwork when `subnetwork_indices` is set)."""
        call = self._label("full")
        self._check(call, kwargs)
        P = self._size()
        what = f"the {P:,} x {P:,} matrix"
        if self._kind == "type-2":  # the GGN: by products with basis vectors when that is cheaper
            f, params, inputs, z = self._problem(x)
            kept, idx = self._subnetwork(params)
            _, flops = self._probe(f, kept, inputs)
            if prefer_columns(P, len(y), z[0].numel(), flops):
                self._fits(call, what, P * P * z.element_size(), z.device)
                with self._told(call):
                    G = funchess.GGNOperator(f, kept, inputs, y).as_matrix(max_memory=self.max_memory)
                if idx is not None:
                    G = G[idx][:, idx]
                return self.factor * self.lossfunc(z, y).detach(), G.mul_(self.factor)
        H: Tensor | None = None
        for rows, signs in self._rows(call, what, x, y, P * P):
            flat = rows.reshape(-1, rows.shape[-1])
            weighted = flat if signs is None else flat * signs.reshape(-1, 1).to(flat.dtype)
            H = weighted.T @ flat if H is None else H.addmm_(weighted.T, flat)
        assert H is not None
        return self.factor * self._loss, H.mul_(self.factor)

    @_entry
    def diag(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """`(factor * loss, factor * diagonal)`, `(P,)`, without (batch, outputs, params) Jacobians."""
        call = self._label("diag")
        self._check(call, kwargs)
        loss, d = self._curvature_diagonal(call, x, y)
        return self.factor * loss, self.factor * d

    @_entry
    def jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """`(Js, f)`: the Jacobians `(B, C, P)` of the outputs w.r.t. the parameters (subnetwork
        columns only when set) and the outputs `(B, C)`, for laplace's GLM predictive.

        One sample at a time (`torch.func.jacrev` of a sample's output, `vmap`ped over slices of
        samples), so the cost grows linearly with the batch (laplace's own `jacobians` takes
        `jacrev` of the whole batch's output: every row is a backward pass of the whole batch).
        With `enable_backprop=True` (gradients through `Js` w.r.t. the inputs) this is laplace's own.
        """
        if enable_backprop:
            return super().jacobians(x, enable_backprop=True)
        call = self._label("jacobians", "x")
        f, params, inputs, z = self._problem(x)
        kept, idx = self._subnetwork(params)
        P, (B, C) = self._size(), (z.shape[0], z[0].numel())
        act, _ = self._probe(f, kept, inputs)
        width = sum(p.numel() for p in kept.values())
        step = self._slices(call, f"the ({B}, {C}, {P:,}) Jacobians", B, B * C * P * z.element_size(),
                            act + 3 * C * width * z.element_size(), z.device)

        def one(p: dict[str, Tensor], xn: Any) -> Tensor:
            return f.output(p, batch_of_one(xn))[0].reshape(C)

        parts = []
        with self._told(call), safe_ops():  # fused attention kernels have no batching rules: math forms
            for b0 in range(0, B, step):
                J = vmap(jacrev(one), in_dims=(None, 0))(kept, take(inputs, b0, b0 + step))
                rows = torch.cat([t.reshape(*t.shape[:2], -1) for t in J.values()], 2)
                parts.append(rows if idx is None else rows[..., idx])
        return torch.cat(parts), z.reshape(B, C)

    @_entry
    def gradients(self, x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        """`(Gs, loss)`: per-sample gradients `(B, P)` of the summed loss (each sample's own loss),
        and the loss; unscaled, as laplace's. Works with dict inputs too."""
        call = self._label("gradients")
        kind, self._kind = self._kind, "empirical"
        try:
            P = self._size()
            parts = [rows[:, 0] for rows, _ in self._rows(call, f"gradients of {P:,} parameters", x, y, len(y) * P)]
        finally:
            self._kind = kind
        return torch.cat(parts), self._loss

    @_entry
    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """`(factor * loss, Kron)`: `funchess.kfac` in laplace's layout, rescaled like its
        curvlinops backend (input covariances by `len(y) / N`, all factors by `factor`)."""
        call = self._label("kron", "x, y, N")
        self._check(call, kwargs, ("kfac_approx",))
        if self.subnetwork_indices is not None:
            raise funchess.UnsupportedError(f"{call}: a Kronecker structure of a subnetwork is not defined; use 'full' or 'diag'.")
        f, params, inputs, z = self._problem(x)
        self._check_kron(call, f.model, params)
        with self._told(call):
            K = funchess.kfac(
                f, fisher_type=self._kind, kfac_approx=kwargs.get("kfac_approx", "expand"),  # type: ignore[arg-type]
                mc_samples=getattr(self, "num_samples", 1) if self._kind == "mc" else 1,
                generator=self.generator, max_memory=self.max_memory,
            )(params, inputs, y)
        kron = _laplace_kron(K, f.model, params, len(y) / N) * self.factor
        return self.factor * self.lossfunc(z, y).detach(), kron

    @staticmethod
    def _check_kron(call: str, owner: nn.Module, params: dict[str, Tensor]) -> None:
        modules = dict(owner.named_modules())
        for name, p in params.items():
            mname = name.rpartition(".")[0]
            mod = modules[mname]
            if type(mod) not in (nn.Linear, nn.Conv2d) and p.dim() >= 2:
                raise funchess.UnsupportedError(
                    f"{call}: parameter {name!r} of {type(mod).__name__} {mname!r} has no Kronecker "
                    f"factorisation (K-FAC covers nn.Linear and nn.Conv2d; 1-D parameters of other "
                    f"modules get their exact block), and laplace's Kron holds a {p.dim()}-D "
                    f"parameter as two factors; expected Linear/Conv2d layers. Use "
                    f"hessian_structure='diag' or 'full', or subset_of_weights='last_layer'."
                )

    # ------------------------------------------------------------------ low rank

    def _operator(self, call: str, f: funchess.ModuleFunction, params: dict[str, Tensor], batches: list[tuple[Any, Tensor]]) -> funchess.LinearOperator:
        """The data set's curvature (of the summed loss) as an operator: the GGN's here."""
        if self._kind != "type-2":
            raise funchess.UnsupportedError(
                f"{call}: the low-rank Laplace needs a deterministic curvature; got the Monte-Carlo "
                f"Fisher (stochastic=True). Use stochastic=False."
            )
        return funchess.DatasetOperator(f, params, batches, curvature="ggn", reduction="sum")

    @_entry
    def eig_lowrank(self, data_loader: Any) -> tuple[Tensor, Tensor, Tensor]:
        """`(eigenvectors (P, k), factor * eigenvalues (k,), factor * loss)`: the top `low_rank`
        eigenpairs (eigenvalues above 1e-6) of the data set's curvature, by `funchess.eigsh`
        (Lanczos) on the data set's operator; what laplace's ASDL backend returns.

        Note: laplace 0.3's `LowRankLaplace` refuses to start unless the old `asdfghjkl` package
        is importable, whatever the backend; call this method directly or see docs/laplace.md.
        """
        call = self._label("eig_lowrank", "data_loader")
        device = next(iter(self.params_dict.values())).device
        batches: list[tuple[Any, Tensor]] = []
        loss: Tensor | float = 0.0
        for data in data_loader:
            if isinstance(data, MutableMapping):
                x, y = data, data[self.dict_key_y].to(device)
            else:
                x, y = data[0].to(device), data[1].to(device)
            f, params, inputs, z = self._problem(x)
            loss = loss + self.lossfunc(z, y).detach()
            batches.append((inputs, y))
        with self._told(call):
            op = self._operator(call, f, params, batches)
            res = funchess.eigsh(op, k=min(self.low_rank, op.shape[0]), which="LA", generator=self.generator)
        vecs = torch.stack([funchess.ravel(v) for v in res.eigenvectors], dim=1)
        keep = res.eigenvalues > _EPS
        return vecs[:, keep], self.factor * res.eigenvalues[keep], self.factor * cast(Tensor, loss)


def _laplace_kron(K: funchess.KFAC, owner: nn.Module, params: dict[str, Tensor], rescale: float) -> Kron:
    """laplace's factor list, in parameter order: `[B, A]` per weight (A rescaled), `[B]` per bias,
    `[block]` per exact block; a weight-only layer with 1x1 factors is `[B * A]` (as laplace's
    curvlinops backend)."""
    role: dict[str, tuple[str, funchess.KFACLayer]] = {}
    for layer in K.layers.values():
        if layer.weight is not None:
            role[layer.weight] = ("weight", layer)
        if layer.bias is not None:
            role[layer.bias] = ("bias", layer)
    modules = dict(owner.named_modules())
    kfacs: list[list[Tensor]] = []
    for name in params:
        if name in K.exact:
            kfacs.append([K.exact[name]])
            continue
        kind, layer = role[name]
        if kind == "bias":
            kfacs.append([layer.B])
            continue
        assert layer.A is not None
        A = layer.A * rescale
        if getattr(modules[layer.module], "bias", None) is None and layer.B.numel() == 1 and A.numel() == 1:
            kfacs.append([layer.B * A])
        else:
            kfacs.append([layer.B, A])
    return Kron(kfacs)  # type: ignore[arg-type]


class FunchessGGN(_Funchess, GGNInterface):
    """laplace's `GGNInterface` on funchess: the GGN (or, `stochastic=True`, the MC Fisher).

    Constructed as laplace constructs every backend; funchess options via `backend_kwargs`.

    Args:
        model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y: laplace's.
        stochastic: the Monte-Carlo Fisher (`num_samples` labels per sample) instead of the GGN.
        num_samples: labels drawn per sample when `stochastic`.
        **options: keyword-only, shared by the three backends: `max_memory` (the memory budget,
            bytes or "4GiB"; default 80 % of the free memory), `sample_chunk_size` (samples per
            vectorised pass; "auto" plans it against the budget), `chunk_size` (Hessian rows per
            pass, `FunchessHessian`), `low_rank` (eigenpairs for `eig_lowrank`), `generator` (the
            `torch.Generator` for the MC Fisher's draws and Lanczos's start).

    Example:
        >>> import torch
        >>> from funchess.integrations.laplace import FunchessGGN
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> backend = FunchessGGN(model, "classification")
        >>> loss, H = backend.full(torch.randn(6, 3), torch.randint(0, 2, (6,)))
        >>> H.shape
        torch.Size([26, 26])
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, **options)
        self.stochastic, self.num_samples = stochastic, num_samples  # what GGNInterface.__init__ sets
        self._kind = "mc" if stochastic else "type-2"


class FunchessEF(_Funchess, EFInterface):
    """laplace's `EFInterface` on funchess: the empirical Fisher `factor * sum_n g_n g_n^T`.

    Per-sample gradients come from `vmap`ped per-sample `vjp`s, so dict inputs work too (laplace's
    own `gradients` needs Tensor inputs). Options as for `FunchessGGN`.

    Example:
        >>> import torch
        >>> from funchess.integrations.laplace import FunchessEF
        >>> backend = FunchessEF(torch.nn.Linear(3, 2), "regression")
        >>> loss, d = backend.diag(torch.randn(5, 3), torch.randn(5, 2))
        >>> d.shape
        torch.Size([8])
    """

    _kind = "empirical"

    def _operator(self, call: str, f: funchess.ModuleFunction, params: dict[str, Tensor], batches: list[tuple[Any, Tensor]]) -> funchess.LinearOperator:
        """`sum_n g_n g_nᵀ` over the data set, from its per-sample gradients (held: `(n, P)`)."""
        grads = funchess.per_sample_grad(f, sample_chunk_size=self.sample_chunk_size)  # type: ignore[arg-type]
        rows = torch.cat([_per_sample_rows(grads(params, x, y)) for x, y in batches])

        def mv(v: dict[str, Tensor]) -> dict[str, Tensor]:
            return funchess.unravel(rows.T @ (rows @ funchess.ravel(v)), v)  # type: ignore[no-any-return]

        return funchess.FunctionOperator(mv, params, vectorize=False)


class FunchessHessian(_Funchess):
    """laplace's `CurvatureInterface` on funchess: the exact Hessian of the summed loss.

    `full` is `funchess.hessian` (planned chunks, `MemoryBudgetError` before allocating, right for
    layer norm where torch.func's mixed second derivatives are wrong), `diag` is
    `funchess.hessian_diagonal`; `kron` is not defined for the Hessian (use `FunchessGGN`).
    Options as for `FunchessGGN`, plus `chunk_size` (Hessian rows per vectorised pass).

    Example:
        >>> import torch
        >>> from funchess.integrations.laplace import FunchessHessian
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
        >>> loss, H = FunchessHessian(model, "regression").full(torch.randn(5, 3), torch.randn(5, 1))
        >>> bool(torch.allclose(H, H.T, atol=1e-5))
        True
    """

    _kind = "hessian"

    @_entry
    def full(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """`(factor * loss, factor * H)` with `H = funchess.hessian` of the summed loss, `(P, P)`."""
        call = self._label("full")
        self._check(call, kwargs)
        f, params, inputs, z = self._problem(x)
        kept, idx = self._subnetwork(params)
        with self._told(call):
            H = funchess.to_matrix(funchess.hessian(f, chunk_size=self.chunk_size, max_memory=self.max_memory)(kept, inputs, y))  # type: ignore[arg-type]
        if idx is not None:
            H = H[idx][:, idx]
        return self.factor * self.lossfunc(z, y).detach(), self.factor * H

    def _curvature_diagonal(self, call: str, x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        """`funchess.hessian_diagonal` of the summed loss (exact, O(P) memory; module-aware where
        the model is a chain of known modules)."""
        f, params, inputs, z = self._problem(x)
        kept, idx = self._subnetwork(params)
        with self._told(call):
            d = funchess.ravel(funchess.hessian_diagonal(f, chunk_size=self.chunk_size, max_memory=self.max_memory)(kept, inputs, y))  # type: ignore[arg-type]
        return self.lossfunc(z, y).detach(), d if idx is None else d[idx]

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        raise funchess.UnsupportedError(
            f"{self._label('kron', 'x, y, N')}: a Kronecker-factored Hessian is not defined (K-FAC "
            f"factors the GGN or a Fisher); expected hessian_structure 'full' or 'diag' with "
            f"FunchessHessian. Use backend=FunchessGGN for 'kron'."
        )

    def _operator(self, call: str, f: funchess.ModuleFunction, params: dict[str, Tensor], batches: list[tuple[Any, Tensor]]) -> funchess.LinearOperator:
        return funchess.DatasetOperator(f, params, batches, reduction="sum")
