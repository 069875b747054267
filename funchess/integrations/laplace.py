"""funchess as laplace-torch's curvature backend: `Laplace(..., backend=FunchessGGN)`.

Three backends that subclass laplace's own interfaces and follow its conventions exactly (losses
summed over the batch, `factor` 0.5 for regression and 1 for classification, parameters in
`parameters_to_vector` order, `subnetwork_indices`, last-layer models, dict inputs):

- `FunchessGGN` (`laplace.curvature.GGNInterface`): the generalised Gauss-Newton matrix (or, with
  `stochastic=True`, the Monte-Carlo Fisher);
- `FunchessEF` (`EFInterface`): the empirical Fisher;
- `FunchessHessian` (`CurvatureInterface`): the exact Hessian, right where torch.func's is wrong
  (layer norm's mixed second derivatives) because it goes through `funchess.hessian`.

`full` and `diag` never form laplace's dense `(batch, outputs, params)` Jacobians: they sum
outer products / squares of per-sample rows `J_n^T s_nc` (`s_nc` the columns of the loss
Hessian's square root, or the loss gradient for the EF), computed in chunks of samples planned
against `max_memory`, and raise a sized `funchess.MemoryBudgetError` before allocating when even
one sample does not fit. `kron` is `funchess.kfac` with laplace's factor layout (curvlinops's:
`[B, A]` per weight, `[B]` per bias, exact dense blocks for 1-D parameters of other modules).

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

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, cast

import torch
from torch import Tensor, nn

try:
    from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
    from laplace.utils import Kron
except (ImportError, RuntimeError) as exc:  # RuntimeError: a CUDA torchvision next to a CPU torch
    raise ImportError(
        f"funchess.integrations.laplace needs laplace-torch, which failed to import ({exc}). "
        f"Install it with pip install 'funchess[laplace]'; if the error says 'operator "
        f"torchvision::nms does not exist', run pip uninstall torchvision (laplace does not use it)."
    ) from exc
from torch.func import functional_call

import funchess

from .._compat import vjp
from .._errors import InvalidArgumentError, UnsupportedError
from .._ggn_factor import (
    LossFactor,
    check_deterministic,
    factor_rows,
    ggn_columns,
    one_sample,
    prefer_columns,
    probe,
)

__all__ = ["FunchessGGN", "FunchessEF", "FunchessHessian"]

_EPS = 1e-6  # eigenvalues kept by eig_lowrank, as laplace's ASDL backend does
OutputFn = Callable[[dict[str, Tensor], Any], Tensor]


class _Funchess(CurvatureInterface):
    """What the three backends share: the problem (full model or last layer), the subnetwork,
    the rows-based full / diagonal, `kron` through `funchess.kfac`, per-sample gradients and
    `eig_lowrank`."""

    _kind = "type-2"  # which factor of the loss: "type-2" (GGN), "mc", "empirical"

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
        self._setup(max_memory, sample_chunk_size, chunk_size, low_rank, generator)

    def _setup(
        self,
        max_memory: int | float | str | None,
        sample_chunk_size: int | str,
        chunk_size: int | str,
        low_rank: int,
        generator: torch.Generator | None,
    ) -> None:
        self.max_memory = max_memory
        self.sample_chunk_size = sample_chunk_size
        self.chunk_size = chunk_size
        self.low_rank = low_rank
        self.generator = generator
        if sample_chunk_size != "auto" and (isinstance(sample_chunk_size, bool) or not isinstance(sample_chunk_size, int) or sample_chunk_size < 1):
            raise InvalidArgumentError(
                f"{self._label('__init__')}: expected sample_chunk_size to be 'auto' or a positive "
                f"int (samples per vectorised pass), got {sample_chunk_size!r}."
            )
        if isinstance(low_rank, bool) or not isinstance(low_rank, int) or low_rank < 1:
            raise InvalidArgumentError(
                f"{self._label('__init__')}: expected low_rank to be a positive int (eigenpairs for "
                f"eig_lowrank), got {low_rank!r}."
            )

    # ------------------------------------------------------------------ the problem

    def _label(self, method: str, args: str = "x, y") -> str:
        return f"funchess.integrations.laplace.{type(self).__name__}.{method}({args})"

    def _params(self) -> dict[str, Tensor]:
        """The trainable parameters at their current values, in `parameters_to_vector` order."""
        return {k: v.detach() for k, v in self.params_dict.items()}

    def _problem(self, x: Any) -> tuple[OutputFn, Any, Tensor]:
        """`(output_fn, inputs, z)`: `output_fn(params, inputs)` is the model's output as a function
        of `self.params_dict`'s parameters, `z` its value. For a last-layer model the inputs are the
        features, computed once."""
        with torch.no_grad():
            if self.last_layer:
                z, phi = self.model.forward_with_features(x)  # type: ignore[operator]
                layer = self._last()
                return (lambda p, inp: functional_call(layer, p, (inp,))), phi.detach(), z.detach()
            model, buffers = self.model, dict(self.model.named_buffers())

            def output(p: dict[str, Tensor], inp: Any) -> Tensor:
                return functional_call(model, (p, buffers), (inp,), strict=False)  # type: ignore[no-any-return]

            return output, x, output(self._params(), x).detach()

    def _last(self) -> nn.Module:
        """The last layer of laplace's `FeatureExtractor` (last-layer Laplace)."""
        return cast(nn.Module, self.model.last_layer)

    def _check(self, call: str, kwargs: dict[str, Any], allowed: tuple[str, ...] = ("N",)) -> None:
        unknown = [k for k in kwargs if k not in allowed]
        if unknown:
            raise InvalidArgumentError(
                f"{call}: got the unexpected keyword argument(s) {unknown}; this backend accepts "
                f"{list(allowed)}. Pass funchess options through backend_kwargs (max_memory, "
                f"sample_chunk_size, chunk_size, low_rank), and drop ASDL-specific "
                f"asdl_fisher_kwargs."
            )
        check_deterministic(call, self.model, "error")

    def _subnetwork(self, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """The parameters that hold subnetwork entries (the rows are taken w.r.t. those only), and
        the subnetwork indices moved into the flattening of just those parameters."""
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

    def _factor(self, call: str, z: Tensor, y: Tensor) -> LossFactor:
        num = getattr(self, "num_samples", 1)
        return LossFactor(call, self.lossfunc, z, y, kind=self._kind, mc_samples=num, generator=self.generator)

    def _rows(self, call: str, what: str, x: Any, y: Tensor, output_bytes: int) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Yield `(rows, signs)` per chunk (subnetwork columns only); then the loss is `self._loss`."""
        output_fn, inputs, z = self._problem(x)
        params, idx = self._subnetwork(self._params())
        factor = self._factor(call, z, y)
        self._loss = self.lossfunc(z, y).detach()
        for rows, signs, _ in factor_rows(
            call, output_fn, params, inputs, factor, what=what, output_bytes=output_bytes,
            max_memory=self.max_memory, sample_chunk_size=self.sample_chunk_size,
        ):
            yield rows if idx is None else rows[..., idx], signs

    def _size(self) -> int:
        idx = self.subnetwork_indices
        return len(idx) if idx is not None else sum(p.numel() for p in self.params_dict.values())

    def _itemsize(self) -> int:
        return next(iter(self.params_dict.values())).element_size()

    # ------------------------------------------------------------------ curvature

    def _curvature_diagonal(self, call: str, x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        """`(loss, diagonal)` of the GGN / MC Fisher / EF of the summed loss (before `factor`):
        the sum of the squared rows, one chunk of samples at a time (the one place to swap in a
        faster exact diagonal, e.g. a module-aware `funchess.ggn_diagonal`, for the GGN)."""
        P = self._size()
        diag: Tensor | None = None
        what = f"the diagonal of {P:,} parameters"
        for rows, signs in self._rows(call, what, x, y, P * self._itemsize()):
            sq = rows.square() if signs is None else rows.square() * signs.unsqueeze(-1).to(rows.dtype)
            piece = sq.sum((0, 1))
            diag = piece if diag is None else diag + piece
        assert diag is not None
        return self._loss, diag

    def full(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """`(factor * loss, factor * H)`, `H` the `(P, P)` curvature of the batch's summed loss
        (restricted to the subnetwork when `subnetwork_indices` is set)."""
        call = self._label("full")
        self._check(call, kwargs)
        P = self._size()
        if self._kind == "type-2":  # the GGN: by products with basis vectors when that is cheaper
            output_fn, inputs, z = self._problem(x)
            params, idx = self._subnetwork(self._params())
            _, flops = probe(output_fn, params, one_sample(inputs, len(y)))
            if prefer_columns(P, len(y), z[0].numel(), flops):
                cols = idx if idx is not None else torch.arange(P, device=z.device)
                G = ggn_columns(call, output_fn, params, inputs, lambda w: self.lossfunc(w, y), cols, max_memory=self.max_memory)
                return self.factor * self.lossfunc(z, y).detach(), G.mul_(self.factor)
        H: Tensor | None = None
        for rows, signs in self._rows(call, f"the {P:,} x {P:,} matrix", x, y, P * P * self._itemsize()):
            flat = rows.reshape(-1, rows.shape[-1])
            weighted = flat if signs is None else flat * signs.reshape(-1, 1).to(flat.dtype)
            H = weighted.T @ flat if H is None else H.addmm_(weighted.T, flat)
        assert H is not None
        return self.factor * self._loss, H.mul_(self.factor)

    def diag(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """`(factor * loss, factor * diagonal)`, `(P,)`, without (batch, outputs, params) Jacobians."""
        call = self._label("diag")
        self._check(call, kwargs)
        loss, d = self._curvature_diagonal(call, x, y)
        return self.factor * loss, self.factor * d

    def jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """`(Js, f)`: the Jacobians `(B, C, P)` of the outputs w.r.t. the parameters (subnetwork
        columns only when set) and the outputs `(B, C)`, for laplace's GLM predictive.

        One sample at a time (per-sample `vjp`s `vmap`ped over chunks of samples and the `C`
        output directions), so the cost grows linearly with the batch (laplace's own `jacobians`
        takes `jacrev` of the whole batch's output: every row is a backward pass of the whole
        batch). With `enable_backprop=True` (gradients through `Js` w.r.t. the inputs) this is
        laplace's own.
        """
        if enable_backprop:
            return super().jacobians(x, enable_backprop=True)
        call = self._label("jacobians", "x")
        check_deterministic(call, self.model, "error")
        output_fn, inputs, z = self._problem(x)
        params, idx = self._subnetwork(self._params())
        factor = LossFactor(call, lambda w: w.sum(), z, None, kind="jacobian")
        P, (B, C) = self._size(), (z.shape[0], z[0].numel())
        J = torch.empty(B, C, P, dtype=z.dtype, device=z.device)
        for rows, _, (b0, c0) in factor_rows(
            call, output_fn, params, inputs, factor, what=f"the ({B}, {C}, {P:,}) Jacobians",
            output_bytes=B * C * P * self._itemsize(), max_memory=self.max_memory,
            sample_chunk_size=self.sample_chunk_size,
        ):
            J[b0 : b0 + rows.shape[0], c0 : c0 + rows.shape[1]] = rows if idx is None else rows[..., idx]
        return J, z

    def gradients(self, x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        """`(Gs, loss)`: per-sample gradients `(B, P)` of the summed loss (each sample's own loss),
        and the loss; unscaled, as laplace's. Works with dict inputs too."""
        call = self._label("gradients")
        check_deterministic(call, self.model, "error")
        kind, self._kind = self._kind, "empirical"
        try:
            P = self._size()
            out = len(y) * P * self._itemsize()
            parts = [rows[:, 0] for rows, _ in self._rows(call, f"gradients of {P:,} parameters", x, y, out)]
        finally:
            self._kind = kind
        return torch.cat(parts), self._loss

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """`(factor * loss, Kron)`: `funchess.kfac` in laplace's layout, rescaled like its
        curvlinops backend (input covariances by `len(y) / N`, all factors by `factor`)."""
        call = self._label("kron", "x, y, N")
        self._check(call, kwargs, ("kfac_approx",))
        if self.subnetwork_indices is not None:
            raise UnsupportedError(f"{call}: a Kronecker structure of a subnetwork is not defined; use 'full' or 'diag'.")
        params = self._params()
        owner = self._last() if self.last_layer else self.model
        self._check_kron(call, owner, params)
        with torch.no_grad():
            if self.last_layer:
                z, inputs = self.model.forward_with_features(x)  # type: ignore[operator]
            else:
                z, inputs = self.model(x), x
        f, _ = funchess.functional(owner, self.lossfunc)
        fisher = {"empirical": "empirical", "mc": "mc", "type-2": "type-2"}[self._kind]
        K = funchess.kfac(
            f, fisher_type=fisher, kfac_approx=kwargs.get("kfac_approx", "expand"),  # type: ignore[arg-type]
            mc_samples=getattr(self, "num_samples", 1) if fisher == "mc" else 1,
            generator=self.generator, max_memory=self.max_memory,
        )(params, (inputs,), y)
        kron = _laplace_kron(K, owner, params, len(y) / N) * self.factor
        return self.factor * self.lossfunc(z, y).detach(), kron

    @staticmethod
    def _check_kron(call: str, owner: nn.Module, params: dict[str, Tensor]) -> None:
        modules = dict(owner.named_modules())
        for name, p in params.items():
            mname = name.rpartition(".")[0]
            mod = modules[mname]
            if type(mod) not in (nn.Linear, nn.Conv2d) and p.dim() >= 2:
                raise UnsupportedError(
                    f"{call}: parameter {name!r} of {type(mod).__name__} {mname!r} has no Kronecker "
                    f"factorisation (K-FAC covers nn.Linear and nn.Conv2d; 1-D parameters of other "
                    f"modules get their exact block), and laplace's Kron holds a {p.dim()}-D "
                    f"parameter as two factors; expected Linear/Conv2d layers. Use "
                    f"hessian_structure='diag' or 'full', or subset_of_weights='last_layer'."
                )

    # ------------------------------------------------------------------ low rank

    def _product(self, output_fn: OutputFn, inputs: Any, z: Tensor, y: Tensor, params: dict[str, Tensor]) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
        """The curvature-vector product of the summed loss on one batch (GGN here)."""
        if self._kind != "type-2":
            raise UnsupportedError(
                f"{self._label('eig_lowrank', 'data_loader')}: the low-rank Laplace needs a "
                f"deterministic curvature; got the Monte-Carlo Fisher (stochastic=True). Use "
                f"stochastic=False."
            )

        def output(p: dict[str, Tensor]) -> Tensor:
            return output_fn(p, inputs)

        def product(v: dict[str, Tensor]) -> dict[str, Tensor]:
            out, pull = vjp(output, params)
            def pulled(u: Tensor) -> Any:
                return pull(u)[0]

            def loss(w: Tensor) -> Tensor:
                return self.lossfunc(w, y)

            _, push = vjp(pulled, torch.zeros_like(out))  # J v as the vjp of the linear pullback
            (Jv,) = push(v)
            _, hess = vjp(torch.func.grad(loss), out.detach())
            (HJv,) = hess(Jv)
            return pull(HJv)[0]  # type: ignore[no-any-return]

        return product

    def eig_lowrank(self, data_loader: Any) -> tuple[Tensor, Tensor, Tensor]:
        """`(eigenvectors (P, k), factor * eigenvalues (k,), factor * loss)`: the top `low_rank`
        eigenpairs (eigenvalues above 1e-6) of the data set's curvature, by `funchess.eigsh`
        (Lanczos) on products summed over the batches; what laplace's ASDL backend returns.

        Note: laplace 0.3's `LowRankLaplace` refuses to start unless the old `asdfghjkl` package
        is importable, whatever the backend; call this method directly or see docs/laplace.md.
        """
        call = self._label("eig_lowrank", "data_loader")
        check_deterministic(call, self.model, "error")
        params = self._params()
        device = next(iter(params.values())).device
        batches = []
        loss = torch.zeros((), dtype=next(iter(params.values())).dtype, device=device)
        for data in data_loader:
            if isinstance(data, MutableMapping):
                x, y = data, data[self.dict_key_y].to(device)
            else:
                x, y = data[0].to(device), data[1].to(device)
            output_fn, inputs, z = self._problem(x)
            loss = loss + self.lossfunc(z, y).detach()
            batches.append(self._product(output_fn, inputs, z, y, params))

        def mv(v: dict[str, Tensor]) -> dict[str, Tensor]:
            parts = [product(v) for product in batches]
            return {k: sum(p[k] for p in parts) for k in v}  # type: ignore[misc]

        op = funchess.FunctionOperator(mv, params, vectorize=False)
        k = min(self.low_rank, op.shape[0])
        res = funchess.eigsh(op, k=k, which="LA", generator=self.generator)
        vecs = torch.stack([funchess.ravel(v) for v in res.eigenvectors], dim=1)
        keep = res.eigenvalues > _EPS
        return vecs[:, keep], self.factor * res.eigenvalues[keep], self.factor * loss


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

    def _product(self, output_fn: OutputFn, inputs: Any, z: Tensor, y: Tensor, params: dict[str, Tensor]) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
        factor = LossFactor(self._label("eig_lowrank", "data_loader"), self.lossfunc, z, y, kind="empirical")
        rows = torch.cat([r[:, 0] for r, _, _ in factor_rows(
            self._label("eig_lowrank", "data_loader"), output_fn, params, inputs, factor,
            what="per-sample gradients", output_bytes=0, max_memory=self.max_memory,
        )])

        def product(v: dict[str, Tensor]) -> dict[str, Tensor]:
            return funchess.unravel(rows.T @ (rows @ funchess.ravel(v)), v)  # type: ignore[no-any-return]

        return product


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

    def _loss_fn(self, x: Any, y: Tensor) -> tuple[Callable[[dict[str, Tensor]], Tensor], Tensor]:
        output_fn, inputs, z = self._problem(x)
        return (lambda p: self.lossfunc(output_fn(p, inputs), y)), self.lossfunc(z, y).detach()

    def full(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """`(factor * loss, factor * H)` with `H = funchess.hessian` of the summed loss, `(P, P)`."""
        call = self._label("full")
        self._check(call, kwargs)
        f, loss = self._loss_fn(x, y)
        H = funchess.to_matrix(funchess.hessian(f, chunk_size=self.chunk_size, max_memory=self.max_memory)(self._params()))  # type: ignore[arg-type]
        if self.subnetwork_indices is not None:
            idx = self.subnetwork_indices.to(H.device)
            H = H[idx][:, idx]
        return self.factor * loss, self.factor * H

    def diag(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """`(factor * loss, factor * diagonal)` with `funchess.hessian_diagonal` (exact, O(P) memory)."""
        call = self._label("diag")
        self._check(call, kwargs)
        f, loss = self._loss_fn(x, y)
        d = funchess.ravel(funchess.hessian_diagonal(f, chunk_size=self.chunk_size, max_memory=self.max_memory)(self._params()))  # type: ignore[arg-type]
        idx = self.subnetwork_indices
        return self.factor * loss, self.factor * (d if idx is None else d[idx.to(d.device)])

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        raise UnsupportedError(
            f"{self._label('kron', 'x, y, N')}: a Kronecker-factored Hessian is not defined (K-FAC "
            f"factors the GGN or a Fisher); expected hessian_structure 'full' or 'diag' with "
            f"FunchessHessian. Use backend=FunchessGGN for 'kron'."
        )

    def _product(self, output_fn: OutputFn, inputs: Any, z: Tensor, y: Tensor, params: dict[str, Tensor]) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
        def loss(p: dict[str, Tensor]) -> Tensor:
            return self.lossfunc(output_fn(p, inputs), y)

        def product(v: dict[str, Tensor]) -> dict[str, Tensor]:
            _, pull = vjp(torch.func.grad(loss), params)
            return pull(v)[0]  # type: ignore[no-any-return]

        return product
