"""Deep Compression, measured on disk: sparsity methods, weight sharing and the packed file, against peers.

Parts (each its own section of docs/benchmarks.md):

* ``digits``: LeNet-300-100 on the embedded digits data, the quick reproduction of Han et al.'s
  first table (prune in rounds, share, pack);
* ``resnet20`` / ``resnet56``: from the adapted CIFAR baselines (runs/baselines/NAME.safetensors,
  benchmarks/baselines.py; made here if absent), every variant with the same retraining budget, and
  in the same run PyTorch's own ``torch.nn.utils.prune.global_unstructured`` (L1) at the same
  sparsity and budget;
* ``lowbit``: resnet20 with LSQ W4/A4, ternary and binary weights, KD from the float model;
* ``execution``: when a CSR weight (``torch.sparse.mm``) beats the dense product on this CPU.

Sizes are bytes of files on disk for the same weights: slimkit's packed file (and the same
without Huffman, and with no entropy coder), the dense safetensors artifact, ``torch.save`` of
the state dict, and xz (lzma preset 9) of the dense artifact. Every packed file is loaded back
and checked bit-identical before its size is reported.

    python benchmarks/sparse.py --parts digits,resnet20,resnet56,lowbit,execution --threads 2
"""

from __future__ import annotations

import argparse
import copy
import io
import lzma
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CIFAR, ROOT, markdown_table, record  # noqa: E402

import slimkit  # noqa: E402
from slimkit.data import load  # noqa: E402
from slimkit.sparse import ShareConfig, SparsifyConfig, pack, share, sizes, sparsify  # noqa: E402
from slimkit.sparse.masks import prunable_layers  # noqa: E402
from slimkit.train import evaluate, fit  # noqa: E402

HEADERS = ["model", "variant", "sparsity", "shared bits", "top-1", "vs dense", "safetensors", "torch.save",
           "xz of safetensors", "packed, bits only", "packed, no Huffman", "packed", "packed ratio", "xz ratio",
           "minutes"]


def tuner(data, lr: float, batch: int, teacher=None):
    """The fixed retraining budget every variant gets: SGD momentum 0.9, cosine, weight decay 5e-4."""
    def run(model, epochs: int, tag: str):
        loader = data.loader("train", batch, seed=0)
        options = dict(epochs=epochs, lr=lr, weight_decay=5e-4, schedule="cosine", progress=False)
        if teacher is None:
            fit(model, loader, **options)
        else:
            from slimkit.distill import distill_terms

            with distill_terms("kd", teacher, model, next(iter(loader))[0][:2]) as terms:
                fit(model, loader, extra_losses=terms, **options)
        return model

    return run


def file_sizes(model, folder: str, x: torch.Tensor) -> dict:
    out = {}
    art = slimkit.save(model, os.path.join(folder, "m.safetensors"))
    out["safetensors"] = os.path.getsize(art)
    with open(art, "rb") as f:
        out["xz"] = len(lzma.compress(f.read(), preset=9))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    out["torch.save"] = buf.tell()
    for label, coders in (("bits only", ("bits",)), ("no huffman", ("bits", "lzma")),
                          ("packed", ("bits", "huffman", "lzma"))):
        p = pack(model, os.path.join(folder, "m.slimpack"), coders=coders)
        out[label] = os.path.getsize(p)
    out["components"] = sizes(p)["components"]
    back = slimkit.load(p)
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in back.state_dict().items()), "packed file is not bit-identical"
    assert torch.equal(back(x), model.eval()(x))
    return out


class Table:
    def __init__(self, name: str, base_top1: float, original_bytes: int, folder: str, x: torch.Tensor) -> None:
        self.name, self.base, self.original, self.folder, self.x = name, base_top1, original_bytes, folder, x
        self.rows: list[list] = []

    def add(self, label: str, model, top1: float, bits: str, seconds: float) -> None:
        layers = prunable_layers(model)
        total = sum(m.weight.numel() for _, m in layers)
        sparsity = sum(int((m.weight == 0).sum()) for _, m in layers) / total
        s = file_sizes(model, self.folder, self.x)
        self.rows.append([self.name, label, f"{sparsity:.3f}", bits, f"{100 * top1:.2f}",
                          f"{100 * (top1 - self.base):+.2f}", f"{s['safetensors']:,}", f"{s['torch.save']:,}",
                          f"{s['xz']:,}", f"{s['bits only']:,}", f"{s['no huffman']:,}", f"**{s['packed']:,}**",
                          f"**{self.original / s['packed']:.1f}x**", f"{self.original / s['xz']:.1f}x",
                          f"{seconds / 60:.1f}"])
        print(" | ".join(self.rows[-1]), s["components"], flush=True)


def torch_prune(model, sparsity: float, finetune, epochs: int):
    """PyTorch's own global L1 unstructured pruning (``torch.nn.utils.prune``), retrained with its masks, made
    permanent: the peer at the same sparsity and budget."""
    import torch.nn.utils.prune as tprune

    m = copy.deepcopy(model)
    params = [(mod, "weight") for _, mod in prunable_layers(m)]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)
    m = finetune(m, epochs, "torch-prune")
    for mod, name in params:
        tprune.remove(mod, name)
    return m.eval()


def cifar_part(name: str, args, data) -> None:
    path = os.path.join(args.baselines, f"{name}.safetensors")
    if not os.path.exists(path):
        from baselines import adapt

        adapt(name, data, 2, 0.01, 128, args.baselines)
    model = slimkit.load(path).eval()
    test = data.loader("test", 500)
    base = evaluate(model, test)["top1"]
    folder = tempfile.mkdtemp()
    x = torch.randn(4, 3, 32, 32)
    original = file_sizes(model, folder, x)["safetensors"]
    table = Table(name, base, original, folder, x)
    table.add("adapted baseline (dense fp32)", model, base, "32", 0.0)
    tune = tuner(data, args.lr, 128)
    kd_tune = tuner(data, args.lr, 128, teacher=copy.deepcopy(model))  # distillation freezes its teacher
    sparsity = args.sparsity[name]
    train = data.loader("train", 128, seed=0)
    best = None
    for variant in args.variants[name]:
        method, _, extra = variant.partition(":")
        t0 = time.perf_counter()
        if method == "torch-prune":
            out = torch_prune(model, sparsity, tune, args.epochs)
            label = f"PyTorch torch.nn.utils.prune global L1, {args.epochs} epoch(s)"
        else:
            options = {"sparsify": method, "sparsity": sparsity}
            if extra == "sens":
                options["scope"] = "sensitivity"
            r = sparsify(model, SparsifyConfig(**options), loader=train, val=data.loader("val", 500),
                         finetune=kd_tune if extra == "kd" else tune, epochs=args.epochs)
            out = r.model
            label = (f"slimkit `{method}`" + (" (sensitivity scope)" if extra == "sens" else "")
                     + (" + KD" if extra == "kd" else "") + f", {args.epochs} epoch(s)")
        top1 = evaluate(out, test)["top1"]
        table.add(label, out, top1, "32", time.perf_counter() - t0)
        if method != "torch-prune" and (best is None or top1 > best[1]):
            best = (out, top1, label)
    for bits in args.share_bits:
        conv, linear = (int(b) for b in bits.split("/"))
        t0 = time.perf_counter()
        s = share(best[0], ShareConfig(conv_bits=conv, linear_bits=linear), finetune=tune_share(data, args),
                  epochs=args.share_epochs)
        top1 = evaluate(s.model, test)["top1"]
        table.add(f"best above + sharing ({conv} conv / {linear} linear / 8 first and last) + {args.share_epochs} "
                  "epoch(s) centroid fine-tune", s.model, top1, f"{conv}/{linear}/8", time.perf_counter() - t0)
    body = (f"Start: the adapted {name} (top-1 {100 * base:.2f} on the 10,000 CIFAR-10 (JPEG) test images). "
            f"Target sparsity {sparsity} of the conv/linear weights (slimkit: global ranking, first conv and "
            f"classifier at half, the `edges=half` rule; PyTorch: global over all of them). Retraining budget of "
            f"every variant: {args.epochs} epoch(s) of SGD momentum 0.9, lr {args.lr} cosine, weight decay 5e-4, "
            f"batch 128, crop+flip, on the 45,000-image train split (split over a method's phases); KD rows add "
            f"Hinton's loss with the dense model as teacher. Sharing rows start from the best slimkit row and "
            f"fine-tune the centroids {args.share_epochs} epoch(s) at lr {args.lr / 10}. Sizes are bytes on disk; "
            "ratios against the dense fp32 safetensors artifact.\n\n" + markdown_table(HEADERS, table.rows))
    record(f"sparse-{name}{args.tag}", f"Deep Compression on {name}: sparsity, sharing, bytes on disk"
           + (f" ({args.tag.strip('-')} budget)" if args.tag else ""), body)


def tune_share(data, args):
    return tuner(data, args.lr / 10, 128)


def lowbit_part(args, data) -> None:
    """resnet20 with weights (and activations) below 8 bits, trained with the same budget, KD from the float model."""
    from slimkit.lowbit import LowBitConfig, lowbit

    model = slimkit.load(os.path.join(args.baselines, "resnet20.safetensors")).eval()
    test = data.loader("test", 500)
    base = evaluate(model, test)["top1"]
    folder = tempfile.mkdtemp()
    x = torch.randn(4, 3, 32, 32)
    table = Table("resnet20", base, file_sizes(model, folder, x)["safetensors"], folder, x)
    table.add("adapted baseline (dense fp32)", model, base, "32", 0.0)
    kd_tune = tuner(data, args.lr, 128, teacher=copy.deepcopy(model))
    for spec in args.lowbit:
        method, _, bits = spec.partition(":")
        w, _, a = bits.partition("/")
        config = LowBitConfig(lowbit=method, weight_bits=int(w) if w and method not in ("ttq", "binary") else None,
                              act_bits=int(a) if a else None)
        t0 = time.perf_counter()
        r = lowbit(model, config, loader=data.loader("train", 128, seed=0), finetune=kd_tune, epochs=args.epochs)
        top1 = evaluate(r.model, test)["top1"]
        label = (f"slimkit `{method}` W{config.bits}" + (f"/A{config.act_bits}" if config.act_bits else "/A32")
                 + f" + KD, {args.epochs} epoch(s)")
        table.add(label, r.model, top1, f"{config.bits} (first/last 8)", time.perf_counter() - t0)
    body = (f"Start: the adapted resnet20 (top-1 {100 * base:.2f}). Every row: quantization-aware training of "
            f"{args.epochs} epoch(s), SGD momentum 0.9, lr {args.lr} cosine, weight decay 5e-4, batch 128, "
            "crop+flip, with Hinton's KD from the float model; the first conv and the classifier at 8 bits "
            "(weights and inputs). Weights are simulated (fake-quantized floats, no low-bit kernels on this "
            "CPU): the packed file stores them at their bit width, which is what the sizes show.\n\n"
            + markdown_table(HEADERS, table.rows))
    record(f"sparse-lowbit{args.tag}", "Low-bit weights on resnet20: LSQ, ternary, binary", body)


def digits_part(args) -> None:
    data = load("digits", seed=0)
    torch.manual_seed(0)
    model = slimkit.create_model("lenet_300_100", in_features=64)
    fit(model, data.loader("train", 64, seed=0), epochs=30, lr=0.05, progress=False)
    model.eval()
    test = data.loader("test", 500)
    base = evaluate(model, test)["top1"]
    folder = tempfile.mkdtemp()
    x = torch.randn(4, 1, 8, 8)
    original = file_sizes(model, folder, x)["safetensors"]
    table = Table("LeNet-300-100 (digits)", base, original, folder, x)
    table.add("trained, dense fp32", model, base, "32", 0.0)
    tune = tuner(data, args.digits_lr, 64)
    t0 = time.perf_counter()
    r = sparsify(model, SparsifyConfig(sparsify="magnitude", sparsity=args.digits_sparsity, rounds=args.digits_rounds,
                                       edges=args.digits_edges), finetune=tune, epochs=args.digits_epochs)
    table.add(f"magnitude {args.digits_sparsity} (edges: {args.digits_edges}), {args.digits_rounds} rounds, "
              f"{args.digits_epochs} epochs", r.model, evaluate(r.model, test)["top1"], "32", time.perf_counter() - t0)
    for bits in (6, 5, 4):
        t0 = time.perf_counter()
        s = share(r.model, ShareConfig(conv_bits=bits, linear_bits=bits, edge_bits=bits),
                  finetune=tuner(data, args.digits_lr / 10, 64), epochs=10)
        table.add(f"+ sharing {bits} bits, 10 epochs centroid fine-tune", s.model, evaluate(s.model, test)["top1"],
                  str(bits), time.perf_counter() - t0)
    body = ("LeNet-300-100 (64 inputs) trained 30 epochs on the embedded digits data (1,294 train images, "
            f"top-1 on its 359 test images: one image is 0.28 points). Retraining SGD lr {args.digits_lr} cosine, "
            "batch 64; centroid fine-tune at a tenth of it. Han et al. 2016 report 40x for LeNet-300-100 on MNIST "
            "(92% sparse, 6-bit sharing, Huffman) at no loss; their 784-input first layer holds 88% of the "
            "weights, our 64-input one 38%, and biases and the JSON header weigh more in a 200 kB model.\n\n"
            + markdown_table(HEADERS, table.rows))
    record("sparse-digits", "Deep Compression reproduction: LeNet-300-100 on digits", body)


def sparse_execution(threads: int, pairs: int) -> str:
    import warnings

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    from slimkit.sparse.execute import SparseConv1x1, SparseLinear

    torch.set_num_threads(threads)
    rows = []
    cases = [("linear", nn.Linear(4096, 4096), (4096,)), ("linear", nn.Linear(512, 512), (512,)),
             ("linear", nn.Linear(64, 10), (64,)), ("conv 1x1", nn.Conv2d(256, 256, 1), (256, 14, 14)),
             ("conv 1x1", nn.Conv2d(64, 64, 1), (64, 32, 32))]
    for kind, layer, shape in cases:
        for sparsity in (0.5, 0.8, 0.9, 0.95, 0.99):
            dense = layer.eval()
            with torch.no_grad():
                w = torch.randn_like(dense.weight)
                w[torch.rand_like(w) < sparsity] = 0
                dense.weight.copy_(w)
            fast = (SparseLinear if kind == "linear" else SparseConv1x1).from_dense(dense).eval()
            for batch in (1, 64):
                x = torch.randn(batch, *shape)
                with torch.no_grad():
                    assert torch.allclose(dense(x), fast(x), atol=1e-3)
                    ratios, times = [], None
                    for _ in range(pairs):
                        times = []
                        for fn in (dense, fast):
                            reps, t0 = 0, time.perf_counter()
                            while time.perf_counter() - t0 < 0.02:
                                fn(x)
                                reps += 1
                            times.append((time.perf_counter() - t0) / reps)
                        ratios.append(times[0] / times[1])
                r = statistics.median(ratios)
                name = f"{kind} {tuple(dense.weight.shape[:2])}" + (f" on {shape[1]}x{shape[2]}" if kind != "linear"
                                                                     else "")
                rows.append([name, f"{sparsity:.2f}", batch, f"{1e6 * times[0]:.1f}", f"{1e6 * times[1]:.1f}",
                             f"{r:.2f}x", "**sparse**" if r > 1.1 else "dense"])
    return markdown_table(["layer", "sparsity", "batch", "dense us", "CSR us", "CSR speed-up (median)", "faster"],
                          rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="digits,resnet20,resnet56,lowbit,execution")
    p.add_argument("--epochs", type=int, default=1, help="retraining epochs of every CIFAR variant")
    p.add_argument("--share-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=9, help="interleaved pairs per sparse-execution cell")
    p.add_argument("--digits-sparsity", type=float, default=0.92)
    p.add_argument("--digits-edges", default="same")
    p.add_argument("--digits-rounds", type=int, default=3)
    p.add_argument("--digits-epochs", type=int, default=30)
    p.add_argument("--digits-lr", type=float, default=0.05)
    p.add_argument("--resnet20", default="torch-prune,magnitude,magnitude:kd,agp,dns,obd,magnitude:sens",
                   help="variants: a method, method:kd, method:sens, or torch-prune")
    p.add_argument("--resnet56", default="magnitude")
    p.add_argument("--sparsity20", type=float, default=0.8)
    p.add_argument("--sparsity56", type=float, default=0.9)
    p.add_argument("--share-bits", default="5/4,4/4", help="conv/linear bits of the sharing rows")
    p.add_argument("--lowbit", default="lsq:4/4,ttq,binary", help="low-bit rows: method[:W[/A]]")
    p.add_argument("--baselines", default=os.path.join(ROOT, "runs", "baselines"))
    p.add_argument("--tag", default="", help="suffix of the docs section, e.g. --tag=-long for a second budget")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.variants = {"resnet20": args.resnet20.split(","), "resnet56": args.resnet56.split(",")}
    args.sparsity = {"resnet20": args.sparsity20, "resnet56": args.sparsity56}
    args.share_bits = [b for b in args.share_bits.split(",") if b]
    args.lowbit = [b for b in args.lowbit.split(",") if b]
    parts = args.parts.split(",")
    if "digits" in parts:
        digits_part(args)
    cifar = [n for n in ("resnet20", "resnet56") if n in parts]
    if cifar or "lowbit" in parts:
        if not os.path.isdir(CIFAR):
            sys.exit(f"CIFAR-10 (JPEG) not found at {CIFAR}")
        data = load(f"cifar10:{CIFAR}", seed=0)
        for name in cifar:
            cifar_part(name, args, data)
        if "lowbit" in parts:
            lowbit_part(args, data)
    if "execution" in parts:
        record("sparse-execution", "When sparse execution pays: CSR matmul vs dense on this CPU",
               f"`slimkit.sparse.execute` layers (CSR weight, `torch.sparse.mm`) against the dense layer, threads "
               f"{args.threads}, median of {args.pairs} interleaved pairs of 20 ms timing windows. "
               "`sparse_execution()` makes this choice per layer of a model, on its real input shapes.\n\n"
               + sparse_execution(args.threads, args.pairs))


if __name__ == "__main__":
    main()
