"""Measure a model: parameters, MACs, element ops, memory, size on disk and an energy estimate.

:func:`profile` runs one forward pass and counts, per layer and in total:

* ``params``: parameter elements (each tensor once, tied weights too; quantized modules count
  their unpacked weight and bias);
* ``macs``: multiply-accumulates of convolutions, linear layers and matrix products, each
  call counted (rules in :mod:`slimkit.profile.ops`);
* ``other_ops``: element operations of everything else (normalisation, activations, pooling,
  ``add``/``mul``/``cat``, softmax...), never mixed into ``macs``;
* ``activation_bytes`` per layer: bytes of the tensors its ops write (views write nothing);
* ``activation_peak_bytes``: the largest total size of op-output storages alive at once
  during the pass, by tensor liveness (a storage lives from the op that creates it until its
  last reference dies; the input and the weights are not counted);
* ``weight_bytes``: bytes of parameters and persistent buffers at their real storage (see
  :mod:`slimkit.profile.weights`, with the :data:`WEIGHT_BYTES` hook for packed layouts);
* ``energy_mj_estimate``: an estimate after Horowitz 2014 / Han et al. 2016 (see
  :mod:`slimkit.profile.energy`).

Ops the profiler has no rule for are listed by name in ``Profile.uncounted``.
"""

from .core import LAYER_KEYS, LayerStats, Profile, profile, profile_spec, size_on_disk
from .energy import mac_energy_pj, precision_class
from .ops import OpCost
from .weights import WEIGHT_BYTES, WeightStat, register_weight_bytes, tensor_bytes

__all__ = ["LAYER_KEYS", "LayerStats", "OpCost", "Profile", "WEIGHT_BYTES", "WeightStat", "mac_energy_pj",
           "precision_class", "profile", "profile_spec", "register_weight_bytes", "size_on_disk", "tensor_bytes"]
