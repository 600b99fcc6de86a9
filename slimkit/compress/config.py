"""The options of the one-command job, declared once: :class:`CompressConfig` (API, CLI, provenance)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, option
from ..search.config import RUNTIMES, parse_duration

TARGETS = ("latency", "size", "macs")


def parse_target(text: str) -> tuple[str, float]:
    """``"latency=0.5"`` -> ``("latency", 0.5)``: the kind of budget and the fraction of the original's.

    Raises:
        ValueError: not ``KIND=FRACTION`` with a kind of :data:`TARGETS` and 0 < fraction < 1.
    """
    kind, sep, value = str(text).partition("=")
    kind = kind.strip()
    if not sep or kind not in TARGETS:
        raise ValueError(f"a target looks like latency=0.5, size=0.1 or macs=0.5, got {text!r}")
    try:
        fraction = float(value)
    except ValueError:
        raise ValueError(f"the fraction in {text!r} is not a number") from None
    if not 0 < fraction < 1:
        raise ValueError(f"the fraction in {text!r} must be between 0 and 1 (of the original's {kind})")
    return kind, fraction


@dataclass(frozen=True)
class CompressConfig(MethodConfig):
    """From a trained model to a smaller, faster, verified one under one target (docs/compress.md).

    Example:
        >>> CompressConfig(target="latency=0.5").kind
        'latency'
    """

    family = "compress"

    target: str = option("latency=0.5", "what to reach, as a fraction of the original's: latency=F (measured on "
                                        "--runtime at every --batch-sizes), size=F (bytes on disk) or macs=F",
                         metavar="KIND=F")
    max_drop: float = option(0.5, "top-1 accuracy the result may lose, in points (0.5 = half a point) on the test "
                                  "split", low=0, high=100)
    runtime: str = option("onnxruntime", "the runtime the model is deployed in: latency is measured there and the "
                                         "model is exported for it", choices=RUNTIMES)
    batch_sizes: tuple[int, ...] = option((1, 64), "batch sizes the latency is measured (and the target held) at",
                                          low=1)
    time_budget: str = option("2h", "the whole job's wall time on this machine (2h, 30m, 90s): shared out between "
                                    "the search and the fine-tune")
    trials: int | None = option(None, "search trials (default: as many as the time budget allows)", low=1)
    finetune_epochs: int | None = option(None, "fine-tune epochs with KD (default: as many as the time budget "
                                               "allows)", low=0)
    lr: float = option(0.01, "learning rate of the fine-tune", low=0, low_inclusive=False)
    quantize: str = option("auto", "int8 for a latency target: auto (when the runtime runs it faster and accuracy "
                                   "holds), always, never", choices=("auto", "always", "never"))
    seed: int = option(0, "seed of the search, the data order and the fine-tune")

    def validate(self) -> None:
        try:
            parse_target(self.target)
        except ValueError as e:
            raise self.error("target", str(e)) from None
        try:
            if not parse_duration(self.time_budget):
                raise ValueError("a time budget must be longer than zero")
        except ValueError as e:
            raise self.error("time_budget", str(e)) from None

    @property
    def kind(self) -> str:
        return parse_target(self.target)[0]

    @property
    def fraction(self) -> float:
        return parse_target(self.target)[1]

    @property
    def seconds(self) -> float:
        return float(parse_duration(self.time_budget))
