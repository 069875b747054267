"""Exact diagonals and factors of the Hessian and the GGN, per batch and per sample, for any model.

Two routes, chosen per call and always exact:

- the *module-aware sweep* (`_chain`): for `funchess.functional(model, loss_fn)` with `model` an
  `nn.Sequential` of modules with rules, one recorded forward, then one backward sweep that carries
  a factorisation of the loss Hessian w.r.t. the output (`_losses`: `H_n = S_n diag(w_n) S_nᵀ`,
  closed forms for cross-entropy, MSE and BCE), plus, for the Hessian, the second-order terms of
  the nonlinear modules (`_rules_nonlinear`), and reads each parameter's diagonal from its
  module's rule (`_rules_linear`, `_step`). This is BackPACK's approach, extended: curvature is
  held as columns, a diagonal, or a dense matrix, whichever is smallest (`_curvature`), and norms,
  softmax and embeddings have rules.
- the *generic* route (`_generic`, and `funchess.hessian_diagonal`'s block engine for the
  Hessian): per-sample vector-Jacobian products of each column, `vmap`ped over samples and
  columns, for any other model (attention, recurrent layers, custom modules, plain functions).

`_route` chooses; `_api` and `_factor` are the public functions.
"""

from ._api import ggn_diagonal as ggn_diagonal
from ._api import per_sample_ggn_diagonal as per_sample_ggn_diagonal
from ._api import per_sample_hessian_diagonal as per_sample_hessian_diagonal
from ._factor import GGNFactor as GGNFactor
from ._factor import per_sample_ggn_factor as per_sample_ggn_factor
from ._route import structured_hessian_diagonal as structured_hessian_diagonal

__all__ = [
    "GGNFactor",
    "ggn_diagonal",
    "per_sample_ggn_diagonal",
    "per_sample_ggn_factor",
    "per_sample_hessian_diagonal",
    "structured_hessian_diagonal",
]
