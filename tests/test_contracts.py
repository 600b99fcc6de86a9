"""The contract suites over every registry entry (slimkit.testing.contracts): nothing is listed by hand."""

import pytest

from slimkit.testing import contracts

# The ImageNet-size giants take seconds each to save and load (hundreds of MB); their forward,
# backward and profile run in the fast suite, their artifact round trip in the slow one.
HEAVY = {"vgg16", "wide_resnet50_2", "alexnet", "resnext50_32x4d", "inception_v3", "xception", "wrn28_10",
         "resnext29_8x64d", "resnet50", "densenet121", "googlenet"}


@pytest.mark.parametrize("name", contracts.model_names())
def test_every_model(name, tmp_path):
    contracts.check_model(name, str(tmp_path), round_trip=name not in HEAVY)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY & set(contracts.model_names())))
def test_heavy_models_round_trip(name, tmp_path):
    contracts.check_model(name, str(tmp_path))


@pytest.mark.parametrize("name", contracts.criterion_names())
def test_every_pruning_criterion(name):
    contracts.check_criterion(name)


@pytest.mark.parametrize("name", contracts.stage_names())
def test_every_stage(name, tmp_path):
    contracts.check_stage(name, tmp_path)


@pytest.mark.parametrize("name", contracts.distill_names())
def test_every_distillation_method(name):
    contracts.check_distill(name)


@pytest.mark.parametrize("name", contracts.observer_names())
def test_every_observer(name):
    err, agree = contracts.check_observer(name)
    assert agree >= 0.8, f"{name}: int8 and float agree on {agree:.0%} of the top-1 predictions"


@pytest.mark.parametrize("name", contracts.decomposition_names())
def test_every_decomposition(name):
    contracts.check_decomposition(name)


@pytest.mark.parametrize("name", contracts.sparsifier_names())
def test_every_sparsity_method(name, tmp_path):
    contracts.check_sparsifier(name, tmp_path)


@pytest.mark.parametrize("name", contracts.lowbit_names())
def test_every_lowbit_method(name, tmp_path):
    contracts.check_lowbit(name, tmp_path)
