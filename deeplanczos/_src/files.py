"""Files written whole or not at all."""

import json
import os


def write_json(path: str, value, **dump_options):
  """Writes ``value`` as JSON to a temporary file renamed onto ``path``.

  A full disk or a kill midway leaves the previous file (or none), never a
  truncated one.
  """
  temporary = f"{path}.{os.getpid()}.tmp"
  try:
    with open(temporary, "w") as f:
      json.dump(value, f, **dump_options)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
