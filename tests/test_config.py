"""Typed config: YAML plus dotted overrides, unknown keys and wrong types are errors, env() is the one door."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest
import yaml

from robix_planner.bus import BusConfig
from robix_planner.config import ENV_VARS, Config, ConfigError, env, load, parse_override, to_dict
from robix_planner.runner import build_node

REPO = Path(__file__).resolve().parents[1]


class Camera(Config):
    rate_hz: float = 10.0
    size: tuple[int, ...] = (640, 480)


class World(Config):
    seed: int = 0
    name: str = "table"
    verbose: bool = False
    camera: Camera = Camera()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_file_and_overrides_in_that_order(tmp_path):
    assert load(World) == World()
    path = write(tmp_path, "seed: 1\ncamera:\n  rate_hz: 5\n")
    cfg = load(World, path, ["camera.rate_hz=2.5", "verbose=true", "camera.size=[320, 240]", "name=kitchen"])
    assert cfg == World(seed=1, name="kitchen", verbose=True, camera=Camera(rate_hz=2.5, size=(320, 240)))
    assert load(World, path).camera.rate_hz == 5.0
    assert load(World, data={"seed": 4}, overrides=["seed=5"]).seed == 5
    assert load(World, data=yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg  # dumps load back


def test_override_values_are_yaml_scalars():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("x=off") == (["x"], False)
    assert parse_override("x=") == (["x"], "")
    assert parse_override("x='3'") == (["x"], "3")
    assert parse_override("text=a=b") == (["text"], "a=b")


@pytest.mark.parametrize("override, message", [
    ("seed", "must look like key.sub=value"),
    ("camera..rate_hz=1", "empty key part"),
    ("=1", "empty key part"),
    ("seed.x=1", "'seed' is a value, not a section"),
    ("seed=[1", "not valid YAML"),
])
def test_malformed_overrides_are_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(World, data={"seed": 1}, overrides=[override])


def test_unknown_keys_are_errors_that_list_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown field `sed`.*Valid keys of World: seed, name, verbose, camera"):
        load(World, overrides=["sed=1"])
    with pytest.raises(ConfigError, match=r"unknown field `fps`.*\$\.camera"):
        load(World, write(tmp_path, "camera:\n  fps: 30\n"))


@pytest.mark.parametrize("override, field", [
    ("seed=abc", "$.seed"),
    ("camera.rate_hz=fast", "$.camera.rate_hz"),
    ("camera.size=[1, x]", "$.camera.size[1]"),
    ("verbose=[1]", "$.verbose"),
    ("camera=3", "$.camera"),
])
def test_type_errors_name_the_key(override, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load(World, overrides=[override])


def test_bad_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(World, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load(World, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(World, write(tmp_path, "seed: [1\n"))
    assert load(World, write(tmp_path, "")) == World()


def test_configs_are_frozen():
    cfg = World()
    with pytest.raises(AttributeError):
        cfg.seed = 3


def test_env_reads_only_documented_variables(monkeypatch):
    monkeypatch.setenv("ROBIX_DOMAIN", "lab")
    assert env("ROBIX_DOMAIN") == "lab"
    monkeypatch.setenv("ROBIX_DOMAIN", "")
    assert env("ROBIX_DOMAIN", "default") == "default"  # empty counts as unset
    monkeypatch.delenv("ROBIX_DOMAIN")
    assert env("ROBIX_DOMAIN") is None
    monkeypatch.setenv("HOME_MADE", "x")
    with pytest.raises(KeyError, match="add it to config.ENV_VARS"):
        env("HOME_MADE")
    assert all(name.isupper() and meaning for name, meaning in ENV_VARS.items())


def test_nothing_else_reads_the_environment():
    """Environment variables are read in config.env() only (copying os.environ for a child process is fine)."""
    reading = re.compile(r"os\.getenv|environ\.get\(|environ\[[^\]]+\](?!\s*=[^=])|environ\.setdefault")
    offenders = []
    for package in ("robix_planner", "sim", "training"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path == REPO / "robix_planner" / "config.py":
                continue
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if reading.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert offenders == [], "read environment variables through robix_planner.config.env():\n" + "\n".join(offenders)


def test_bus_config_follows_the_environment_only_where_unset(monkeypatch, tmp_path):
    from robix_planner.bus import graph_root

    monkeypatch.setenv("ROBIX_GRAPH_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("ROBIX_DOMAIN", "lab")
    assert graph_root(BusConfig()) == tmp_path / "env" / "lab"
    assert graph_root(BusConfig(graph_dir=str(tmp_path / "cfg"), domain="x")) == tmp_path / "cfg" / "x"
    monkeypatch.delenv("ROBIX_GRAPH_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert graph_root(BusConfig()) == tmp_path / "run" / "robix" / "lab"


def test_node_params_come_from_yaml_and_overrides(tmp_path, bus_config):
    path = write(tmp_path, f"params:\n  rate_hz: 4\nbus:\n  graph_dir: {bus_config.graph_dir}\n  domain: test\n")
    node = build_node("robix_planner.demo:CameraNode", config=str(path), overrides=["params.camera=wrist"],
                      name="cam2", remap={"/camera/wrist": "/robot1/wrist"})
    try:
        assert (node.name, node.params.rate_hz, node.params.camera) == ("cam2", 4.0, "wrist")
        assert node.pub.topic == "/robot1/wrist"
        assert node.bus.config.domain == "test"
    finally:
        node.shutdown()


@pytest.mark.parametrize("overrides, message", [
    (["params.fps=3"], "unknown field `fps`"),
    (["params.rate_hz=often"], "$.rate_hz"),
    (["bus.transport=udp"], "$.transport"),
    (["nodes.x=1"], "unknown field `nodes`"),
])
def test_node_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_node("robix_planner.demo:CameraNode", overrides=overrides)


def test_config_errors_are_not_validation_errors():
    """Callers catch one exception type; msgspec's own errors never leak."""
    with pytest.raises(ConfigError) as info:
        load(World, overrides=["seed=abc"])
    assert not isinstance(info.value, msgspec.ValidationError)


def test_exponent_floats_read_as_numbers(tmp_path):
    """`lr: 2e-4` in a file or `train.lr=2e-4` on the command line is a float (PyYAML alone reads a string)."""
    from robix_planner.config import parse_override, read_yaml

    p = tmp_path / "c.yaml"
    p.write_text("lr: 2e-4\nwarmup: 1.0e-1\nname: x1e5\nsteps: 10\n")
    assert read_yaml(p) == {"lr": 2e-4, "warmup": 0.1, "name": "x1e5", "steps": 10}
    assert parse_override("train.lr=3e-5") == (["train", "lr"], 3e-5)
