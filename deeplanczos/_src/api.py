"""The loss-level convenience form of every method, in one place.

Every method takes a :class:`~deeplanczos.HessianOperator` first, as optax's
``power_iteration`` takes a matrix. :func:`takes_operator` lets the same
function also be called with ``(loss, params, batch_iterable, ...)`` and the
operator's keyword options, building the operator here and nowhere else.
"""

from collections.abc import Callable
import functools

from deeplanczos._src import operator as operator_lib

# The keyword options of HessianOperator that the loss-level form accepts.
OPERATOR_OPTIONS = ("batch_parser", "mesh", "shardings", "shardings_rule",
                    "data_axis", "subset", "loss_rng", "data_on_device",
                    "device_bytes", "curvature", "model_fn", "output_loss",
                    "accumulate", "precision", "linearize")


def build_operator(loss, params, batch_iterable, *, show_pbar=False,
                   **options) -> operator_lib.HessianOperator:
  """``HessianOperator(loss, params, batch_iterable, **options)``."""
  return operator_lib.HessianOperator(loss, params, batch_iterable,
                                      show_pbar=show_pbar, **options)


def takes_operator(method: Callable) -> Callable:
  """``method(op, *args, **kw)``, also callable as ``method(loss, params,
  batch_iterable, *args, **kw, **operator_options)``."""

  @functools.wraps(method)
  def dispatch(first, *args, **kwargs):
    options = {k: kwargs.pop(k) for k in OPERATOR_OPTIONS if k in kwargs}
    if isinstance(first, operator_lib.HessianOperator):
      if options:
        raise TypeError(
            f"{method.__name__} got an operator and the operator options "
            f"{sorted(options)}; build the operator with them instead.")
      return method(first, *args, **kwargs)
    if len(args) < 2:
      raise TypeError(
          f"{method.__name__} takes a HessianOperator, or a loss function "
          "followed by the parameters and the batches; got "
          f"{type(first).__name__} and {len(args)} more positional "
          "arguments.")
    params, batch_iterable, *rest = args
    op = build_operator(first, params, batch_iterable,
                        show_pbar=kwargs.get("show_pbar", False), **options)
    return method(op, *rest, **kwargs)

  return dispatch
