"""deeplanczos: the curvature of deep-network losses, matrix-free and sharded.

The largest Hessian eigenvalues and eigenvectors of a loss averaged over a
whole dataset, by the power method and by Lanczos, from Hessian-vector
products alone, with parameters and vectors sharded over a device mesh.
"""

from deeplanczos._src.operator import HessianOperator
from deeplanczos._src.power import InitPowerMethodVector
from deeplanczos._src.power import PowerMethodIterate
from deeplanczos._src.sharding import infer_sharding
from deeplanczos._src.sharding import make_mesh

__version__ = "0.1.0"

__all__ = (
    "HessianOperator",
    "InitPowerMethodVector",
    "PowerMethodIterate",
    "infer_sharding",
    "make_mesh",
)
