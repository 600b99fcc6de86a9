"""ONE: On-the-fly Native Ensemble (Lan, Zhu & Gong, NeurIPS 2018).

A CIFAR ResNet's low layers are shared and its last stage (with the classifier) is duplicated
into ``m`` branches; a gate (global pooling, FC, BN, ReLU, softmax) on the shared features
weighs the branch logits into an ensemble that teaches every branch. After training, one
branch (a plain network of the base architecture) is deployed: :meth:`OneNetwork.extract`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import SlimkitError

_NEEDED = ("conv1", "bn1", "relu", "layer1", "layer2", "layer3", "pool", "linear")


class OneNetwork(nn.Module):
    """A multi-branch CIFAR ResNet for ONE training; ``forward`` returns the gated ensemble logits.

    ``base_spec`` names the architecture (a CIFAR ResNet: ``resnet20`` ... ``resnet110``); every
    branch gets its own random initialisation, because branches that start equal stay nearly
    equal and teach each other nothing. After each forward, ``last_branch_logits`` (N, m, K) and
    ``last_gate`` (N, m) hold the branch outputs and their gate weights, which the ``one`` loss
    term reads. Use :meth:`from_model` to start all branches from a trained network instead.
    """

    def __init__(self, base_spec: str = "resnet20", branches: int = 3, num_classes: int | None = None,
                 base: nn.Module | None = None, branch_bases: list[nn.Module] | None = None) -> None:
        super().__init__()
        from ..models import create_model

        if int(branches) < 2:
            raise SlimkitError(f"ONE needs at least 2 branches, got {branches}")
        self.base_spec, self.branches_count = base_spec, int(branches)
        base = base if base is not None else create_model(base_spec, num_classes=num_classes)
        missing = [a for a in _NEEDED if not hasattr(base, a)]
        if missing:
            raise SlimkitError(f"ONE duplicates the last stage of a CIFAR ResNet; {base_spec!r} "
                               f"({type(base).__name__}) lacks {missing}")
        self.conv1, self.bn1, self.relu, self.layer1, self.layer2 = (base.conv1, base.bn1, base.relu, base.layer1,
                                                                      base.layer2)
        self.pool = base.pool
        if branch_bases is None:
            branch_bases = [base] + [create_model(base_spec, num_classes=num_classes) for _ in range(branches - 1)]
        self.branches = nn.ModuleList(nn.ModuleDict({"layer3": b.layer3, "linear": b.linear}) for b in branch_bases)
        shared = base.layer3[0].conv1.in_channels if hasattr(base.layer3[0], "conv1") else base.linear.in_features
        # the paper's gate: GAP -> FC -> BN -> ReLU -> softmax over branches
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(shared, branches),
                                  nn.BatchNorm1d(branches), nn.ReLU(inplace=True), nn.Softmax(dim=1))
        self._base = [base]  # a plain list: the template for extract(), not a submodule
        self.last_branch_logits: torch.Tensor | None = None
        self.last_gate: torch.Tensor | None = None

    @classmethod
    def from_model(cls, model: nn.Module, branches: int = 3) -> "OneNetwork":
        """A ONE network whose shared layers and every branch start from ``model``'s (trained) weights."""
        base = copy.deepcopy(model)
        spec = (getattr(model, "slimkit_base", None) or {}).get("spec", type(model).__name__)
        return cls(spec, branches, base=base, branch_bases=[base] + [copy.deepcopy(model) for _ in range(branches - 1)])

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared low layers (stem, first and second stage)."""
        return self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shared(x)
        g = self.gate(h)
        z = torch.stack([b["linear"](torch.flatten(self.pool(b["layer3"](h)), 1)) for b in self.branches], 1)
        self.last_branch_logits, self.last_gate = z, g
        return (g.unsqueeze(2) * z).sum(1)

    def extract(self, branch: int = 0) -> nn.Module:
        """Branch ``branch`` with the shared layers, as a plain network of the base architecture (a copy)."""
        if not 0 <= branch < len(self.branches):
            raise SlimkitError(f"branch must be in [0, {len(self.branches) - 1}], got {branch}")
        base = self._base[0]
        saved = base.layer3, base.linear
        base.layer3, base.linear = self.branches[branch]["layer3"], self.branches[branch]["linear"]
        try:
            out = copy.deepcopy(base)
        finally:
            base.layer3, base.linear = saved
        out.train(self.training)
        return out
