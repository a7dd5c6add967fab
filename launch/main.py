r"""deeplanczos launcher: flags -> config -> jax.distributed -> experiment.run.

One host:
  python launch/main.py --config=configs/mlp_digits.py --workdir=/tmp/run
Several processes (run once per process, process_id 0..N-1):
  python launch/main.py --config=... --workdir=... \
    --coordinator_address=HOST:PORT --num_processes=N --process_id=I
On a multi-host TPU slice, with no distributed flags, the cluster is detected
from the TPU environment.
Before reserving a slice, whether the run fits it (compiled here, no TPU):
  python launch/main.py --config=... --workdir=... \
    --config.dry_run=v5e:8x8 --config.mesh_shape="(16,4)"
"""

import os
import socket
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from deeplanczos import checkpoint
from deeplanczos import experiment
from deeplanczos.experiment import logs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file from configs/ (`path.py:arg` for variants).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for result.json and plots (process 0 writes).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for multi-process.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "How many processes take part.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, 0..N-1.")
_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300,
    "Seconds to wait for all processes to reach the coordinator.")
_LIBRARY_LOGS = flags.DEFINE_bool(
    "library_logs", False,
    "Also show other libraries' INFO logs (orbax's per-save lines, jax's "
    "backend probing); their warnings and errors are always shown.")
flags.mark_flags_as_required(["config", "workdir"])

def _wait_for_coordinator(address: str, timeout: float):
  """Fails cleanly if nothing listens at ``address`` within ``timeout``.

  XLA's client aborts the process when it cannot register, so processes
  other than 0 check the coordinator's port first and exit with a message.
  """
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=2).close()
      return
    except OSError as e:
      if time.monotonic() > deadline:
        raise SystemExit(
            f"Could not reach the coordinator at {address} within {timeout}s "
            f"({e}). Start process 0 there first, or check "
            "--coordinator_address.") from e
      time.sleep(0.5)


def _initialize_distributed():
  """Joins the processes: from flags, from a TPU pod's environment, or not."""
  asked = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  on_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if not any(v is not None for v in asked) and not on_pod:
    return
  if any(v is not None for v in asked) and None in asked:
    raise app.UsageError("--coordinator_address, --num_processes and "
                         "--process_id go together; got " + ", ".join(
                             f"{n}={v}" for n, v in zip(
                                 ("coordinator_address", "num_processes",
                                  "process_id"), asked)))
  if _PROCESS_ID.value:
    _wait_for_coordinator(_COORDINATOR.value, _TIMEOUT.value)
  logging.info("Joining %s processes at %s; waiting up to %ds for all.",
               _NUM_PROCESSES.value or "the TPU pod's",
               _COORDINATOR.value or "the TPU coordinator", _TIMEOUT.value)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(*asked, initialization_timeout=_TIMEOUT.value)


def _parse_flags(argv):
  """absl's parsing, with a config that fails to load said in one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit("deeplanczos: " + experiment.explain_config_error(
        argv, e)) from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _LIBRARY_LOGS.value:
    logging.get_absl_handler().addFilter(logs.OwnInfo(__file__))
  try:
    config = _CONFIG.value
    config.get("method")  # a file that failed to load raises only when read
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit("deeplanczos: " + experiment.explain_config_error(
        sys.argv, e)) from None
  _initialize_distributed()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  try:
    experiment.run(config, _WORKDIR.value, handle_sigterm=True)
  except (experiment.ConfigError, checkpoint.WriteError) as e:
    raise SystemExit(f"deeplanczos: {e}") from None
  except checkpoint.Preempted as e:
    saved = (f"checkpoint step {e.step} saved" if e.step is not None else
             f"stopped {e.where}, what was saved kept")
    logging.warning("Preempted (SIGTERM): %s in %s; run the same command "
                    "again to resume.", saved, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
