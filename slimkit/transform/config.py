"""The options of the module transforms, declared once: :class:`TransformConfig`.

Used by :func:`slimkit.transform.apply_transform`'s stage and command (``transform`` recipe stage,
``slimkit transform``) and recorded in the provenance (see :mod:`slimkit.config`). A recipe
writes the transform's own options beside the config's (``{method: transform, transform:
grouped_shuffle, groups: 4}``); they are checked against the transform's registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import MethodConfig, option
from .methods import TRANSFORMS


@dataclass(frozen=True)
class TransformConfig(MethodConfig):
    """Replace layers by an efficient structure, initialised to match the original (docs/transform.md).

    Example:
        >>> TransformConfig.from_options({"transform": "grouped_shuffle", "groups": 4}).options
        {'groups': 4}
    """

    family = "transform"
    extras = "options"

    transform: str = option("depthwise_separable", "the transform", choices=TRANSFORMS, flag="--method")
    layers: str | tuple[str, ...] = option("all eligible", "module names to replace, comma-separated (default: all "
                                                           "eligible)")
    num_batches: int = option(4, "training batches whose activations initialise the replacements", low=1)
    batch_size: int | None = option(None, "batch size of those batches (default: the recipe's)", low=1)
    max_images: int = option(64, "at most this many images per layer for the least-squares fits", low=1)
    options: dict[str, Any] = option({}, "a transform option as KEY=VALUE (groups=4, ratio=2, ...); repeatable",
                                     flag="--opt", metavar="KEY=VALUE", repeat=True)

    def validate(self) -> None:
        known = set(TRANSFORMS.get(self.transform).defaults)
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise self.error("options", f"{self.transform} takes no option {', '.join(map(repr, unknown))} "
                                        f"(known: {', '.join(sorted(known)) or 'none'})")

    @classmethod
    def extra_names(cls, own) -> set[str]:
        return set(TRANSFORMS.get(own.get("transform", "depthwise_separable")).defaults)
