"""The user side of provider-side black-box merging: the ``lora_pool`` space, its control op,
the staged optimizers (``evo_merging``, ``lorahub``, ``subspace``), the ``pool`` backend and
export, end to end against the real pool server on 127.0.0.1 (the test zoo's 3 LoRA experts,
token auth on)."""

from __future__ import annotations

import http.server
import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from evomerge.config import SpaceConfig, parse_config
from evomerge.errors import BackendError, ConfigError, PlanError, RunError
from evomerge.optim import Result, make_optimizer
from evomerge.optim.state import from_jsonable, to_jsonable
from evomerge.spaces import make_space

ROOT = Path(__file__).resolve().parents[2]
CIPHER_A = str(ROOT / "fitness/zoo/cipher_a.yaml")
TOKEN_ENV = "EVOMERGE_TEST_POOL_CLIENT_TOKEN"
TOKEN = "tok-" + secrets.token_hex(16)
ADAPTERS = ["lora_a", "lora_b", "lora_c"]


def _space(n=3, **options):
    models = {f"m{i}": f"pool:ad{i}" for i in range(n)}
    return make_space(SpaceConfig(type="lora_pool", options=options), models, None)


def _quadratic(g):
    return -float(np.sum((np.asarray(g) - 0.3) ** 2))


def _drive(opt, n_evals, batch=3, f=_quadratic):
    """Ask/tell ``n_evals`` candidates in batches; returns them in ask order."""
    out = []
    while len(out) < n_evals:
        cands = opt.ask(min(batch, n_evals - len(out)))
        assert cands, "optimizer asked for nothing with nothing pending"
        opt.tell([Result(c.id, f(c.genome)) for c in cands])
        out += cands
    return out


# --------------------------------------------------------------------------- space + op


def test_space_genome_recipe_and_control_plan():
    sp = _space(3)
    assert sp.remote and sp.dim == 6
    assert sp.names == ["alpha.ad0", "alpha.ad1", "alpha.ad2", "beta.ad0", "beta.ad1", "beta.ad2"]
    x0 = sp.initial()
    np.testing.assert_allclose(x0[:3], 1.0)
    np.testing.assert_allclose(-1.5 + 3.0 * x0[3:], 1 / 3)  # beta starts at 1/N
    r = sp.decode(x0)
    assert r == {"merge_method": "evo_lora", "adapters": ["ad0", "ad1", "ad2"],
                 "alpha": {"ad0": 1.0, "ad1": 1.0, "ad2": 1.0},
                 "beta": {"ad0": 0.3333, "ad1": 0.3333, "ad2": 0.3333}}
    plan = sp.compile(r)
    plan.validate()
    assert plan.sources == {"ad0": "pool:ad0", "ad1": "pool:ad1", "ad2": "pool:ad2"}
    (step,) = plan.steps
    assert step.op == "evo_lora" and [i.model for i in step.inputs] == ["ad0", "ad1", "ad2"]
    assert step.params == {"density": [1.0, 1.0, 1.0], "weight": [0.3333] * 3}
    g = np.array([0.2, 0.5, 1.0, 0.0, 0.5, 1.0])
    rec = sp.decode(g)
    assert rec["alpha"] == {"ad0": 0.2, "ad1": 0.5, "ad2": 1.0}
    assert rec["beta"] == {"ad0": -1.5, "ad1": 0.0, "ad2": 1.5}
    assert sp.compile(yaml.safe_load(yaml.safe_dump(rec))).hash() == sp.plan(g).hash()
    assert sp.plan(g).hash() != sp.plan(x0).hash()
    ex = sp.optimizer_extras("evo_merging")
    assert ex["alpha_dims"] == [0, 1, 2] and ex["beta_dims"] == [3, 4, 5]
    assert ex["beta_zero"] == pytest.approx(0.5) and ex["beta_init"] == pytest.approx(x0[3])
    assert sp.optimizer_extras("cma") == {}
    narrow = _space(2, beta_range=[0.0, 1.0])
    assert narrow.decode(np.array([1, 1, 0.25, 1.0]))["beta"] == {"ad0": 0.25, "ad1": 1.0}


@pytest.mark.parametrize("models, base, options, field", [
    ({"a": "pool:a", "b": "/some/local/dir"}, None, {}, "models.b"),
    ({"a": "pool:a", "b": "pool:"}, None, {}, "models.b"),
    ({"a": "pool:a", "b": "pool:a"}, None, {}, "models"),
    ({"a": "pool:a", "b": "pool:b", "c": "pool:c"}, "a", {}, "base_model"),
    ({"a": "pool:a", "b": "pool:b"}, None, {"beta_range": [1.0, -1.0]}, "space.options.beta_range"),
    ({"a": "pool:a", "b": "pool:b"}, None, {"beta_range": [0.6, 1.5]}, "space.options.beta_range"),
    ({"a": "pool:a", "b": "pool:b"}, None, {"beta": 1}, "space.options.beta"),
])
def test_space_refuses_bad_config_in_one_line(models, base, options, field):
    with pytest.raises(ConfigError) as e:
        make_space(SpaceConfig(type="lora_pool", options=options), models, base)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_space_refuses_recipes_that_do_not_fit_the_pool():
    sp = _space(2)
    good = sp.decode(sp.initial())
    for bad in (dict(good, adapters=["ad1", "ad0"]), dict(good, alpha={"ad0": 1.0}),
                dict(good, beta={"ad0": 2.0, "ad1": 0.0}), dict(good, merge_method="linear"),
                dict(good, alpha={"ad0": float("nan"), "ad1": 1.0})):
        with pytest.raises(ConfigError):
            sp.compile(bad)


def test_evo_lora_op_validates_and_refuses_to_run_locally():
    from evomerge.ops import get_op

    sp = _space(2)
    plan = sp.plan(sp.initial())
    step = plan.steps[0]
    for params in ({"density": [1.2, 1.0], "weight": [0.5, 0.5]},
                   {"density": [1.0], "weight": [0.5, 0.5]},
                   {"density": [1.0, 1.0], "weight": [float("nan"), 0.5]},
                   {"density": [1.0, 1.0], "weight": [0.5, 0.5], "lambda": 1.0}):
        step.params = params
        with pytest.raises(PlanError):
            plan.validate()
    with pytest.raises(PlanError, match="pool provider"):
        get_op("evo_lora").fn([], None, {}, None)


# --------------------------------------------------------------------------- optimizers


def _opt(name, sp=None, budget=30, **options):
    sp = sp or _space(3)
    return make_optimizer(name, lower=sp.lower, upper=sp.upper, x0=sp.initial(), sigma0=1 / 6,
                          seed=5, budget=budget, **sp.optimizer_extras(name), **options)


def test_evo_merging_runs_alpha_then_beta_from_the_best_alpha():
    sp = _space(3)
    x0 = sp.initial()
    opt = _opt("evo_merging", sp, budget=30, popsize=4)
    assert opt.shares == [10, 20] and opt.stage == "alpha"
    cands = _drive(opt, 30)
    assert [c.id for c in cands] == list(range(30))
    stage1, stage2 = cands[:10], cands[10:]
    assert all(c.info["stage"] == "alpha" for c in stage1)
    assert all(c.info["stage"] == "beta" for c in stage2)
    for c in stage1:  # betas held at 1/N while the sparsities move
        np.testing.assert_array_equal(c.genome[3:], x0[3:])
    best1 = max(stage1, key=lambda c: _quadratic(c.genome))
    for c in stage2:  # sparsities held at the stage-1 best
        np.testing.assert_array_equal(c.genome[:3], best1.genome[:3])
    assert len({tuple(c.genome[3:]) for c in stage2}) == 20
    assert opt.history[0]["stage"] == "alpha" and opt.history[0]["evaluations"] == 10
    assert opt.best()[1] == max(_quadratic(c.genome) for c in cands)
    # pycma's TPA would be picked at >= 300 dims; the stages pin CSA explicitly
    from cma.sigma_adaptation import CMAAdaptSigmaCSA

    assert opt._stage_opt.opt._es.opts["AdaptSigma"] is CMAAdaptSigmaCSA


def test_evo_merging_ablations():
    sp = _space(3)
    x0 = sp.initial()
    only_beta = _drive(_opt("evo_merging", sp, budget=12, popsize=4, stages=["beta"]), 12)
    assert all(np.array_equal(c.genome[:3], x0[:3]) for c in only_beta)  # alpha stays 1
    only_alpha = _drive(_opt("evo_merging", sp, budget=12, popsize=4, stages=["alpha"]), 12)
    assert all(np.array_equal(c.genome[3:], x0[3:]) for c in only_alpha)  # beta stays 1/N
    no_flip = _drive(_opt("evo_merging", sp, budget=40, popsize=8, sign_flips=False),
                     40, f=lambda g: -float(np.sum(g[3:])))  # pushes betas down to the floor
    betas = np.array([-1.5 + 3.0 * c.genome[3:] for c in no_flip])
    assert betas.min() >= 0.0 and betas.min() < 0.2
    split = _opt("evo_merging", sp, budget=40, popsize=4, stage_split=[1, 1])
    assert split.shares == [20, 20]


@pytest.mark.parametrize("name, options", [
    ("evo_merging", {"popsize": 4}),
    ("lorahub", {}),
    ("subspace", {"dims": [0, 2, 4], "inner": "cma", "popsize": 4}),
    ("subspace", {"dims": [1, 3], "inner": "ng:TwoPointsDE"}),
])
def test_state_round_trip_gives_the_same_next_asks(name, options):
    budget = 30
    a = _opt(name, budget=budget, **options)
    _drive(a, 13, batch=3)  # evo_merging: past its stage boundary (10)
    pending = a.ask(2)
    state = from_jsonable(json.loads(json.dumps(to_jsonable(a.state_dict()))))
    b = _opt(name, budget=budget, **options)
    b.load_state_dict(state)
    results = [Result(c.id, _quadratic(c.genome)) for c in pending]
    a.tell(results)
    b.tell(results)
    for _ in range(3):
        ca, cb = a.ask(3), b.ask(3)
        assert [(c.id, c.genome.tolist()) for c in ca] == [(c.id, c.genome.tolist()) for c in cb]
        for o, cs in ((a, ca), (b, cb)):
            o.tell([Result(c.id, _quadratic(c.genome)) for c in cs])
    assert a.best()[1] == b.best()[1]
    other = _opt(name, budget=budget + 1, **options)  # settings changed: refused, not diverged
    with pytest.raises(RunError):
        other.load_state_dict(state)


def test_lorahub_searches_betas_with_dense_adapters():
    sp = _space(3)
    opt = _opt("lorahub", sp, budget=20)
    cands = _drive(opt, 20, batch=2)
    assert all(np.array_equal(c.genome[:3], np.ones(3)) for c in cands)
    np.testing.assert_allclose(opt.sub.opt.init, 0.5)  # LoraHub starts nevergrad at w = 0
    assert np.abs(-1.5 + 3.0 * cands[0].genome[3:]).max() < 1.5  # ... and samples around it
    assert len({tuple(c.genome[3:]) for c in cands}) > 10
    assert opt.selected  # what NGOpt picked
    uniform = _opt("lorahub", sp, budget=20, init="uniform")
    np.testing.assert_allclose(uniform.sub.opt.init, sp.initial()[3:])


@pytest.mark.parametrize("name, kwargs, field", [
    ("evo_merging", {"stages": ["gamma"]}, "optimizer.options.stages"),
    ("evo_merging", {"stage_split": [1]}, "optimizer.options.stage_split"),
    ("evo_merging", {"sign_flips": "no"}, "optimizer.options.sign_flips"),
    ("evo_merging", {"temperature": 1}, "optimizer.options.temperature"),
    ("lorahub", {"init": "random"}, "optimizer.options.init"),
    ("lorahub", {"popsize": 4}, "optimizer.popsize"),
    ("subspace", {"dims": [0, 9]}, "optimizer.options.dims"),
    ("subspace", {"dims": [0], "inner": "nope"}, "optimizer.options.inner"),
])
def test_optimizer_options_refused_in_one_line(name, kwargs, field):
    with pytest.raises(ConfigError) as e:
        _opt(name, **kwargs)
    assert str(e.value).startswith(field), str(e.value)


def test_staged_optimizers_need_the_lora_pool_space():
    for name in ("evo_merging", "lorahub"):
        with pytest.raises(ConfigError, match="lora_pool"):
            make_optimizer(name, lower=np.zeros(4), upper=np.ones(4), budget=10)


@pytest.mark.parametrize("preset, optimizer", [("zoo_pool_evo.yaml", "evo_merging"),
                                               ("zoo_pool_lorahub.yaml", "lorahub")])
def test_presets_build_their_space_and_optimizer(preset, optimizer):
    from evomerge.config import load_config
    from evomerge.engine.search import build_optimizer
    from evomerge.fitness.backends.pool import PoolOptions

    cfg = load_config(ROOT / "search_spaces" / preset)
    sp = make_space(cfg.space, cfg.models, cfg.base_model, seed=cfg.seed)
    opt = build_optimizer(cfg, sp)
    assert type(opt).__name__.lower().replace("_", "") == optimizer.replace("_", "")
    assert sp.dim == 2 * len(cfg.models) and opt.ask(1)
    assert PoolOptions.parse(cfg.backend.options).api_key_env == "EVOMERGE_POOL_TOKEN"


# --------------------------------------------------------------------------- backend options


@pytest.mark.parametrize("options, field", [
    ({}, "backend.options.base_url"),
    ({"base_url": "127.0.0.1:8321"}, "backend.options.base_url"),
    ({"base_url": "http://h", "objective": "accuracy"}, "backend.options.objective"),
    ({"base_url": "http://h", "l1": -0.1}, "backend.options.l1"),
    ({"base_url": "http://h", "timeout": 0}, "backend.options.timeout"),
    ({"base_url": "http://h", "max_retries": -1}, "backend.options.max_retries"),
    ({"base_url": "http://h", "remote_tasks": ["a"]}, "backend.options.remote_tasks"),
    ({"base_url": "http://h", "api_key_env": "my token!"}, "backend.options.api_key_env"),
    ({"base_url": "http://h", "batch": 3}, "backend.options.batch"),
])
def test_pool_backend_options_refused_in_one_line(options, field):
    from evomerge.fitness.backends.pool import PoolOptions

    with pytest.raises(ConfigError) as e:
        PoolOptions.parse(options)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- unpacking


def _targz(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


GOOD = [("adapter_config.json", b'{"r": 4}', "file"), ("adapter_model.safetensors", b"xx", "file")]


def test_unpack_adapter_takes_only_the_adapter_files(tmp_path):
    from evomerge.fitness.backends.pool_client import unpack_adapter

    out = tmp_path / "a"
    out.mkdir()
    unpack_adapter(_targz(GOOD + [("README.md", b"hi", "file")]), out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    nested = tmp_path / "b"
    nested.mkdir()
    unpack_adapter(_targz([(f"merged/{n}", d, k) for n, d, k in GOOD]), nested)
    assert (nested / "adapter_model.safetensors").read_bytes() == b"xx"


@pytest.mark.parametrize("entries, words", [
    (GOOD + [("../evil.json", b"x", "file")], "unsafe path"),
    (GOOD + [("/etc/evil", b"x", "file")], "unsafe path"),
    (GOOD + [("adapter_link", b"", "symlink")], "not a regular file"),
    (GOOD[:1], "no adapter_model.safetensors"),
    ([("adapter_config.json", b"{nope", "file"), GOOD[1]], "not JSON"),
    (GOOD + [("x/adapter_config.json", b"{}", "file")], "twice"),
])
def test_unpack_adapter_refuses_unsafe_archives(tmp_path, entries, words):
    from evomerge.fitness.backends.pool_client import unpack_adapter

    with pytest.raises(BackendError, match=words):
        unpack_adapter(_targz(entries), tmp_path)
    assert not (tmp_path.parent / "evil.json").exists()
    with pytest.raises(BackendError, match="not a tar.gz"):
        unpack_adapter(b"plain bytes", tmp_path)


# --------------------------------------------------------------------------- bad providers


class _FakeProvider(http.server.BaseHTTPRequestHandler):
    """A provider that answers evaluations with whatever ``evaluate_body`` says."""

    evaluate_body: bytes = b"{}"

    def _send(self, status, body, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self._send(200, json.dumps({"adapters": [{"name": n} for n in ("ad0", "ad1")],
                                    "control": {"alpha": [0, 1], "beta": [-1.5, 1.5]},
                                    "limits": {"max_examples": 5000}}).encode())

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/v1/sessions":
            self._send(201, json.dumps({"session": "s1", "num_examples": 200,
                                        "adapters": ["ad0", "ad1"]}).encode())
        else:
            self._send(200, type(self).evaluate_body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_provider():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeProvider)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("body, words", [
    (json.dumps({"losses": [1.0] * 199}).encode(), "must hold 200 values"),
    (b"<html>oops</html>", "not JSON"),
    (b'{"losses": [NaN' + b", 1.0" * 199 + b"]}", "'losses'\\[0\\] is nan"),
    (json.dumps({"losses": [None] + [1.0] * 199}).encode(), "null"),
    (json.dumps({"losses": ["1.0"] * 200}).encode(), "not a number"),
    (json.dumps([1, 2]).encode(), "JSON object"),
])
def test_bad_provider_responses_fail_the_candidate_in_one_line(fake_provider, body, words):
    from evomerge.fitness import load_tasks
    from evomerge.fitness.backends import make_backend

    _FakeProvider.evaluate_body = body
    sp = _space(2)
    be = make_backend("pool", model_dir="pool:ad0", base_url=fake_provider, max_retries=0)
    try:
        be.load_plan(sp.plan(sp.initial()), None)
        with pytest.raises(BackendError, match=words) as e:
            be.evaluate(load_tasks([CIPHER_A]))
        assert "\n" not in str(e.value)
    finally:
        be.close()


# --------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def pool_server(test_zoo):
    from evomerge.blackbox.pool import LoraPool
    from evomerge.blackbox.pool_server import create_app, serve_in_thread

    pool = LoraPool.from_dirs(test_zoo.base.path, {m.name: m.path for m in test_zoo.lora})
    assert pool.names == ADAPTERS
    os.environ[TOKEN_ENV] = TOKEN
    allowing = serve_in_thread(create_app(pool, TOKEN, tasks={"hosted_a": CIPHER_A},
                                          allow_export={"adapter"}))
    refusing = serve_in_thread(create_app(pool, TOKEN))
    try:
        yield SimpleNamespace(url=allowing.url, refusing_url=refusing.url, pool=pool,
                              base=test_zoo.base.path)
    finally:
        allowing.close()
        refusing.close()
        os.environ.pop(TOKEN_ENV, None)


def _cfg(url, optimizer, budget=8, **over):
    d = {
        "name": "pool_run",
        "models": {n: f"pool:{n}" for n in ADAPTERS},
        "space": {"type": "lora_pool"},
        "optimizer": optimizer,
        "budget": budget,
        "tasks": [{"path": CIPHER_A}],
        "backend": {"name": "pool", "options": {"base_url": url, "api_key_env": TOKEN_ENV}},
        "executor": {"name": "local", "num_threads": 1},
    }
    d.update(over)
    return d


def _log(run_dir):
    from evomerge.engine.store import RunStore

    return [(r["id"], r["genome"], r["fitness"]) for r in RunStore(run_dir).read_evals()]


def _run_cli(args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], env=e, capture_output=True,
                          text=True, timeout=600)


def _no_token_under(*folders):
    for folder in folders:
        for p in Path(folder).rglob("*"):
            if p.is_file():
                assert TOKEN.encode() not in p.read_bytes(), p


def test_pool_backend_sessions_hosted_tasks_racing_slices_and_auth(pool_server):
    from evomerge.fitness import load_tasks
    from evomerge.fitness.backends import make_backend
    from evomerge.fitness.racing import _sliced

    sp = make_space(SpaceConfig(type="lora_pool"), {n: f"pool:{n}" for n in ADAPTERS}, None)
    plan = sp.plan(np.array([1.0, 0.5, 0.8, 0.7, 0.4, 0.55]))
    (task,) = load_tasks([CIPHER_A])
    be = make_backend("pool", model_dir="pool:lora_a", base_url=pool_server.url,
                      api_key_env=TOKEN_ENV)
    hosted = make_backend("pool", model_dir="pool:lora_a", base_url=pool_server.url,
                          api_key_env=TOKEN_ENV, remote_tasks={"cipher_a": "hosted_a"})
    try:
        for b in (be, hosted):
            b.load_plan(plan, None)
        full = be.evaluate([task])["cipher_a"]
        assert full.shape == (200,) and np.all(np.isfinite(full)) and np.all(full < 0)
        beta = np.array(plan.steps[0].params["weight"])
        direct = pool_server.pool.evaluate([(e.prompt, e.target) for e in task.examples()],
                                           [1.0, 0.5, 0.8], beta.tolist(), metrics=["loss"])
        np.testing.assert_allclose(full, -np.asarray(direct["losses"]) - 0.05 * np.abs(beta).mean(),
                                   rtol=1e-6)
        np.testing.assert_allclose(hosted.evaluate([task])["cipher_a"], full, rtol=1e-6)
        idx = np.array([5, 0, 17, 199])
        part = be.evaluate([_sliced(task, "search", idx)])["cipher_a"]  # racing's slices
        np.testing.assert_allclose(part, full[idx], rtol=1e-6)
        assert be.stats["sessions"] == 1  # one session per (task, split), slices included
        be.client.close_session(be._sessions[("cipher_a", "search")])  # expired on the provider
        np.testing.assert_allclose(be.evaluate([task])["cipher_a"], full, rtol=1e-6)
        assert be.stats["reopened"] == 1
    finally:
        be.close()
        hosted.close()
    os.environ["EVOMERGE_TEST_WRONG_TOKEN"] = "wrong-" + TOKEN
    wrong = make_backend("pool", base_url=pool_server.url, api_key_env="EVOMERGE_TEST_WRONG_TOKEN")
    try:
        with pytest.raises(BackendError, match="401") as e:
            wrong.load_plan(plan, None)
            wrong.evaluate([task])
        assert TOKEN not in str(e.value) and "\n" not in str(e.value)
    finally:
        wrong.close()
        os.environ.pop("EVOMERGE_TEST_WRONG_TOKEN")


@pytest.mark.slow
def test_evo_merging_run_sigkill_resume_and_export(pool_server, tmp_path):
    """The CLI run of a pool search, killed at several points and resumed, gives the
    uninterrupted run's log; the best candidate exports as a PEFT adapter; the token is in
    no file and no output."""
    cfg = _cfg(pool_server.url, {"name": "evo_merging", "popsize": 4, "seed": 2}, budget=10)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    outputs = []
    ref = _run_cli(["run", str(path), "--runs-dir", str(tmp_path / "ref"), "--no-progress"])
    outputs.append(ref.stdout + ref.stderr)
    assert ref.returncode == 0, ref.stderr[-2000:]
    want = _log(tmp_path / "ref/pool_run")
    assert [w[0] for w in want] == list(range(10))
    for point in ("after_ask:2", "after_log:5"):  # in stage 1 (alpha), in stage 2 (beta)
        runs = tmp_path / point.replace(":", "_")
        crashed = _run_cli(["run", str(path), "--runs-dir", str(runs), "--no-progress"],
                           env={"EVOMERGE_CRASH_AT": point})
        assert crashed.returncode == -9, (point, crashed.stderr[-2000:])
        assert len(_log(runs / "pool_run")) < 10
        res = _run_cli(["resume", str(runs / "pool_run"), "--no-progress"])
        outputs += [crashed.stdout + crashed.stderr, res.stdout + res.stderr]
        assert res.returncode == 0, (point, res.stderr[-2000:])
        assert _log(runs / "pool_run") == want, point
    exp = _run_cli(["export", str(tmp_path / "ref/pool_run"), "--out", str(tmp_path / "export")])
    outputs.append(exp.stdout + exp.stderr)
    assert exp.returncode == 0, exp.stderr[-2000:]
    (folder,) = (tmp_path / "export").iterdir()
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                     "evomerge_recipe.yaml"]
    recipe = yaml.safe_load((folder / "evomerge_recipe.yaml").read_text())
    best = max(want, key=lambda w: w[2])
    sp = make_space(SpaceConfig(type="lora_pool"), {n: f"pool:{n}" for n in ADAPTERS}, None)
    assert recipe == sp.decode(np.array(best[1]))
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pool_server.base), folder)
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()
    _no_token_under(tmp_path)
    assert all(TOKEN not in o for o in outputs)


@pytest.mark.slow
def test_lorahub_run_and_resume_after_interruption(pool_server, tmp_path):
    cfg = _cfg(pool_server.url, {"name": "lorahub", "seed": 1}, budget=8)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ref = _run_cli(["run", str(path), "--runs-dir", str(tmp_path / "ref"), "--no-progress"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    want = _log(tmp_path / "ref/pool_run")
    assert len(want) == 8 and all(np.allclose(w[1][:3], 1.0) for w in want)
    crashed = _run_cli(["run", str(path), "--runs-dir", str(tmp_path / "cut"), "--no-progress"],
                       env={"EVOMERGE_CRASH_AT": "after_log:4"})
    assert crashed.returncode == -9
    res = _run_cli(["resume", str(tmp_path / "cut/pool_run"), "--no-progress"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert _log(tmp_path / "cut/pool_run") == want
    _no_token_under(tmp_path)
    assert TOKEN not in ref.stdout + ref.stderr + res.stdout + res.stderr


def test_export_refused_by_the_provider_is_one_line_and_writes_nothing(pool_server, tmp_path):
    from evomerge.engine.export import export_top
    from evomerge.engine.runner import run_search

    # a plain CMA-ES over the whole 2N control vector works on the space too
    cfg = parse_config(_cfg(pool_server.refusing_url, {"name": "cma", "popsize": 2}, budget=2))
    best = run_search(cfg, tmp_path / "run", progress=False)
    assert best is not None and best["recipe"]["merge_method"] == "evo_lora"
    with pytest.raises(BackendError) as e:
        export_top(tmp_path / "run", 1, tmp_path / "export")
    msg = str(e.value)
    assert "refused" in msg and "403" in msg and "--allow-export adapter" in msg and "\n" not in msg
    assert not (tmp_path / "export" / f"rank1-id{best['id']}").exists()
    _no_token_under(tmp_path)


def test_wrong_pool_configs_are_one_line_config_errors(pool_server, tmp_path):
    from evomerge.engine.runner import run_search

    local = _cfg(pool_server.url, {"name": "evo_merging"},
                 models={"a": "pool:lora_a", "b": str(pool_server.base)})
    with pytest.raises(ConfigError, match=r"^models\.b: the lora_pool space takes pool:"):
        run_search(parse_config(local), tmp_path / "r1", progress=False)
    assert not (tmp_path / "r1").exists()  # refused before the run directory exists
    bad_backend = _cfg(pool_server.url, {"name": "lorahub"})
    bad_backend["backend"]["options"]["objective"] = "f1"
    with pytest.raises(ConfigError, match=r"^backend\.options\.objective"):
        run_search(parse_config(bad_backend), tmp_path / "r3", progress=False)
    missing = _cfg(pool_server.url, {"name": "evo_merging"},
                   models={"lora_a": "pool:lora_a", "lora_b": "pool:lora_b"}, budget=2)
    from evomerge.engine.store import RunStore

    run_search(parse_config(missing), tmp_path / "r4", progress=False)
    (rec, _) = RunStore(tmp_path / "r4").read_evals()
    assert rec["failed"] and "lora_c" in rec["error"]  # the provider's pool also holds lora_c
