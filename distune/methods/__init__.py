"""Method plugins. Importing this package registers the built-in methods."""

from distune.methods import adapters, distill, full, ia3, lora, prompt_learning  # noqa: F401  (registration side effect)
from distune.methods.base import (
    ENTRY_POINT_GROUP, LossOutput, Method, MethodConfig, build_method, causal_lm_loss, get_method, known_methods,
    register_method, Stream,
)

__all__ = ["ENTRY_POINT_GROUP", "LossOutput", "Method", "MethodConfig", "build_method", "causal_lm_loss",
           "get_method", "known_methods", "register_method", "Stream"]
