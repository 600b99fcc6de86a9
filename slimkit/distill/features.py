"""Feature taps, the frozen teacher, and pairing teacher layers with student layers.

Feature-based methods (FitNets, attention transfer, FSP, factor transfer) compare a teacher's
intermediate maps with the student's. Both are read with forward hooks; the teacher runs once
per training step under ``no_grad`` (shared by every term of that step), the student's maps are
those of the forward pass the engine has just made.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SlimkitError


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with ``requires_grad`` off on every parameter, and return it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class FeatureTap:
    """Forward hooks keeping the latest output of each named module (``tap.out[name]``)."""

    def __init__(self, model: nn.Module, names: list[str] | tuple[str, ...] = ()) -> None:
        self.model, self.out, self._handles = model, {}, {}
        self.add(names)

    def add(self, names: Iterable[str]) -> None:
        """Start keeping the outputs of the modules ``names`` (a :class:`SlimkitError` names an unknown one)."""
        modules = dict(_named(self.model))
        for name in names:
            if name in self._handles:
                continue
            if name not in modules:
                raise SlimkitError(f"no layer {name!r} in {type(self.model).__name__} "
                                   f"(layers include: {', '.join(list(modules)[:8])}, ...)")

            def hook(module, args, output, name=name):
                # a clone, because a later in-place op (ReLU(inplace=True)) would otherwise change
                # the captured value and break autograd's version check
                self.out[name] = output.clone() if isinstance(output, torch.Tensor) else output

            self._handles[name] = modules[name].register_forward_hook(hook)

    def close(self) -> None:
        """Remove the hooks and drop the kept outputs."""
        for h in self._handles.values():
            h.remove()
        self._handles.clear()
        self.out.clear()


def _named(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((n, m) for n, m in model.named_modules() if n)


class Teacher:
    """A frozen teacher run once per batch: ``teacher(x)`` gives its logits, ``teacher.features(x)`` its tapped maps.

    The model is put in eval mode with gradients off, and runs under ``torch.no_grad``, so no
    gradient and no batch-norm statistic update ever reaches it; the last result is cached by
    the identity of the input tensor, so several loss terms of one step share one forward pass.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = freeze(model)
        self.tap = FeatureTap(model)
        self._inputs: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._features: dict[str, torch.Tensor] = {}

    def _run(self, inputs: torch.Tensor) -> None:
        if self._inputs is inputs:
            return
        dev = next(iter(self.model.parameters()), inputs).device
        if dev != inputs.device:
            self.model.to(inputs.device)
        self.model.eval()  # someone may have switched it back to train mode since
        with torch.no_grad():
            self._logits = self.model(inputs)
        self._features = dict(self.tap.out)
        self._inputs = inputs

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for ``inputs`` (computed once per input tensor)."""
        self._run(inputs)
        return self._logits

    def features(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tapped teacher maps for ``inputs``, by layer name."""
        self._run(inputs)
        return self._features

    def close(self) -> None:
        """Remove the teacher's hooks and drop the cached outputs."""
        self.tap.close()
        self._inputs = self._logits = None
        self._features = {}


def output_shapes(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """``(module name, output shape)`` of every submodule with a tensor output, in completion order."""
    order: list[tuple[str, tuple[int, ...]]] = []
    handles = [m.register_forward_hook(
        lambda mod, a, out, n=n: order.append((n, tuple(out.shape))) if isinstance(out, torch.Tensor) else None)
        for n, m in _named(model)]
    was_training = model.training
    model.eval()  # a probe must not move batch-norm statistics
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return order


def stages(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """The last module to finish at each spatial resolution (a "stage"), in order of resolution appearance.

    A container finishes after its children, so for a CIFAR ResNet this gives ``layer1``,
    ``layer2``, ``layer3``. Maps of 1x1 (globally pooled vectors) are not stages.
    """
    last: dict[tuple[int, int], tuple[str, tuple[int, ...]]] = {}
    for name, shape in output_shapes(model, example_input):
        if len(shape) == 4 and shape[2] * shape[3] > 1:
            last[shape[2:]] = (name, shape)  # dict keeps first-appearance order, value is the latest
    return list(last.values())


@dataclass(frozen=True)
class Pair:
    """A teacher layer matched with a student layer, with their output shapes (N, C, H, W)."""

    teacher: str
    student: str
    teacher_shape: tuple[int, ...]
    student_shape: tuple[int, ...]


def _sizes(st: list[tuple[str, tuple[int, ...]]]) -> str:
    return ", ".join(f"{s[2]}x{s[3]} ({n})" for n, s in st) or "none"


def parse_pairs(pairs) -> list[tuple[str, str]]:
    """Named pairs from a dict ``{teacher: student}``, a list of 2-sequences or ``"t:s,t:s"``."""
    if isinstance(pairs, dict):
        return [(str(t), str(s)) for t, s in pairs.items()]
    if isinstance(pairs, str):
        out = []
        for item in [p.strip() for p in pairs.split(",") if p.strip()]:
            t, sep, s = item.partition(":")
            if not sep or not t or not s:
                raise SlimkitError(f"layer pairs are 'teacher_layer:student_layer,...', got {item!r}")
            out.append((t, s))
        return out
    try:
        return [(str(t), str(s)) for t, s in pairs]
    except (TypeError, ValueError):
        raise SlimkitError(f"layer pairs must be a mapping, 't:s,...' or a list of (teacher, student), "
                           f"got {pairs!r}") from None


def pair_features(teacher: nn.Module, student: nn.Module, example_input: torch.Tensor, pairs=None, *,
                  same_size: bool = True) -> list[Pair]:
    """Match teacher layers with student layers: the named ``pairs``, or automatically stage by stage.

    Automatic pairing takes each model's :func:`stages` (the last module at each spatial
    resolution) and pairs the stages of equal resolution; a :class:`SlimkitError` naming both
    models' resolutions is raised when none match. Named pairs are checked to exist and, with
    ``same_size``, to have the same spatial size. Channel counts may differ: methods that need
    equal channels insert 1x1 adapters.
    """
    if pairs:
        t_shapes, s_shapes = dict(output_shapes(teacher, example_input)), dict(output_shapes(student, example_input))
        out = []
        for t, s in parse_pairs(pairs):
            for name, shapes, model, who in ((t, t_shapes, teacher, "teacher"), (s, s_shapes, student, "student")):
                if name not in shapes:
                    raise SlimkitError(f"no layer {name!r} with a tensor output in the {who} "
                                       f"{type(model).__name__} (e.g. {', '.join(list(shapes)[:8])})")
                if len(shapes[name]) != 4:
                    raise SlimkitError(f"{who} layer {name!r} outputs shape {shapes[name]}, not a feature map")
            if same_size and t_shapes[t][2:] != s_shapes[s][2:]:
                raise SlimkitError(f"teacher layer {t!r} is {t_shapes[t][2]}x{t_shapes[t][3]} but student layer "
                                   f"{s!r} is {s_shapes[s][2]}x{s_shapes[s][3]}: paired maps need the same size")
            out.append(Pair(t, s, t_shapes[t], s_shapes[s]))
        return out
    ts, ss = stages(teacher, example_input), stages(student, example_input)
    by_size = {shape[2:]: (name, shape) for name, shape in ts}
    out = [Pair(by_size[s[2:]][0], n, by_size[s[2:]][1], s) for n, s in ss if s[2:] in by_size]
    if not out:
        raise SlimkitError(f"automatic pairing found no stages of equal spatial size: teacher "
                           f"{type(teacher).__name__} has {_sizes(ts)}, student {type(student).__name__} has "
                           f"{_sizes(ss)}; name the layers to match with pairs={{teacher_layer: student_layer}}")
    return out


def adapter(student_channels: int, teacher_channels: int) -> nn.Conv2d:
    """A 1x1 convolution mapping student channels to teacher channels (FitNets' regressor, Romero et al. 2015)."""
    conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight)
    return conv
