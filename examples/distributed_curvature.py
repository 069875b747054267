"""Curvature past one process: data-parallel data-set curvature, distributed Lanczos, and one
Hessian computed block by block on several ranks, with `funchess.distributed` on
`torch.distributed`.

Each rank holds its own shard of the data (every world_size-th sample, so shards differ by at
most one sample; no `DistributedSampler` padding), the same model and the same parameters. Every
rank gets the same answers, equal to what one process gets on the whole data set, which the
script checks (against the dense data-set Hessian) and exits non-zero when a check fails.
Launched without torchrun, it runs as one process: every function then is its single-process
counterpart.

Run: torchrun --standalone --nproc_per_node=2 examples/distributed_curvature.py [--quick]
(2 CPU processes, gloo; NCCL when every rank has a GPU), or as one process:
python examples/distributed_curvature.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

import funchess
import funchess.distributed as fd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller data set")
    args = parser.parse_args()

    launched = "RANK" in os.environ  # by torchrun: join the group; otherwise one process
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = launched and torch.cuda.is_available() and torch.cuda.device_count() >= world
    if launched:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if launched else 0
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    # The same model, parameters and data set on every rank (seeded); each rank keeps its shard.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)
    n = 128 if args.quick else 3000
    x, y = torch.randn(n, 10), torch.randint(0, 3, (n,))
    shard = Subset(TensorDataset(x, y), range(rank, n, world))  # unequal shards are weighted exactly
    loader = DataLoader(shard, batch_size=64)
    f, params = funchess.functional(model, F.cross_entropy)
    N = sum(p.numel() for p in params.values())

    # 1. The data-set Hessian and gradient over all ranks' shards: one all-reduce each.
    start = time.perf_counter()
    H = fd.dataset_hessian(f)(params, loader)
    g = fd.dataset_grad(f)(params, loader)
    t_hessian = time.perf_counter() - start

    # 2. A matrix-free operator whose products all-reduce: the spectral tools run unchanged.
    #    Random vectors must be drawn the same on every rank: pass a seeded generator.
    op = fd.dataset_operator(f, params, loader)
    start = time.perf_counter()
    eig = funchess.eigsh(op, k=3, generator=torch.Generator().manual_seed(0))
    trace = funchess.trace_estimate(op, 30, generator=torch.Generator().manual_seed(1))
    ggn = fd.dataset_operator(f, params, loader, curvature="ggn")  # positive semi-definite
    step = funchess.cg(ggn, g, damping=1e-2, rtol=1e-6)  # a damped Gauss-Newton step
    t_spectral = time.perf_counter() - start

    # 3. One Hessian of one batch, its blocks computed on different ranks, gathered to rank 0.
    xb, yb = x[:64].to(device), y[:64].to(device)
    Hb = fd.sharded_hessian(f, gather="rank0")(params, xb, yb)

    answers = (eig.eigenvalues.tolist(), float(trace.value), funchess.ravel(step.solution).sum().item())
    every = [answers]
    if launched:
        every = [None] * world
        dist.all_gather_object(every, answers)
    if rank == 0:
        dense = funchess.to_matrix(H).double()
        exact = torch.linalg.eigvalsh(dense).flip(0)[:3]
        print(f"{world} rank(s), {n} samples ({len(shard)} on rank 0), {N} parameters, on {device}")
        print(f"data-set Hessian + gradient: {t_hessian:.2f} s; |grad| = {funchess.ravel(g).norm():.4f}")
        print(f"top eigenvalues (Lanczos, {eig.num_hvps} products): {[round(v, 6) for v in eig.eigenvalues.tolist()]}")
        print(f"                (dense data-set Hessian):  {[round(v, 6) for v in exact.tolist()]}")
        print(f"trace (Hutch++, 30 products): {float(trace.value):.4f}; exact {float(dense.trace()):.4f}")
        print(f"CG Gauss-Newton step: {step.num_iter} iterations, converged={step.converged}; spectral tools {t_spectral:.2f} s")
        assert Hb is not None
        whole = funchess.to_matrix(funchess.hessian(f)(params, xb, yb))
        print(f"sharded one-batch Hessian gathered on rank 0: {tuple(funchess.to_matrix(Hb).shape)}")
        same = all(a == every[0] for a in every)
        print(f"same on every rank: {same}")
        # the checks: Lanczos against the dense data-set Hessian, the sharded Hessian against one
        # process's, CG converged, and one answer on every rank
        assert torch.allclose(eig.eigenvalues.double(), exact, rtol=1e-3, atol=1e-5), "Lanczos disagrees"
        assert torch.allclose(funchess.to_matrix(Hb), whole, rtol=1e-4, atol=1e-6), "the sharded Hessian differs"
        assert step.converged and same, "CG did not converge, or the ranks disagree"
    if launched:
        dist.barrier()  # every rank tears gloo down together: a rank leaving early can abort a peer's
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
