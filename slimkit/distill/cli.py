"""``slimkit distill``: train a student from a teacher with one of the distillation methods.

Wired into ``slimkit/cli.py`` through its ``PLUGIN_COMMANDS`` table.
"""

from __future__ import annotations

import argparse
import json
import os

from ..cli import logger
from ..cli_args import add_data_arguments
from ..errors import SlimkitError


def command_configs() -> dict[str, tuple[type, dict]]:
    """The configs ``slimkit distill`` turns into flags, with how: ``{key: (class, add_arguments options)}``."""
    from ..train.config import FitConfig
    from .config import DistillConfig

    return {"distill": (DistillConfig, {"title": "distillation", "required": ("distill",)}),
            "fit": (FitConfig, {"title": "training", "defaults": {"lr": 0.05}})}


def add_distill_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``slimkit distill --teacher MODEL --student MODEL --method NAME --data SPEC --out DIR``.

    The method flags come from :class:`~slimkit.distill.config.DistillConfig` and the training
    flags from :class:`~slimkit.train.config.FitConfig`. Method options are ``--opt KEY=VALUE``
    (repeatable; values parsed as JSON, else kept as text), e.g. ``--opt T=4 --opt alpha=0.9``.
    """
    parser.add_argument("--student", help="student model spec (for moonshine: the model to make cheap, default "
                                          "the teacher; for one: the CIFAR ResNet to branch)")
    parser.add_argument("--student-weights", help="weights to start the student from")
    for cls, how in command_configs().values():
        cls.add_arguments(parser, **how)
    add_data_arguments(parser, required=True)
    parser.add_argument("--out", required=True, help="output folder (model.safetensors, report.json)")
    return parser


def cli_distill(args: argparse.Namespace) -> dict:
    """Distill ``--teacher`` into ``--student`` on ``--data``, write ``OUT/model.safetensors``, return both top-1s.

    The loss is cross-entropy plus the terms of :func:`slimkit.distill.distill_terms` for
    ``--method`` (Hinton et al. 2015, Ba & Caruana 2014, Romero et al. 2015, Zagoruyko &
    Komodakis 2017, Yim et al. 2017, Kim et al. 2018, Lan et al. 2018, Crowley et al. 2018,
    Bucila et al. 2006: see docs/distill.md). ``moonshine`` builds the student from the
    teacher (or ``--student``) with cheap convolutions; ``one`` trains a multi-branch network
    of ``--student`` without a teacher and keeps its best branch on the validation split;
    ``munge`` trains on the train split plus MUNGE samples, all labelled by the teacher.
    """
    import torch

    from ..artifact import atomic_write_text, history, save
    from ..data import load
    from ..models import create_model
    from ..models.registry import is_artifact_path
    from ..train import check_input, evaluate, fit
    from ..train.config import FitConfig
    from . import OneNetwork, best_branch, distill_terms, moonshine_student, training_loader
    from .config import DistillConfig

    config = DistillConfig.from_args(args, fit=FitConfig.from_args(args))
    log = logger(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    names = config.names
    opts = dict(config.options)
    method = config.distill
    data = load(args.data, limit=args.limit, seed=args.seed)
    nc = data.info.num_classes
    what = f"dataset {args.data}"
    test_loader = data.loader("test", args.batch_size)
    example = next(iter(data.loader("train", 2, shuffle=False, augment=False)))[0]

    def build(spec: str, weights: str | None):
        return create_model(spec, num_classes=None if is_artifact_path(spec) else nc, weights=weights)

    teacher, teacher_test = None, None
    if "one" in names:
        if names != ["one"]:
            raise SlimkitError("--method one is its own teacher and does not combine with other methods")
        spec = args.student or config.teacher
        if not spec:
            raise SlimkitError("--method one needs --student (a CIFAR ResNet spec such as resnet20)")
        base = build(spec, args.student_weights)
        check_input(base, example, nc, what)
        student = OneNetwork.from_model(base, config.branches) if args.student_weights else \
            OneNetwork(spec, config.branches, num_classes=None if is_artifact_path(spec) else nc, base=base)
    else:
        if not config.teacher:
            raise SlimkitError(f"--method {method} needs --teacher")
        teacher = build(config.teacher, config.teacher_weights)
        check_input(teacher, example, nc, what)
        teacher_test = evaluate(teacher, test_loader)
        if "moonshine" in names:
            source = build(args.student, args.student_weights) if args.student else teacher
            student = moonshine_student(source, config.groups, config.init)
        else:
            if not args.student:
                raise SlimkitError(f"--method {method} needs --student")
            student = build(args.student, args.student_weights)
        check_input(student, example, nc, what)

    loader = training_loader(method, teacher, data, args.batch_size, args.seed, opts)
    with distill_terms(method, teacher, student, example, **opts) as terms:
        run = fit(student, loader, val=data.loader("val", args.batch_size) if len(data.val) else None,
                  seed=args.seed, extra_losses=terms, checkpoint_dir=os.path.join(args.out, "checkpoints"),
                  progress=not args.json, **config.fit.fit_kwargs())
    result: dict = {"method": method, "teacher": config.teacher, "student": args.student, "epochs": run.epochs}
    if "one" in names:
        result["ensemble_test"] = evaluate(student, test_loader)
        best, scores = best_branch(student, data, args.batch_size)
        result.update(branch_top1=scores, kept_branch=best)
        student = student.extract(best)
        student.slimkit_history = []
    if "moonshine" in names:
        result["moonshine"] = student.slimkit_last_moonshine
    student_test = evaluate(student, test_loader)
    history(student).append({"stage": "distill", "params": config.to_dict(), "student": args.student,
                             "metrics": {"test_top1": student_test["top1"],
                                         "teacher_test_top1": teacher_test["top1"] if teacher_test else None}})
    path = save(student, os.path.join(args.out, "model.safetensors"),
                meta={"dataset": args.data, "input_size": list(data.info.input_size),
                      "classes": list(data.info.classes)})
    result.update(artifact=path, teacher_test=teacher_test, student_test=student_test,
                  teacher_top1=teacher_test["top1"] if teacher_test else None, student_top1=student_test["top1"],
                  teacher_params=sum(p.numel() for p in teacher.parameters()) if teacher is not None else None,
                  student_params=sum(p.numel() for p in student.parameters()))
    atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(result, indent=2, default=str))
    t = f"{teacher_test['top1']:.4f}" if teacher_test else "-"
    log(f"{method}: teacher test top1 {t}, student test top1 {student_test['top1']:.4f}; wrote {path}")
    return result
