import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
CIFAR_JPEG = os.path.join(SHARED, "data", "cifar10-jpeg")
RESNET20 = os.path.join(SHARED, "models", "resnet20-12fca82f.th")
RESNET56 = os.path.join(SHARED, "models", "resnet56-4bfd9763.th")

# Tests share two cores; one thread each keeps timings and throughput predictable.
torch.set_num_threads(1)


def need(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (the ../shared folder beside the project provides it)")
    return path
