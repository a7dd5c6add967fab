"""deeplanczos: the curvature of deep-network losses, matrix-free and sharded.

The largest Hessian eigenvalues and eigenvectors of a loss averaged over a
whole dataset, by the power method and by Lanczos, from Hessian-vector
products alone, with parameters and vectors sharded over a device mesh.

Every method takes a :class:`HessianOperator` first (``lanczos(op, k)``), or
the loss, parameters and batches with the operator's options
(``lanczos(loss, params, data, k, mesh=...)``).
"""

from deeplanczos._src.checks import OperatorCheck
from deeplanczos._src.checks import check_operator
from deeplanczos._src.density import DensityResult
from deeplanczos._src.density import spectral_density
from deeplanczos._src.lanczos import ConvergenceWarning
from deeplanczos._src.lanczos import Decomposition
from deeplanczos._src.lanczos import LanczosResult
from deeplanczos._src.lanczos import lanczos
from deeplanczos._src.lanczos import tridiagonalize
from deeplanczos._src.operator import HessianOperator
from deeplanczos._src.plan import Plan
from deeplanczos._src.plan import plan
from deeplanczos._src.plan import probes_per_call
from deeplanczos._src.plan import topology_mesh
from deeplanczos._src.power import InitPowerMethodVector
from deeplanczos._src.power import PowerMethodIterate
from deeplanczos._src.power import PowerResult
from deeplanczos._src.power import power_iteration
from deeplanczos._src.power import top_eigenvalue
from deeplanczos._src.restore import checkpoint_steps
from deeplanczos._src.restore import restore_params
from deeplanczos._src.sharding import infer_sharding
from deeplanczos._src.sharding import from_metadata as sharding_from_metadata
from deeplanczos._src.sharding import make_mesh
from deeplanczos._src.sharding import split_over_all_devices
from deeplanczos._src.subset import path_str
from deeplanczos._src.trace import TraceResult
from deeplanczos._src.trace import hutchinson
from deeplanczos._src.trace import hutchpp
from deeplanczos.eigenvectors import load_eigenvectors
from deeplanczos.eigenvectors import save_eigenvectors

__version__ = "0.2.0"

__all__ = (
    "ConvergenceWarning",
    "Decomposition",
    "DensityResult",
    "HessianOperator",
    "InitPowerMethodVector",
    "LanczosResult",
    "OperatorCheck",
    "Plan",
    "PowerMethodIterate",
    "PowerResult",
    "TraceResult",
    "check_operator",
    "checkpoint_steps",
    "hutchinson",
    "hutchpp",
    "infer_sharding",
    "lanczos",
    "load_eigenvectors",
    "make_mesh",
    "path_str",
    "plan",
    "power_iteration",
    "probes_per_call",
    "restore_params",
    "save_eigenvectors",
    "sharding_from_metadata",
    "split_over_all_devices",
    "spectral_density",
    "top_eigenvalue",
    "topology_mesh",
    "tridiagonalize",
)
