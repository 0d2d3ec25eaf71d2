"""Run config parsing: clear one-line errors naming the field path."""

from __future__ import annotations

import pytest
import yaml

from evomerge.config import load_config, parse_config
from evomerge.errors import ConfigError

GOOD = {
    "name": "t",
    "models": {"base": "/m/base", "a": "/m/a", "b": "/m/b"},
    "base_model": "base",
    "tasks": [{"path": "fitness/zoo/x.yaml"}],
}


def test_good_config_parses_with_defaults():
    cfg = parse_config(GOOD)
    assert cfg.optimizer.name == "cma"
    assert cfg.space.type == "parameter"
    assert cfg.backend.name == "hf"
    assert cfg.budget == 100


@pytest.mark.parametrize(
    "patch, expect",
    [
        ({"optimizer": {"nmae": "cma"}}, "optimizer.nmae: unknown field"),
        ({"space": {"type": "nope"}}, "space.type"),
        ({"budget": 0}, "budget"),
        ({"tasks": []}, "tasks: Value error, needs at least one task"),
        ({"models": {"a": "/x"}}, "models: Value error, needs at least two source models"),
        ({"space": {"params": {"weight": {"low": 1.0, "high": 0.5}}}}, "space.params.weight.high"),
        ({"executor": {"workers": 0}}, "executor.workers"),
    ],
)
def test_bad_fields_name_the_path(patch, expect):
    data = dict(GOOD, **patch)
    with pytest.raises(ConfigError) as e:
        parse_config(data, "run.yaml")
    msg = str(e.value)
    assert msg.startswith("run.yaml: ")
    assert expect in msg
    assert "\n" not in msg


def test_missing_field():
    data = dict(GOOD)
    del data["models"]
    with pytest.raises(ConfigError, match="models: required field is missing"):
        parse_config(data)


def test_unknown_base_model():
    with pytest.raises(ConfigError, match="base_model: 'nope' is not one of models"):
        parse_config(dict(GOOD, base_model="nope"))


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(top)


def test_paths_resolved_relative_to_config(tmp_path):
    (tmp_path / "m").mkdir()
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(dict(GOOD, models={"base": "m", "a": "zoo:experts/a"}, base_model="base")))
    cfg = load_config(p)
    assert cfg.models["base"] == str((tmp_path / "m").resolve())
    assert cfg.models["a"] == "zoo:experts/a"


def test_fingerprint_ignores_name_budget_executor():
    a = parse_config(GOOD)
    b = parse_config(dict(GOOD, name="other", budget=7, executor={"name": "ray", "workers": 2}))
    c = parse_config(dict(GOOD, seed=1))
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
