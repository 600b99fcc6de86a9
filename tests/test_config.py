"""One declaration per method: configs check themselves, recipes fail before data, --help is the fields."""

import argparse
import contextlib
import dataclasses
import doctest
import importlib
import io
import os

import pytest
from conftest import ROOT

import slimkit
from slimkit import SlimkitError
from slimkit.cli import build_parser, command_configs, main
from slimkit.config import MethodConfig
from slimkit.distill import DistillConfig
from slimkit.pipeline import FinetuneConfig, get_stage, run_recipe, stage_configs
from slimkit.prune import DepthConfig, PruneConfig, SensitivityConfig
from slimkit.quant import QuantConfig, Train8Config
from slimkit.train.config import FitConfig
from slimkit.transform import TransformConfig

ALL = [PruneConfig, DepthConfig, SensitivityConfig, QuantConfig, Train8Config, DistillConfig, TransformConfig,
       FitConfig, FinetuneConfig]


# -- configs validate themselves and name the field ------------------------------------------------------------

@pytest.mark.parametrize("cls,options,message", [
    (PruneConfig, {"target_macs": 1.5}, r"prune: target_macs: must be in \(0, 1\], got 1.5"),
    (PruneConfig, {"target_macs": "half"}, "target_macs: expected number or null, got a string"),
    (PruneConfig, {"criterion": "group_l2"}, "unknown pruning criterion 'group_l2'.*did you mean 'group_l1'"),
    (PruneConfig, {"target_macs": 0.5, "ratio": 0.3}, "give only one policy, got target_macs, ratio"),
    (PruneConfig, {}, "give one of target_macs"),
    (PruneConfig, {"ratio": 0.3, "round_to": 0}, "round_to: must be >= 1, got 0"),
    (PruneConfig, {"ratio": 0.3, "latency_batch": [1, 64]}, "latency_model='table'"),
    (PruneConfig, {"ratio": 0.3, "criterion_options": {"aux_epoch": 1}, "criterion": "dcp"},
     "criterion 'dcp' takes no option 'aux_epoch'"),
    (PruneConfig, {"sensitivity": {"max_dorp": 0.1}}, "unknown option 'max_dorp' \\(did you mean 'max_drop'\\?\\)"),
    (DepthConfig, {"target_macs": 0.5, "count": 2}, "give exactly one of target_macs"),
    (DepthConfig, {"count": 1, "scoring": "gredy"}, "scoring: must be one of greedy, lazy, once, got 'gredy'"),
    (QuantConfig, {"observer": "minmix"}, "unknown observer 'minmix'.*did you mean 'minmax'"),
    (QuantConfig, {"qat_epochs": -1}, "qat_epochs: must be >= 0, got -1"),
    (QuantConfig, {"keep_float": "conv1"}, "keep_float: expected a list of strings, got a string"),
    (Train8Config, {"bits": 1}, r"bits: must be in \[2, 16\], got 1"),
    (FitConfig, {"lr": 0}, "lr: must be > 0, got 0.0"),
    (FitConfig, {"epochs": True}, "epochs: expected integer, got a boolean"),
    (FinetuneConfig, {"teacher": "resnet56"}, "teacher: goes with distill"),
    (FinetuneConfig, {"distill": "kd+xx"}, "unknown method 'xx'"),
    (DistillConfig, {"distill": "kd", "temperature": 2}, "unknown option 'temperature'"),
    (DistillConfig, {"distill": "one+kd"}, "'one' is its own teacher"),
    (TransformConfig, {"transform": "bottleneck", "groups": 2}, "unknown option 'groups'"),
])
def test_bad_options_are_named(cls, options, message):
    with pytest.raises(SlimkitError, match=message):
        cls.from_options(options)


@pytest.mark.parametrize("cls", ALL)
def test_record_round_trips_and_is_versioned(cls):
    example = {PruneConfig: {"target_macs": 0.5, "protected": ["fc"], "latency_batch": 1},
               DepthConfig: {"count": 2}, DistillConfig: {"distill": "at+kd", "T": 2.0, "epochs": 3},
               TransformConfig: {"transform": "grouped_shuffle", "groups": 4}}.get(cls, {})
    config = cls.from_options(example)
    record = config.to_dict()
    assert record["version"] == cls.VERSION
    import json

    assert cls.from_dict(json.loads(json.dumps(record))) == config  # through JSON, as in an artifact
    # a record written before a field existed still loads: the field takes its default
    newest = dataclasses.fields(cls)[-1].name
    older = {k: v for k, v in record.items() if k != newest}
    if newest not in getattr(cls, "flat", ()) and newest != getattr(cls, "extras", None):
        assert getattr(cls.from_dict(older), newest) == getattr(cls(**{}) if not example else
                                                                 cls.from_options(example), newest)
    with pytest.raises(SlimkitError, match="newer than this slimkit"):
        cls.from_dict({**record, "version": cls.VERSION + 1})


def test_flat_recipe_keys_route_to_their_place():
    c = DistillConfig.from_options({"distill": "kd", "teacher": "resnet56", "T": 2.0, "alpha": 0.5, "epochs": 3,
                                    "lr": 0.02})
    assert c.options == {"T": 2.0, "alpha": 0.5} and c.fit == FitConfig(epochs=3, lr=0.02)
    assert c.to_dict()["T"] == 2.0 and c.to_dict()["epochs"] == 3  # written back flat
    t = TransformConfig.from_options({"transform": "grouped_shuffle", "groups": 4, "layers": ["layer1.0.conv1"]})
    assert t.options == {"groups": 4} and t.layers == ("layer1.0.conv1",)


def test_api_takes_the_config_or_the_keywords_that_build_one():
    import torch

    from slimkit.prune import prune

    m = slimkit.create_model("digits_cnn")
    x = torch.zeros(1, 1, 8, 8)
    a = prune(m, x, PruneConfig(target_macs=0.5, round_to=4))
    b = prune(m, x, target_macs=0.5, round_to=4)
    assert a.kept == b.kept
    with pytest.raises(SlimkitError, match="not both"):
        prune(m, x, PruneConfig(target_macs=0.5), round_to=4)


# -- recipes: a mistyped option fails before any data is read ------------------------------------------------

def test_recipe_typo_fails_before_data_is_read(tmp_path, monkeypatch):
    import slimkit.pipeline as pipeline

    loaded = []
    monkeypatch.setattr(pipeline, "load_data", lambda *a, **k: loaded.append(a) or pytest.fail("data was read"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: digits_cnn\ndata: digits\nstages:\n  - method: finetune\n    epochs: 1\n"
                      "  - method: prune\n    target_mac: 0.5\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["compress", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--json"])
    assert code == 2 and not loaded
    line = err.getvalue().strip()
    assert line.startswith("slimkit: error: ") and len(line.splitlines()) == 1
    assert line.endswith("stage 2 (prune): unknown option 'target_mac' (did you mean 'target_macs'?)")
    with pytest.raises(SlimkitError, match=r"stage 1 \(finetune\): unknown option 'finetune.epoch' "
                                           r"\(did you mean 'finetune.epochs'\?\)"):
        stage_configs({"method": "finetune", "finetune": {"epoch": 2}}, 1)


def test_every_stage_record_in_a_recipe_rebuilds_its_config(tmp_path):
    stages = [{"method": "finetune", "epochs": 1},
              {"method": "prune_blocks", "count": 1, "batches": 1, "scoring": "once"},
              {"method": "prune", "target_macs": 0.7, "round_to": 4, "finetune": {"epochs": 1, "distill": "kd"}},
              {"method": "quantize", "calib": 32, "batch_size": 16}]
    report = run_recipe({"model": "digits_resnet", "data": "digits", "limit": 60, "progress": False,
                         "stages": stages}, str(tmp_path), log=lambda _: None)
    loaded = slimkit.load(report["artifact"])
    records = loaded.slimkit_history
    assert [r["stage"] for r in records] == [s["method"] for s in stages]
    for stage, record in zip(stages, records):
        entry = get_stage(record["stage"])
        _, config, recovery = stage_configs(stage, 1)
        assert entry.config.from_dict(record["params"]) == config
        assert (FinetuneConfig.from_dict(record["finetune"]) if record["finetune"] else None) == recovery


# -- the command line is generated from the fields ----------------------------------------------------------

def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# flags every command has or that name models, data and outputs: not method options
COMMON = {"help", "json", "threads", "trust_code", "model", "weights", "num_classes", "data", "limit", "seed",
          "batch_size", "out", "no_bench", "input_size", "student", "student_weights", "no_resume"}


@pytest.mark.parametrize("command", ["train", "prune", "quantize", "distill", "transform"])
def test_help_and_config_fields_agree(command):
    sub = _subparsers()[command]
    actions = {a.dest: a for a in sub._actions}
    expected = set()
    for cls, how in command_configs(command).values():
        prefix = how.get("prefix", "")
        for f in cls.cli_fields(how.get("only"), how.get("skip", ())):
            # a field whose dest the command already uses (--batch-size) gets its own, recorded as a default
            dest = sub.get_default(f"_dest_{prefix}{f.name}") or prefix + f.name
            expected.add(dest)
            assert dest in actions, f"{command}: no flag for {cls.__name__}.{f.name}"
            action = actions[dest]
            assert action.help.startswith(f.metadata["help"]), f"{command} {action.option_strings}: help drifted"
            flag = cls.flag(f.name, how.get("rename"), prefix)
            assert flag in action.option_strings or action.option_strings[0].startswith(("--no-", "--tie")), \
                f"{command}: {cls.__name__}.{f.name} is not {flag}"
            nested = dataclasses.fields(cls)
            assert f in nested
    stray = {d for d in actions if not d.startswith(("_flag_", "_dest_"))} - expected - COMMON
    # a nested config's own fields (sensitivity_max_drop ...) are flags of the nested class
    stray = {d for d in stray if not any(d.startswith(f"{n.name}_") for cls, _ in command_configs(command).values()
                                         for n in dataclasses.fields(cls))}
    assert not stray, f"{command}: flags that no config declares: {sorted(stray)}"
    text = sub.format_help()
    for dest in expected:
        for flag in actions[dest].option_strings:
            assert flag in text


def test_help_lists_registry_names():
    from slimkit.prune import CRITERIA

    text = _subparsers()["prune"].format_help().replace("\n", " ")
    assert all(name in text for name in CRITERIA.names())


def test_bad_flag_value_is_named_by_its_flag(tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["prune", "digits_cnn", "--target-macs", "2", "--out", str(tmp_path), "--json"])
    assert code == 2 and "prune: --target-macs must be in (0, 1], got 2.0" in err.getvalue()


# -- registries carry their facts; the docs are generated from them ------------------------------------------

def test_generated_method_catalogue_is_current():
    from slimkit.catalog import catalog_markdown

    with open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8") as f:
        assert f.read() == catalog_markdown(), "stale: python -m slimkit.catalog --write docs/methods.md"


def test_every_stage_declares_a_config_and_an_example():
    from slimkit.pipeline import STAGES, load_stage_modules

    load_stage_modules()
    for name in STAGES.names():
        entry = STAGES.get(name)
        assert issubclass(entry.config, MethodConfig) and dataclasses.is_dataclass(entry.config)
        assert entry.summary, f"stage {name} has no docstring"
        entry.config.from_options(entry.example)


# -- the docstring examples run ------------------------------------------------------------------------------

DOCUMENTED = ["slimkit.config", "slimkit.config_flags", "slimkit.trust", "slimkit.documents", "slimkit.experimental",
              "slimkit.models.registry", "slimkit.artifact", "slimkit.pipeline", "slimkit.train.config",
              "slimkit.prune.config", "slimkit.prune.pruner", "slimkit.prune.depth", "slimkit.prune.importance",
              "slimkit.quant.config", "slimkit.quant.core", "slimkit.distill", "slimkit.distill.config",
              "slimkit.transform", "slimkit.transform.config", "slimkit.profile.core", "slimkit.bench.core"]


@pytest.mark.parametrize("module", DOCUMENTED)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{module} has no example"
    assert result.failed == 0


@pytest.mark.parametrize("name", ["create_model", "prune", "quantize", "distill_terms", "apply_transform",
                                  "run_recipe", "save", "load", "profile", "compare"])
def test_public_entry_points_document_args_and_an_example(name):
    from slimkit.bench import compare
    from slimkit.distill import distill_terms
    from slimkit.profile import profile
    from slimkit.prune import prune
    from slimkit.quant import quantize
    from slimkit.transform import apply_transform

    fn = {"create_model": slimkit.create_model, "prune": prune, "quantize": quantize, "distill_terms": distill_terms,
          "apply_transform": apply_transform, "run_recipe": run_recipe, "save": slimkit.save, "load": slimkit.load,
          "profile": profile, "compare": compare}[name]
    doc = fn.__doc__ or ""
    assert "Args:" in doc and "Returns:" in doc and ">>>" in doc, f"{name}: Args/Returns/example missing"


def test_nested_configs_round_trip_through_their_records():
    c = PruneConfig(target_macs=0.5, sensitivity=SensitivityConfig(batches=2), steps=2,
                    step_finetune=FitConfig(epochs=2))
    assert PruneConfig.from_dict(c.to_dict()) == c


def test_flags_of_a_config_never_share_a_dest_with_the_command(tmp_path):
    p = build_parser()
    a = p.parse_args(["quantize", "m", "--data", "d", "--out", "o", "--calib-batch-size", "16", "--batch-size", "512"])
    assert a.batch_size == 512 and QuantConfig.from_args(a).batch_size == 16


def test_opt_takes_one_key_value_each(tmp_path):
    p = build_parser()
    a = p.parse_args(["distill", "--teacher", "t", "--student", "s", "--method", "at", "--data", "d", "--out", "o",
                      "--opt", "pairs=layer2:layer2,layer3:layer3", "--opt", "ce-weight=0.5"])
    assert DistillConfig.from_args(a, fit=FitConfig()).options == {"pairs": "layer2:layer2,layer3:layer3",
                                                                   "ce_weight": 0.5}
    with pytest.raises(SlimkitError, match="option T must be a finite number"):
        DistillConfig.from_options({"distill": "kd", "T": "abc"})


def test_non_finite_numbers_are_refused():
    with pytest.raises(SlimkitError, match="warmup_epochs: expected number"):
        FitConfig(warmup_epochs=float("inf"))
    with pytest.raises(SlimkitError, match="lr: expected number"):
        FitConfig(lr=float("nan"))


def test_the_older_none_defaults_of_prune_still_work():
    import torch

    from slimkit.prune import prune

    r = prune(slimkit.create_model("digits_cnn"), torch.zeros(1, 1, 8, 8), ratio=0.5, ratios=None, protected=None,
              round_to=4)
    assert r.macs_after < r.macs_before
