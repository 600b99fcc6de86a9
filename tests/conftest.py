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


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics and affine terms (fresh BN is the identity), so folding and fusion are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def run_cli(*argv: str) -> dict:
    """Run ``slimkit ARGV --json`` through the real entry point; the parsed JSON, or SlimkitError with its message."""
    import contextlib
    import io
    import json

    from slimkit.cli import main
    from slimkit.errors import SlimkitError

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--json"])
    if code != 0:
        raise SlimkitError(err.getvalue().strip())
    return json.loads(out.getvalue())

