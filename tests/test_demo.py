"""The bus demo: its nodes in one process, and ``robix launch launch/demo.yaml`` end to end."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from robix_planner.bus import Bus
from robix_planner.config import ConfigError
from robix_planner.demo import CameraNode, DemoCommander, DemoController, render_frame
from robix_planner.messages import CommandState, Image
from robix_planner.node import spin

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = [CommandState.SUCCEEDED, CommandState.SUCCEEDED, CommandState.REJECTED, CommandState.PREEMPTED,
            CommandState.SUCCEEDED]


def test_render_frame_is_a_moving_coloured_square():
    a, b = render_frame(0), render_frame(15)
    assert a.shape == (120, 160, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_frame(0))  # deterministic in the frame index
    assert not np.array_equal(a, b)
    coloured = lambda f: np.argwhere(f.max(axis=2) - f.min(axis=2) > 100)  # noqa: E731 (grey background has none)
    assert len(coloured(a)) == 30 * 30 and len(coloured(b)) == 30 * 30
    assert not np.array_equal(coloured(a).min(axis=0), coloured(b).min(axis=0))  # the square moved


def test_camera_publishes_images(bus_config):
    received = []
    with Bus(bus_config) as bus:
        cam = CameraNode(CameraNode.Params(rate_hz=50), bus=bus)
        bus.subscribe("/camera/head", Image, lambda _s, rec: received.append(rec.msg))
        with cam:
            assert _wait(lambda: len(received) >= 3, 10), "no frames from the camera"
    img = received[-1]
    assert (img.camera, img.width, img.height, img.encoding.value) == ("head", 160, 120, "rgb8")
    assert img.array().shape == (120, 160, 3)


def test_commander_and_controller_run_the_script(bus_config):
    with Bus(bus_config) as bus:
        controller = DemoController(bus=bus)
        commander = DemoCommander(bus=bus)
        assert spin(controller, commander, handle_signals=False, timeout_s=30) == 0
    assert commander.shutdown_requested, "the script did not finish within 30 s"
    assert [s.state for s in commander.results] == EXPECTED
    assert commander.results[0].holding == "red cup" and commander.results[1].holding is None
    assert "purple unicorn" in commander.results[2].detail  # rejected: outside the vocabulary
    # the stop came while the bowl was being picked up
    bowl = [s.state for i, s in commander.statuses if i == 3]
    assert CommandState.RUNNING in bowl and bowl[-1] is CommandState.PREEMPTED


def test_commander_fails_when_the_controller_answers_otherwise(bus_config):
    params = DemoCommander.Params(script=("pick up the purple unicorn",), expect=("succeeded",))
    with Bus(bus_config) as bus:
        controller = DemoController(bus=bus)
        commander = DemoCommander(params, bus=bus)
        assert spin(controller, commander, handle_signals=False, timeout_s=30) == 1
    assert commander.results[0].state is CommandState.REJECTED


def test_commander_gives_up_without_a_controller(bus_config):
    commander = DemoCommander(DemoCommander.Params(capabilities_timeout_s=0.3), bus_config=bus_config)
    assert spin(commander, handle_signals=False, timeout_s=10) == 1
    assert commander.results == [None] * 5


def test_commander_params_are_checked():
    with pytest.raises(ConfigError, match="one final state per command"):
        DemoCommander(DemoCommander.Params(script=("stop",), expect=("succeeded", "failed")))


def test_demo_launch_finishes_by_itself_with_exit_code_0(bus_env):
    res = subprocess.run([sys.executable, "-m", "robix_planner.cli", "launch", str(ROOT / "launch/demo.yaml"),
                          "--timeout-s", "40"], capture_output=True, text=True, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    for name in ("camera", "controller", "commander"):
        assert re.search(rf"^\[{name}\] +\S", res.stderr, re.M), f"no [{name}] lines:\n{out}"
    # the commander's summary: one "ok <command> <final state>" line per command
    summary = re.findall(r"^\[commander\] +(ok|EXPECTED \w+:) (.+?) +(succeeded|rejected|preempted|failed)\b",
                         res.stderr, re.M)
    assert [(mark, state) for mark, _, state in summary] == [("ok", s.value) for s in EXPECTED], out
    assert summary[2][1] == "pick up the purple unicorn" and summary[3][1] == "pick up the blue bowl"
    assert "[commander]" in out and "robix.node.controller: executing pick_up {'object': 'red cup'}" in out
    assert "commander exited with code 0" in out


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
