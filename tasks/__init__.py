"""deepmosaic.tasks: configurable algorithms sharing one interface (``Task.run(TileInput) -> TaskOutput``).

``STAGES`` maps stage names to task classes; ``get_task(name)`` refuses unknown names listing the valid ones.
"""
from __future__ import annotations

from deepmosaic.pipeline.errors import ConfigError

from .base import Task, TaskOutput, TileInput
from .sep_task import SepTask

STAGES: dict[str, type[Task]] = {"sep": SepTask}


def register(cls: type[Task]) -> type[Task]:
    """Register a stage class under its ``name``."""
    STAGES[cls.name] = cls
    return cls


def _load_optional():
    # Stages that need heavier imports register themselves when their module imports cleanly.
    try:
        from .photutils_task import PhotutilsTask
        STAGES.setdefault("photutils", PhotutilsTask)
    except ImportError:
        pass
    try:
        from .clumps_task import ClumpsSepTask, ClumpsTask
        STAGES.setdefault("clumps", ClumpsTask)
        STAGES.setdefault("clumps_sep", ClumpsSepTask)
    except ImportError:
        pass
    try:
        from .morphology_task import MorphologyFitTask, MorphologyTask
        STAGES.setdefault("morphology", MorphologyTask)
        STAGES.setdefault("morphology_fit", MorphologyFitTask)
    except ImportError:
        pass
    try:
        from .deblend_task import DeblendTask
        STAGES.setdefault("deblend", DeblendTask)
    except ImportError:
        pass
    try:
        from .detect_task import DetectTask
        STAGES.setdefault("detect", DetectTask)
    except ImportError:
        pass


def get_task_class(name: str) -> type[Task]:
    _load_optional()
    if name not in STAGES:
        raise ConfigError(f"--stages: unknown stage {name!r}. Valid stages: {', '.join(sorted(STAGES))}.")
    return STAGES[name]


__all__ = ["Task", "TaskOutput", "TileInput", "STAGES", "get_task_class", "register"]
