"""funchess: Hessians of PyTorch models, fast, chunked, structured and verified.

Turn a module plus a loss into a pure function of a parameter dict (`functional`), then take
`hessian`, `hvp`/`vhp`, `jacrev`/`jacfwd` of it. Hessians are pytrees of blocks
(`H[a][b].shape == params[a].shape + params[b].shape`) that convert to and from one dense matrix
(`to_matrix`, `from_matrix`). `funchess.testing` holds the reference oracle.

Example:
    >>> import torch, funchess
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> f, params = funchess.functional(model, torch.nn.functional.cross_entropy)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> H = funchess.hessian(f)(params, x, y)
    >>> funchess.to_matrix(H).shape
    torch.Size([67, 67])
"""

from . import testing as testing
from ._curvature_operators import DatasetOperator as DatasetOperator
from ._curvature_operators import GGNOperator as GGNOperator
from ._curvature_operators import HessianOperator as HessianOperator
from ._dataset import dataset_ggn as dataset_ggn
from ._dataset import dataset_ggn_vp as dataset_ggn_vp
from ._dataset import dataset_hessian as dataset_hessian
from ._dataset import dataset_hvp as dataset_hvp
from ._diagonal import GGNFactor as GGNFactor
from ._diagonal import ggn_diagonal as ggn_diagonal
from ._diagonal import per_sample_ggn_diagonal as per_sample_ggn_diagonal
from ._diagonal import per_sample_ggn_factor as per_sample_ggn_factor
from ._diagonal import per_sample_hessian_diagonal as per_sample_hessian_diagonal
from ._eigen import EigenResult as EigenResult
from ._eigen import SpectralDensity as SpectralDensity
from ._eigen import eigsh as eigsh
from ._eigen import spectral_density as spectral_density
from ._errors import ConvergenceWarning as ConvergenceWarning
from ._errors import FunchessError as FunchessError
from ._errors import InvalidArgumentError as InvalidArgumentError
from ._errors import MemoryBudgetError as MemoryBudgetError
from ._errors import OutputError as OutputError
from ._errors import StructureError as StructureError
from ._errors import UnsupportedError as UnsupportedError
from ._estimators import DiagonalEstimate as DiagonalEstimate
from ._estimators import TraceEstimate as TraceEstimate
from ._estimators import diagonal_estimate as diagonal_estimate
from ._estimators import hutchinson_trace as hutchinson_trace
from ._estimators import hutchpp_trace as hutchpp_trace
from ._estimators import trace_estimate as trace_estimate
from ._functional import ModuleFunction as ModuleFunction
from ._functional import functional as functional
from ._ggn import empirical_fisher as empirical_fisher
from ._ggn import ggn as ggn
from ._ggn import ggn_vp as ggn_vp
from ._ggn import per_sample_ggn as per_sample_ggn
from ._hessian import hessian as hessian
from ._hessian import hessian_diagonal as hessian_diagonal
from ._hessian import plan_hessian as plan_hessian
from ._hvp import hvp as hvp
from ._hvp import vhp as vhp
from ._jacobian import jacfwd as jacfwd
from ._jacobian import jacrev as jacrev
from ._kfac import KFAC as KFAC
from ._kfac import KFACLayer as KFACLayer
from ._kfac import kfac as kfac
from ._memory import MemoryPlan as MemoryPlan
from ._operator import DenseOperator as DenseOperator
from ._operator import FunctionOperator as FunctionOperator
from ._operator import LinearOperator as LinearOperator
from ._operator import diagonal as diagonal
from ._operator import trace as trace
from ._per_sample import per_sample_grad as per_sample_grad
from ._per_sample import per_sample_hessian as per_sample_hessian
from ._per_sample import per_sample_hvp as per_sample_hvp
from ._solve import SolveResult as SolveResult
from ._solve import cg as cg
from ._tree import from_matrix as from_matrix
from ._tree import ravel as ravel
from ._tree import to_matrix as to_matrix
from ._tree import unravel as unravel

__version__ = "0.2.0"

__all__ = [
    "FunchessError",
    "InvalidArgumentError",
    "MemoryBudgetError",
    "MemoryPlan",
    "ModuleFunction",
    "OutputError",
    "StructureError",
    "UnsupportedError",
    "from_matrix",
    "functional",
    "hessian",
    "hessian_diagonal",
    "hvp",
    "jacfwd",
    "jacrev",
    "plan_hessian",
    "ravel",
    "testing",
    "to_matrix",
    "unravel",
    "vhp",
    # matrix-free operators and spectral tools
    "ConvergenceWarning",
    "DatasetOperator",
    "DenseOperator",
    "DiagonalEstimate",
    "EigenResult",
    "FunctionOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "SolveResult",
    "SpectralDensity",
    "TraceEstimate",
    "cg",
    "diagonal",
    "diagonal_estimate",
    "eigsh",
    "hutchinson_trace",
    "hutchpp_trace",
    "spectral_density",
    "trace",
    "trace_estimate",
    # per-sample and data-set curvature, GGN and Fisher
    "per_sample_grad",
    "per_sample_hessian",
    "per_sample_hvp",
    "per_sample_ggn",
    "per_sample_ggn_factor",
    "GGNFactor",
    # exact diagonals (module-aware where the model is a chain of known modules)
    "ggn_diagonal",
    "per_sample_ggn_diagonal",
    "per_sample_hessian_diagonal",
    "dataset_hessian",
    "dataset_hvp",
    "dataset_ggn",
    "dataset_ggn_vp",
    "ggn",
    "ggn_vp",
    "empirical_fisher",
    # Kronecker-factored curvature
    "KFAC",
    "KFACLayer",
    "kfac",
]
