"""Shared fixtures: the case table (cases.py) x devices x dtypes, and Hypothesis settings."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

from cases import CASES, DEVICES, DTYPES, Case

settings.register_profile(
    "funchess",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("thorough", deadline=None, max_examples=300)
settings.load_profile("funchess")


@pytest.fixture(params=[(name, dev, dt) for name in CASES for dev in DEVICES for dt in DTYPES],
                ids=lambda p: f"{p[0]}-{p[1]}-{str(p[2]).replace('torch.', '')}")
def case(request: pytest.FixtureRequest) -> Case:
    name, device, dtype = request.param
    return CASES[name](dtype, device)


@pytest.fixture(params=[(name, dev) for name in CASES for dev in DEVICES], ids=lambda p: f"{p[0]}-{p[1]}")
def case64(request: pytest.FixtureRequest) -> Case:
    name, device = request.param
    return CASES[name](torch.float64, device)


class ModelSnapshot:
    """Everything about a model funchess promises not to change."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = copy.deepcopy(model.state_dict())
        self.training = [m.training for m in model.modules()]
        self.requires_grad = [p.requires_grad for p in model.parameters()]
        self.grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    def assert_unchanged(self) -> None:
        now = self.model.state_dict()
        assert now.keys() == self.state.keys()
        for k, v in self.state.items():
            assert torch.equal(now[k], v), f"model state {k!r} changed"
        assert [m.training for m in self.model.modules()] == self.training
        assert [p.requires_grad for p in self.model.parameters()] == self.requires_grad
        for p, g in zip(self.model.parameters(), self.grads):
            assert (p.grad is None) if g is None else (p.grad is not None and torch.equal(p.grad, g)), "a .grad was written"


@pytest.fixture
def snapshot() -> Iterator[type[ModelSnapshot]]:
    yield ModelSnapshot


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread for the test: sequential HVPs on tiny models with two OpenMP threads on
    a busy 2-core machine were ~50x slower (spinning threads descheduled). Opt in per module with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
