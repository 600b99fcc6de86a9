"""The steps of ``slimkit compress --target`` and the state that lets a killed run resume where it stopped.

Every step reads the artifact the step before it saved and saves its own (``OUT/steps/NAME``)
before ``OUT/compress.json`` marks it done, written atomically; a run started again with the same
model, data and options skips the steps marked done, and a step cut short continues inside itself
where it can: the search continues its Optuna study, a fine-tune its last epoch checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from ..errors import SlimkitError
from .config import CompressConfig

STATE = "compress.json"
STATE_VERSION = 1


@dataclasses.dataclass
class Job:
    """What every step may use: the original model, the data, the options, where to write and the state."""

    model: nn.Module
    data: object
    data_spec: str
    limit: int | None
    config: CompressConfig
    out: str
    threads: int
    log: Callable[[str], None]
    progress: bool
    state: dict

    @property
    def example(self) -> torch.Tensor:
        return torch.zeros(1, *self.data.info.input_size)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def step(self, name: str) -> dict:
        return self.state["steps"].setdefault(name, {})

    def done(self, name: str) -> bool:
        return bool(self.state["steps"].get(name, {}).get("done"))

    def finish(self, name: str, record: dict, seconds: float) -> None:
        self.state["steps"][name] = {**record, "done": True, "seconds": seconds}
        self.save_state()

    def save_state(self) -> None:
        from ..artifact import atomic_write_text

        atomic_write_text(self.path(STATE), json.dumps(self.state, indent=1, default=str))

    def saved(self, name: str) -> nn.Module:
        """The model step ``name`` saved. Its path is fixed by the step's name, never read from the state file,
        so a crafted ``compress.json`` cannot make the job load another file."""
        from ..artifact import load

        path = self.path("steps", f"{name}.safetensors")
        if name == "search" and not os.path.exists(path):  # a job started before the search step saved it there
            path = self.path("search", "model.safetensors")
        return load(path).eval()

    def pruned(self) -> bool:
        """Whether the result comes from the pruning search (for a MACs target the decomposed model may win)."""
        return self.config.kind != "size" and self.state["steps"].get("choose", {}).get("chosen", "search") == "search"

    def result_step(self) -> str:
        """The step whose model is the result: int8 when it was kept, else the float model before it."""
        if self.config.kind == "size":
            return "share"
        return "quantize" if self.state["steps"].get("quantize", {}).get("used") else "finetune"

    def save(self, model: nn.Module, name: str, **meta) -> str:
        from ..artifact import save

        os.makedirs(self.path("steps"), exist_ok=True)
        return save(model, self.path("steps", f"{name}.safetensors"),
                    meta={"input_size": list(self.data.info.input_size), "dataset": self.data_spec,
                          "classes": list(self.data.info.classes), **meta})

    def context(self, name: str):
        """A pipeline context whose checkpoints live in ``OUT/steps/NAME`` (a resumed fine-tune finds them)."""
        from ..pipeline import Context

        return Context(data=self.data, out_dir=self.path("steps", name), seed=self.config.seed,
                       progress=self.progress)


def open_state(out: str, model_digest: str, config: CompressConfig, data_spec: str, limit: int | None) -> dict:
    """The job's state in ``out``: resumed when it is this job's, new when there is none.

    Raises:
        SlimkitError: ``out`` holds a job of another model, dataset or options.
    """
    from ..documents import read_json_file

    path = os.path.join(out, STATE)
    identity = {"version": STATE_VERSION, "model": model_digest, "config": config.to_dict(), "data": data_spec,
                "limit": limit}
    if not os.path.exists(path):
        return {**identity, "steps": {}, "started": time.time()}
    state = read_json_file(path, "compress state")
    if not isinstance(state, dict) or not isinstance(state.get("steps"), dict):
        raise SlimkitError(f"compress: {path} is not a compress state file: use another --out")
    for key in ("model", "data", "limit", "config"):
        if state.get(key) != identity[key]:
            what = {"model": "another model", "data": "another dataset", "limit": "another --limit",
                    "config": "other options"}[key]
            raise SlimkitError(f"compress: {out} holds a job of {what} ({key} differs): use another --out, or delete "
                               f"{path} to start over")
    return state


def kd_config(epochs: int, lr: float):
    """Hinton et al.'s KD from the original, the recovery of every step that retrains."""
    from ..pipeline import FinetuneConfig

    return FinetuneConfig(epochs=epochs, lr=lr, distill="kd")


# --- the steps of a latency or MACs target after the search (slimkit/compress/search_step.py) ----------------


def step_decompose(job: Job, plan: dict) -> dict:
    """Tucker-2 (Kim et al., ICLR 2016) with ranks allocated to the MAC budget, re-fitted layer by layer on training
    batches to the original's outputs: the other candidate of a MACs target. A budget decomposition cannot reach
    leaves it out (the record says why) and the pruned model goes on alone."""
    from ..artifact import history
    from ..decompose import DecomposeConfig, decompose
    from ..train import evaluate

    cfg = DecomposeConfig(decompose="tucker", target_macs=job.config.fraction, procedure="sequential")
    try:
        r = decompose(job.model, job.example, cfg, loader=job.data.loader("train", 64, seed=job.config.seed),
                      seed=job.config.seed)
    except SlimkitError as e:
        job.log(f"decomposition left out: {e}")
        return {"skipped": str(e)}
    top1 = evaluate(r.model, job.data.loader("test", 256))["top1"]
    macs_ratio = r.macs_after / r.macs_before
    history(r.model).append({"stage": "decompose", "params": cfg.to_dict(),
                             "metrics": {"test_top1": top1, "macs_ratio": macs_ratio}})
    job.save(r.model, "decompose")
    return {"chosen": {"method": "tucker", "ranks": {x["name"]: x["rank"] for x in r.layers}},
            "metrics": {"test_top1": top1, "macs_ratio": macs_ratio}, "left_whole": r.skipped}


CANDIDATES = ("search", "decompose")  # the pruned and the decomposed model of a MACs target
LABELS = {"search": "pruned", "decompose": "decomposed"}


def step_choose(job: Job, plan: dict) -> dict:
    """Pruned or decomposed: each candidate gets the same KD pilot from the original (``plan["pilot_epochs"]``);
    the one with the better validation top-1 is kept (as ``steps/choose``) and the fine-tune continues it. Each is
    also timed against the original in the job's runtime; when the kept one is the slower (by over 5%), the step's
    warning says so in the report.

    Validation is the split carved from train, never the test split the report's accuracy is measured on.
    """
    from ..artifact import history
    from ..pipeline import recover
    from ..prune.sensitivity import held_out_loader
    from ..train import evaluate

    c, rec = job.config, job.step("choose")
    epochs = plan["pilot_epochs"]
    val = held_out_loader(job.data, 256, c.seed)
    # names only from CANDIDATES: a crafted compress.json cannot make the job load another file
    rows = rec["candidates"] = {n: r for n, r in (rec.get("candidates") or {}).items() if n in CANDIDATES}
    for name in CANDIDATES:
        if name not in plan["steps"] or job.state["steps"].get(name, {}).get("skipped") or name in rows:
            continue
        model = job.saved(name)
        if epochs:
            model = recover(model, job.context(f"pilot-{name}"), kd_config(epochs, c.lr), job.model).eval()
        rows[name] = {"val_top1": evaluate(model, val)["top1"], "pilot_epochs": epochs,
                      "macs_ratio": job.state["steps"][name]["metrics"]["macs_ratio"],
                      "latency_ratio": _latency_ratio(job, model)}
        history(model).append({"stage": "pilot", "params": {"epochs": epochs, "lr": c.lr, "distill": "kd"},
                               "metrics": {"val_top1": rows[name]["val_top1"]}})
        job.save(model, f"pilot-{name}")
        job.save_state()  # a killed job does not pilot this candidate again
    best = max(rows, key=lambda n: (rows[n]["val_top1"], -rows[n]["macs_ratio"]))
    job.log("chosen: " + ", ".join(f"{LABELS[n]} {r['val_top1']:.4f}" for n, r in rows.items())
            + f" validation top-1 -> {best}")
    model = job.saved(f"pilot-{best}")
    job.save(model, "choose")
    out = {"chosen": best, "candidates": rows, "metrics": {"macs_ratio": rows[best]["macs_ratio"]}}
    # MACs are what was asked, time is what the user gets: say so when the more accurate candidate is the slower one
    other = next((n for n in rows if n != best), None)
    mine, theirs = (rows[n].get("latency_ratio") if n else None for n in (best, other))
    if mine is not None and theirs is not None and mine > 1.05 * theirs:
        out["warning"] = (f"the {LABELS[best]} model was kept for its validation top-1 ({rows[best]['val_top1']:.4f} "
                          f"vs {rows[other]['val_top1']:.4f}) though it measured {mine:.2f}x the original's latency in "
                          f"{c.runtime} against the {LABELS[other]} model's {theirs:.2f}x: a MACs target counts MACs; "
                          "ask for latency=F if speed is what matters")
        job.log(out["warning"])
    return out


def _latency_ratio(job: Job, model: nn.Module) -> float | None:
    """The candidate's latency / the original's in the job's runtime, worst batch size (7 interleaved pairs), or None
    where the runtime cannot run it."""
    from ..search.evaluate import measured_ratio

    c = job.config
    try:
        return measured_ratio(job.model, model, job.example, c.runtime, c.batch_sizes, job.threads, repeats=7)
    except SlimkitError:
        return None


def step_finetune(job: Job, plan: dict) -> dict:
    """KD fine-tune from the original of the searched (or, for a MACs target, the chosen) model, checkpointed every
    epoch; the chosen model's pilot epochs count towards the planned epochs."""
    from ..artifact import history
    from ..pipeline import recover
    from ..train import evaluate

    chosen = "choose" in plan["steps"]
    model = job.saved("choose" if chosen else "search")
    epochs = plan["finetune_epochs"] - (plan.get("pilot_epochs", 0) if chosen else 0)
    if epochs:
        model = recover(model, job.context("finetune"), kd_config(epochs, job.config.lr), job.model).eval()
    top1 = evaluate(model, job.data.loader("test", 256))["top1"]
    history(model).append({"stage": "finetune", "params": {"epochs": epochs, "lr": job.config.lr, "distill": "kd"},
                           "metrics": {"test_top1": top1}})
    job.save(model, "finetune")
    return {"metrics": {"test_top1": top1}, "epochs": epochs}


def step_quantize(job: Job, plan: dict) -> dict:
    """int8 when the runtime runs it faster and accuracy holds (measured), else the float model stays."""
    from ..artifact import history
    from ..prune.sensitivity import held_out_loader
    from ..search import int8_if_faster
    from ..train import evaluate

    c = job.config
    if not plan.get("int8"):
        return {"used": False, "reason": "not planned for this target",
                "metrics": dict(job.state["steps"]["finetune"]["metrics"])}
    model = job.saved("finetune")
    val = held_out_loader(job.data, 256, c.seed)
    q, info = int8_if_faster(model, job.data, val, job.example, c.runtime, c.batch_sizes, job.threads,
                             allowed=c.max_drop / 100, always=c.quantize == "always", seed=c.seed, log=job.log)
    if q is None:
        return {**info, "metrics": dict(job.state["steps"]["finetune"]["metrics"])}
    top1 = evaluate(q, job.data.loader("test", 256))["top1"]
    history(q).append({"stage": "quantize", "params": {"calib": 512, "runtime": c.runtime},
                       "metrics": {"test_top1": top1, **info}})
    job.save(q, "quantize")
    return {**info, "metrics": {"test_top1": top1}}


# --- the steps of a size target ------------------------------------------------------------------------------


SPARSITIES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.97, 0.98)
BITS = ((6, 5), (5, 4), (4, 4), (4, 3), (3, 2))  # (conv, linear) codebook bits, most precise first


def step_sparsity(job: Job, plan: dict) -> dict:
    """Choose sparsity and codebook bits: for each bit width, the least sparsity whose packed file fits the
    target (packed for real); of those, the one with the best validation top-1 before retraining."""
    import tempfile

    from ..artifact import save
    from ..prune.sensitivity import held_out_loader
    from ..sparse import ShareConfig, SparsifyConfig, pack, share, sparsify
    from ..sparse.sizes import SIZE_MARGIN
    from ..train import evaluate

    c = job.config
    with tempfile.TemporaryDirectory(prefix="slimkit-size-") as tmp:
        original = os.path.getsize(save(job.model, os.path.join(tmp, "m.safetensors")))
        target = c.fraction * original
        val = [b for _, b in zip(range(2), held_out_loader(job.data, 256, c.seed), strict=False)]
        rows, fits = [], []
        sparse_cache: dict[float, nn.Module] = {}
        for bits in BITS:
            for s in SPARSITIES:
                if s not in sparse_cache:
                    sparse_cache[s] = sparsify(job.model, SparsifyConfig(sparsity=s)).model
                shared = share(sparse_cache[s], ShareConfig(conv_bits=bits[0], linear_bits=bits[1])).model
                size = os.path.getsize(pack(shared, os.path.join(tmp, "m.slimpack")))
                row = {"sparsity": s, "conv_bits": bits[0], "linear_bits": bits[1], "bytes": size,
                       "ratio": size / original, "fits": size <= SIZE_MARGIN * target}
                rows.append(row)
                if row["fits"]:
                    row["val_top1"] = evaluate(shared, val)["top1"]
                    fits.append(row)
                    break
    warning = None
    if not fits:  # the job still makes the smallest model it can, and the report says how close it got
        best = min(rows, key=lambda r: r["bytes"])
        best["val_top1"] = None
        warning = (f"{c.target} is out of reach: the smallest packed file tried ({best['sparsity']:.0%} sparse, "
                   f"{best['conv_bits']}/{best['linear_bits']}-bit codebooks) is {best['ratio']:.4f} of the "
                   "original; that one is made")
        job.log(warning)
    else:
        best = max(fits, key=lambda r: (r["val_top1"], -r["sparsity"]))
    job.log(f"size plan: {best['sparsity']:.0%} sparsity, {best['conv_bits']}-bit conv / {best['linear_bits']}-bit "
            f"linear codebooks -> {best['ratio']:.3f} of {original:,} bytes before retraining "
            f"({len(rows)} candidates packed)")
    return {"chosen": best, "candidates": rows, "original_bytes": original} | ({"warning": warning} if warning else {})


def step_sparsify(job: Job, plan: dict) -> dict:
    """Global magnitude sparsity at the chosen level, retrained with the masks held (KD from the original)."""
    from ..artifact import history
    from ..sparse import SparsifyConfig, finetuner, sparsify
    from ..train import evaluate

    chosen = job.state["steps"]["sparsity"]["chosen"]
    epochs = plan["sparse_epochs"]
    cfg = SparsifyConfig(sparsity=chosen["sparsity"], rounds=2 if epochs >= 4 else 1)
    ctx = job.context("sparsify")
    r = sparsify(job.model, cfg, loader=job.data.loader("train", 128, seed=job.config.seed),
                 finetune=finetuner(ctx, kd_config(epochs, job.config.lr), job.model) if epochs else None,
                 epochs=epochs)
    top1 = evaluate(r.model, job.data.loader("test", 256))["top1"]
    history(r.model).append({"stage": "sparsify", "params": cfg.to_dict(), "metrics": {"test_top1": top1,
                                                                                       "sparsity": r.sparsity}})
    job.save(r.model, "sparsify")
    return {"sparsity": r.sparsity, "metrics": {"test_top1": top1},
            "layers": r.layers}


def step_share(job: Job, plan: dict) -> dict:
    """Per-layer k-means weight sharing at the chosen bits, centroids retrained with KD."""
    from ..artifact import history
    from ..sparse import ShareConfig, finetuner, share
    from ..train import evaluate

    chosen = job.state["steps"]["sparsity"]["chosen"]
    epochs = plan["share_epochs"]
    cfg = ShareConfig(conv_bits=chosen["conv_bits"], linear_bits=chosen["linear_bits"])
    r = share(job.saved("sparsify"), cfg,
              finetune=finetuner(job.context("share"), kd_config(epochs, job.config.lr), job.model) if epochs else None,
              epochs=epochs)
    top1 = evaluate(r.model, job.data.loader("test", 256))["top1"]
    history(r.model).append({"stage": "share", "params": cfg.to_dict(), "metrics": {"test_top1": top1}})
    job.save(r.model, "share")
    return {"metrics": {"test_top1": top1}, "layers": r.layers}


def step_pack(job: Job, plan: dict) -> dict:
    """The packed file (sparse indices, codebooks, Huffman/lzma): what a size target is measured on."""
    from ..sparse import pack, sizes

    path = pack(job.saved("share"), job.path("model.slimpack"))
    return {"bytes": os.path.getsize(path),
            "breakdown": sizes(path)}
