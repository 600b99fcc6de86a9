"""int8 through PyTorch 2 export: torchao's PT2E flow with the X86 inductor quantizer, compiled by inductor.

``torch.ao``'s FX graph mode, which :func:`slimkit.quant.quantize` uses, is deprecated upstream in
favour of this flow: ``torch.export`` captures the model, ``prepare_pt2e`` inserts observers where
``X86InductorQuantizer`` says (per-channel int8 weights, per-tensor uint8 activations, the same
scheme), calibration runs, ``convert_pt2e`` leaves quantize/dequantize pairs in the graph and
``torch.compile`` (inductor, with freezing) lowers them to oneDNN's int8 kernels. The result is a
compiled program, not a module tree, so it is not a slimkit artifact: slimkit keeps the FX model
as the saved form and measures this flow beside it (docs/export.md says which is faster here).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import SlimkitError
from ..experimental import experimental


class CompiledInt8(nn.Module):
    """A PT2E int8 program as a module (eval only): ``forward`` runs the compiled graph."""

    def __init__(self, program, source: nn.Module) -> None:
        super().__init__()
        self._program = [program]  # a plain list: the program is no submodule (it has no state_dict of ours)
        self.slimkit_base = getattr(source, "slimkit_base", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._program[0](x)

    def train(self, mode: bool = True) -> "CompiledInt8":  # an exported program cannot switch modes
        return super().train(False)


@experimental("0.1", "torchao's PT2E API; slimkit artifacts keep the FX int8 model")
def quantize_pt2e(model: nn.Module, calib_loader: Iterable, *, num_batches: int | None = None,
                  example: torch.Tensor | None = None, compile: bool = True) -> nn.Module:
    """Static int8 of ``model`` through torchao's PT2E flow and the X86 inductor quantizer (Jacob et al. 2018).

    Args:
        model: the float model (eval mode; not modified).
        calib_loader: calibration batches (or ``(input, label)`` pairs), as for :func:`slimkit.quant.quantize`.
        num_batches: how many calibration batches (default all).
        example: one input batch (default the first calibration batch); its batch axis is exported dynamic.
        compile: lower with inductor (int8 kernels); False returns the converted graph (reference int8, slow).

    Returns:
        A module whose forward runs the int8 program (:class:`CompiledInt8`).

    Raises:
        SlimkitError: torchao is not installed, or the model cannot be exported or quantized.
    """
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError:
        raise SlimkitError("PT2E int8 needs torchao: pip install 'slimkit[torchao]'") from None
    batches = []
    for i, batch in enumerate(calib_loader):
        if num_batches is not None and i >= num_batches:
            break
        batches.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
    if not batches:
        raise SlimkitError("calibration data is empty")
    x = example if example is not None else batches[0]
    if x.shape[0] < 2:  # a batch of one makes torch.export specialise the batch axis to 1
        x = torch.cat([x, x])
    model = model.eval()
    try:
        exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for b in batches:
                prepared(b)
        converted = convert_pt2e(prepared)
    except Exception as e:
        raise SlimkitError(f"PT2E quantization failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") \
            from None
    if not compile:
        return CompiledInt8(converted, model)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights as constants: what lets inductor pick the int8 oneDNN kernels
    program = torch.compile(converted)
    with torch.no_grad():
        program(x)  # compile now, so a compiler failure is raised here and not in a timing loop
    return CompiledInt8(program, model)
