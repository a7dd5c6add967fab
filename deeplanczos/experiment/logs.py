"""The launchers' log filter: our INFO lines, everyone's warnings."""

import logging
import os

import deeplanczos


class OwnInfo(logging.Filter):
  """INFO lines from deeplanczos and the given launcher files' folders;
  warnings and errors from everyone (orbax logs every save at INFO)."""

  def __init__(self, *launcher_files: str):
    super().__init__()
    self.ours = tuple(os.path.dirname(os.path.abspath(f)) + os.sep
                      for f in (deeplanczos.__file__, *launcher_files))

  def filter(self, record):
    return (record.levelno >= logging.WARNING or
            os.path.abspath(record.pathname).startswith(self.ours))
