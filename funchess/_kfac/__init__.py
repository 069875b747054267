"""K-FAC (`funchess.kfac`): Kronecker factors of the GGN, the Fisher or the empirical Fisher
per Linear / Conv2d layer, exact blocks for the parameters of other modules.

`_api` is the function (conventions in its docstring), `_layers` the recorded forward and the
factors' pieces, `_result` the `KFAC` it returns.
"""

from ._api import kfac as kfac
from ._result import KFAC as KFAC
from ._result import KFACLayer as KFACLayer

__all__ = ["KFAC", "KFACLayer", "kfac"]
