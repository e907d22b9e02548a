"""Datasets, image containers and continual-learning scenarios."""
from . import compositional  # noqa: F401  (registers the fmnist100 datasets)
from .images import ConcatImageSet, ImageSet, TensorStore
from .scenarios import (Scenario, Task, build_scenario, class_incremental, domain_incremental, fingerprint_diff,
                        verify_images)

__all__ = ["ImageSet", "ConcatImageSet", "TensorStore", "Scenario", "Task", "build_scenario",
           "class_incremental", "domain_incremental", "fingerprint_diff", "verify_images"]
