"""slimkit: make trained CNNs smaller and faster, and prove it with measurements."""

from .errors import SlimkitError
from .models import create_model, list_models, register_model

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavier subsystems load on first use so `import slimkit` stays quick.
    if name in ("save", "load"):
        from . import artifact

        return getattr(artifact, name)
    raise AttributeError(f"module 'slimkit' has no attribute {name!r}")


__all__ = ["SlimkitError", "create_model", "list_models", "register_model", "save", "load", "__version__"]
