"""``robix launch``: launch-file validation, restarts, required nodes, and no orphan after Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from robix_planner.bus import read_graph
from robix_planner.config import ConfigError
from robix_planner.launch import LaunchNode, load_launch, node_argv

ROOT = Path(__file__).resolve().parents[1]

SLEEPER = "import time; print('ready', flush=True); time.sleep(60)"
# Ignores SIGINT, so the launcher has to escalate to SIGTERM.
STUBBORN = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
# Starts a grandchild in its own process group and reports its pid.
PARENT = ("import subprocess, sys, time; "
          "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
          "print('grandchild', p.pid, flush=True); time.sleep(60)")


def write_launch(tmp_path: Path, data: dict, name: str = "graph.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def alive(pid: int) -> bool:
    """True if ``pid`` runs; a zombie (dead, not yet reaped by its new parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate, timeout_s: float, period_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period_s)
    return predicate()


class Launch:
    """``robix launch`` in a subprocess, its merged output collected line by line."""

    def __init__(self, path: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "robix_planner.cli", "launch", str(path), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()

    @property
    def output(self) -> str:
        with self._cv:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float = 15.0, count: int = 1) -> list[re.Match]:
        """The first ``count`` lines matching ``pattern``; fails after ``timeout_s``."""
        rx = re.compile(pattern)
        with self._cv:
            ok = self._cv.wait_for(lambda: len([m for m in map(rx.search, self.lines) if m]) >= count, timeout_s)
            assert ok, f"no {count} line(s) matching {pattern!r} within {timeout_s} s; output:\n" + "\n".join(self.lines)
            return [m for m in map(rx.search, self.lines) if m][:count]

    def pids(self) -> dict[str, list[int]]:
        """Every pid the launcher reported starting, by node name."""
        out: dict[str, list[int]] = {}
        with self._cv:
            for line in self.lines:
                m = re.search(r"(?:started|restarted) (\S+) \(pid (\d+)\)", line)
                if m:
                    out.setdefault(m.group(1), []).append(int(m.group(2)))
        return out

    def wait(self, timeout_s: float) -> int:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"robix launch did not exit within {timeout_s} s; output:\n{self.output}")
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def launches():
    started: list[Launch] = []
    yield lambda *a: started.append(Launch(*a)) or started[-1]
    for la in started:  # a failed test must not leave its launcher (and so its children) behind
        la.kill()


# --------------------------------------------------------------------------- the file format


def test_demo_launch_file_is_valid():
    launch = load_launch(ROOT / "launch/demo.yaml")
    assert [n.name for n in launch.nodes] == ["camera", "controller", "commander"]
    assert [n.name for n in launch.nodes if n.required] == ["commander"]
    assert launch.shutdown_grace_s == 5.0


def test_overrides_address_nodes_by_name():
    launch = load_launch(ROOT / "launch/demo.yaml",
                         ["nodes.camera.params.rate_hz=5", "bus.domain=lab", "shutdown_grace_s=1.5"])
    assert launch.nodes[0].params == {"rate_hz": 5}
    assert launch.bus == {"domain": "lab"} and launch.shutdown_grace_s == 1.5
    with pytest.raises(ConfigError, match="no node named 'camra'.*camera, controller, commander"):
        load_launch(ROOT / "launch/demo.yaml", ["nodes.camra.params.rate_hz=5"])


@pytest.mark.parametrize("nodes, message", [
    ([{"name": "a", "cmd": ["x"], "restrat": "always"}], r"nodes\[0\] \('a'\): unknown key 'restrat'; did you mean 'restart'"),
    ([{"name": "a", "cmd": ["x"], "restart": "sometimes"}], r"restart: .*use one of never, on-failure, always"),
    ([{"name": "a", "cmd": ["x"], "max_restarts": "many"}], r"max_restarts: Expected `int`"),
    ([{"name": "a"}], r"give exactly one of node: .* or cmd:"),
    ([{"name": "a", "node": "m:C", "cmd": ["x"]}], r"give exactly one of node:"),
    ([{"name": "a", "node": "just_a_module"}], r"must look like package.module:ClassName"),
    ([{"name": "a", "cmd": ["x"]}, {"name": "a", "cmd": ["y"]}], r"nodes\[1\] \('a'\): another node is already named"),
    ([{"name": "a b", "cmd": ["x"]}], r"a name may use letters"),
    ([{"name": "a", "cmd": ["x"], "params": {"k": 1}}], r"params: and remap: apply to node: entries only"),
    ([{"name": "a", "node": "m:C", "remap": {"cam": "/x"}}], r"must start with '/'"),
    ([], r"`nodes` must be a non-empty list"),
])
def test_invalid_node_entries_say_what_to_change(tmp_path, nodes, message):
    with pytest.raises(ConfigError, match=message):
        load_launch(write_launch(tmp_path, {"nodes": nodes}))


def test_invalid_top_level_and_bus_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"top level: unknown key 'grace'.*nodes, bus, shutdown_grace_s"):
        load_launch(write_launch(tmp_path, {"grace": 1, "nodes": [{"name": "a", "cmd": ["x"]}]}))
    with pytest.raises(ConfigError, match=r"bus: .*unknown field `domian`"):
        load_launch(write_launch(tmp_path, {"bus": {"domian": "x"}, "nodes": [{"name": "a", "cmd": ["x"]}]}))


def test_node_command_lines_use_this_interpreter():
    spec = LaunchNode(name="cam", node="robix_planner.demo:CameraNode", remap={"/camera/head": "/cam"})
    assert node_argv(spec, "/tmp/cam.yaml") == [
        sys.executable, "-m", "robix_planner.cli", "run", "robix_planner.demo:CameraNode", "--name", "cam",
        "--config", "/tmp/cam.yaml", "--remap", "/camera/head:=/cam"]
    rec = LaunchNode(name="rec", cmd=["robix", "record", "-o", "out.mcap"])
    assert node_argv(rec, None) == [sys.executable, "-m", "robix_planner.cli", "record", "-o", "out.mcap"]


def test_invalid_launch_file_exits_2_with_a_clear_error(tmp_path, bus_env):
    path = write_launch(tmp_path, {"nodes": [{"name": "camera", "node": "robix_planner.demo:CameraNode",
                                              "restart": "on-failure", "max_restart": 2}]})
    res = subprocess.run([sys.executable, "-m", "robix_planner.cli", "launch", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "unknown key 'max_restart'; did you mean 'max_restarts'" in res.stderr
    assert "started" not in res.stderr  # nothing was launched
    res = subprocess.run([sys.executable, "-m", "robix_planner.cli", "launch", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "does not exist" in res.stderr


# --------------------------------------------------------------------------- processes


def test_restarts_a_killed_node_and_ctrl_c_stops_it(tmp_path, bus_env, launches):
    path = write_launch(tmp_path, {"nodes": [
        {"name": "camera", "node": "robix_planner.demo:CameraNode", "params": {"rate_hz": 5},
         "restart": "on-failure", "restart_delay_s": 0.1},
    ]})
    root = Path(bus_env["ROBIX_GRAPH_DIR"]) / bus_env["ROBIX_DOMAIN"]

    def camera_pids() -> set[int]:
        return {e.pid for e in read_graph(root) if "camera" in e.nodes}

    la = launches(path)
    assert wait_until(lambda: camera_pids(), 20), la.output
    (first,) = camera_pids()
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: camera_pids() - {first}, 20), f"no new camera on the bus; output:\n{la.output}"
    la.wait_for(r"camera was killed by SIGKILL; restarting in 0\.1 s \(restart 1 of 3\)")
    (second,) = camera_pids() - {first}
    assert la.pids()["camera"] == [first, second]

    la.proc.send_signal(signal.SIGINT)
    assert la.wait(20) == 130
    assert not alive(first) and not alive(second)
    assert "[camera]" in la.output and "received SIGINT, shutting down" in la.output  # the node stopped cleanly


def test_ctrl_c_leaves_no_process_behind(tmp_path, bus_env, launches):
    path = write_launch(tmp_path, {"shutdown_grace_s": 1, "nodes": [
        {"name": "sleeper", "cmd": [sys.executable, "-c", SLEEPER]},
        {"name": "stubborn", "cmd": [sys.executable, "-c", STUBBORN]},
        {"name": "parent", "cmd": [sys.executable, "-c", PARENT]},
    ]})
    la = launches(path)
    la.wait_for(r"^\[sleeper\] +ready")
    la.wait_for(r"^\[stubborn\] +ready")
    grandchild = int(la.wait_for(r"^\[parent\] +grandchild (\d+)")[0].group(1))
    pids = [p for ps in la.pids().values() for p in ps] + [grandchild]
    assert len(pids) == 4 and all(alive(p) for p in pids)

    la.proc.send_signal(signal.SIGINT)
    assert la.wait(20) == 130
    assert wait_until(lambda: not any(alive(p) for p in pids), 5), [p for p in pids if alive(p)]
    assert re.search(r"stubborn still running after 1\.0 s; sending SIGTERM", la.output)
    assert "stubborn was killed by SIGTERM" in la.output


def test_a_failing_required_node_takes_the_graph_down(tmp_path, bus_env, launches):
    path = write_launch(tmp_path, {"nodes": [
        {"name": "sleeper", "cmd": [sys.executable, "-c", SLEEPER]},
        {"name": "worker", "cmd": [sys.executable, "-c", "import sys, time; time.sleep(0.2); sys.exit(3)"],
         "required": True, "restart": "on-failure", "max_restarts": 1, "restart_delay_s": 0.1},
    ]})
    la = launches(path)
    assert la.wait(30) == 3, la.output
    assert len(la.pids()["worker"]) == 2  # restarted once, then given up
    assert "worker exited with code 3; giving up after 1 restart(s)" in la.output
    assert "required node worker is down; stopping the graph" in la.output
    assert not alive(la.pids()["sleeper"][0])


def test_timeout_takes_the_graph_down(tmp_path, bus_env, launches):
    path = write_launch(tmp_path, {"nodes": [{"name": "sleeper", "cmd": [sys.executable, "-c", SLEEPER]}]})
    la = launches(path, "--timeout-s", "1")
    la.wait_for(r"^\[sleeper\] +ready")
    assert la.wait(20) == 124
    assert not alive(la.pids()["sleeper"][0])


def test_a_node_that_exits_is_not_restarted_by_default_and_the_graph_ends(tmp_path, bus_env, launches):
    path = write_launch(tmp_path, {"nodes": [
        {"name": "ok", "cmd": [sys.executable, "-c", "print('done')"]},
        {"name": "bad", "cmd": [sys.executable, "-c", "import sys; sys.exit(5)"]},
    ]})
    la = launches(path)
    assert la.wait(20) == 1  # every node exited by itself, one of them failed
    assert la.pids() == {"ok": la.pids()["ok"], "bad": la.pids()["bad"]} and len(la.pids()["bad"]) == 1
    assert "every node has exited; failed: bad" in la.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_children_die_with_a_killed_launcher(tmp_path, bus_env, launches):
    path = write_launch(tmp_path, {"nodes": [{"name": "sleeper", "cmd": [sys.executable, "-c", SLEEPER]}]})
    la = launches(path)
    la.wait_for(r"^\[sleeper\] +ready")
    (child,) = la.pids()["sleeper"]
    la.proc.kill()
    la.proc.wait(10)
    assert wait_until(lambda: not alive(child), 5), "the child outlived its SIGKILLed launcher"
