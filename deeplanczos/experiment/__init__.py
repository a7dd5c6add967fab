"""The launcher's experiment code: a config in, result files out.

- ``config``: the schema, :func:`base_config`, and :class:`ConfigError`;
- ``tasks``: models, data and the training loop (:func:`build_task`,
  :func:`train`);
- ``methods``: each method's config section -> library call -> result;
- ``plots``: one PNG per method;
- ``runner``: the orchestration that ``launch/main.py`` calls (:func:`run`).
"""

from deeplanczos.experiment.config import ConfigError
from deeplanczos.experiment.config import base_config
from deeplanczos.experiment.config import explain_config_error
from deeplanczos.experiment.build import build_mesh
from deeplanczos.experiment.runner import run
from deeplanczos.experiment.tasks import TASKS
from deeplanczos.experiment.tasks import Task
from deeplanczos.experiment.tasks import build_task
from deeplanczos.experiment.tasks import train

__all__ = ("ConfigError", "TASKS", "Task", "base_config", "build_mesh",
           "build_task", "explain_config_error", "run", "train")
