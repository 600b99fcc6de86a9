"""Ship it: export a model to ONNX, OpenVINO IR or frozen TorchScript, verified in the runtime that deploys it.

::

    import slimkit
    from slimkit.export import export, ExportConfig
    r = export(slimkit.load("runs/r56/model.safetensors"), "model.onnx", ExportConfig(format="onnx"))
    r.checks          # max |diff|, relative L2, top-1 agreement per runtime and input set
    r.float_nodes     # the conv/linear nodes each runtime left in float (an int8 model: none)

An int8 model is exported with its own scales and zero points (QDQ), so ONNX Runtime and OpenVINO
run integer kernels on the calibration PyTorch made; :data:`FORMATS` and :data:`RUNTIMES` hold
what each format and runtime is. Next to every exported file a ``PATH.json`` records the format,
opset, the versions of torch and of every runtime used, the model's provenance, the checks and the
float-node report. See docs/export.md for the measurements.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..config import MethodConfig, option
from ..errors import SlimkitError
from .formats import FORMATS, Format, format_of, signed_activations, staging_dir
from .runtime import RUNTIMES, Runtime, Session, open_exported
from .verify import Check, first_divergence, verify

__all__ = ["Check", "ExportConfig", "ExportResult", "FORMATS", "Format", "RUNTIMES", "Runtime", "Session", "export",
           "first_divergence", "format_of", "open_exported", "signed_activations", "verify"]


@dataclass(frozen=True)
class ExportConfig(MethodConfig):
    """How to export: the format, the ONNX opset, the batch axis, which runtimes verify it and on what.

    Example:
        >>> ExportConfig(format="onnx").runtimes_for_check()
        ('onnxruntime',)
    """

    family = "export"

    format: str = option("onnx", "file format", choices=FORMATS)
    opset: int = option(17, "ONNX opset (QDQ with per-channel weights needs >= 13)", low=13, high=23)
    dynamic_batch: bool = option(True, "a dynamic batch axis (off: fixed to the example's batch size)")
    activations: str = option("u8", "int8 models: activations as uint8 (what PyTorch calibrated) or int8 (s8, ORT's "
                                    "S8S8 format; the same values, zero points shifted by 128)", choices=("u8", "s8"))
    runtimes: tuple[str, ...] = option((), "runtimes that verify the file (default: the format's own; an ONNX file "
                                           "also runs in openvino)")
    check_batches: int = option(2, "random input batches of 4 compared with PyTorch", low=1)
    data_batches: int = option(4, "with data: real test batches of 64 compared as well", low=0)
    threads: int = option(1, "runtime threads while verifying", low=1)
    require_int8: bool = option(True, "fail an int8 export whose runtime graph still runs a conv/linear in float "
                                      "(off: report them only)")

    def validate(self) -> None:
        for name in self.runtimes:
            if name not in RUNTIMES:
                raise self.error("runtimes", RUNTIMES.unknown(name))

    def runtimes_for_check(self) -> tuple[str, ...]:
        return self.runtimes or (FORMATS.get(self.format).runtime,)


@dataclass
class ExportResult:
    """What :func:`export` wrote and measured."""

    path: str
    format: str
    int8: bool
    bytes: int
    checks: list[Check] = field(default_factory=list)
    float_nodes: dict[str, list[str]] = field(default_factory=dict)
    facts: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "int8": self.int8, "bytes": self.bytes,
                "passed": self.passed, "checks": [c.to_dict() for c in self.checks], "float_nodes": self.float_nodes,
                **self.facts}


def _versions(runtimes: Iterable[str]) -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import onnx

        out["onnx"] = onnx.__version__
    except ImportError:
        pass
    for name in runtimes:
        out[name] = RUNTIMES.get(name).version()
    return out


def _random_batches(input_size: tuple[int, ...], n: int) -> list[np.ndarray]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, *input_size, generator=g).numpy() for _ in range(n)]


def export(model: nn.Module, path: str | os.PathLike, config: ExportConfig | None = None, *,
           input_size: tuple[int, ...] | None = None, data: Iterable | None = None, **options) -> ExportResult:
    """Write ``model`` to ``path`` in ``config.format``, verify it in its runtime(s), record what was done.

    Args:
        model: any slimkit model: float (pruned, transformed, distilled) or int8 (:func:`slimkit.quant.quantize`).
        path: the file (``.onnx``, ``.xml`` for OpenVINO with its ``.bin`` beside, ``.pt`` for TorchScript).
        config: an :class:`ExportConfig`, or keyword ``options`` building one.
        input_size: (C, H, W) of one input (default: the model's recorded one).
        data: ``(inputs, labels)`` batches (e.g. a test loader) to verify on as well.

    Returns:
        An :class:`ExportResult`; the same, as JSON, is written to ``PATH.json``.

    Raises:
        SlimkitError: an unknown format, a runtime that is not installed (naming its extra), an op the
            exporter lacks (naming the op and the layer), an output that cannot be written, a
            verification beyond tolerance (naming the first diverging layer), or conv/linear layers
            of an int8 model that the runtime runs in float. Nothing is left at ``path`` then.

    Example:
        >>> import os, tempfile, slimkit
        >>> r = export(slimkit.create_model("digits_cnn"), os.path.join(tempfile.mkdtemp(), "m.onnx"))
        >>> r.passed, r.checks[0].runtime
        (True, 'onnxruntime')
    """
    from ..models import model_input_size

    config = config if config is not None else ExportConfig.from_options(options)
    path = os.fspath(path)
    fmt = FORMATS.get(config.format)
    if not path.endswith(fmt.suffix):
        raise SlimkitError(f"{path}: a {fmt.name} file ends in {fmt.suffix}")
    try:
        import onnx  # noqa: F401  (ONNX and OpenVINO exports both go through an ONNX graph)
    except ImportError:
        if fmt.name != "torchscript":
            raise SlimkitError("onnx is not installed: pip install 'slimkit[onnx]'") from None
    for name in config.runtimes_for_check():
        RUNTIMES.get(name).require()
        if fmt.name not in (RUNTIMES.get(name).format, "onnx") or (
                fmt.name == "onnx" and RUNTIMES.get(name).format == "torchscript"):
            raise SlimkitError(f"export: a {fmt.name} file does not run in {name}")
    model = model.cpu().eval()
    size = tuple(input_size) if input_size is not None else tuple(model_input_size(model))
    example = torch.zeros(1, *size)
    # everything is written and verified in a hidden folder beside PATH and moved into place last, so
    # a kill during the (long) verification leaves neither the model nor its record behind
    staging = staging_dir(path)
    try:
        staged = os.path.join(staging, os.path.basename(path))
        facts = fmt.write(model, example, staged, config)
        result = ExportResult(staged, fmt.name, bool(facts.get("int8")), _size(staged, fmt.name), facts=facts)
        _check(model, staged, fmt, config, size, data, result)
        result.path = path
        record = {**result.to_dict(), "versions": _versions(config.runtimes_for_check()), "config": config.to_dict(),
                  "source": {"base": getattr(model, "slimkit_base", None),
                             "stages": [h.get("stage") for h in getattr(model, "slimkit_history", [])]}}
        with open(staged + ".json", "w") as f:
            f.write(json.dumps(record, indent=2, default=str))
        # weights first, the record last: a visible model file always has its weights beside it
        order = ([".bin"] if fmt.name == "openvino" else []) + ["", ".json"]
        for ext in order:
            src = staged[: -len(".xml")] + ".bin" if ext == ".bin" else staged + ext
            dst = path[: -len(".xml")] + ".bin" if ext == ".bin" else path + ext
            os.replace(src, dst)
    except OSError as e:
        raise SlimkitError(f"{path}: cannot write ({os.strerror(e.errno) if e.errno else e}); nothing was written"
                           ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _size(path: str, fmt: str) -> int:
    size = os.path.getsize(path)
    if fmt == "openvino" and os.path.exists(path[:-4] + ".bin"):
        size += os.path.getsize(path[:-4] + ".bin")
    return size


def _check(model: nn.Module, path: str, fmt: Format, config: ExportConfig, size: tuple[int, ...],
           data: Iterable | None, result: ExportResult) -> None:
    """Run the file in each runtime on random and real inputs, collect checks and float nodes; raise on failure."""
    sets = [("random", _random_batches(size, config.check_batches))]
    if data is not None and config.data_batches:
        real = []
        for i, batch in enumerate(data):
            if i >= config.data_batches:
                break
            real.append((batch[0] if isinstance(batch, (tuple, list)) else batch).float().numpy())
        if real:
            sets.append(("data", real))
    from ..progress import Progress

    onnx_graph = path if fmt.name == "onnx" else None
    runtimes = config.runtimes_for_check()
    bar = Progress(len(runtimes) * len(sets), f"export verification of {os.path.basename(path)}")
    for name in runtimes:
        session = RUNTIMES.get(name).open(path, config.threads)
        for what, batches in sets:
            result.checks.append(verify(model, session, batches, int8=result.int8, inputs=what, onnx_path=onnx_graph))
            bar.update(note=f"{name}, {what} inputs")
        result.float_nodes[name] = RUNTIMES.get(name).float_nodes(session)
    bar.close()
    failed = [c for c in result.checks if not c.passed]
    if failed:
        c = failed[0]
        where = f"; first diverging layer: {c.first_divergence}" if c.first_divergence else ""
        raise SlimkitError(f"{path}: {c.runtime} output differs from PyTorch on {c.inputs} inputs (max |diff| "
                           f"{c.max_abs_diff:.3g}, relative L2 {c.rel_l2:.3g}, top-1 agreement {c.top1_agreement:.3f}; "
                           f"rule {c.rule}){where}")
    if result.int8 and config.require_int8:
        stayed = {r: nodes for r, nodes in result.float_nodes.items() if nodes and r != "torchscript"}
        kept = set(getattr(model, "keep_float", []) or [])
        if stayed and not kept:
            r, nodes = next(iter(stayed.items()))
            raise SlimkitError(f"{path}: {r} runs {len(nodes)} conv/linear node(s) of this int8 model in float "
                               f"({', '.join(nodes[:4])}); pass require_int8=False (--allow-float) to export anyway")
