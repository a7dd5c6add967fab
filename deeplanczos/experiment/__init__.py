"""The launcher's experiment code: a config in, result files out.

- ``config``: the schema, :func:`base_config`, and :class:`ConfigError`;
- ``tasks``: models, data and the training loop (:func:`build_task`,
  :func:`train`);
- ``build``: the mesh, task, layout, data and operator a config builds;
- ``methods``: each method's config section -> library call -> result;
- ``plots``: one PNG per method, and the followed run's figures;
- ``runner``: the orchestration that ``launch/main.py`` calls (:func:`run`);
- ``follow``: a long-running job beside a trainer (``config.follow``);
- ``trainer``: the example trainer that ``launch/train.py`` runs
  (:func:`train_and_save`).
"""

from deeplanczos.experiment.build import build_mesh
from deeplanczos.experiment.config import ConfigError
from deeplanczos.experiment.config import base_config
from deeplanczos.experiment.config import explain_config_error
from deeplanczos.experiment.follow import read_log
from deeplanczos.experiment.runner import run
from deeplanczos.experiment.tasks import TASKS
from deeplanczos.experiment.tasks import Task
from deeplanczos.experiment.tasks import build_task
from deeplanczos.experiment.tasks import train
from deeplanczos.experiment.trainer import train_and_save

__all__ = ("ConfigError", "TASKS", "Task", "base_config", "build_mesh",
           "build_task", "explain_config_error", "read_log", "run", "train",
           "train_and_save")
