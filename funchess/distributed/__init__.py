"""funchess on torch.distributed: data-set curvature over every rank's shard, one Hessian computed
block by block on many ranks, and operators whose products all-reduce.

A public submodule, imported on its own (`import funchess.distributed`); `import funchess` does
not import it. Everything runs in the caller's process group (`group=None`: the default group),
with `torch.distributed`'s own collectives (gloo on CPUs, NCCL on CUDA tensors), each under the
group's timeout. Without an initialised process group every function runs as one process and
equals its single-process counterpart.

- Data-parallel: `dataset_hessian`, `dataset_hvp`, `dataset_ggn`, `dataset_ggn_vp`,
  `dataset_grad`: each rank passes the loader of its own shard; every rank gets the curvature of
  the whole data set (the mean over all samples of all ranks, shards of any sizes).
- `dataset_operator`: the same as a `funchess.LinearOperator`, so `funchess.eigsh`,
  `trace_estimate`, `spectral_density` and `cg` run distributed unchanged.
- `sharded_hessian`: one full Hessian whose blocks are split across ranks by cost, gathered to
  every rank, to rank 0, or kept sharded (`ShardedHessian`).

On entry the ranks check that they made the same call (options, parameter names, shapes, dtypes
and values) and raise a `funchess.StructureError` on every rank if not, instead of waiting
forever; a padding `DistributedSampler` is refused; a model wrapped in
`DistributedDataParallel` is unwrapped. See docs/distributed.md.

Example:
    >>> import torch, funchess, funchess.distributed
    >>> f, params = funchess.functional(torch.nn.Linear(3, 1), torch.nn.functional.mse_loss)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> H = funchess.distributed.dataset_hessian(f)(params, [(x[:5], y[:5]), (x[5:], y[5:])])
    >>> funchess.to_matrix(H).shape
    torch.Size([4, 4])
"""

from ._data import dataset_ggn as dataset_ggn
from ._data import dataset_ggn_vp as dataset_ggn_vp
from ._data import dataset_grad as dataset_grad
from ._data import dataset_hessian as dataset_hessian
from ._data import dataset_hvp as dataset_hvp
from ._group import DistributedError as DistributedError
from ._operator import dataset_operator as dataset_operator
from ._sharded import ShardedHessian as ShardedHessian
from ._sharded import sharded_hessian as sharded_hessian

__all__ = [
    "DistributedError",
    "ShardedHessian",
    "dataset_ggn",
    "dataset_ggn_vp",
    "dataset_grad",
    "dataset_hessian",
    "dataset_hvp",
    "dataset_operator",
    "sharded_hessian",
]
