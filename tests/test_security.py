"""Files are data, never code: crafted artifacts and recipes run nothing and fail in one line (README: trust model)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, cli, one_line_error
from safetensors.torch import load_file, save_file

import slimkit
from slimkit import SlimkitError
from slimkit.artifact import read_header


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "m.safetensors"
    return str(slimkit.save(slimkit.create_model("digits_cnn").eval(), path, meta={"input_size": [1, 8, 8]}))


def _forge(src: str, dst, edit=None, text: str | None = None) -> str:
    header = read_header(src)
    if edit is not None:
        edit(header)
    save_file(load_file(src), str(dst), metadata={"slimkit": text if text is not None else json.dumps(header)})
    return str(dst)


def _set(path: tuple, value):
    def edit(header):
        node = header
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return edit


# -- code named by a file never runs -----------------------------------------------------------------------

def _code_specs(tmp_path):
    marker = tmp_path / "MARKER"
    sidecar = tmp_path / "evil.py"
    sidecar.write_text(f"open({str(marker)!r}, 'w').write('ran at import')\n"
                       f"def build(**kw):\n    open({str(marker)!r}, 'w').write('ran')\n")
    import os as os_module
    import subprocess as sp_module
    return marker, [
        {"spec": f"{os_module.__file__}:system", "num_classes": None, "kwargs": {"command": f"touch {marker}"}},
        {"spec": f"{sp_module.__file__}:run", "num_classes": None, "kwargs": {"args": ["touch", str(marker)]}},
        {"spec": f"{sidecar}:build", "num_classes": None, "kwargs": {}},
        {"spec": "evil.py:build", "num_classes": None, "kwargs": {}},  # relative: the file shipped beside it
    ]


def test_header_naming_code_runs_nothing(artifact, tmp_path, monkeypatch):
    marker, bases = _code_specs(tmp_path)
    monkeypatch.chdir(tmp_path)
    for i, base in enumerate(bases):
        forged = _forge(artifact, tmp_path / f"f{i}.safetensors", _set(("base",), base))
        with pytest.raises(SlimkitError, match=r"never runs code a file names.*--trust-code"):
            slimkit.load(forged)
        line = one_line_error(*cli("eval", forged, "--data", "digits", "--json")[::2])
        assert "--trust-code" in line and f"f{i}.safetensors" in line
        assert not marker.exists(), f"{base['spec']} ran"


def test_quantized_record_naming_code_runs_nothing(tmp_path):
    from slimkit.quant import quantize

    marker, bases = _code_specs(tmp_path)
    q = quantize(slimkit.create_model("digits_cnn").eval(), [torch.randn(8, 1, 8, 8)])
    path = str(slimkit.save(q, tmp_path / "q.safetensors"))
    assert slimkit.load(path) is not None  # the genuine file loads
    forged = _forge(path, tmp_path / "fq.safetensors", _set(("modules", "config", "base"), bases[0]))
    with pytest.raises(SlimkitError, match="never runs code a file names"):
        slimkit.load(forged)
    assert not marker.exists()


def test_crafted_file_in_a_fresh_process_exits_2_without_traceback(artifact, tmp_path):
    marker, bases = _code_specs(tmp_path)
    forged = _forge(artifact, tmp_path / "f.safetensors", _set(("base",), bases[1]))
    r = subprocess.run([sys.executable, "-m", "slimkit.cli", "eval", forged, "--data", "digits"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    one_line_error(r.returncode, r.stderr)
    assert not marker.exists()


# -- malformed headers: one line, exit 2, the field named -----------------------------------------------------

def _deep(n):
    return "[" * n + "]" * n


MALFORMED = {
    "not JSON": (None, "{not json", "not valid JSON"),
    "deeply nested JSON": (None, '{"format": "slimkit.artifact", "version": 1, "modules": ' + _deep(100_000) + "}",
                           "nested"),
    "nested past the limit": (None, json.dumps({"format": "slimkit.artifact", "version": 1,
                                                "modules": {"type": "torch.nn.Identity"},
                                                "meta": json.loads(_deep(80))}), "nested deeper than 64"),
    "header is a list": (None, "[1, 2]", "expected a mapping"),
    "unknown top-level key": (_set(("extra",), 1), None, "unknown key"),
    "wrong format": (_set(("format",), "pickle"), None, "unsupported artifact format"),
    "future version": (_set(("version",), 99), None, "newer than this slimkit"),
    "version a string": (_set(("version",), "1"), None, "unsupported artifact format"),
    "modules a list": (_set(("modules",), []), None, "field modules: expected a mapping, got a list"),
    "module type an integer": (_set(("modules", "type"), 7), None, "field modules.type: expected a string"),
    "children a list": (_set(("modules", "children"), [1]), None, "field modules.children: expected a mapping"),
    "child a string": (_set(("modules", "children", "classifier"), "x"), None,
                       "field modules.children.classifier: expected a mapping"),
    "child name with a dot": (_set(("modules", "children", "a.b"), {"type": "torch.nn.Identity"}), None,
                              "is not a module name"),
    "config a string": (_set(("modules", "children", "classifier", "config"), "x"), None,
                        "modules.children.classifier.config: expected a mapping"),
    "config the type refuses": (_set(("modules", "children", "classifier", "config"), {"nonsense": 1}), None,
                                "cannot rebuild module 'classifier'"),
    "history a mapping": (_set(("history",), {}), None, "field history: expected a list"),
    "history entry a number": (_set(("history",), [3]), None, r"field history\[0\]: expected a mapping"),
    "meta a list": (_set(("meta",), []), None, "field meta: expected a mapping"),
    "input size huge": (_set(("meta", "input_size"), [3, 100_000, 100_000]), None, "larger than any input"),
    "input size of strings": (_set(("meta", "input_size"), ["3"]), None, "field meta.input_size"),
    "classes not strings": (_set(("meta", "classes"), [1, 2]), None, r"meta.classes\[0\]: expected a string"),
    "base a string": (_set(("base",), "digits_cnn"), None, "field base: expected a mapping"),
    "base spec a number": (_set(("base", "spec"), 3), None, "field base.spec: expected a string"),
    "base unknown key": (_set(("base", "module"), "os"), None, "field base: unknown key"),
    "num_classes a string": (_set(("base", "num_classes"), "ten"), None, "field base.num_classes"),
    "kwargs nested": (_set(("base", "kwargs"), {"width": {"a": 1}}), None, "field base.kwargs.width"),
    "kwargs unknown to the builder": (_set(("base", "kwargs"), {"evil": 1}), None,
                                      "digits_cnn takes no argument 'evil'"),
    "kwargs the builder refuses": (_set(("base",), {"spec": "torchvision:resnet18",
                                                    "kwargs": {"width_per_group": "x"}}),
                                   None, "building torchvision:resnet18 failed"),
    "kwargs reserved": (_set(("base",), {"spec": "torchvision:resnet18", "kwargs": {"weights": "IMAGENET1K_V1"}}),
                        None, "may not set 'weights'"),
    "base another artifact": (_set(("base", "spec"), "other.safetensors"), None, "names another artifact"),
    "base unknown model": (_set(("base", "spec"), "no_such_net"), None, "unknown model 'no_such_net'"),
    "oversized string": (_set(("meta", "note"), "x" * 1_000_001), None, "1,000,001 characters"),
    "oversized list": (_set(("history",), [{}] * 1_000_001), None, "1,000,001 entries"),
    "too many modules": (_set(("modules", "children"), {f"m{i}": {"type": "torch.nn.Identity"}
                                                        for i in range(100_001)}), None, "more than 100,000 modules"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_header_is_one_line(artifact, tmp_path, case):
    edit, text, message = MALFORMED[case]
    forged = _forge(artifact, tmp_path / "bad.safetensors", edit, text)
    code, _, err = cli("info", forged, "--json")
    line = one_line_error(code, err)
    assert "bad.safetensors" in line
    with pytest.raises(SlimkitError) as e:
        slimkit.load(forged)
    import re
    assert re.search(message, str(e.value)), str(e.value)


def test_tensors_that_do_not_fit_are_named(artifact, tmp_path):
    state = load_file(artifact)
    name = next(iter(state))
    state[name] = torch.zeros(3)
    bad = tmp_path / "shape.safetensors"
    save_file(state, str(bad), metadata={"slimkit": json.dumps(read_header(artifact))})
    line = one_line_error(*cli("eval", str(bad), "--data", "digits", "--json")[::2])
    assert "shape mismatch" in line and name in line


# -- the explicit opt-in -------------------------------------------------------------------------------------

NETS = textwrap.dedent("""
    import torch
    from torch import nn

    class OddNet(nn.Module):
        def __init__(self, num_classes=10, width=24):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.head(self.body(self.stem(x)).mean((2, 3)))

    def build(num_classes=10, width=24):
        return OddNet(num_classes, width)
""")


def test_user_model_pruned_round_trips_in_a_fresh_process_with_trust(tmp_path):
    from slimkit.prune import prune

    nets = tmp_path / "nets.py"
    nets.write_text(NETS)
    model = slimkit.create_model(f"{nets}:build", num_classes=10, width=24).eval()
    pruned = prune(model, torch.zeros(1, 1, 8, 8), ratio=0.5, round_to=4).model.eval()
    assert pruned.stem[0].out_channels == 12
    path = str(slimkit.save(pruned, tmp_path / "pruned.safetensors"))
    assert read_header(path)["modules"]["type"] == "slimkit_user_nets.OddNet"  # no per-process salt
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        save_file({"x": x, "y": pruned(x)}, str(tmp_path / "io.safetensors"))

    elsewhere = tmp_path / "colleague"
    elsewhere.mkdir()
    (elsewhere / "nets.py").write_text(NETS)  # the artifact and its code handed to someone else
    for trusted in (nets, elsewhere / "nets.py"):  # each in a fresh process, as a user would
        script = textwrap.dedent(f"""
            import torch, slimkit
            from safetensors.torch import load_file
            io = load_file({str(tmp_path / 'io.safetensors')!r})
            try:
                slimkit.load({path!r})
                raise SystemExit("loaded without trust")
            except slimkit.SlimkitError as e:
                assert "--trust-code nets.py" in str(e), e
            m = slimkit.load({path!r}, trust_code={str(trusted)!r})
            with torch.no_grad():
                assert torch.equal(m(io["x"]), io["y"])
            assert m.slimkit_base["spec"].startswith({str(trusted)!r}), m.slimkit_base
            print("ok")
        """)
        r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr

    r = subprocess.run([sys.executable, "-m", "slimkit.cli", "info", path, "--trust-code", str(elsewhere / "nets.py"),
                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params"] == sum(p.numel() for p in pruned.parameters())


def test_trust_names_the_file_a_document_names(tmp_path):
    nets = tmp_path / "nets.py"
    nets.write_text(NETS)
    other = tmp_path / "other.py"
    other.write_text(NETS)
    path = str(slimkit.save(slimkit.create_model(f"{nets}:build").eval(), tmp_path / "m.safetensors"))
    with pytest.raises(SlimkitError, match="never runs code"):
        slimkit.load(path, trust_code=str(other))  # trusting another file does not trust this one
    with pytest.raises(SlimkitError, match="file not found"):
        slimkit.load(path, trust_code=str(tmp_path / "absent.py"))
    with pytest.raises(SlimkitError, match=r"takes a Python file"):
        slimkit.load(path, trust_code=str(tmp_path / "m.safetensors"))


# -- recipes ------------------------------------------------------------------------------------------------

def _recipe(tmp_path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_recipe_naming_code_needs_trust(tmp_path, monkeypatch):
    from slimkit.pipeline import load_recipe
    from slimkit.trust import trust_code

    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(NETS)
    recipe = _recipe(tmp_path, """
        model: nets.py:build
        data: digits
        stages: []
    """)
    line = one_line_error(*cli("compress", "--recipe", recipe, "--out", str(tmp_path / "out"), "--json")[::2])
    assert "field model" in line and "--trust-code nets.py" in line
    assert not (tmp_path / "out").exists()
    with trust_code("nets.py"):
        assert load_recipe(recipe)["model"] == f"{tmp_path / 'nets.py'}:build"
    teacher = _recipe(tmp_path, """
        model: digits_cnn
        data: digits
        stages:
          - method: finetune
            finetune: {distill: kd, teacher: nets.py:build}
    """)
    with pytest.raises(SlimkitError, match=r"stages\[0\]\.finetune\.teacher names code"):
        load_recipe(teacher)


@pytest.mark.parametrize("text,message", [
    ("a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: "
     "[*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n",
     "more than 100,000 values"),
    ("model: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32"),
    ("- 1\n- 2\n", "a recipe is a mapping"),
    ("model: digits_cnn\ndata: digits\nseed: abc\n", "field seed: expected an integer, got a string"),
    ("model: digits_cnn\ndata: digits\nstages: [{method: 3}]\n", r"field stages\[0\]\.method: expected a string"),
    ("model: !!python/object/apply:os.system ['touch MARKER']\n", "not valid YAML"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_recipe_is_one_line(tmp_path, monkeypatch, text, message):
    import re

    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, text)
    line = one_line_error(*cli("compress", "--recipe", recipe, "--out", str(tmp_path / "out"), "--json")[::2])
    assert re.search(message, line), line
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "out").exists()


def test_oversized_recipe_is_refused_unread(tmp_path):
    recipe = tmp_path / "big.yaml"
    recipe.write_text("model: digits_cnn\ndata: digits\n" + "#" * (1 << 20))
    line = one_line_error(*cli("compress", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--json")[::2])
    assert "at most 1,048,576" in line


def test_user_module_name_is_stable_across_processes(tmp_path):
    nets = tmp_path / "my-nets.py"
    nets.write_text(NETS)
    names = set()
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", f"import slimkit; m = slimkit.create_model({str(nets)!r} + ':build');"
                            "print(type(m).__module__)"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        names.add(r.stdout.strip())
    assert names == {"slimkit_user_my_nets"}
    assert os.path.exists(nets)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_in_a_training_checkpoint_never_runs(tmp_path):
    import pickle

    from slimkit.train import fit
    from slimkit.train.engine import CHECKPOINT

    marker = tmp_path / "MARKER"
    with open(tmp_path / CHECKPOINT, "wb") as f:
        pickle.dump({"epoch": 1, "model": {"w": _Evil(marker)}}, f)
    data = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))]
    with pytest.raises(SlimkitError, match="not a readable slimkit checkpoint"):
        fit(slimkit.create_model("digits_cnn"), data, epochs=1, checkpoint_dir=str(tmp_path), progress=False)
    assert not marker.exists()
    torch.save({"epoch": "one", "log": []}, tmp_path / CHECKPOINT)  # plain data, wrong types
    with pytest.raises(SlimkitError, match="does not match"):
        fit(slimkit.create_model("digits_cnn"), data, epochs=1, checkpoint_dir=str(tmp_path), progress=False)


# -- found in review: each once a way past the promise ----------------------------------------------------------

def test_a_trusted_file_runs_only_the_builders_it_defines(tmp_path):
    marker = tmp_path / "PWNED"
    nets = tmp_path / "nets.py"
    nets.write_text(NETS + "\nfrom os import makedirs\n\ndef _private(**kw):\n    raise SystemExit('ran')\n")
    art = slimkit.save(slimkit.create_model(f"{nets}:build").eval(), tmp_path / "m.safetensors")
    for fn, kwargs in (("makedirs", {"name": str(marker), "exist_ok": True}), ("_private", {})):
        forged = _forge(str(art), tmp_path / f"{fn}.safetensors",
                        _set(("base",), {"spec": f"{nets}:{fn}", "num_classes": None, "kwargs": kwargs}))
        with pytest.raises(SlimkitError, match=f"defines no public builder function '{fn}'"):
            slimkit.load(forged, trust_code=str(nets))
    assert not marker.exists()


def test_declared_sizes_beyond_the_file_are_refused(artifact, tmp_path):
    import time

    cases = {
        "huge linear": _set(("modules", "children", "big"),
                            {"type": "torch.nn.Linear", "config": {"in_features": 16000, "out_features": 16000}}),
        "transformer": _set(("modules", "children", "t"),
                            {"type": "torch.nn.Transformer", "config": {"num_encoder_layers": 20000}}),
        "huge base": _set(("base", "spec"), "wrn28_10"),
    }
    for case, edit in cases.items():
        forged = _forge(artifact, tmp_path / "x.safetensors", edit)
        t0 = time.perf_counter()
        with pytest.raises(SlimkitError, match="declares .* values, more than|not registered"):
            slimkit.load(forged)
        assert time.perf_counter() - t0 < 10, case


def test_crafted_quantized_state_is_bounded(tmp_path):
    import time

    from slimkit.quant import quantize

    q = quantize(slimkit.create_model("digits_cnn").eval(), [torch.randn(8, 1, 8, 8)])
    path = str(slimkit.save(q, tmp_path / "q.safetensors"))
    state = load_file(path)
    key = next(k for k in state if k.endswith(".__qlen"))
    for value, message in ((2 ** 62, r"outside \[0, 9\)"), (-1, "outside")):
        bad = dict(state)
        bad[key] = torch.tensor(value)
        save_file(bad, str(tmp_path / "b.safetensors"), metadata={"slimkit": json.dumps(read_header(path))})
        t0 = time.perf_counter()
        with pytest.raises(SlimkitError, match=message):
            slimkit.load(tmp_path / "b.safetensors")
        assert time.perf_counter() - t0 < 10
    axis = next(k for k in state if k.endswith(".__qaxis"))
    bad = {**state, axis: torch.tensor(10 ** 9)}
    save_file(bad, str(tmp_path / "c.safetensors"), metadata={"slimkit": json.dumps(read_header(path))})
    with pytest.raises(SlimkitError, match="outside"):
        slimkit.load(tmp_path / "c.safetensors")
    header = read_header(path)
    header["modules"]["config"]["recipe"]["observer"] = "percentile"
    header["modules"]["config"]["recipe"]["observer_kwargs"] = {"bins": 10 ** 8}
    save_file(state, str(tmp_path / "d.safetensors"), metadata={"slimkit": json.dumps(header)})
    with pytest.raises(SlimkitError, match="bins must be in"):
        slimkit.load(tmp_path / "d.safetensors")


class _Huge:
    def __reduce__(self):
        import numpy as np
        from numpy._core.multiarray import _reconstruct
        return (_reconstruct, (np.ndarray, (300000, 3072), np.dtype("u1")))


def test_a_cifar_batch_cannot_ask_for_memory_it_does_not_hold(tmp_path):
    import pickle

    from slimkit.data import load

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "test_batch"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": _Huge(), b"labels": [0]}, f, protocol=4)
    with pytest.raises(SlimkitError, match=r"asks for shape \(300000, 3072\) before any data"):
        load(f"cifar10:{tmp_path}")


def test_a_crafted_layer_that_fails_in_the_forward_is_one_line(artifact, tmp_path):
    forged = _forge(artifact, tmp_path / "s.safetensors",
                    _set(("modules", "children", "features", "children", "2"),
                         {"type": "torch.nn.Softmax", "config": {"dim": 9}}))
    line = one_line_error(*cli("eval", forged, "--data", "digits", "--json")[::2])
    assert "cannot take input" in line and "IndexError" in line


@pytest.mark.parametrize("text,message", [
    ("model: digits_cnn\ndata: digits\nstages: [{method: distill, distill: 5}]\n", "distill: expected string"),
    ("model: digits_cnn\ndata: digits\ndevice: bogus\n", "field device"),
    ("model: digits_cnn\ndata: digits\nnum_classes: -3\n", "field num_classes"),
    ("model: digits_cnn\ndata: digits\nstages: [{method: finetune, warmup_epochs: .inf}]\n",
     "warmup_epochs: expected number"),
    ("model: digits_cnn\ndata: digits\nstages: [{method: quantize, observer_kwargs: {foo: 1}}]\n",
     "takes no option 'foo'"),
    ("model: digits_cnn\ndata: digits\nstages: [{method: prune, ratio: 0.5, finetune: {distill: kd, "
     "distill_options: {temperature: 4}}}]\n", "kd takes no option 'temperature'"),
])
def test_more_bad_recipes_fail_before_data(tmp_path, monkeypatch, text, message):
    import re

    import slimkit.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_data", lambda *a, **k: pytest.fail("data was read"))
    recipe = _recipe(tmp_path, text)
    line = one_line_error(*cli("compress", "--recipe", recipe, "--out", str(tmp_path / "out"), "--json")[::2])
    assert re.search(message, line), line


def test_same_named_user_files_in_one_process_still_load(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "nets.py").write_text(NETS)
    slimkit.create_model(f"{tmp_path / 'a' / 'nets.py'}:build")
    second = slimkit.create_model(f"{tmp_path / 'b' / 'nets.py'}:build").eval()
    path = slimkit.save(second, tmp_path / "s.safetensors")
    r = subprocess.run([sys.executable, "-m", "slimkit.cli", "info", str(path), "--trust-code",
                        str(tmp_path / "b" / "nets.py"), "--json"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
