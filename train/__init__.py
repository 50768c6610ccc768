"""mtft.train: fine-tune task adapters on a frozen base and publish them into the registry.

The public surface: load a spec, run a recipe, read its results. The recipes share one loop
(`loop.train`) and one run session (`session.Session`); what differs is their step plan.
"""

from .adapters import train_adapters
from .base import EMBEDDED_BASE, BaseModelError, resolve_base
from .check import RunOptions
from .evaluate import generate
from .multitask import train_one_pass, train_shared
from .results import TaskResult
from .spec import Spec, SpecError
from .spec_file import load_spec

__all__ = [
    "EMBEDDED_BASE",
    "BaseModelError",
    "RunOptions",
    "Spec",
    "SpecError",
    "TaskResult",
    "generate",
    "load_spec",
    "resolve_base",
    "train_adapters",
    "train_one_pass",
    "train_shared",
]
