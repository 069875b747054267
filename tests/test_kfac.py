"""funchess.kfac: Kronecker factors against closed forms, the reference GGN and curvlinops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import funchess
from funchess.testing import assert_hessian_close, reference_ggn, reference_hessian

from cases import CASES, Case

pytestmark = pytest.mark.usefixtures("one_thread")
f64 = torch.float64


def _data(n: int, d: int, seed: int = 0) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=f64)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(f64)


def _conv(padding_mode: str = "zeros") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode), nn.Tanh(),
        nn.Conv2d(3, 4, 2, stride=2, bias=False), nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
    ).to(f64)


def _ggn_matrix(model: nn.Module, loss: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    f, _ = funchess.functional(model, loss)
    return funchess.to_matrix(reference_ggn(f.output, lambda z: loss(z, y), params, x))


def _offsets(params: dict[str, Tensor]) -> dict[str, slice]:
    out, start = {}, 0
    for k, p in params.items():
        out[k] = slice(start, start + p.numel())
        start += p.numel()
    return out


# ----------------------------------------------------------------------------- closed forms


@given(n=st.integers(1, 6), d_in=st.integers(1, 5), d_out=st.integers(1, 4), bias=st.booleans())
def test_linear_model_mse_is_exact(n: int, d_in: int, d_out: int, bias: bool) -> None:
    """A linear model with MSE: B = 2 n I and A = XᵀX / n, so B ⊗ A is the exact GGN (= Hessian)
    block of the weight, and B that of the bias, for any batch."""
    model = nn.Linear(d_in, d_out, bias=bias).to(f64)
    loss = nn.MSELoss(reduction="sum")
    f, params = funchess.functional(model, loss)
    x, y = _data(n, d_in), _data(n, d_out, seed=1)
    K = funchess.kfac(f)(params, x, y)
    H = funchess.to_matrix(reference_hessian(f, params, x, y))
    sl = _offsets(params)
    layer = K.layers[""]
    torch.testing.assert_close(layer.B, 2 * n * torch.eye(d_out, dtype=f64))
    torch.testing.assert_close(layer.A, x.T @ x / n)
    torch.testing.assert_close(K.block("weight"), H[sl["weight"], sl["weight"]])
    if bias:
        torch.testing.assert_close(K.block("bias"), H[sl["bias"], sl["bias"]])


@pytest.mark.parametrize("loss", [nn.MSELoss(reduction="sum"), nn.CrossEntropyLoss(reduction="mean"), F.cross_entropy])
def test_one_sample_weight_blocks_are_exact(loss: nn.Module) -> None:
    """One sample at one position: A = a aᵀ and B = Σ_c g_c g_cᵀ, so every layer's weight block is
    the exact GGN block (the GGN of one sample factorises as (Σ g gᵀ) ⊗ a aᵀ)."""
    model = _mlp()
    f, params = funchess.functional(model, loss)
    x = _data(1, 4)
    y = _data(1, 3, seed=1) if isinstance(loss, nn.MSELoss) else torch.tensor([2])
    K = funchess.kfac(f)(params, x, y)
    G = _ggn_matrix(model, loss, params, x, y)  # type: ignore[arg-type]
    sl = _offsets(params)
    for name in params:
        torch.testing.assert_close(K.block(name), G[sl[name], sl[name]], rtol=1e-10, atol=1e-12)


def test_batches_add_up_with_num_data() -> None:
    model = _conv()
    f, params = funchess.functional(model, nn.CrossEntropyLoss(reduction="sum"))
    x = torch.randn(6, 2, 6, 6, dtype=f64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    whole = funchess.kfac(f)(params, x, y)
    parts = funchess.kfac(f, num_data=6)(params, x[:4], y[:4]) + funchess.kfac(f, num_data=6)(params, x[4:], y[4:])
    torch.testing.assert_close(parts.as_matrix(), whole.as_matrix(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((2.0 * whole).layers["0"].B, 2 * whole.layers["0"].B)


def test_operator_views_agree() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(f64)
    f, params = funchess.functional(model, F.cross_entropy)
    K = funchess.kfac(f)(params, _data(5, 3), torch.tensor([0, 1, 1, 0, 1]))
    M = K.as_matrix()
    v = {k: torch.randn_like(p) for k, p in params.items()}
    torch.testing.assert_close(funchess.ravel(K.mv(v)), M @ funchess.ravel(v))
    torch.testing.assert_close(K @ funchess.ravel(v), M @ funchess.ravel(v))
    torch.testing.assert_close(funchess.ravel(K.diagonal()), M.diagonal())
    torch.testing.assert_close(M, M.T)
    assert list(K.exact) == ["1.weight", "1.bias"]
    batched = torch.func.vmap(K.mv)({k: torch.stack([t, 2 * t]) for k, t in v.items()})
    torch.testing.assert_close(funchess.ravel({k: t[1] for k, t in batched.items()}), 2 * M @ funchess.ravel(v))
    op = funchess.FunctionOperator(K.mv, params)
    top = funchess.eigsh(op, k=1, generator=torch.Generator().manual_seed(0)).eigenvalues[0]
    torch.testing.assert_close(top, torch.linalg.eigvalsh(M)[-1])


# ----------------------------------------------------------------------------- the case table


def _positions(model: nn.Module, inputs: object) -> dict[str, int]:
    """Inputs per sample each Linear/Conv2d sees (1: K-FAC of one sample is exact there)."""
    seen: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if type(m) in (nn.Linear, nn.Conv2d):
            def hook(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor, name: str = name) -> None:
                seen[name] = out[0].numel() // (out.shape[-1] if isinstance(mod, nn.Linear) else out.shape[1])
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(inputs)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize(
    "name", ["mlp_mse", "mlp_ce", "conv", "layernorm", "batchnorm_eval", "embedding", "attention_mha", "attention_sdpa", "frozen", "noncontiguous", "selected"]
)
def test_case_table_against_reference_ggn(name: str, snapshot: type) -> None:
    """Exact blocks (LayerNorm, BatchNorm, Embedding, attention) equal the reference GGN's blocks for
    the whole batch; Linear/Conv2d blocks of one sample at one position are exact too."""
    case: Case = CASES[name](f64, "cpu")
    snap = snapshot(case.model)
    f, params = funchess.functional(case.model, case.loss_fn, params=case.params)
    sl = _offsets(params)
    K = funchess.kfac(f)(params, case.inputs, case.targets)
    G = funchess.to_matrix(reference_ggn(f.output, lambda z: case.loss_fn(z, case.targets), params, case.inputs))
    for pname, block in K.exact.items():
        torch.testing.assert_close(block, G[sl[pname], sl[pname]], rtol=1e-9, atol=1e-11)
    x1, y1 = case.inputs[:1], case.targets[:1]
    K1 = funchess.kfac(f)(params, x1, y1)
    G1 = funchess.to_matrix(reference_ggn(f.output, lambda z: case.loss_fn(z, y1), params, x1))
    single = _positions(case.model, x1)
    for layer in K1.layers.values():
        if single[layer.module] != 1:
            continue
        for pname in (layer.weight, layer.bias):
            if pname is not None:
                torch.testing.assert_close(K1.block(pname), G1[sl[pname], sl[pname]], rtol=1e-9, atol=1e-11)
    snap.assert_unchanged()


def test_general_loss_uses_exact_output_hessian() -> None:
    """A loss without a closed form: its per-sample output Hessian (possibly indefinite) is
    eigendecomposed; the factors equal MSE's for a wrapped MSE, and exact blocks equal the GGN."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2)).to(f64)
    x, y = _data(5, 3), _data(5, 2, seed=1)
    f, params = funchess.functional(model, nn.MSELoss(reduction="sum"))
    wrapped, _ = funchess.functional(model, lambda z, t: ((z - t) ** 2).sum())
    torch.testing.assert_close(funchess.kfac(wrapped)(params, x, y).as_matrix(), funchess.kfac(f)(params, x, y).as_matrix())

    def nonconvex(z: Tensor, t: Tensor) -> Tensor:
        return (torch.cos(z - t) + 0.1 * (z * t).sum(1, keepdim=True) ** 2).mean()

    g, _ = funchess.functional(model, nonconvex)
    K = funchess.kfac(g)(params, x, y)
    G = funchess.to_matrix(reference_ggn(g.output, lambda z: nonconvex(z, y), params, x))
    sl = _offsets(params)
    for pname, block in K.exact.items():
        torch.testing.assert_close(block, G[sl[pname], sl[pname]], rtol=1e-9, atol=1e-11)
    x1, y1 = x[:1], y[:1]
    K1 = funchess.kfac(g)(params, x1, y1)
    G1 = funchess.to_matrix(reference_ggn(g.output, lambda z: nonconvex(z, y1), params, x1))
    torch.testing.assert_close(K1.block("3.weight"), G1[sl["3.weight"], sl["3.weight"]], rtol=1e-9, atol=1e-11)


def test_empirical_fisher_matches_funchess_empirical_fisher() -> None:
    """One sample of a one-layer model: the empirical K-FAC is the empirical Fisher's block."""
    model = nn.Linear(3, 2).to(f64)
    for loss in (nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")):
        f, params = funchess.functional(model, loss)
        x = _data(1, 3)
        y = torch.tensor([1]) if isinstance(loss, nn.CrossEntropyLoss) else _data(1, 2, seed=1)
        K = funchess.kfac(f, fisher_type="empirical")(params, x, y)
        E = funchess.to_matrix(funchess.empirical_fisher(f, reduction=loss.reduction)(params, x, y))  # type: ignore[arg-type]
        torch.testing.assert_close(K.block("weight"), E[:6, :6])


def test_mc_fisher_is_reproducible_and_unbiased() -> None:
    model = _mlp()
    f, params = funchess.functional(model, F.cross_entropy)
    x, y = _data(4, 4), torch.tensor([0, 1, 2, 1])
    exact = funchess.kfac(f)(params, x, y).as_matrix()

    def mc(seed: int, m: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return funchess.kfac(f, fisher_type="mc", mc_samples=m, generator=gen)(params, x, y).as_matrix()

    torch.testing.assert_close(mc(3, 5), mc(3, 5))
    err = (mc(0, 4000) - exact).norm() / exact.norm()
    assert err < 0.1, err


# ----------------------------------------------------------------------------- against curvlinops


def _curvlinops_factors(model: nn.Module, loss: nn.Module, x: Tensor, y: Tensor, fisher: str, approx: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    curvlinops = pytest.importorskip("curvlinops")
    linop = curvlinops.KFACLinearOperator(
        model, loss, list(model.parameters()), [(x, y)], fisher_type=fisher, kfac_approx=approx,
        check_deterministic=False, separate_weight_and_bias=True,
    )
    linop.compute_kronecker_factors()
    return linop._input_covariances, linop._gradient_covariances


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
@pytest.mark.parametrize(
    "problem", ["mlp-mse-sum", "mlp-ce-sum", "mlp-ce-mean", "mlp-mse-mean", "conv-ce-sum", "sequence-mse-sum"]
)
def test_equals_curvlinops(problem: str, fisher: str, approx: str) -> None:
    kind, lossname, reduction = problem.split("-")
    if kind == "mlp":
        model, x = _mlp(), _data(7, 4)
    elif kind == "conv":
        model, x = _conv(), torch.randn(5, 2, 6, 6, dtype=f64, generator=torch.Generator().manual_seed(0))
    else:  # a Linear on sequences: weight sharing over 2 positions
        torch.manual_seed(0)
        model, x = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Flatten()).to(f64), torch.randn(3, 2, 4, dtype=f64)
    n, c = x.shape[0], 6 if kind == "sequence" else 3
    loss: nn.Module
    if lossname == "mse":
        loss, y = nn.MSELoss(reduction=reduction), _data(n, c, seed=1)
    else:
        loss, y = nn.CrossEntropyLoss(reduction=reduction), torch.arange(n) % c
    # conventions differ in one place: for a mean-reduced MSE, curvlinops takes a sample's loss as
    # its sum over the C outputs divided by the batch size; funchess takes the loss of a batch of
    # one (as funchess.empirical_fisher), the mean over the C outputs: C times smaller
    scale = c if (fisher == "empirical" and lossname == "mse" and reduction == "mean") else 1
    As, Bs = _curvlinops_factors(model, loss, x, y, fisher, approx)
    f, params = funchess.functional(model, loss)
    K = funchess.kfac(f, fisher_type=fisher, kfac_approx=approx)(params, x, y)  # type: ignore[arg-type]
    assert sorted(K.layers) == sorted(Bs)
    for name, layer in K.layers.items():
        torch.testing.assert_close(layer.B * scale, Bs[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.A, As[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_options_equal_curvlinops(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2), nn.ReLU(),
        nn.Conv2d(4, 2, 3, padding="same"), nn.Flatten(), nn.Linear(2 * 4 * 4, 3),
    ).to(dtype)
    x = torch.randn(3, 4, 7, 7, dtype=dtype)
    y = torch.tensor([0, 2, 1])
    loss = nn.CrossEntropyLoss(reduction="sum")
    As, Bs = _curvlinops_factors(model, loss, x, y, "type-2", "expand")
    f, params = funchess.functional(model, loss)
    K = funchess.kfac(f)(params, x, y)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for name, layer in K.layers.items():
        torch.testing.assert_close(layer.B, Bs[name], **tol)
        torch.testing.assert_close(layer.A, As[name], **tol)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")  # torch's own, on an even kernel
@pytest.mark.parametrize(
    "options",
    [
        {"kernel_size": 2, "padding": "same"},  # asymmetric padding (curvlinops refuses it)
        {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
        {"kernel_size": 3, "padding": 2, "padding_mode": "circular", "stride": 2},
        {"kernel_size": (2, 3), "padding": (1, 0), "padding_mode": "replicate", "dilation": 2},
    ],
)
def test_conv_input_covariance_is_the_patch_covariance(options: dict[str, object]) -> None:
    """The rows of a conv's Jacobian w.r.t. one output channel's weights are its input patches, so
    A must equal their covariance: an oracle independent of unfolding and padding."""
    conv = nn.Conv2d(2, 3, bias=False, **options).to(f64)  # type: ignore[arg-type]
    x = torch.randn(2, 2, 5, 5, dtype=f64)
    w = conv.weight.detach()
    J = torch.func.jacrev(lambda w: torch.func.functional_call(conv, {"weight": w}, (x,)))(w)
    patches = J[:, 0, :, :, 0].reshape(x.shape[0], -1, w[0].numel())  # d out[n, 0, t] / d weight[0]: (N, T, d_in)
    T = patches.shape[1]
    expected = torch.einsum("nti,ntj->ij", patches, patches) / (x.shape[0] * T)
    f, params = funchess.functional(conv, nn.MSELoss(reduction="sum"))
    y = torch.randn_like(conv(x))
    torch.testing.assert_close(funchess.kfac(f)(params, x, y).layers[""].A, expected, rtol=1e-12, atol=1e-12)


def test_reflect_padding_single_position_is_exact() -> None:
    """A conv whose kernel covers the whole (reflect-padded) input has one position: K-FAC of a
    linear model with MSE is then its exact Hessian block, padding mode included."""
    model = nn.Conv2d(2, 3, 5, padding=1, padding_mode="reflect").to(f64)
    loss = nn.MSELoss(reduction="sum")
    f, params = funchess.functional(model, loss)
    x = torch.randn(4, 2, 3, 3, dtype=f64)
    y = torch.randn(4, 3, 1, 1, dtype=f64)
    K = funchess.kfac(f)(params, x, y)
    H = funchess.to_matrix(reference_hessian(f, params, x, y))
    assert_hessian_close(K.block("weight"), H[:150, :150])


def test_unused_layer_has_zero_factors() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(4, 5)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    f, params = funchess.functional(Skip().to(f64), F.mse_loss)
    K = funchess.kfac(f)(params, _data(4, 3), _data(4, 2, seed=1))
    assert K.layers["unused"].A.abs().sum() == 0 and K.layers["unused"].B.abs().sum() == 0
    assert K.layers["unused"].A.shape == (4, 4) and K.layers["unused"].B.shape == (5, 5)


# ----------------------------------------------------------------------------- errors


def test_errors() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    f, params = funchess.functional(model, F.mse_loss)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(funchess.InvalidArgumentError, match=r"funchess.kfac\(f\): expected f from funchess.functional"):
        funchess.kfac(lambda p, x, y: p)
    with pytest.raises(funchess.UnsupportedError, match=r"'1.weight' belongs to LayerNorm '1'.*others='exact'"):
        funchess.kfac(f, others="error")(params, x, y)
    with pytest.raises(funchess.InvalidArgumentError, match=r"expected fisher_type to be 'type-2'"):
        funchess.kfac(f, fisher_type="ggn")  # type: ignore[arg-type]
    with pytest.raises(funchess.InvalidArgumentError, match=r"mc_samples=1 unless fisher_type='mc'"):
        funchess.kfac(f, mc_samples=3)
    with pytest.raises(funchess.InvalidArgumentError, match=r"reduction='sum' contradicts the loss"):
        funchess.kfac(f, fisher_type="empirical", reduction="sum")(params, x, y)
    g, _ = funchess.functional(model, lambda z, t: ((z - t) ** 4).sum())
    with pytest.raises(funchess.UnsupportedError, match=r"fisher_type='mc' samples labels .* MSE and cross-entropy"):
        funchess.kfac(g, fisher_type="mc")(params, x, y)
    tied = CASES["tied"](torch.float32, "cpu")
    ft, pt = funchess.functional(tied.model, tied.loss_fn)
    with pytest.raises(funchess.UnsupportedError, match=r"'enc.weight' is shared by Embedding 'enc', Linear 'dec'"):
        funchess.kfac(ft)(pt, tied.inputs, tied.targets)
    bn = CASES["batchnorm_train"](torch.float32, "cpu")
    fb, pb = funchess.functional(bn.model, bn.loss_fn)
    with pytest.raises(funchess.UnsupportedError, match=r"BatchNorm1d '1' in train mode.*model.eval\(\)"):
        funchess.kfac(fb)(pb, bn.inputs, bn.targets)
    drop = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5))
    fd, pd = funchess.functional(drop, F.mse_loss)
    with pytest.raises(funchess.UnsupportedError, match=r"Dropout '1' \(p=0.5\) in train mode"):
        funchess.kfac(fd)(pd, x, y)
    K = funchess.kfac(f)(params, x, y)
    with pytest.raises(funchess.InvalidArgumentError, match=r"KFAC.block\('nope'\): expected one of the parameters"):
        K.block("nope")
    with pytest.raises(funchess.StructureError, match=r"KFAC.mv\(v\): expected a dict with the keys"):
        K.mv({"0.weight": torch.zeros(4, 3)})
    with pytest.raises(funchess.StructureError, match=r"KFAC \+ other: expected another funchess.KFAC"):
        K + funchess.kfac(f, others="exact")(dict(list(params.items())[:2]), x, y)
