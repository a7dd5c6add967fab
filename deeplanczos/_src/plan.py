"""A dry run: what a method needs per device, compiled but never run.

:func:`plan` compiles the operator's Hessian-vector program for abstract
parameters and batches (``jax.ShapeDtypeStruct``), on any mesh, including one
built from a TPU topology on a machine without TPUs
(:func:`topology_mesh`), and reports per device the compiler's bytes,
flops and bytes accessed, the method's stored vectors, and a roofline time
per product. Nothing is allocated.
"""

from collections.abc import Callable
import math
import os
import re
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from deeplanczos._src import basis as basis_lib
from deeplanczos._src import hvp as hvp_lib
from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import subset as subset_lib
from deeplanczos._src import tree_math


class Chip(NamedTuple):
  """A device's dense bf16 peak, memory bandwidth and memory, per chip."""
  flops: float
  bandwidth: float  # bytes per second
  memory: float  # bytes


# Published per-chip figures, by ``device.device_kind``.
CHIPS = {
    "TPU v4": Chip(275e12, 1.228e12, 32 * 2**30),
    "TPU v5 lite": Chip(197e12, 0.819e12, 16 * 2**30),
    "TPU v5": Chip(459e12, 2.765e12, 95 * 2**30),
    "TPU v5p": Chip(459e12, 2.765e12, 95 * 2**30),
    "TPU v6 lite": Chip(918e12, 1.640e12, 32 * 2**30),
    "NVIDIA H100 80GB HBM3": Chip(989e12, 3.35e12, 80e9),
    "NVIDIA H200": Chip(989e12, 4.8e12, 141e9),
}


class ProgramCost(NamedTuple):
  """One compiled program, per device.

  Attributes:
    name: what it computes.
    bytes: arguments + outputs + temporaries, less donated (aliased) bytes:
      the memory the program needs while it runs.
    argument_bytes, output_bytes, temp_bytes: the compiler's split of it.
    flops: floating-point operations (the compiler's cost analysis).
    bytes_accessed: memory traffic (the compiler's cost analysis).
    collectives: ``{kind: (in_loops, outside)}``, see :func:`collectives`.
  """
  name: str
  bytes: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  flops: float
  bytes_accessed: float
  collectives: dict


class Plan(NamedTuple):
  """What a method costs per device, from the compiler.

  Attributes:
    device_kind: the devices' kind (``'TPU v5 lite'``, ``'cpu'``).
    mesh: the mesh's axis sizes.
    num_params: parameters the operator acts on.
    accumulate: the HVP's accumulation layout (see ``HessianOperator``).
    programs: the compiled programs.
    state: ``{name: bytes per device}`` of the vectors the method keeps
      between products (parameters, the Krylov basis, probes).
    peak_bytes: the parameters and the method's vectors, plus the largest
      program's temporaries: the most one device holds at once.
    device_memory: the device's memory where known (``CHIPS``), else None.
    seconds_per_hvp: the roofline time of one product over the whole
      dataset, ``max(flops / peak, bytes / bandwidth)`` per batch times the
      batches, where the chip is known; else None.
  """
  device_kind: str
  mesh: dict
  num_params: int
  accumulate: str
  programs: tuple[ProgramCost, ...]
  state: dict
  peak_bytes: int
  device_memory: float | None
  seconds_per_hvp: float | None

  def fits(self) -> bool | None:
    """Whether ``peak_bytes`` fits the device's memory (None: unknown)."""
    if self.device_memory is None:
      return None
    return self.peak_bytes <= self.device_memory

  def table(self) -> str:
    """The plan as a Markdown table, one row per program and stored state."""
    rows = [f"Dry run on {self.device_kind}, mesh {self.mesh}, "
            f"{self.num_params:,} parameters, accumulate="
            f"{self.accumulate!r}", "",
            "| per device | memory | GFLOP | GB accessed |",
            "|---|---|---|---|"]
    for p in self.programs:
      rows.append(f"| program: {p.name} | {human_bytes(p.bytes)} | "
                  f"{p.flops / 1e9:.2f} | {p.bytes_accessed / 1e9:.3f} |")
    for name, b in self.state.items():
      rows.append(f"| stored: {name} | {human_bytes(b)} | | |")
    rows.append(f"| **peak** | **{human_bytes(self.peak_bytes)}** | | |")
    if self.device_memory is not None:
      margin = self.device_memory - self.peak_bytes
      rows.append("")
      rows.append(f"Device memory {human_bytes(self.device_memory)}: "
                  f"{'fits' if margin >= 0 else 'does NOT fit'}, margin "
                  f"{human_bytes(margin)}.")
    if self.seconds_per_hvp is not None:
      rows.append(f"Roofline time per Hessian-vector product over the "
                  f"dataset: {self.seconds_per_hvp:.4g} s.")
    return "\n".join(rows)


def human_bytes(b: float) -> str:
  """``b`` bytes in KiB, MiB or GiB."""
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(b) >= size:
      return f"{b / size:.2f} {unit}"
  return f"{b:.0f} B"


def topology_mesh(topology: str, axes=(("data", -1), ("model", 1))) -> Mesh:
  """A mesh on a TPU topology's devices, for compiling without TPUs.

  Needs the ``libtpu`` wheel matching the installed jax (``pip install
  "jax[tpu]"``); only compiling works on these devices, not running.

  Args:
    topology: a TPU slice, e.g. ``'v5e:8x8'``, ``'v5p:4x8x8'``.
    axes: the mesh's axis names and sizes, as for ``make_mesh``.
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    devices = topologies.get_topology_desc(topology, platform="tpu").devices
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"Cannot describe TPU topology {topology!r} ({type(e).__name__}: "
        f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); "
        "give one like 'v5e:8x8' or 'v5p:4x8x8', with the libtpu wheel "
        "matching jax installed (pip install 'jax[tpu]').") from e
  return sharding_lib.make_mesh(axes, devices)


def _abstract(tree, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a),
                                        sharding=s), tree, shardings)


def program_cost(name: str, compiled) -> ProgramCost:
  """A compiled program's (``jit(...).lower(...).compile()``) costs."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
           memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return ProgramCost(name, int(total), int(memory.argument_size_in_bytes),
                     int(memory.output_size_in_bytes),
                     int(memory.temp_size_in_bytes),
                     float(cost.get("flops", 0.0)),
                     float(cost.get("bytes accessed", 0.0)),
                     collectives(compiled.as_text()))


def shard_bytes(tree, shardings) -> int:
  """Bytes of ``tree`` that one device holds under ``shardings`` (the most)."""
  total = 0
  for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = s.shard_shape(np.shape(a))
    total += math.prod(shape) * jnp.dtype(jnp.result_type(a)).itemsize
  return total


def free_device_bytes() -> int:
  """Bytes one local device has free: its allocator's limit less what is in
  use on accelerators; on CPU, the host's available memory over its
  devices."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  return int(available // jax.local_device_count())


def probes_per_call(op, limit: int, *, basis_vectors: int = 0,
                    vectors: int = 3, fraction: float = 0.5) -> int:
  """How many probes one batched pass can take, by memory.

  The pass's bytes per device for 1 and 2 vectors come from the compiler
  (:meth:`HessianOperator.batched_pass_bytes`); each further probe costs
  their difference plus what a probe keeps between passes (``vectors``
  vectors on the vectors' shardings and a basis of ``basis_vectors`` split
  over every device). The count is the most that fit in ``fraction`` of
  :func:`free_device_bytes`, between 1 and ``limit``; 1 when the data is
  streamed (products are one pass each).

  Args:
    op: the operator.
    limit: at most this many (the probes there are).
    basis_vectors: vectors of a Krylov basis per probe (SLQ: steps + 1).
    vectors: other vectors per probe (probe, product, work vector).
    fraction: the share of the free memory to fill.
  """
  one = op.batched_pass_bytes(1)
  if one is None or limit <= 1:
    return 1
  slope = max(op.batched_pass_bytes(2) - one, 0)
  whole = sum(math.prod(t.shape) * jnp.dtype(t.dtype).itemsize
              for t in jax.tree.leaves(op.template))
  kept = (vectors * shard_bytes(op.template, op.shardings) +
          basis_vectors * whole // op.mesh.size)
  # P probes take one + (P - 1) * slope + P * kept.
  budget = fraction * free_device_bytes()
  fits = (budget - one + slope) // max(slope + kept, 1)
  return int(np.clip(fits, 1, limit))


def resolve_probes_per_call(op, value, limit: int, **state) -> int:
  """A method's ``probes_per_call``: a positive integer, or ``'auto'`` for
  :func:`probes_per_call` (``state``: its ``basis_vectors``, ``vectors``).

  Raises:
    ValueError: anything else.
  """
  if isinstance(value, str) and value == "auto":
    count = probes_per_call(op, limit, **state)
    logging.info("probes_per_call='auto': %d of %d probes a pass.", count,
                 limit)
    return count
  if not isinstance(value, (int, np.integer)) or isinstance(
      value, bool) or value < 1:
    raise ValueError("probes_per_call must be a positive integer or 'auto', "
                     f"got {value!r}.")
  return int(value)


METHODS = ("power", "lanczos", "density", "trace")


def method_state(method, template, shardings, *, ncv, num_probes,
                 basis_dtype):
  """The vectors ``method`` keeps between products, in bytes per device."""
  vec = shard_bytes(template, shardings)
  if method == "power":
    return {"power vectors (V, HV)": 2 * vec}
  if method in ("lanczos", "density"):
    size = ncv + 1
    dtype = basis_dtype or tree_math.accumulation_dtype(
        jnp.result_type(*jax.tree.leaves(template)))
    basis = jax.tree.map(lambda t: jax.ShapeDtypeStruct(
        (size, *np.shape(t)), dtype), template)
    per = shard_bytes(basis, sharding_lib.basis_shardings(
        template, shardings, size))
    state = {f"Krylov basis ({size} vectors, {jnp.dtype(dtype).name})": per,
             "working vectors (v, Hv)": 2 * vec}
    if method == "density":
      state = {f"{k}, x{num_probes} probes at a time": b * num_probes
               for k, b in state.items()}
    return state
  if method == "trace":
    return {f"probes and products ({num_probes} at a time)":
                2 * num_probes * vec}
  raise ValueError(f"method must be one of {METHODS}; got {method!r}.")


def plan(loss: Callable, params, batch, *, num_batches: int = 1,
         mesh: Mesh | None = None, shardings=None,
         shardings_rule: Callable = sharding_lib.infer_sharding,
         data_axis: str = "data", subset=None, method: str = "lanczos",
         ncv: int = 20, num_probes: int = 1, basis_dtype=None,
         curvature: str = "hessian", model_fn: Callable | None = None,
         output_loss: Callable | None = None, accumulate: str | None = None,
         uses_rng: bool = False, precision: str | None = "highest") -> Plan:
  """Compiles the Hessian-vector product for abstract inputs; runs nothing.

  The program compiled is the one ``HessianOperator`` runs for a streamed
  batch (the unit of a pass on a large model), with the same kernel, so its
  bytes per device are the run's.

  Args:
    loss: ``loss(params, x, y) -> scalar``, as for ``HessianOperator``.
    params: the parameters: arrays or ``jax.ShapeDtypeStruct`` (with or
      without flax partitioning metadata).
    batch: one global batch ``(x, y)``: arrays or ``jax.ShapeDtypeStruct``,
      the leading dimension the examples.
    num_batches: batches in one pass (for the time per product).
    mesh: the mesh, e.g. from :func:`topology_mesh`; by default one device.
    shardings, shardings_rule, data_axis, subset, curvature, model_fn,
      output_loss, accumulate, precision: as for ``HessianOperator``.
    method: ``'power'``, ``'lanczos'``, ``'density'`` or ``'trace'``: which
      vectors the method keeps.
    ncv: the Krylov basis size for ``'lanczos'`` and ``'density'``.
    num_probes: probes in one batched pass (``probes_per_call``) for
      ``'trace'`` and ``'density'``.
    basis_dtype: the Krylov basis's dtype (default: the parameters', at
      least float32, as ``lanczos`` stores it).
    uses_rng: the loss takes a fourth argument, a PRNG key.

  Returns:
    A :class:`Plan`; ``print(plan(...).table())`` shows it.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
  hvp_lib.check_precision(precision)
  loss, model_fn, output_loss = (hvp_lib.with_precision(f, precision)
                                 for f in (loss, model_fn, output_loss))
  if sharding_lib.has_metadata(params):
    if shardings is None and mesh is not None:
      shardings = sharding_lib.from_metadata(params, mesh,
                                             shardings_rule=shardings_rule)
    params = sharding_lib.unbox(params)
  if mesh is None:
    mesh = sharding_lib.make_mesh([(data_axis, 1)], jax.local_devices()[:1])
  if shardings is None:
    shardings = shardings_rule(params, mesh)
  template = subset_lib.select(params, subset)
  vector_shardings = subset_lib.take(template, shardings)
  treedef = jax.tree.structure(params)
  if accumulate is None:
    accumulate = hvp_lib.choose_accumulate(vector_shardings, mesh, data_axis)
  kernel = hvp_lib.Kernel(
      loss=loss, treedef=treedef,
      in_subset=tuple(t is not None for t in treedef.flatten_up_to(template)),
      param_shardings=tuple(treedef.flatten_up_to(shardings)), mesh=mesh,
      data_axis=data_axis, uses_rng=uses_rng, curvature=curvature,
      model_fn=model_fn, output_loss=output_loss, accumulate=accumulate)
  programs = hvp_lib.programs(kernel)
  weight_dtype = tree_math.accumulation_dtype(
      jnp.result_type(*jax.tree.leaves(template)))
  x, y = batch
  n = jax.tree.leaves(x)[0].shape[0]
  data = NamedSharding(mesh, P(data_axis))
  rep = NamedSharding(mesh, P())
  abstract_params = _abstract(params, shardings)
  v = _abstract(template, vector_shardings)
  x, y = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      np.shape(a), jnp.result_type(a), sharding=data), (x, y))
  w = jax.ShapeDtypeStruct((n,), weight_dtype, sharding=data)
  acc, stats = jax.eval_shape(
      lambda v: programs.start(v, weight_dtype=weight_dtype), v)
  acc_shardings, stats_shardings = programs.start.lower(
      v, weight_dtype=weight_dtype).compile().output_shardings
  acc = _abstract(acc, acc_shardings)
  stats = _abstract(stats, stats_shardings)
  index = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
  step = programs.batch_step.lower(abstract_params, v, acc, stats, index, x,
                                   y, w, key, padded=False).compile()
  costs = (program_cost("HVP of one batch, added to the pass's sums", step),)
  if method in ("lanczos", "density"):
    size = ncv + 1
    dtype = basis_dtype or tree_math.accumulation_dtype(
        jnp.result_type(*jax.tree.leaves(template)))
    basis = jax.tree.map(
        lambda t, s: jax.ShapeDtypeStruct((size, *np.shape(t)), dtype,
                                          sharding=s),
        template, sharding_lib.basis_shardings(template, vector_shardings,
                                               size))
    count = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    reorth = basis_lib.orthogonalize.lower(basis, v, count).compile()
    costs += (program_cost(f"reorthogonalize against the {size}-vector "
                           "basis", reorth),)
  state = {"parameters": shard_bytes(params, shardings),
           **method_state(method, template, vector_shardings, ncv=ncv,
                          num_probes=num_probes, basis_dtype=basis_dtype)}
  device = mesh.devices.flat[0]
  chip = CHIPS.get(device.device_kind)
  # The program's arguments are the parameters and vectors counted in state.
  peak = sum(state.values()) + max(c.temp_bytes + c.output_bytes
                                   for c in costs)
  seconds = None
  if chip is not None:
    seconds = num_batches * max(costs[0].flops / chip.flops,
                                costs[0].bytes_accessed / chip.bandwidth)
  return Plan(device_kind=device.device_kind, mesh=dict(mesh.shape),
              num_params=sum(math.prod(np.shape(t))
                             for t in jax.tree.leaves(template)),
              accumulate=accumulate, programs=costs, state=state,
              peak_bytes=int(peak),
              device_memory=None if chip is None else chip.memory,
              seconds_per_hvp=seconds)


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\s*$", re.M)
_CALLED = re.compile(
    r"(?:body|condition|calls|to_apply|true_computation|false_computation)="
    r"%?([\w.\-]+)|branch_computations=\{([^}]*)\}")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
               "collective-permute")


def collectives(hlo_text: str) -> dict:
  """Collectives of a compiled program, inside and outside its loops.

  Args:
    hlo_text: ``compiled.as_text()``.

  Returns:
    ``{kind: (in_loops, outside)}`` for each kind in ``COLLECTIVES``: how
    many such instructions lie in computations a ``while`` loop runs (its
    body and condition, and what they call) and how many elsewhere. A
    scanned model's layer loop is such a loop.
  """
  starts = [(m.start(), m.group(1)) for m in _COMPUTATION.finditer(hlo_text)]
  bodies = {}
  for (start, name), (end, _) in zip(starts, starts[1:] + [(len(hlo_text),
                                                            None)]):
    bodies[name] = hlo_text[start:end]

  def called(text, loops_only):
    names = set()
    for line in text.splitlines():
      if loops_only and " while(" not in line:
        continue
      for m in _CALLED.finditer(line):
        names.update(n.strip().lstrip("%") for n in (m.group(1) or
                                                      m.group(2)).split(","))
    return names & bodies.keys()

  in_loop = set()
  frontier = set().union(*(called(t, True) for t in bodies.values()))
  while frontier:
    in_loop |= frontier
    frontier = set().union(*(called(bodies[n], False)
                             for n in frontier)) - in_loop
  counts = {}
  for kind in COLLECTIVES:
    op = re.compile(rf"\s{kind}(?:-start)?\(")
    inside = sum(len(op.findall(bodies[n])) for n in in_loop)
    total = sum(len(op.findall(t)) for t in bodies.values())
    counts[kind] = (inside, total - inside)
  return counts
