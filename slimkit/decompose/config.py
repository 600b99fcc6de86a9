"""The options of low-rank decomposition, declared once: :class:`DecomposeConfig` (API, stage, CLI, provenance)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, option
from .methods import DECOMPOSITIONS
from .ranks import parse_rank


@dataclass(frozen=True)
class DecomposeConfig(MethodConfig):
    """Decompose layers into low-rank factors, per layer or under a global budget (docs/decompose.md).

    ``rank`` sets each layer's rank (``vbmf``: EVBMF on the weights' unfoldings, Kim et al. 2016;
    ``energy:F``: the fewest components holding F of the energy; ``ratio:F``: F of the layer's
    parameters; ``full``: the most the layer allows; or a number). With a budget (``target_macs``, ``target_params`` or
    ``target_latency``), that rank is each layer's ceiling and the allocation lowers ranks where
    the least error is added per unit saved, leaving a layer whole where decomposing it saves
    nothing.

    Example:
        >>> DecomposeConfig(decompose="tucker", rank="energy:0.9").procedure
        'all'
    """

    family = "decompose"

    # named for the family, as TransformConfig.transform: a recipe stage's own `method:` key names the stage
    # (version 1 called it `method`, which a recipe could not set)
    decompose: str = option("tucker", "the decomposition", choices=DECOMPOSITIONS, flag="--method")
    rank: str | int | None = option(None, "per-layer rank: vbmf, energy:F, ratio:F, full or a number; with a target "
                                          "it is each layer's ceiling (default: vbmf, or full with a target)")
    target_macs: float | None = option(None, "keep this fraction of the original MACs", low=0, high=1,
                                       low_inclusive=False)
    target_params: float | None = option(None, "keep this fraction of the original parameters", low=0, high=1,
                                         low_inclusive=False)
    target_latency: float | None = option(None, "keep this fraction of the original's measured eager latency on "
                                                "this machine", low=0, high=1, low_inclusive=False)
    latency_batch: int | tuple[int, ...] = option(1, "batch size(s) the latency target is measured at", low=1)
    layers: str | tuple[str, ...] = option("all eligible", "layer names to decompose, comma-separated")
    protected: tuple[str, ...] = option((), "layers (or blocks) left whole", flag="--protect")
    procedure: str = option("all", "all: every layer from the original weights; sequential: layer by layer, each "
                                   "re-fitted on data to the original's outputs from the decomposed model's inputs",
                            choices=("all", "sequential"))
    batches: int = option(4, "training batches for the data-driven ranks, fits and the sequential re-fit", low=1)
    max_images: int = option(64, "at most this many images per layer in the fits", low=1)
    iterations: int = option(100, "ALS iterations of CP and Tucker (tensorly)", low=1)
    round_to: int = option(1, "ranks considered by the allocation are multiples of this", low=1)
    min_saving: float = option(0.0, "leave a layer whole unless decomposing saves at least this fraction of its "
                                    "MACs (or measured time)", low=0, high=1, high_inclusive=False)

    VERSION = 2

    @classmethod
    def migrate(cls, record: dict, version: int) -> dict:
        if version < 2 and "method" in record:
            record = {**record, "decompose": record["method"]}
            record.pop("method")
        return record

    @property
    def method(self) -> str:
        """The decomposition (the ``decompose`` field; ``--method`` on the command line)."""
        return self.decompose

    def validate(self) -> None:
        try:
            parse_rank(self.rank_rule)
        except Exception as e:  # noqa: BLE001 - parse_rank's own words, under this field's name
            raise self.error("rank", str(e)) from None
        given = [n for n in ("target_macs", "target_params", "target_latency") if getattr(self, n) is not None]
        if len(given) > 1:
            raise self.error(None, "give at most one of {target_macs}, {target_params}, {target_latency}")

    @property
    def rank_rule(self) -> str | int:
        """The rank actually used: the given one, else ``vbmf`` alone and ``full`` under a budget."""
        if self.rank is not None:
            return self.rank
        return "full" if self.target else "vbmf"

    @property
    def target(self) -> tuple[str, float] | None:
        for name in ("target_macs", "target_params", "target_latency"):
            if getattr(self, name) is not None:
                return name[len("target_"):], getattr(self, name)
        return None

    @property
    def latency_batches(self) -> tuple[int, ...]:
        return self.latency_batch if isinstance(self.latency_batch, tuple) else (self.latency_batch,)
