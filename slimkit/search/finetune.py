"""The final fine-tune of a searched model: KD from the original, in this process or data-parallel under torchrun.

``python -m torch.distributed.run --nproc-per-node N -m slimkit.search.finetune JOB.json`` runs
the same :func:`finetune` in ``N`` processes (gloo on CPU; several machines with torchrun's
``--nnodes``/``--rdzv-endpoint``): :func:`slimkit.train.fit` shards every batch across them and
averages the gradients, and rank 0 writes the result. The job names the student and teacher
artifacts, the dataset spec and the fit options; artifacts are loaded with :func:`slimkit.load`
(nothing is unpickled or imported by name).
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def finetune(student: nn.Module, teacher: nn.Module | None, data, *, epochs: int, lr: float, seed: int,
             input_size: tuple[int, ...], batch_size: int = 128, distill: str | None = "kd",
             progress: bool = False) -> dict:
    """Fine-tune ``student`` in place on the train split, with Hinton et al.'s KD from ``teacher`` when given.

    Returns the last epoch's log record (empty for ``epochs=0``).
    """
    from ..train import fit

    loader = data.loader("train", batch_size, seed=seed)
    if teacher is not None and distill:
        from ..distill import distill_terms

        with distill_terms(distill, teacher, student, torch.zeros(1, *input_size)) as terms:
            result = fit(student, loader, epochs=epochs, lr=lr, seed=seed, progress=progress, extra_losses=terms)
    else:
        result = fit(student, loader, epochs=epochs, lr=lr, seed=seed, progress=progress)
    student.eval()
    return result.epochs[-1] if result.epochs else {}


def main(argv: list[str] | None = None) -> int:
    """The torchrun entry point (module docstring)."""
    import json
    import os

    import torch.distributed as dist

    from ..artifact import atomic_write_text, load, save
    from ..data import load as load_data
    from ..documents import read_json_file
    from ..errors import SlimkitError

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: torchrun --nproc-per-node N -m slimkit.search.finetune JOB.json", file=sys.stderr)
        return 2
    try:
        job = read_json_file(argv[0], "fine-tune job")
        if "RANK" in os.environ and not dist.is_initialized():
            dist.init_process_group("gloo")
        torch.set_num_threads(int(job.get("threads", 1)))
        student = load(job["student"])
        teacher = load(job["teacher"]) if job.get("teacher") else None
        data = load_data(job["data"], limit=job.get("limit"), seed=job.get("data_seed", 0))
        record = finetune(student, teacher, data, epochs=int(job["epochs"]), lr=float(job["lr"]),
                          seed=int(job.get("seed", 0)), input_size=tuple(job["input_size"]),
                          batch_size=int(job.get("batch_size", 128)), distill=job.get("distill", "kd"))
        if not dist.is_initialized() or dist.get_rank() == 0:
            save(student, job["out"], meta={"input_size": list(job["input_size"])})
            atomic_write_text(job["out"] + ".log.json", json.dumps(record))
    except SlimkitError as e:
        print(f"slimkit search finetune: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
