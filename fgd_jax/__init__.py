"""fgd-jax: Focal and Global Knowledge Distillation for detectors in JAX/Flax.

Submodules load on first use, so `import fgd_jax` stays cheap and
`fgd_jax.experiment.load_model(...)` / `fgd_jax.models.build_detector(...)` work after it.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = frozenset(
    {
        "analysis",
        "checkpoint",
        "config",
        "convert",
        "data",
        "demo",
        "demo_runs",
        "distill",
        "eval",
        "evaluation",
        "experiment",
        "export",
        "logging_utils",
        "models",
        "ops",
        "optim",
        "parallel",
        "train",
        "trainer",
    }
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
