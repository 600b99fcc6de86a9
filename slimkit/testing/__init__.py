"""Test support shipped with slimkit: contract suites over every registry and the helpers they use."""

from . import contracts
from .helpers import random_batches, randomize_bn, zeroed_copy

__all__ = ["contracts", "random_batches", "randomize_bn", "zeroed_copy"]
