"""Built-in models and synthetic data for the command line (`demo` and `bench`).

Everything here is generated in code from a seed: no downloads, no files. A `Problem` bundles a
model, a loss and one batch of data; `PROBLEMS` is the registry the benchmark runs and `DEMOS` the
models the demo offers. A new problem is one entry in `PROBLEMS`.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import funchess

__all__ = ["Problem", "PROBLEMS", "DEMOS", "DTYPES", "make_problem", "mlp", "cnn", "transformer"]

#: The floating-point types the command line accepts, by name.
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Problem:
    """A model, a loss and one batch of synthetic data: the loss `f(params)` whose Hessian we take.

    Attributes:
        name: registry name, e.g. "mlp-8k".
        family: "mlp", "cnn" or "transformer"; problems of one family share code paths (the
            benchmark warms each method up on the family's smallest problem).
        description: one line for tables, e.g. "MLP 50-64-64-10, tanh, cross-entropy, batch 128".
        model, loss_fn, inputs, targets: `loss_fn(model(inputs), targets)` is the loss.
        extra: family-specific settings (kept for `to`).
    """

    name: str
    family: str
    description: str
    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    inputs: Tensor
    targets: Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    def function(self) -> tuple[funchess.ModuleFunction, dict[str, Tensor]]:
        """`funchess.functional(model, loss_fn)`: the pure loss and its parameter dict."""
        return funchess.functional(self.model, self.loss_fn)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def dtype(self) -> torch.dtype:
        first: Tensor = next(self.model.parameters())
        return first.dtype

    @property
    def device(self) -> torch.device:
        first: Tensor = next(self.model.parameters())
        return first.device

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Problem:
        """A copy with the model and the floating-point data moved/cast (targets keep their dtype)."""
        model = copy.deepcopy(self.model).to(dtype=dtype, device=device)
        inputs = self.inputs.to(device=device, dtype=dtype if self.inputs.is_floating_point() else None)
        targets = self.targets.to(device=device, dtype=dtype if self.targets.is_floating_point() else None)
        return replace(self, model=model, inputs=inputs, targets=targets)

    def sample(self, i: int) -> Problem:
        """The problem restricted to sample `i` (a batch of one): its loss is the per-sample loss."""
        return replace(self, inputs=self.inputs[i : i + 1], targets=self.targets[i : i + 1])


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic initialisation independent of torch's global RNG (and of the module order)."""
    gen = _generator(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model


# ----------------------------------------------------------------------------- MLP


def _mlp_module(widths: tuple[int, ...], act: type[nn.Module]) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        last = i == len(widths) - 2
        layers["out" if last else f"fc{i + 1}"] = nn.Linear(a, b)
        if not last:
            layers[f"act{i + 1}"] = act()
    return nn.Sequential(layers)


def mlp(
    widths: tuple[int, ...] = (4, 24, 24, 3),
    *,
    batch: int = 512,
    loss: str = "cross_entropy",
    seed: int = 0,
    name: str = "mlp",
) -> Problem:
    """A tanh MLP on data labelled by a random "teacher" MLP of the same shape.

    With `loss="cross_entropy"` the targets are classes drawn from the teacher's softmax; with "mse"
    they are the teacher's outputs plus noise.
    """
    model = _init(_mlp_module(widths, nn.Tanh), seed)
    teacher = _init(_mlp_module(widths, nn.Tanh), seed + 1000)
    gen = _generator(seed + 1)
    x = torch.randn(batch, widths[0], generator=gen)
    with torch.no_grad():
        out = 2.0 * teacher(x)
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    if loss == "cross_entropy":  # labels drawn from the teacher's softmax: noisy, so a minimum exists
        y = torch.multinomial(out.softmax(1), 1, generator=gen).squeeze(1)
        loss_fn, lname = F.cross_entropy, "cross-entropy"
    else:
        y, loss_fn, lname = out + 0.1 * torch.randn(out.shape, generator=gen), F.mse_loss, "MSE"
    desc = f"MLP {'-'.join(map(str, widths))}, tanh, {lname}, batch {batch}"
    return Problem(name, "mlp", desc, model, loss_fn, x, y, {"widths": widths})


# ----------------------------------------------------------------------------- CNN


def _conv_net(channels: tuple[int, int, int], size: int, classes: int) -> nn.Sequential:
    """conv 3x3 -> tanh -> conv 3x3 -> tanh -> 2x2 average pool -> linear, all as modules (so that
    layer-whitelist tools such as BackPACK can run on it too)."""
    c0, c1, c2 = channels
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(c0, c1, 3)),
        ("act1", nn.Tanh()),
        ("conv2", nn.Conv2d(c1, c2, 3)),
        ("act2", nn.Tanh()),
        ("pool", nn.AvgPool2d(2)),
        ("flatten", nn.Flatten()),
        ("out", nn.Linear(c2 * ((size - 4) // 2) ** 2, classes)),
    ]))


def _noisy_labels(y: Tensor, classes: int, gen: torch.Generator, rate: float = 0.1) -> Tensor:
    """Replace a fraction `rate` of the labels by random ones (so the loss has a finite minimum)."""
    flip = torch.rand(y.shape, generator=gen) < rate
    return torch.where(flip, torch.randint(0, classes, y.shape, generator=gen), y)


def _gratings(n: int, channels: int, size: int, classes: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Noisy sinusoidal gratings; the class is the orientation (one of `classes` angles)."""
    y = torch.randint(0, classes, (n,), generator=gen)
    angle = y.double() * math.pi / classes
    phase = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    grid = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    u = grid.view(1, 1, -1) * angle.cos().view(-1, 1, 1) + grid.view(1, -1, 1) * angle.sin().view(-1, 1, 1)
    img = torch.sin(2 * math.pi * u / 4.0 + phase.view(-1, 1, 1))
    x = img.unsqueeze(1).expand(n, channels, size, size) + 0.5 * torch.randn(
        n, channels, size, size, generator=gen, dtype=torch.float64
    )
    return x.float(), _noisy_labels(y, classes, gen)


def cnn(
    channels: tuple[int, int, int] = (1, 6, 8),
    *,
    size: int = 12,
    classes: int = 4,
    batch: int = 256,
    seed: int = 0,
    name: str = "cnn",
) -> Problem:
    """A two-layer conv net classifying the orientation of noisy gratings."""
    model = _init(_conv_net(channels, size, classes), seed)
    x, y = _gratings(batch, channels[0], size, classes, _generator(seed + 1))
    desc = f"CNN {channels[0]}x{size}x{size} -> conv{channels[1]} -> conv{channels[2]} -> {classes}, tanh, cross-entropy, batch {batch}"
    return Problem(name, "cnn", desc, model, F.cross_entropy, x, y, {"channels": channels})


# ----------------------------------------------------------------------------- transformer


class TransformerBlock(nn.Module):  # type: ignore[misc]
    """A pre-LayerNorm transformer block (self-attention + GELU MLP) with a mean-pooled linear head.

    `fused_attention=False` asks `nn.MultiheadAttention` for its weights, which takes its explicit
    softmax path; `True` is what `nn.TransformerEncoderLayer` does, which on current torch runs a
    fused scaled-dot-product-attention kernel without double backward.
    """

    def __init__(self, dim: int, heads: int, hidden: int, classes: int, fused_attention: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, hidden)
        self.ff2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)
        self.fused_attention = fused_attention

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=not self.fused_attention)[0]
        x = x + self.ff2(F.gelu(self.ff1(self.norm2(x))))
        out: Tensor = self.head(x.mean(1))
        return out


def transformer(
    dim: int = 8,
    heads: int = 2,
    hidden: int = 16,
    *,
    seq: int = 6,
    classes: int = 3,
    batch: int = 256,
    fused_attention: bool = False,
    seed: int = 0,
    name: str = "transformer",
) -> Problem:
    """A transformer block classifying sequences by which of `classes` hidden directions the
    tokens align with most strongly (a task attention can solve)."""
    model = _init(TransformerBlock(dim, heads, hidden, classes, fused_attention), seed)
    gen = _generator(seed + 1)
    keys = torch.randn(classes, dim, generator=gen)
    x = torch.randn(batch, seq, dim, generator=gen)
    y = _noisy_labels(torch.einsum("btd,kd->bkt", x, keys).amax(2).argmax(1), classes, gen)
    attn = "fused attention" if fused_attention else "softmax attention"
    desc = f"Transformer block d={dim}, {heads} heads, MLP {hidden}, {attn}, seq {seq}, cross-entropy, batch {batch}"
    return Problem(name, "transformer", desc, model, F.cross_entropy, x, y, {"fused": fused_attention})


# ----------------------------------------------------------------------------- registries

#: The benchmark's problems by name: zero-argument factories (deterministic).
PROBLEMS: dict[str, Callable[[], Problem]] = {
    "mlp-tiny": lambda: mlp((6, 8, 3), batch=16, name="mlp-tiny"),
    "mlp-500": lambda: mlp((10, 16, 16, 3), batch=32, name="mlp-500"),
    "mlp-2k": lambda: mlp((20, 32, 32, 5), batch=64, loss="mse", name="mlp-2k"),
    "mlp-8k": lambda: mlp((50, 64, 64, 10), batch=128, name="mlp-8k"),
    "mlp-20k": lambda: mlp((60, 120, 96, 10), batch=128, name="mlp-20k"),
    "mlp-50k": lambda: mlp((100, 180, 160, 10), batch=128, name="mlp-50k"),
    "cnn-tiny": lambda: cnn((1, 2, 2), size=8, classes=2, batch=8, name="cnn-tiny"),
    "cnn-2k": lambda: cnn((3, 6, 8), size=12, classes=10, batch=64, name="cnn-2k"),
    "cnn-5k": lambda: cnn((3, 8, 16), size=14, classes=10, batch=64, name="cnn-5k"),
    "transformer-tiny": lambda: transformer(4, 2, 8, seq=3, classes=2, batch=8, name="transformer-tiny"),
    "transformer-2k": lambda: transformer(16, 2, 32, seq=8, classes=10, batch=64, name="transformer-2k"),
    "transformer-9k": lambda: transformer(32, 4, 64, seq=8, classes=10, batch=64, name="transformer-9k"),
    "transformer-fused-2k": lambda: transformer(
        16, 2, 32, seq=8, classes=10, batch=64, fused_attention=True, name="transformer-fused-2k"
    ),
}

#: The smallest problem of each family (the benchmark's warm-up).
TINY: dict[str, str] = {"mlp": "mlp-tiny", "cnn": "cnn-tiny", "transformer": "transformer-tiny"}

#: The demo's models: a few hundred to a thousand parameters, so the dense Hessian is quick.
DEMOS: dict[str, Callable[[int], Problem]] = {
    "mlp": lambda seed: mlp((4, 24, 24, 3), batch=512, seed=seed, name="mlp"),
    "cnn": lambda seed: cnn((1, 6, 8), size=10, classes=4, batch=128, seed=seed, name="cnn"),
    "transformer": lambda seed: transformer(8, 2, 16, seq=6, classes=3, batch=128, seed=seed, name="transformer"),
}


def make_problem(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Problem:
    """Build a registered benchmark problem in `dtype` on `device`."""
    return PROBLEMS[name]().to(dtype=dtype, device=device)
