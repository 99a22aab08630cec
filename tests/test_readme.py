"""The README is a contract: its commands and its controller example must work as written."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from robix_planner.bus import Bus
from robix_planner.controller import CommandClient
from robix_planner.messages import CommandState
from robix_planner.node import Node

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    test_cmd = next(b.strip() for b in _blocks("bash") if "pytest" in b)
    ci_lines = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ci_lines[-1] == test_cmd


def test_main_command_names_an_existing_launch_file():
    main_cmd = next(b.strip() for b in _blocks("bash") if "robix launch" in b)
    launch_file = main_cmd.rsplit("robix launch", 1)[1].split()[0]
    assert (ROOT / launch_file).is_file()


def test_controller_example_executes_a_command(tmp_path, bus_config, bus_env):
    code = next(b for b in _blocks("python") if "CommandServer(" in b)
    script = tmp_path / "my_robot.py"
    script.write_text(code)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        done = threading.Event()
        statuses = []

        def on_status(s):
            statuses.append(s)
            if s.state.terminal:
                done.set()

        with Bus(bus_config) as bus:
            node = Node("tester", bus=bus).start()
            client = CommandClient(node, on_status)
            client.send("pick up the red cup", "pick_up", {"object": "red cup"})
            assert done.wait(15), f"no final status; got {statuses}"
            node.shutdown()
        states = [s.state for s in statuses]
        assert states[0] is CommandState.ACCEPTED
        assert states[-1] is CommandState.SUCCEEDED and statuses[-1].holding == "red cup"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, out
        assert "executing pick_up {'object': 'red cup'}" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
