"""The options of unstructured sparsity and weight sharing, declared once (API, recipe stage, CLI, provenance)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, option
from .methods import SPARSIFIERS


@dataclass(frozen=True)
class SparsifyConfig(MethodConfig):
    """Zero a fraction of the conv and linear weights (docs/sparse.md).

    Example:
        >>> SparsifyConfig(sparsify="agp", sparsity=0.9).edges
        'half'
    """

    family = "sparsify"

    # named for the family, as TransformConfig.transform: a recipe stage's own `method:` key names the stage
    sparsify: str = option("magnitude", "how weights are chosen", choices=SPARSIFIERS, flag="--method")
    sparsity: float = option(0.9, "fraction of the conv and linear weights set to zero", low=0, high=1,
                             high_inclusive=False)
    scope: str = option("global", "global: rank all layers' weights together; layer: every layer at the target; "
                                  "sensitivity: per-layer sparsities from a per-layer scan (needs data)",
                        choices=("global", "layer", "sensitivity"))
    scan_batches: int = option(4, "sensitivity: held-out batches each scan point is evaluated on", low=1)
    edges: str = option("half", "the first conv and the classifier: half the target, keep them dense, or the "
                                "same as the rest", choices=("half", "keep", "same"))
    rounds: int = option(1, "magnitude: prune and retrain in this many rounds of rising sparsity (Han et al. 2015)",
                         low=1)
    initial_sparsity: float = option(0.0, "agp: the sparsity the schedule starts from", low=0, high=1,
                                     high_inclusive=False)
    ramp: float = option(0.75, "agp: the schedule reaches the target after this fraction of the training steps",
                         low=0, high=1, low_inclusive=False)
    every: int = option(0, "agp: recompute the masks every this many steps (0: eight times per epoch)", low=0)
    batches: int = option(8, "obd: training batches for the Fisher estimate of the Hessian diagonal", low=1)
    splice_margin: float = option(0.1, "dns: weights are spliced back when above the cut that would prune this much "
                                       "more of the kept fraction", low=0, high=1)
    cycles: int = option(1, "iht: dense-sparse cycles after the first sparse phase", low=1)
    strength: float | None = option(None, "l1, l0, sensitivity: the penalty's strength (default 1e-4, 0.1, 5e-3)",
                                    low=0)

    STRENGTHS = {"l1": 1e-4, "l0": 0.1, "sensitivity": 5e-3}

    @property
    def method(self) -> str:
        """The sparsity method (the ``sparsify`` field; ``--method`` on the command line)."""
        return self.sparsify

    def validate(self) -> None:
        if self.method == "agp" and self.initial_sparsity > self.sparsity:
            raise self.error("initial_sparsity", "must not exceed {sparsity}")
        if self.rounds > 1 and self.method not in ("magnitude", "obd"):
            raise self.error("rounds", "goes with {sparsify} magnitude or obd (the others train on their own "
                                       "schedule)")
        if self.strength is not None and self.method not in self.STRENGTHS:
            raise self.error("strength", f"goes with {{sparsify}} {', '.join(self.STRENGTHS)}")

    @property
    def penalty(self) -> float:
        """The strength in use: the given one or the method's default."""
        return self.strength if self.strength is not None else self.STRENGTHS.get(self.method, 0.0)


@dataclass(frozen=True)
class ShareConfig(MethodConfig):
    """Cluster each layer's weights into a small codebook (Deep Compression stage 2, docs/sparse.md).

    Example:
        >>> ShareConfig().bits_for("Linear", edge=False)
        4
    """

    family = "share"

    conv_bits: int = option(5, "codebook bits of conv layers (2**bits shared values)", low=1, high=8)
    linear_bits: int = option(4, "codebook bits of linear layers", low=1, high=8)
    edge_bits: int = option(8, "codebook bits of the first conv and the classifier", low=1, high=8)
    init: str = option("linear", "k-means initialisation (linear as in Han et al. 2016)",
                       choices=("linear", "density", "random"))
    iterations: int = option(30, "k-means (Lloyd) iterations at most", low=1)
    weighting: str = option("none", "hessian: weight each value by its Fisher diagonal (Choi et al., ICLR 2017)",
                            choices=("none", "hessian"))
    batches: int = option(8, "hessian: training batches for the Fisher estimate", low=1)

    def bits_for(self, kind: str, edge: bool) -> int:
        """Codebook bits of a layer of type name ``kind``."""
        if edge:
            return self.edge_bits
        return self.linear_bits if kind == "Linear" else self.conv_bits
