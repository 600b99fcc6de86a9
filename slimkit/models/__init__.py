"""Model registry and the built-in models (importing a module registers its models)."""

from . import (  # noqa: F401
               channelnet,
               cifar_resnet,
               classic,
               densenet_cifar,
               fractalnet,
               mobilenet_v1,
               peleenet,
               preact_resnet,
               resnext,
               shufflenet_v1,
               small,
               stochastic_depth,
               torchvision_zoo,
               xception,
)

# (imported for their registration side effects)
from .registry import (
               MODELS,
               create_model,
               default_input_size,
               list_models,
               load_weights,
               model_input_size,
               read_state_dict,
               register_model,
)

__all__ = ["MODELS", "create_model", "default_input_size", "list_models", "load_weights", "model_input_size",
           "read_state_dict",
           "register_model"]
