"""Method plugins. Importing this package registers the built-in methods."""

from distune.methods import adapters, distill, full, ia3, lora, prompt_learning  # noqa: F401  (registration side effect)
from distune.methods.base import (
    ENTRY_POINT_GROUP, Method, MethodConfig, RunSettings, Stream, build_method, frozen_models, get_method,
    known_methods, register_method,
)
from distune.tasks import LossOutput

__all__ = ["ENTRY_POINT_GROUP", "LossOutput", "Method", "MethodConfig", "RunSettings", "Stream", "build_method",
           "frozen_models", "get_method", "known_methods", "register_method"]
