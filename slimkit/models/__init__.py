"""Model registry and the built-in models (importing a module registers its models)."""

from . import cifar_resnet, small  # noqa: F401  (registration side effects)
from .registry import (MODELS, create_model, default_input_size, list_models, load_weights, read_state_dict,
                       register_model)

__all__ = ["MODELS", "create_model", "default_input_size", "list_models", "load_weights", "read_state_dict",
           "register_model"]
