"""Verification is part of export: the exported file runs in its runtime and must compute what PyTorch computes.

:func:`verify` feeds fixed random inputs (and real batches when given) to the PyTorch model and to the
exported file in its runtime and records the largest absolute difference, the relative L2 error
and the top-1 agreement. Beyond tolerance, :func:`first_divergence` finds the first layer where the
two part ways, by exposing the ONNX graph's intermediate tensors and comparing each conv/linear
output with the same layer's output in PyTorch (the n-th such layer of one is the n-th of the
other: the exporter keeps their order).

Tolerances: a float export must match to ``1e-3`` of the output's scale (the float rounding of
another kernel library); an int8 export runs other int8 kernels whose requantization rounds
differently, so it is held to a relative L2 error of 0.05 and, on real data, a top-1 agreement
of 0.95 with the PyTorch int8 model (measured on resnet20 here: 0.028-0.041 and 0.98; the
accuracy of every exported int8 model on the full test split is in docs/export.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

FLOAT_RTOL = 1e-3
INT8_REL_L2 = 0.05
INT8_TOP1 = 0.95
LAYER_REL_L2 = {False: 1e-3, True: 0.1}  # per-layer bound in the divergence search (float, int8)


@dataclass
class Check:
    """The comparison of one exported file with its PyTorch model on one set of inputs."""

    runtime: str
    inputs: str  # "random" or "data"
    n: int
    max_abs_diff: float
    output_scale: float
    rel_l2: float
    top1_agreement: float
    passed: bool
    rule: str
    first_divergence: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def compare_outputs(got: np.ndarray, ref: np.ndarray, int8: bool, real_data: bool) -> tuple[bool, str, dict]:
    """(passed, the rule applied, the numbers) for one runtime output against the PyTorch reference."""
    diff = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
    scale = float(np.abs(ref).max())
    rel = _rel_l2(got, ref) if got.shape == ref.shape else float("inf")
    agree = float((got.argmax(1) == ref.argmax(1)).mean()) if got.shape == ref.shape else 0.0
    if int8:
        ok = rel <= INT8_REL_L2 and (not real_data or agree >= INT8_TOP1)
        rule = f"int8: relative L2 <= {INT8_REL_L2}" + (f", top-1 agreement >= {INT8_TOP1}" if real_data else "")
    else:
        ok = diff <= FLOAT_RTOL * max(1.0, scale)
        rule = f"float: max |diff| <= {FLOAT_RTOL} x max(1, output scale)"
    return ok, rule, {"max_abs_diff": diff, "output_scale": scale, "rel_l2": rel, "top1_agreement": agree}


def reference(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).float().numpy()


def verify(model: nn.Module, session, batches: Sequence[np.ndarray], *, int8: bool, inputs: str = "random",
           onnx_path: str | None = None) -> Check:
    """Compare ``session`` (:class:`~slimkit.export.runtime.Session`) with ``model`` on ``batches``.

    On failure, with ``onnx_path`` (the ONNX graph the session runs), the first diverging layer is
    searched (:func:`first_divergence`) and named in the result.
    """
    model.eval()
    refs = [reference(model, x) for x in batches]
    outs = [np.asarray(session.run(x)) for x in batches]
    ref, got = np.concatenate(refs), np.concatenate(outs) if all(o.ndim == 2 for o in outs) else outs[0]
    ok, rule, numbers = compare_outputs(got, ref, int8, inputs == "data")
    check = Check(session.runtime, inputs, int(ref.shape[0]), passed=ok, rule=rule, **numbers)
    if not ok and onnx_path is not None:
        check.first_divergence = first_divergence(model, onnx_path, batches[0][:2], int8, session.runtime)
    return check


# -- the first diverging layer ---------------------------------------------------------------------------

_COMPUTE = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def _is_compute_module(m: nn.Module) -> bool:
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)):
        return not any(True for _ in m.children())
    kind = type(m).__name__
    return type(m).__module__.startswith("torch.ao.nn") and ("Conv" in kind or "Linear" in kind)


def _torch_layer_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, np.ndarray]]:
    """(name, type, output) of every conv/linear layer in call order (int8 outputs dequantized).

    The ONNX exporter folds an eval-mode batch norm into the conv before it, so a conv whose next
    call is a batch norm is compared at that batch norm's output.
    """
    from .formats import exported_module

    module, _ = exported_module(model)
    calls: list[tuple[str, nn.Module, np.ndarray]] = []
    handles = []
    for name, m in module.named_modules():
        if name and not any(True for _ in m.children()):
            def hook(mod, args, out, n=name):
                if isinstance(out, torch.Tensor):
                    t = out.dequantize() if out.is_quantized else out
                    calls.append((n, mod, t.detach().float().numpy().copy()))  # an in-place ReLU comes next
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            module(x)
    finally:
        for h in handles:
            h.remove()
    seen = []
    for i, (name, mod, out) in enumerate(calls):
        if _is_compute_module(mod):
            nxt = calls[i + 1] if i + 1 < len(calls) else None
            if nxt is not None and isinstance(nxt[1], nn.modules.batchnorm._BatchNorm):
                out = nxt[2]
            seen.append((name, type(mod).__name__, out))
    return seen


def _onnx_compute_tensors(onnx_path: str, fused_relu: list[bool]) -> list[tuple[str, str]]:
    """(node, tensor to compare) of each conv/linear node in graph order; after the ReLU a torch layer fuses."""
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    out = []
    compute = [n for n in graph.node if n.op_type in _COMPUTE]
    for k, node in enumerate(compute):
        tensor = node.output[0]
        if k < len(fused_relu) and fused_relu[k]:
            nxt = consumers.get(tensor, [])
            if len(nxt) == 1 and nxt[0].op_type == "Relu":
                tensor = nxt[0].output[0]
        out.append((node.name or node.op_type, tensor))
    return out


def _intermediate_values(onnx_path: str, tensors: list[str], x: np.ndarray, runtime: str) -> list[np.ndarray]:
    import tempfile

    import onnx

    model = onnx.load(onnx_path)
    known = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    with tempfile.TemporaryDirectory(prefix="slimkit-verify-") as tmp:
        path = f"{tmp}/probe.onnx"
        onnx.save(model, path)
        if runtime == "openvino":
            import openvino as ov

            from .runtime import ov_config

            compiled = ov.Core().compile_model(path, "CPU", ov_config(1))
            result = compiled([x])
            by_name = {}
            for port, value in result.items():
                for name in port.get_names():
                    by_name[name] = value
            return [np.asarray(by_name[t]) for t in tensors]
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
        opts.log_severity_level = 3
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        values = session.run(tensors, {session.get_inputs()[0].name: x})
    return [np.asarray(v) for v in values]


def first_divergence(model: nn.Module, onnx_path: str, x: np.ndarray, int8: bool, runtime: str = "onnxruntime"
                     ) -> str | None:
    """The first conv/linear layer whose output in the runtime differs from PyTorch's, as one phrase; None if none."""
    layers = _torch_layer_outputs(model, torch.from_numpy(x))
    fused = ["ReLU" in kind for _, kind, _ in layers]
    nodes = _onnx_compute_tensors(onnx_path, fused)
    if not layers or len(layers) != len(nodes):
        return (f"the ONNX graph has {len(nodes)} conv/linear nodes and the model {len(layers)} such layers: they "
                "cannot be matched one to one")
    try:
        values = _intermediate_values(onnx_path, [t for _, t in nodes], x, runtime)
    except Exception as e:  # noqa: BLE001 - the search is a diagnosis; its own failure is reported, not raised
        return f"the intermediate outputs could not be read ({type(e).__name__})"
    bound = LAYER_REL_L2[int8]
    for (name, kind, ref), (node, _), got in zip(layers, nodes, values):
        if got.shape != ref.shape:
            return f"{name} ({kind}, ONNX node {node}): output shape {got.shape} vs {ref.shape}"
        rel = _rel_l2(got, ref)
        if not rel <= bound:
            return f"{name} ({kind}, ONNX node {node}): relative error {rel:.3g} > {bound}"
    return None
