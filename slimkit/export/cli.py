"""``slimkit export``: write a model as ONNX, OpenVINO IR or TorchScript, verified in its runtime.

Wired into ``slimkit/cli.py`` through its ``PLUGIN_COMMANDS`` table.
"""

from __future__ import annotations

import argparse

from ..cli import logger
from ..cli_args import add_data_arguments, add_model_arguments


def command_configs() -> dict[str, tuple[type, dict]]:
    """The configs ``slimkit export`` turns into flags: ``{key: (class, add_arguments options)}``."""
    from . import ExportConfig

    return {"export": (ExportConfig, {"title": "export", "skip": SKIP})}


SKIP = ("require_int8", "threads")  # --allow-float and the command's own --threads set them


def add_export_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``slimkit export MODEL --format onnx|openvino|torchscript --out PATH [--data D]``."""
    add_model_arguments(parser, "an artifact (or any model spec: registered name, torchvision:NAME, file.py:fn)")
    for cls, how in command_configs().values():
        cls.add_arguments(parser, **how)
    parser.add_argument("--allow-float", action="store_true",
                        help="export an int8 model even when the runtime runs some conv/linear in float (reported)")
    add_data_arguments(parser, "also verify on test batches of this dataset (digits, cifar10:PATH, ...)",
                       batch_size=None)
    parser.add_argument("--input-size", help="C,H,W (default: the model's own)")
    parser.add_argument("--out", required=True, help="the file to write (.onnx, .xml, .pt); PATH.json beside it")
    return parser


def cli_export(args: argparse.Namespace) -> dict:
    """Export ``MODEL`` to ``--out`` in ``--format``, verify it (random inputs, and ``--data`` batches), report."""
    from ..cli import _input_size, _model
    from . import ExportConfig, export

    config = ExportConfig.from_args(args, skip=SKIP, require_int8=not args.allow_float, threads=args.threads or 1)
    model = _model(args)
    data = None
    if args.data:
        from ..data import load
        from ..train import check_input

        dataset = load(args.data, limit=args.limit, seed=args.seed)
        data = dataset.loader("test", 64)
        check_input(model, next(iter(data))[0], dataset.info.num_classes, f"dataset {args.data}")
    result = export(model, args.out, config, input_size=_input_size(args.input_size), data=data)
    log = logger(args)
    for c in result.checks:
        log(f"{c.runtime} on {c.n} {c.inputs} inputs: max |diff| {c.max_abs_diff:.3g} (output scale "
            f"{c.output_scale:.3g}), relative L2 {c.rel_l2:.3g}, top-1 agreement {c.top1_agreement:.3f}")
    for runtime, nodes in result.float_nodes.items():
        if result.int8:
            shown = f": {', '.join(nodes[:6])}" if nodes else ""
            log(f"{runtime}: {len(nodes)} conv/linear node(s) in float{shown}")
    log(f"wrote {result.path} ({result.bytes:,} bytes, {'int8' if result.int8 else 'float'}) and {result.path}.json")
    return result.to_dict()
