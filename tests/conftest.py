import os

import pytest
import torch

from slimkit.testing import randomize_bn  # noqa: F401  (the tests' shared helper)

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



def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``slimkit ARGV`` through the real entry point: (exit status, stdout, stderr)."""
    import contextlib
    import io

    from slimkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str) -> str:
    """Assert the ground rule for bad input: exit status 2 and one ``slimkit: error:`` line, no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimkit: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def digits_model():
    """The digits ResNet trained two epochs on 300 digits, and that data (the search tests' small real problem)."""
    import slimkit
    from slimkit.data import load
    from slimkit.train import fit

    torch.manual_seed(0)
    data = load("digits", limit=300)
    model = slimkit.create_model("digits_resnet")
    fit(model, data.loader("train", 64), epochs=2, lr=0.05, progress=False)
    return model.eval(), data
