"""The options of knowledge distillation, declared once: :class:`DistillConfig`.

Used by the ``distill`` recipe stage, ``slimkit distill``'s flags and the provenance of a distilled
artifact (see :mod:`slimkit.config`). A recipe writes a stage flat, as users think of it::

    {method: distill, distill: kd, teacher: resnet56, epochs: 2, lr: 0.01, T: 4}

so :meth:`DistillConfig.from_options` sends each key where it belongs: the config's own fields,
the training options (:class:`~slimkit.train.config.FitConfig`) and the method's options (the
``defaults`` of the methods named, e.g. ``T`` and ``alpha`` of ``kd``), and refuses the rest
with a did-you-mean. :meth:`DistillConfig.to_dict` writes it back flat.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from ..config import MethodConfig, option
from ..errors import SlimkitError
from ..train.config import FitConfig
from .methods import METHODS


def method_names(method: str) -> list[str]:
    """``"at+kd"`` -> ``["at", "kd"]``, each checked against :data:`METHODS`."""
    names = [n.strip() for n in method.split("+")]
    for n in names:
        METHODS.get(n)
    if len(set(names)) != len(names):
        raise SlimkitError(f"distillation method listed twice in {method!r}")
    return names


def check_method_options(method: str, options: dict) -> str | None:
    """Why ``options`` do not fit the methods in ``method`` (unknown name, a number where a number belongs), or None."""
    names = method_names(method)
    known = method_option_names(method)
    for key, value in options.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), 1)
            return f"{method} takes no option {key!r}" + (f" (did you mean {close[0]!r}?)" if close
                                                         else f" (known: {', '.join(sorted(known))})")
        defaults = [METHODS.get(n).defaults.get(key) for n in names if key in METHODS.get(n).defaults]
        numeric = [d for d in defaults if isinstance(d, (int, float)) and not isinstance(d, bool)]
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value
                        or value in (float("inf"), float("-inf"))):
            return f"option {key} must be a finite number, got {value!r}"
    return None


def method_option_names(method: str) -> set[str]:
    """The options the methods in ``method`` take (their registry entries' ``defaults``, and ``ce_weight``)."""
    return set().union(*(METHODS.get(n).defaults for n in method_names(method)), {"ce_weight"})


@dataclass(frozen=True)
class DistillConfig(MethodConfig):
    """Fine-tune a student from a teacher with one or several distillation methods (docs/distill.md).

    ``distill``: ``kd`` (Hinton et al. 2015), ``logits`` (Ba & Caruana 2014), ``fitnet`` (Romero
    et al. 2015), ``at`` (Zagoruyko & Komodakis 2017), ``fsp`` (Yim et al. 2017), ``ft`` (Kim et
    al. 2018), ``one`` (Lan et al. 2018), ``moonshine`` (Crowley et al. 2018), ``munge`` (Bucila
    et al. 2006), or several joined by ``+``.

    Example:
        >>> c = DistillConfig.from_options({"distill": "kd", "teacher": "resnet56", "epochs": 2, "T": 2.0})
        >>> c.fit.epochs, c.options
        (2, {'T': 2.0})
        >>> DistillConfig.from_options({"distill": "kd", "temperature": 2.0})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        slimkit.errors.SlimkitError: distill: unknown option 'temperature' ...
    """

    family = "distill"
    flat = ("fit",)
    extras = "options"

    distill: str = option("kd", "distillation method(s), joined by '+' (e.g. at+kd)", flag="--method", listing=METHODS)
    teacher: str | None = option(None, "teacher: registered name, torchvision:NAME, file.py:fn or an artifact (not "
                                       "needed for one; moonshine derives the student from it)")
    teacher_weights: str | None = option(None, "state_dict / checkpoint / safetensors file for the teacher")
    groups: int = option(4, "moonshine: groups of the cheap convolutions", low=1)
    init: str = option("teacher", "moonshine: start the student from the teacher's weights or from scratch",
                       choices=("teacher", "scratch"))
    branches: int = option(3, "one: number of branches", low=2)
    batch_size: int | None = option(None, "training batch size (default: the recipe's)", low=1, cli=False)
    options: dict[str, Any] = option({}, "a method option as KEY=VALUE (T=4, alpha=0.9, pairs=...); repeatable",
                                     flag="--opt", metavar="KEY=VALUE", repeat=True)
    fit: FitConfig = option(FitConfig(), "how the student trains", cli=False)

    def validate(self) -> None:
        names = method_names(self.distill)
        if "one" in names and names != ["one"]:
            raise self.error("distill", "'one' is its own teacher and does not combine with other methods")
        problem = check_method_options(self.distill, self.options)
        if problem:
            raise self.error("options", problem)
        if self.teacher_weights and not self.teacher:
            raise self.error("teacher_weights", "needs {teacher}")

    @property
    def names(self) -> list[str]:
        return method_names(self.distill)

    @classmethod
    def extra_names(cls, own) -> set[str]:
        method = own.get("distill", "kd")
        return method_option_names(method) if isinstance(method, str) else set()
