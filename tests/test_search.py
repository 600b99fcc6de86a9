"""slimkit.search: the engine on a synthetic problem with a known best, workers sharing PostgreSQL and SQLite
studies (killed with SIGKILL and restarted), the real pruning problem on the digits model, the CLI's bad input,
and the data-parallel fine-tune under torchrun."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("optuna")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

import slimkit  # noqa: E402
from slimkit.errors import SlimkitError  # noqa: E402
from slimkit.search import QuadraticProblem, SearchConfig, search  # noqa: E402
from slimkit.search.study import fail_dead_trials, open_storage, open_study  # noqa: E402
from slimkit.search.worker import run  # noqa: E402
from slimkit.testing.postgres import find_binaries, throwaway_postgres  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::optuna.exceptions.ExperimentalWarning")


def quad_job(storage, name="q", trials=10, sampler="tpe", seed=0, **quad):
    return {"problem": "quadratic", "study": name, "storage": storage, "fingerprint": {"problem": "quadratic"},
            "sampler": sampler, "seed": seed, "trials": trials, "heartbeat_s": 1, "grace_s": 2, "quadratic": quad}


def complete(storage, name):
    study = optuna.load_study(study_name=name, storage=storage)
    return [t for t in study.get_trials() if t.state == TrialState.COMPLETE]


def sqlite(tmp_path, name="s.db"):
    return f"sqlite:///{tmp_path / name}"


def test_tpe_finds_the_known_best_under_its_constraint(tmp_path):
    job = quad_job(sqlite(tmp_path), trials=50)
    run(job)
    best = QuadraticProblem(job).best()
    feasible = [t for t in complete(job["storage"], "q") if all(c <= 0 for c in t.user_attrs["constraints"])]
    top = max(feasible, key=lambda t: t.values[0])
    assert top.params == best == {"x0": 0.5, "x1": 0.25, "x2": 0.75}
    assert top.values[0] == pytest.approx(1 - 3 * 0.25 ** 2)


def test_one_seeded_worker_repeats_its_study(tmp_path):
    seen = []
    for i in range(2):
        job = quad_job(sqlite(tmp_path, f"r{i}.db"), trials=15, seed=3)
        run(job)
        seen.append([t.params for t in complete(job["storage"], "q")])
    assert seen[0] == seen[1] and len(seen[0]) == 15
    other = quad_job(sqlite(tmp_path, "r9.db"), trials=15, seed=4)
    run(other)
    assert [t.params for t in complete(other["storage"], "q")] != seen[0]


def spawn(job, path, index, **kw):
    with open(path, "w") as f:
        json.dump(job, f)
    return subprocess.Popen([sys.executable, "-m", "slimkit.search.worker", str(path), "--index", str(index)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def events(log):
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def postgres():
    if find_binaries() is None:
        if os.environ.get("SLIMKIT_REQUIRE_POSTGRES"):  # CI sets it: there the test must run
            pytest.fail("no PostgreSQL server binaries, and SLIMKIT_REQUIRE_POSTGRES is set")
        pytest.skip("no PostgreSQL server binaries on this machine (.ci/run installs them)")
    with throwaway_postgres() as url:
        yield url


@pytest.mark.timing
def test_three_workers_share_a_postgres_study_without_duplicates_or_losses(postgres, tmp_path):
    log = str(tmp_path / "events.jsonl")
    job = quad_job(postgres, name="three", trials=12, sleep=1.0, log=log)
    procs = [spawn(job, tmp_path / "job.json", i) for i in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    done = complete(postgres, "three")
    finished = [e for e in events(log) if e["event"] == "done"]
    assert 12 <= len(done) <= 14  # N, give or take workers asking in the same instant
    assert sorted(e["trial"] for e in finished) == sorted(t.number for t in done)  # none lost
    assert len({e["trial"] for e in finished}) == len(finished)  # none evaluated twice
    assert len({e["pid"] for e in finished}) >= 2  # they worked side by side (a slow start may leave one idle)


def test_a_worker_killed_mid_trial_has_its_trial_retried(postgres, tmp_path):
    log = str(tmp_path / "events.jsonl")
    job = quad_job(postgres, name="killed", trials=6, sleep=1.5, log=log)
    victim = spawn(job, tmp_path / "job.json", 0)
    deadline = time.time() + 120
    while not any(e["event"] == "start" and e["pid"] == victim.pid for e in events(log)):
        assert time.time() < deadline, "the worker never started a trial"
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = next(e for e in events(log) if e["pid"] == victim.pid)
    survivor = spawn(job, tmp_path / "job.json", 1)
    out, err = survivor.communicate(timeout=240)
    assert survivor.returncode == 0, err
    study = optuna.load_study(study_name="killed", storage=postgres)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[killed["trial"]] == TrialState.FAIL  # the heartbeat marked it stale
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(done) == 6
    retried = [t for t in done if t.system_attrs.get("failed_trial") == killed["trial"]]
    assert len(retried) == 1 and retried[0].params == killed["policy"]


def test_sqlite_study_survives_a_kill_and_resumes(tmp_path):
    log = str(tmp_path / "events.jsonl")
    job = quad_job(sqlite(tmp_path), name="lite", trials=8, sleep=0.4, log=log)
    first = spawn(job, tmp_path / "job.json", 0)
    deadline = time.time() + 120
    while sum(e["event"] == "done" for e in events(log)) < 3:
        assert time.time() < deadline
        time.sleep(0.05)
    # "done" is logged when the objective returns, before Optuna commits the trial: the completed trials are the
    # ones the storage holds (on a loaded machine a kill can fall between the two; that trial is retried)
    while len(complete(job["storage"], "lite")) < 3:
        assert time.time() < deadline
        time.sleep(0.05)
    before = {t.number for t in complete(job["storage"], "lite")}
    first.send_signal(signal.SIGKILL)
    first.wait()
    again = spawn(job, tmp_path / "job.json", 0)
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    numbers = {t.number for t in complete(job["storage"], "lite")}
    assert before <= numbers and len(numbers) == 8


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_retried(tmp_path):
    # a worker killed while its sampler ran (after the trial was created, before the heartbeat thread
    # started) leaves a running trial that Optuna's own stale check never fails
    study = open_study(sqlite(tmp_path), "early", {"model": "m"}, optuna.samplers.RandomSampler(seed=0),
                       ["maximize"], heartbeat_s=1, grace_s=1)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    fail_dead_trials(study, grace_s=1)
    assert study.get_trials()[0].state == TrialState.RUNNING  # too young to call dead
    time.sleep(1.2)
    fail_dead_trials(study, grace_s=1, silent_s=1)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING]  # failed, and queued again with its parameters
    assert study.get_trials()[1].params == {"x": trial.params["x"]}


def test_finalists_are_distinct_and_later_rounds_correct_for_the_tables_bias():
    from slimkit.search.results import choose

    def row(trial, name, proxy, predicted):
        return {"trial": trial, "policy": {"p": name}, "proxy": proxy, "latency_ratio": predicted,
                "feasible": True, "evaluated": True}

    # TPE proposed A three times; the table predicts 10% too fast on this "machine"
    # and A2 differs from A only inside a removed block: the same model
    rows = [row(0, "A", 0.9, 0.49), row(1, "A", 0.9, 0.49), row(2, "A2", 0.9, 0.49), row(3, "B", 0.8, 0.48),
            row(4, "E", 0.75, 0.47), row(5, "C", 0.7, 0.44), row(6, "D", 0.6, 0.40)]
    measured = []

    def measure(policy):
        measured.append(policy["p"])
        return {"A": 0.49, "A2": 0.49, "B": 0.48, "E": 0.47, "C": 0.44, "D": 0.40}[policy["p"]] * 1.1

    chosen, checked = choose(rows, measure, 0.5, 2, lambda s: None)
    # E (0.47 * 1.1 > 0.5) is skipped once the bias is known; a pass is measured twice
    assert measured == ["A", "B", "C", "C", "D", "D"]
    assert chosen["policy"] == {"p": "C"} and chosen["measured_ratio"] <= 0.5
    assert [c["meets"] for c in checked] == [False, False, True, True]


def test_storage_that_does_not_connect_names_host_and_port():
    with pytest.raises(SlimkitError, match=r"postgresql at host 127\.0\.0\.1, port 1 \("):
        open_storage("postgresql://someone@127.0.0.1:1/db")


def test_study_of_another_model_under_the_same_name_is_refused(tmp_path):
    url = sqlite(tmp_path)
    sampler = optuna.samplers.RandomSampler(seed=0)
    open_study(url, "same", {"model": "aaaa"}, sampler, ["maximize"])
    with pytest.raises(SlimkitError, match=r"study 'same' .* searches another model .*differs in model"):
        open_study(url, "same", {"model": "bbbb"}, sampler, ["maximize"])


# --- the pruning problem on the digits model -------------------------------------------------------------------


def quiet(_):
    pass


def test_mac_budget_search_is_reproducible_and_within_budget(digits_model, tmp_path):
    model, data = digits_model
    cfg = SearchConfig(target_macs=0.6, trials=5, warm_start=("uniform",), calib_batches=1, val_batches=1,
                       quantize="never")
    runs = [search(model, "digits", cfg, str(tmp_path / f"r{i}"), limit=300, data=data, log=quiet) for i in range(2)]
    assert runs[0]["chosen"]["policy"] == runs[1]["chosen"]["policy"]
    assert [r["proxy"] for r in runs[0]["pareto"]] == [r["proxy"] for r in runs[1]["pareto"]]
    for r in runs:
        assert r["chosen"]["macs_ratio"] <= 0.6 and r["final"]["macs_ratio"] <= 0.6
        assert r["study"]["complete"] == 5
    art = slimkit.load(runs[0]["artifact"])
    record = art.slimkit_history[-1]
    assert record["stage"] == "search" and record["policy"] == runs[0]["chosen"]["policy"]
    assert os.path.getsize(runs[0]["plot"]) > 1000


def test_the_rank_space_decomposes_kxk_convs_and_the_search_weighs_it_against_channels(digits_model, tmp_path):
    from slimkit.search import PruningSpace

    model, data = digits_model
    x = torch.randn(4, 1, 8, 8)
    space = PruningSpace(model, torch.zeros(1, 1, 8, 8), blocks=False, channels=False, ranks=True).build()
    assert space.dimensions and all(d.name.startswith("rank:") for d in space.dimensions)
    with torch.no_grad():  # rank 1 everywhere is the model itself
        assert torch.equal(space.apply(space.uniform(1.0))(x), model(x))
    name = next(n for n, m in model.named_modules()
                if n in space.rank_layers and min(m.in_channels, m.out_channels) >= 8)
    conv = model.get_submodule(name)
    split = space.apply({space.rank_layers[name]: 0.5}).get_submodule(name)
    assert isinstance(split, torch.nn.Sequential)  # 1x1 -> kxk -> 1x1 at half the widths
    assert [m.out_channels for m in split] == [round(conv.in_channels / 2), round(conv.out_channels / 2),
                                               conv.out_channels]
    assert split[1].kernel_size == conv.kernel_size and split[1].stride == conv.stride
    stem = next((n for n, m in model.named_modules() if n in space.rank_layers and m.in_channels == 1), None)
    if stem is not None:  # 1x1 1->1, 3x3 1->12, 1x1 12->16 has more parameters than 3x3 1->16: not made
        assert isinstance(space.apply({space.rank_layers[stem]: 0.75}).get_submodule(stem), torch.nn.Conv2d)
    rebuilt = PruningSpace.from_description(model, torch.zeros(1, 1, 8, 8), space.describe())
    assert rebuilt.rank_layers == space.rank_layers
    # searched together with channels under a MAC budget: the result meets it and loads as an artifact
    cfg = SearchConfig(target_macs=0.6, space=("prune", "rank"), trials=6, calib_batches=1, val_batches=1,
                       quantize="never")
    r = search(model, "digits", cfg, str(tmp_path), limit=300, data=data, log=quiet)
    assert any(k.startswith("rank:") for k in r["chosen"]["policy"])
    assert r["final"]["macs_ratio"] <= 0.6
    art = slimkit.load(r["artifact"])
    decomposed = {n for n, v in r["chosen"]["policy"].items() if n.startswith("rank:") and v < 1}
    split_layers = {n for n, m in art.named_modules() if isinstance(m, torch.nn.Sequential) and f"rank:{n}" in
                    decomposed}
    assert split_layers <= {n[len("rank:"):] for n in decomposed}
    assert art(x).shape == (4, 10)


def test_trial_steps_tune_each_feasible_candidate_in_two_reported_halves(digits_model, tmp_path):
    from slimkit.search.evaluate import accuracy_proxy
    from slimkit.search.problems import PruningProblem

    model, data = digits_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SearchConfig(target_macs=0.6, trials=8, trial_steps=6, warm_start=("uniform",), calib_batches=1,
                       val_batches=1, quantize="never", finetune_epochs=0)
    r = search(model, "digits", cfg, str(tmp_path), limit=300, data=data, log=quiet)
    for k, v in model.state_dict().items():  # the tuning trained copies, never the caller's model
        assert torch.equal(v, before[k]), k
    job = json.load(open(tmp_path / "search.json"))
    trials = optuna.load_study(study_name=job["study"], storage=job["storage"]).get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    feasible = [t for t in done if all(c <= 0 for c in t.user_attrs["constraints"])]
    assert feasible and r["study"]["complete"] == len(done)
    for t in feasible:  # reported after each half, and the value is the second half's
        assert sorted(t.intermediate_values) == [0, 1]
        assert t.values[0] == pytest.approx(t.intermediate_values[1])
    for t in trials:
        if t.state == TrialState.PRUNED:  # the median pruner stops a trial after a reported half
            assert t.intermediate_values
    # the reported value is the tuned candidate's: six SGD steps move it off the untuned proxy
    problem = PruningProblem(job, model=model, data=data)
    untuned = [accuracy_proxy(problem.measure(t.user_attrs["policy"])[0], problem.calib, problem.val)
               for t in feasible]
    assert any(u != pytest.approx(t.values[0]) for u, t in zip(untuned, feasible))


@pytest.mark.timing
def test_latency_budget_is_met_as_measured(digits_model, tmp_path):
    model, data = digits_model
    torch.set_num_threads(1)
    # sixteen trials and four finalists: on a shared 2-core VM a whole-model timing can miss the table by 5%
    # (0.836 seen), so the test needs several candidates predicted well inside the budget
    cfg = SearchConfig(target_latency=0.8, runtime="eager", batch_sizes=(1,), trials=16, finalists=4, calib_batches=1,
                       val_batches=1, quantize="never")
    r = search(model, "digits", cfg, str(tmp_path), limit=300, data=data, log=quiet)
    assert r["chosen"]["measured_ratio"] <= 0.8
    assert all(f["meets"] == (f["measured_ratio"] <= 0.8) for f in r["finalists"])
    table = json.load(open(tmp_path / "latency-table.json"))
    assert table["runtime"] == "eager" and table["layers"]


def test_unreachable_budget_names_the_smallest_reachable(digits_model, tmp_path):
    model, data = digits_model
    cfg = SearchConfig(target_macs=0.01, trials=2)
    with pytest.raises(SlimkitError, match=r"MAC budget 0\.01 is out of reach: the smallest policy of this space "
                                           r"keeps 0\.\d+ of the MACs"):
        search(model, "digits", cfg, str(tmp_path), limit=300, data=data, log=quiet)


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "slimkit.cli", "search", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--target-latency", "0.5", "--runtime", "tensorrt"], "--runtime must be one of eager, torchscript"),
    (["--target-macs", "0.5", "--storage", "postgresql://u@127.0.0.1:1/x"], "host 127.0.0.1, port 1"),
    (["--target-macs", "0.001"], "out of reach"),
    (["--target-macs", "0.5", "--criterion", "taylor"], "data-free criterion"),
    (["--target-macs", "0.5", "--space", "prune,bits"], "needs a latency budget (--target-latency)"),
])
def test_cli_bad_input_is_one_line_and_status_2(tmp_path, args, message):
    r = cli("digits_resnet", "--data", "digits", "--limit", "60", "--out", str(tmp_path), *args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln and "optuna_warn" not in ln]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_cli_search_then_resume(tmp_path):
    out = str(tmp_path / "s")
    r = cli("digits_resnet", "--data", "digits", "--limit", "60", "--target-macs", "0.7", "--trials", "3",
            "--calib-batches", "1", "--val-batches", "1", "--quantize", "never", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["study"]["complete"] == 3 and got["final"]["macs_ratio"] <= 0.7
    r2 = cli("--resume", "--out", out, "--json")
    assert r2.returncode == 0, r2.stderr
    again = json.loads(r2.stdout)
    assert again["study"]["name"] == got["study"]["name"] and again["study"]["complete"] == 3
    assert again["chosen"]["policy"] == got["chosen"]["policy"]


# --- data-parallel fine-tune --------------------------------------------------------------------------------------


def test_two_process_torchrun_finetune_matches_one_process(tmp_path):
    from slimkit.artifact import load, save
    from slimkit.data import load as load_data
    from slimkit.search.finetune import finetune

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(32, 10))  # no batch norm: statistics are per process
    size = (1, 8, 8)
    student = save(net, str(tmp_path / "student.safetensors"), meta={"input_size": list(size)})
    job = {"student": student, "teacher": None, "data": "digits", "limit": 128, "data_seed": 0, "seed": 0,
           "epochs": 1, "lr": 0.05, "input_size": list(size), "batch_size": 32, "threads": 1,
           "out": str(tmp_path / "tuned.safetensors")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "slimkit.search.finetune", str(tmp_path / "job.json")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    two = load(job["out"])
    one = load(student)
    data = load_data("digits", limit=128, seed=0)
    finetune(one, None, data, epochs=1, lr=0.05, seed=0, input_size=size, batch_size=32)
    before = load(student)
    for (name, a), b, c in zip(one.state_dict().items(), two.state_dict().values(), before.state_dict().values()):
        assert not torch.equal(a, c), name  # it trained
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.timing
def test_the_bits_space_runs_int8_layer_by_layer_and_the_final_model_follows_the_policy(digits_model, tmp_path):
    from slimkit.quant.core import quantizable_layers
    from slimkit.search import PruningSpace
    from slimkit.search.problems import PruningProblem

    model, data = digits_model
    example = torch.zeros(1, 1, 8, 8)
    layers = quantizable_layers(model)
    space = PruningSpace(model, example, blocks=False, channels=False, ranks=True, bits=True).build()
    flags = [d for d in space.dimensions if d.kind == "flag"]
    assert [d.name for d in flags] == [f"int8:{n}" for n in layers]  # one flag per conv/linear layer
    assert all(space.uniform(1.0)[d.name] == 1 for d in flags) and all(space.smallest()[d.name] == 1 for d in flags)
    assert not space.quantized(space.uniform(1.0, int8=0))
    # a decomposed layer's factors follow the flag of the layer they replace
    split = next(n for n in space.rank_layers if min(model.get_submodule(n).weight.shape[:2]) >= 8)
    policy = {**space.uniform(1.0), f"rank:{split}": 0.5, f"int8:{split}": 0}
    cand = space.apply(policy)
    assert space.keep_float(policy, cand) == [n for n in quantizable_layers(cand) if n.startswith(split + ".")]
    assert len(space.keep_float(policy, cand)) == 3
    rebuilt = PruningSpace.from_description(model, example, space.describe())
    assert rebuilt.int8_layers == space.int8_layers
    # bits alone changes neither MACs nor parameters: refused without a latency budget, and on compile
    with pytest.raises(SlimkitError, match="needs a latency budget"):
        SearchConfig(target_macs=0.5, space=("prune", "bits"))
    with pytest.raises(SlimkitError, match="not compile"):
        SearchConfig(target_latency=0.5, space=("bits",), runtime="compile")
    # searched with channels under a latency budget in eager at batch 64: int8 trials are timed whole,
    # the chosen one meets the budget as measured, and the final model runs int8 exactly where it says
    cfg = SearchConfig(target_latency=0.9, runtime="eager", batch_sizes=(64,), space=("prune", "bits"), trials=6,
                       finalists=2, calib_batches=1, val_batches=1, warm_start=("uniform", "sensitivity"))
    r = search(model, "digits", cfg, str(tmp_path), limit=300, data=data, log=quiet)
    starts = {row["warm_start"]: row for row in r["warm_starts"]}
    assert starts["uniform"]["int8_layers"] == len(layers)  # the uniform warm start runs every layer int8
    assert starts["sensitivity"]["int8_layers"] in (0, len(layers))  # all int8, else all float
    assert r["chosen"]["measured_ratio"] <= 0.9
    chosen = r["chosen"]["policy"]
    art = slimkit.load(r["artifact"])
    assert r["final"]["int8"]["from"] == "policy" and r["final"]["int8_kept"] == space.quantized(chosen)
    if space.quantized(chosen):
        kinds = {n.removeprefix("model."): type(m).__module__ for n, m in art.named_modules()}
        floats = {n for n, k in kinds.items() if k.startswith("torch.nn.modules.conv")
                  or k.startswith("torch.nn.modules.linear")}
        flagged_float = {n for n in layers if chosen[f"int8:{n}"] == 0}
        assert {n for n in floats if n in layers} == flagged_float
    assert art(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    # a problem rebuilt from the job judges the chosen policy the same way (int8 where flagged)
    job = json.load(open(tmp_path / "search.json"))
    problem = PruningProblem(job, model=model, data=data)
    assert hasattr(problem.judged(chosen), "keep_float") == space.quantized(chosen)
