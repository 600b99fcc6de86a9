"""What one aten op costs: multiply-accumulates, element operations, or nothing.

Counting happens at the level of the ops the dispatcher runs (after autograd and after
composite ops such as ``F.linear`` or ``torch.einsum`` are decomposed), so functional code
is counted exactly like modules. Every op lands in exactly one of three groups:

* **MAC ops** (convolutions, linear/matmul products, attention kernels, quantized conv and
  linear): one multiply-accumulate per product term. A convolution with weight ``W`` costs
  ``X.numel() * W[0].numel()`` where ``X`` is its output (its input when transposed), which
  covers groups, stride, dilation and padding (products with padding zeros are counted, as
  every other counter does). Bias additions are element ops, not MACs.
* **element ops** (``other_ops``), counted per element with these costs: pointwise ops
  (activations, ``add``/``mul``/..., comparisons, (de)quantisation) 1 per output element;
  inference batch norm 2 per element with an affine (scale, shift), 1 without; norms that
  compute statistics at run time (layer/group/instance norm, training batch norm) 5 per
  element with an affine, 4 without (the fvcore convention); softmax 3 per element (exp, sum,
  divide); pooling one per element of each window (``out.numel() * kernel area``; adaptive
  pooling sums its actual windows); reductions one per input element; data movement that
  builds a new tensor (``cat``, ``stack``, padding, ``roll``, gathers, upsampling) 1 per
  output element.
* **zero-cost ops**: views and metadata (``view``, ``reshape``, ``t``, ``permute``,
  ``expand``, ``slice``...), copies and casts (``clone``, ``_to_copy``, ``copy_``) and tensor
  creation (``empty``, ``zeros``, ``fill_``...).

Any other op is *uncounted*: the profiler lists it by name, never drops it silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Ops whose cost is zero by definition (see the module docstring). Names are the op's
# schema name with "::" written as ".", without overload; an in-place "op_" maps to "op".
ZERO_COST: frozenset[str] = frozenset(f"aten.{n}" for n in """
    view _unsafe_view reshape _reshape_alias view_as t transpose permute expand expand_as
    detach alias lift_fresh lift_fresh_copy squeeze unsqueeze flatten unflatten slice select
    split split_with_sizes unsafe_split unbind chunk narrow as_strided diagonal movedim
    unfold view_as_real view_as_complex _to_copy to clone contiguous copy _copy_from
    _copy_from_and_resize empty empty_like empty_strided zeros zeros_like ones ones_like full
    full_like new_empty new_empty_strided new_zeros new_ones new_full scalar_tensor fill zero
    arange _local_scalar_dense item sym_size sym_stride sym_numel sym_storage_offset
    _assert_async _assert_tensor_metadata _functional_assert_async resize set int_repr
    _has_compatible_shallow_copy_type is_same_size dropout alpha_dropout feature_dropout
""".split())

POINTWISE: frozenset[str] = frozenset(f"aten.{n}" for n in """
    add sub rsub mul div true_divide floor_divide remainder fmod neg abs sign reciprocal
    relu relu6 hardtanh leaky_relu elu selu celu gelu silu mish sigmoid tanh hardsigmoid
    hardswish softplus softshrink hardshrink threshold prelu _prelu_kernel glu
    clamp clamp_min clamp_max clip maximum minimum fmax fmin where masked_fill
    exp exp2 expm1 log log2 log10 log1p sqrt rsqrt pow square erf erfc erfinv sin cos tan
    floor ceil round trunc frac eq ne lt le gt ge logical_and logical_or logical_not
    logical_xor bitwise_and bitwise_or bitwise_not bitwise_xor addcmul addcdiv lerp
    nan_to_num isnan isinf isfinite _weight_norm _weight_norm_interface quantize_per_tensor quantize_per_channel
    quantize_per_tensor_dynamic dequantize fake_quantize_per_tensor_affine
    fake_quantize_per_channel_affine native_dropout
""".split())

REDUCTIONS: frozenset[str] = frozenset(f"aten.{n}" for n in """
    mean sum nansum prod amax amin max min argmax argmin all any var std var_mean std_mean
    norm linalg_vector_norm frobenius_norm logsumexp cumsum cumprod count_nonzero
""".split())

DATA_MOVEMENT: frozenset[str] = frozenset(f"aten.{n}" for n in """
    cat stack hstack vstack constant_pad_nd pad reflection_pad1d reflection_pad2d
    reflection_pad3d replication_pad1d replication_pad2d replication_pad3d roll flip repeat
    index index_select gather embedding tril triu pixel_shuffle pixel_unshuffle
    channel_shuffle native_channel_shuffle upsample_nearest1d upsample_nearest2d
    upsample_nearest3d _upsample_nearest_exact1d _upsample_nearest_exact2d
    _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d upsample_bicubic2d
    upsample_trilinear3d _upsample_bilinear2d_aa _upsample_bicubic2d_aa grid_sampler_2d
    masked_select scatter index_put _unsafe_index_put _unsafe_index
""".split())

SOFTMAX: frozenset[str] = frozenset(f"aten.{n}"
                                     for n in "_softmax softmax _safe_softmax _log_softmax log_softmax".split())
BATCH_NORM: frozenset[str] = frozenset(f"aten.{n}" for n in """
    native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training
    _native_batch_norm_legit_functional batch_norm _batch_norm_impl_index cudnn_batch_norm
    miopen_batch_norm _batch_norm_with_update _batch_norm_no_update
""".split())
# name -> index of the affine weight argument
STAT_NORMS: dict[str, int] = {"aten.native_layer_norm": 2, "aten.layer_norm": 2, "aten.native_group_norm": 1,
                              "aten.group_norm": 2, "aten.instance_norm": 1, "aten._fused_rms_norm": 2,
                              "aten.rms_norm": 2}
POOLS: frozenset[str] = frozenset(f"aten.{n}" for n in """
    max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
    max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d mkldnn_max_pool2d
    mkldnn_max_pool3d quantized_max_pool1d quantized_max_pool2d quantized_max_pool3d
""".split())
ADAPTIVE_POOLS: frozenset[str] = frozenset(f"aten.{n}" for n in """
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d
    _adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    mkldnn_adaptive_avg_pool2d
""".split())


@dataclass(frozen=True)
class OpCost:
    """The cost of one op call: MACs, element ops, and the operand whose dtype sets MAC energy."""

    macs: int = 0
    other_ops: int = 0
    mac_dtype: torch.dtype | None = None


ZERO = OpCost()


def op_name(func: Any) -> str:
    """``aten.add`` for ``aten.add.Tensor``: the op's schema name, namespace kept, overload dropped."""
    try:
        return func._schema.name.replace("::", ".")
    except AttributeError:
        return str(func)


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def _first(out: Any) -> torch.Tensor:
    ts = _tensors(out)
    if not ts:
        raise ValueError("op returned no tensor")
    return ts[0]


def _numel(t: torch.Tensor) -> int:
    return int(t._nnz()) if t.layout == torch.sparse_coo else int(t.numel())


def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


# ---------------------------------------------------------------- MAC ops


def _conv(transposed_index: int | None, transposed: bool = False) -> Callable[..., OpCost]:
    def count(args, kwargs, out) -> OpCost:
        x, w = args[0], args[1]
        bias = _arg(args, kwargs, 2, "bias")
        given = transposed_index is not None and len(args) > transposed_index
        is_t = bool(args[transposed_index]) if given else transposed
        per = w[0].numel() if w.dim() else 0
        y = _first(out)
        macs = (x.numel() if is_t else y.numel()) * per
        return OpCost(macs, y.numel() if bias is not None else 0, w.dtype)

    return count


def _addmm(args, kwargs, out) -> OpCost:
    a, b = args[1], args[2]  # args[0] is the bias: its adds are element ops, not MACs
    macs = _numel(a) * b.shape[-1] if a.layout == torch.sparse_coo else a.shape[0] * a.shape[1] * b.shape[1]
    return OpCost(int(macs), _first(out).numel(), b.dtype)


def _mm(args, kwargs, out) -> OpCost:
    a, b = args[0], args[1]
    if a.layout == torch.sparse_coo:
        return OpCost(_numel(a) * b.shape[-1], 0, a.dtype)
    if b.layout == torch.sparse_coo:
        return OpCost(_numel(b) * a.shape[0], 0, b.dtype)
    return OpCost(a.shape[0] * a.shape[1] * b.shape[1], 0, b.dtype)


def _bmm(args, kwargs, out) -> OpCost:
    a, b = args[0], args[1]
    return OpCost(a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], 0, b.dtype)


def _baddbmm(args, kwargs, out) -> OpCost:
    a, b = args[1], args[2]
    y = _first(out)
    if a.dim() == 3:  # baddbmm; addbmm sums over the batch into a 2-D result
        return OpCost(a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], y.numel(), b.dtype)
    return OpCost(a.shape[0] * a.shape[1] * b.shape[1], y.numel(), b.dtype)


def _mv(args, kwargs, out) -> OpCost:
    off = 1 if len(args) >= 3 else 0  # addmv(self, mat, vec) vs mv(mat, vec)
    a = args[off]
    return OpCost(a.shape[0] * a.shape[1], _first(out).numel() if off else 0, args[off + 1].dtype)


def _dot(args, kwargs, out) -> OpCost:
    return OpCost(args[0].numel(), 0, args[1].dtype)


def _linear(args, kwargs, out) -> OpCost:
    w = args[1]
    bias = _arg(args, kwargs, 2, "bias")
    y = _first(out)
    return OpCost(y.numel() * w.shape[-1], y.numel() if bias is not None else 0, w.dtype)


def _sdpa(args, kwargs, out) -> OpCost:
    # scores q k^T and the weighted sum over v; softmax and the score scaling are element ops
    q, k, v = args[0], args[1], args[2]
    rows = math.prod(q.shape[:-1])
    s = k.shape[-2]
    scores = rows * s
    return OpCost(scores * (q.shape[-1] + v.shape[-1]), 4 * scores, q.dtype)


def _native_mha(args, kwargs, out) -> OpCost:
    # torch's fused nn.MultiheadAttention fast path: q/k/v projections, attention, out projection
    q, k = args[0], args[1]
    e = int(args[3])
    heads = int(args[4])
    qkv_w = args[5]
    rows_q = math.prod(q.shape[:-1])
    rows_k = math.prod(k.shape[:-1])
    s = k.shape[-2] if k.dim() >= 2 else 1
    projections = (rows_q + 2 * rows_k) * e * e + rows_q * e * e
    attention = 2 * rows_q * s * e
    scores = rows_q * s * heads
    biases = (rows_q + 2 * rows_k) * e + rows_q * e
    return OpCost(projections + attention, biases + rows_q * e + 3 * scores, qkv_w.dtype)


def _unpack(packed: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if hasattr(packed, "unpack"):
        return packed.unpack()
    return torch.ops.quantized.linear_unpack(packed)


def _quantized(kind: str, fused_relu: bool = False) -> Callable[..., OpCost]:
    def count(args, kwargs, out) -> OpCost:
        x = args[0]
        w, b = _unpack(args[1])
        y = _first(out)
        if kind == "linear":
            macs = y.numel() * w.shape[-1]
        else:
            macs = (x.numel() if kind == "conv_transpose" else y.numel()) * w[0].numel()
        other = (y.numel() if b is not None else 0) + (y.numel() if fused_relu else 0)
        return OpCost(int(macs), other, w.dtype)

    return count


MAC_OPS: dict[str, Callable[..., OpCost]] = {
    "aten.convolution": _conv(6),
    "aten._convolution": _conv(6),
    "aten.convolution_overrideable": _conv(6),
    "aten.conv1d": _conv(None),
    "aten.conv2d": _conv(None),
    "aten.conv3d": _conv(None),
    "aten.conv_transpose1d": _conv(None, True),
    "aten.conv_transpose2d": _conv(None, True),
    "aten.conv_transpose3d": _conv(None, True),
    "aten.mkldnn_convolution": _conv(None),
    "aten.cudnn_convolution": _conv(None),
    "aten.cudnn_convolution_transpose": _conv(None, True),
    "aten.miopen_convolution": _conv(None),
    "aten.miopen_depthwise_convolution": _conv(None),
    "aten.slow_conv2d": _conv(None),
    "aten._slow_conv2d_forward": _conv(None),
    "aten.thnn_conv2d": _conv(None),
    "aten._conv_depthwise2d": _conv(None),
    "aten.slow_conv3d": _conv(None),
    "aten.slow_conv_dilated2d": _conv(None),
    "aten.slow_conv_transpose2d": _conv(None, True),
    "aten.addmm": _addmm,
    "aten._addmm_activation": _addmm,
    "aten._sparse_addmm": _addmm,
    "aten.sspaddmm": _addmm,
    "aten._sparse_mm": _mm,
    "aten.mm": _mm,
    "aten._int_mm": _mm,
    "aten.bmm": _bmm,
    "aten.baddbmm": _baddbmm,
    "aten.addbmm": _baddbmm,
    "aten.mv": _mv,
    "aten.addmv": _mv,
    "aten.dot": _dot,
    "aten.vdot": _dot,
    "aten.linear": _linear,
    "aten._native_multi_head_attention": _native_mha,
    "aten.scaled_dot_product_attention": _sdpa,
    "aten._scaled_dot_product_flash_attention_for_cpu": _sdpa,
    "aten._scaled_dot_product_flash_attention": _sdpa,
    "aten._scaled_dot_product_efficient_attention": _sdpa,
    "aten._scaled_dot_product_cudnn_attention": _sdpa,
    "aten._scaled_dot_product_fused_attention_overrideable": _sdpa,
    "quantized.linear": _quantized("linear"),
    "quantized.linear_relu": _quantized("linear", True),
    "quantized.linear_dynamic": _quantized("linear"),
    "quantized.linear_relu_dynamic": _quantized("linear", True),
    "quantized.linear_dynamic_fp16": _quantized("linear"),
    "quantized.conv1d": _quantized("conv"),
    "quantized.conv2d": _quantized("conv"),
    "quantized.conv3d": _quantized("conv"),
    "quantized.conv1d_relu": _quantized("conv", True),
    "quantized.conv2d_relu": _quantized("conv", True),
    "quantized.conv3d_relu": _quantized("conv", True),
    "quantized.conv_transpose1d": _quantized("conv_transpose"),
    "quantized.conv_transpose2d": _quantized("conv_transpose"),
    "quantized.conv_transpose3d": _quantized("conv_transpose"),
}

# quantized:: element ops (quantized add/mul/cat and friends), one per output element
QUANTIZED_POINTWISE: frozenset[str] = frozenset(f"quantized.{n}" for n in """
    add add_relu add_scalar mul mul_relu mul_scalar cat cat_relu relu6 leaky_relu sigmoid
    hardswish hardtanh batch_norm2d batch_norm2d_relu batch_norm3d layer_norm
""".split())


# ---------------------------------------------------------------- element ops


def _pool(args, kwargs, out) -> OpCost:
    y = _first(out)
    spatial = y.dim() - 2 if y.dim() >= 3 else y.dim() - 1
    kernel = list(args[1]) if len(args) > 1 else list(kwargs["kernel_size"])
    if len(kernel) == 1:
        kernel = kernel * max(spatial, 1)
    return OpCost(0, y.numel() * math.prod(kernel))


def _window_total(n_in: int, n_out: int) -> int:
    # adaptive pooling window i spans [floor(i*in/out), ceil((i+1)*in/out))
    return sum(-(-((i + 1) * n_in) // n_out) - (i * n_in) // n_out for i in range(n_out))


def _adaptive_pool(args, kwargs, out) -> OpCost:
    x, y = args[0], _first(out)
    out_size = list(y.shape[-(len(list(args[1]))):]) if len(args) > 1 else list(y.shape[2:])
    k = len(out_size)
    lead = math.prod(y.shape[:-k])
    reads = math.prod(_window_total(x.shape[-k + i], out_size[i]) for i in range(k))
    return OpCost(0, lead * reads)


def _batch_norm(args, kwargs, out) -> OpCost:
    x = args[0]
    weight = _arg(args, kwargs, 1, "weight")
    # the training flag is argument 5, or 3 in the ``no_stats`` overloads
    training = next((a for a in args[3:6] if isinstance(a, bool)), bool(kwargs.get("training", False)))
    if training:
        return OpCost(0, x.numel() * (5 if weight is not None else 4))
    return OpCost(0, x.numel() * (2 if weight is not None else 1))


def _bn_training(args, kwargs, out) -> OpCost:
    x, weight = args[0], _arg(args, kwargs, 1, "weight")
    return OpCost(0, x.numel() * (5 if weight is not None else 4))


def _bn_no_training(args, kwargs, out) -> OpCost:
    x, weight = args[0], _arg(args, kwargs, 1, "weight")
    return OpCost(0, x.numel() * (2 if weight is not None else 1))


def _stat_norm(affine_index: int) -> Callable[..., OpCost]:
    def count(args, kwargs, out) -> OpCost:
        x = args[0]
        affine = len(args) > affine_index and args[affine_index] is not None
        return OpCost(0, x.numel() * (5 if affine else 4))

    return count


def _pointwise(args, kwargs, out) -> OpCost:
    return OpCost(0, _first(out).numel())


def _reduction(args, kwargs, out) -> OpCost:
    return OpCost(0, _first(args).numel())


def _softmax(args, kwargs, out) -> OpCost:
    return OpCost(0, 3 * _first(out).numel())


def _zero(args, kwargs, out) -> OpCost:
    return ZERO


COUNTERS: dict[str, Callable[..., OpCost]] = dict(MAC_OPS)
COUNTERS.update({n: _zero for n in ZERO_COST})
COUNTERS.update({n: _pointwise for n in POINTWISE | DATA_MOVEMENT | QUANTIZED_POINTWISE})
COUNTERS.update({n: _reduction for n in REDUCTIONS})
COUNTERS.update({n: _softmax for n in SOFTMAX})
COUNTERS.update({n: _batch_norm for n in BATCH_NORM})
COUNTERS["aten._native_batch_norm_legit_no_training"] = _bn_no_training
COUNTERS["aten._batch_norm_no_update"] = _bn_no_training
COUNTERS["aten._batch_norm_with_update"] = _bn_training
COUNTERS["aten._native_batch_norm_legit_functional"] = _bn_training
COUNTERS.update({n: _stat_norm(i) for n, i in STAT_NORMS.items()})
COUNTERS.update({n: _pool for n in POOLS})
COUNTERS.update({n: _adaptive_pool for n in ADAPTIVE_POOLS})


def counter_for(name: str) -> Callable[..., OpCost] | None:
    """The cost function for an op name (``aten.relu_`` falls back to ``aten.relu``), or None."""
    fn = COUNTERS.get(name)
    if fn is None and name.endswith("_") and not name.endswith("__"):
        fn = COUNTERS.get(name[:-1])
    return fn


def is_zero_cost(name: str) -> bool:
    """Whether an op is a known zero-cost view, metadata, copy or creation op."""
    return name in ZERO_COST or (name.endswith("_") and name[:-1] in ZERO_COST)
