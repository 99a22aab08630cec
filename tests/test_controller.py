"""The command channel end to end: exactly-once execution, rejection, preemption, timeouts."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from waiting import wait_until

from robix_planner.controller import COMMAND_TOPIC, CommandClient, CommandContext, CommandServer
from robix_planner.messages import Capabilities, Command, CommandState, CommandStatus
from robix_planner.node import Node, NodeConfig
from robix_planner.skills import TABLETOP_SKILLS

TIMEOUT_S = 5.0
CAPS = Capabilities(robot="test_arm", skills=list(TABLETOP_SKILLS), objects=["red cup", "fork"],
                    receptacles=["bus tub"])


class Robot:
    """A controller node whose ``execute`` records every command it runs."""

    def __init__(self, bus_config, *, step_s: float = 0.0, steps: int = 1):
        self.node = Node("robot", bus_config=bus_config, node_config=NodeConfig(heartbeat_period_s=0))
        self.executed: list[str] = []
        self.step_s, self.steps = step_s, steps
        self.server = CommandServer(self.node, CAPS, execute=self.execute, capabilities_period_s=0)
        self.node.start()

    def execute(self, cmd: Command, ctx: CommandContext) -> None:
        self.executed.append(cmd.text)
        for _ in range(self.steps):
            if ctx.cancelled.wait(self.step_s):
                return
        if cmd.skill == "pick_up":
            ctx.holding = cmd.args["object"]


class Planner:
    """A client node collecting every status it is given."""

    def __init__(self, bus_config, **client_kw):
        self.node = Node("planner", bus_config=bus_config, node_config=NodeConfig(heartbeat_period_s=0))
        self.statuses: queue.Queue[CommandStatus] = queue.Queue()
        self.client = CommandClient(self.node, self.statuses.put, **{"resend_period_s": 0.05, **client_kw})
        self.node.start()

    def until_final(self, command_id: str) -> list[CommandStatus]:
        """Statuses of one command up to and including its terminal one (others are skipped)."""
        seen = []
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            st = self.statuses.get(timeout=max(0.0, deadline - time.monotonic()))
            if st.command_id != command_id:
                continue
            seen.append(st)
            if st.state.terminal:
                return seen


@pytest.fixture
def robot(bus_config):
    r = Robot(bus_config)
    yield r
    r.node.shutdown()


@pytest.fixture
def planner(bus_config):
    p = Planner(bus_config)
    yield p
    p.node.shutdown()


def connected(planner: Planner, robot: Robot) -> Planner:
    """Wait until both directions are connected, so that no status is lost to a late connection."""
    assert planner.client.pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
    assert robot.server.status_pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
    return planner


def states(statuses: list[CommandStatus]) -> list[str]:
    return [s.state.value for s in statuses]


def test_a_command_runs_and_reports_its_states(robot, planner):
    cmd = connected(planner, robot).client.send("pick up the red cup", "pick_up", {"object": "red cup"})
    seen = planner.until_final(cmd.id)
    assert states(seen) == ["accepted", "running", "succeeded"]
    assert seen[-1].holding == "red cup"
    assert robot.executed == ["pick up the red cup"]
    assert planner.client.unacknowledged == []


def test_a_dropped_command_is_executed_exactly_once(robot, planner, monkeypatch):
    connected(planner, robot)
    real_publish = planner.client.pub.publish
    dropped: list[Command] = []

    def lossy_publish(msg):
        if len(dropped) < 3:  # the first send and two re-sends vanish
            dropped.append(msg)
            return 0
        return real_publish(msg)

    monkeypatch.setattr(planner.client.pub, "publish", lossy_publish)
    cmd = planner.client.send("pick up the fork", "pick_up", {"object": "fork"})
    seen = planner.until_final(cmd.id)
    assert [d.id for d in dropped] == [cmd.id] * 3
    assert seen[-1].state is CommandState.SUCCEEDED
    assert robot.executed == ["pick up the fork"]
    assert planner.client.resends >= 3


def test_lost_statuses_make_the_client_resend_and_the_server_still_executes_once(robot, planner, monkeypatch):
    connected(planner, robot)
    real_publish = robot.server.status_pub.publish
    lost: list[CommandStatus] = []

    def lossy_publish(msg):
        if len(lost) < 4:  # accepted, running, succeeded and the first re-answer are lost
            lost.append(msg)
            return 0
        return real_publish(msg)

    monkeypatch.setattr(robot.server.status_pub, "publish", lossy_publish)
    cmd = planner.client.send("pick up the red cup", "pick_up", {"object": "red cup"})
    seen = planner.until_final(cmd.id)
    # The client kept re-sending; the server answered each duplicate with the latest status.
    assert states(seen) == ["succeeded"]
    assert states(lost) == ["accepted", "running", "succeeded", "succeeded"]
    assert robot.executed == ["pick up the red cup"]
    assert planner.client.resends >= 2  # one re-send answered into the void, one answered for real


def test_a_duplicated_command_is_executed_once_and_answered_twice(robot, bus_config):
    """The same Command published twice (e.g. by a client that restarted): one execution, two answers."""
    sender = Node("sender", bus_config=bus_config, node_config=NodeConfig(heartbeat_period_s=0))
    got: queue.Queue[CommandStatus] = queue.Queue()
    sender.create_subscription("/controller/status", CommandStatus, got.put)
    sender.start()
    try:
        pub = sender.create_publisher(COMMAND_TOPIC, Command)
        assert pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
        assert robot.server.status_pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)  # nobody re-sends here
        cmd = Command(id="dup1", text="pick up the fork", skill="pick_up", args={"object": "fork"})
        pub.publish(cmd)
        first = []
        while not first or not first[-1].state.terminal:
            first.append(got.get(timeout=TIMEOUT_S))
        pub.publish(cmd)  # a new seq, the same command id
        again = got.get(timeout=TIMEOUT_S)
        assert (again.command_id, again.state) == ("dup1", CommandState.SUCCEEDED)
        assert robot.executed == ["pick up the fork"]
    finally:
        sender.shutdown()


@pytest.mark.parametrize("text, skill, reason", [
    ("fly to the moon", "fly", "matches no skill"),
    ("pick up the purple unicorn", "pick_up", "outside the vocabulary"),
])
def test_commands_outside_the_grammar_are_rejected_with_a_reason(robot, planner, text, skill, reason):
    cmd = connected(planner, robot).client.send(text, skill)
    seen = planner.until_final(cmd.id)
    assert states(seen) == ["rejected"]
    assert reason in seen[-1].detail
    assert robot.executed == []


def test_stop_preempts_the_running_command(bus_config, planner):
    robot = Robot(bus_config, step_s=0.05, steps=200)  # a 10 s command
    try:
        connected(planner, robot)
        long_cmd = planner.client.send("put the red cup into the bus tub", "put_into",
                                       {"object": "red cup", "receptacle": "bus tub"})
        assert planner.statuses.get(timeout=TIMEOUT_S).state is CommandState.ACCEPTED
        assert planner.statuses.get(timeout=TIMEOUT_S).state is CommandState.RUNNING
        busy = planner.client.send("pick up the fork", "pick_up", {"object": "fork"})
        rejected = planner.until_final(busy.id)
        assert "busy" in rejected[-1].detail and "send 'stop' first" in rejected[-1].detail
        t0 = time.monotonic()
        stop = planner.client.send("stop", "stop")
        assert states(planner.until_final(stop.id)) == ["accepted", "succeeded"]
        assert planner.until_final(long_cmd.id)[-1].state is CommandState.PREEMPTED
        assert time.monotonic() - t0 < 1.0
        assert robot.executed == ["put the red cup into the bus tub"]  # stop is handled by the server itself
    finally:
        robot.node.shutdown()


def test_no_status_within_the_ack_timeout_yields_a_local_failure(bus_config):
    planner = Planner(bus_config, ack_timeout_s=0.3)  # no controller on this bus
    try:
        t0 = time.monotonic()
        cmd = planner.client.send("pick up the red cup", "pick_up", {"object": "red cup"})
        seen = planner.until_final(cmd.id)
        assert states(seen) == ["failed"]
        assert "no status from the controller within 0.3 s" in seen[-1].detail
        assert 0.3 <= time.monotonic() - t0 < 2.0
        assert planner.client.unacknowledged == []
        resends = planner.client.resends
        time.sleep(0.15)
        assert planner.client.resends == resends  # given up: no more re-sends
    finally:
        planner.node.shutdown()


def test_capabilities_reach_a_late_subscriber(robot, bus_config):
    late = Node("late", bus_config=bus_config, node_config=NodeConfig(heartbeat_period_s=0))
    got: queue.Queue[Capabilities] = queue.Queue()
    late.create_subscription("/controller/capabilities", Capabilities, got.put)
    late.start()
    try:
        assert got.get(timeout=TIMEOUT_S) == CAPS
    finally:
        late.shutdown()


def test_event_style_server_acknowledges_and_lets_the_robot_report(bus_config, planner):
    node = Node("evented", bus_config=bus_config, node_config=NodeConfig(heartbeat_period_s=0))
    received: list[Command] = []
    done = threading.Event()

    def on_command(cmd: Command) -> None:
        received.append(cmd)
        server.report(cmd.id, CommandState.SUCCEEDED, "done", holding=None)
        done.set()

    server = CommandServer(node, CAPS, on_command=on_command, capabilities_period_s=0)
    node.start()
    try:
        assert planner.client.pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
        assert server.status_pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
        cmd = planner.client.send("pick up the fork", "pick_up", {"object": "fork"})
        assert states(planner.until_final(cmd.id)) == ["accepted", "succeeded"]
        assert [c.id for c in received] == [cmd.id]
    finally:
        node.shutdown()


def test_node_shutdown_cancels_the_running_command_and_it_reports_preempted(bus_config):
    """Shutting a controller node down mid-command cancels the command, which ends with a
    'preempted' status sent while the sockets are still open (no 'publisher closed' error)."""
    caps = Capabilities(robot="arm", skills=list(TABLETOP_SKILLS), objects=["red cup"], receptacles=["bus tub"])
    started, finished = threading.Event(), threading.Event()

    def execute(cmd, ctx):
        started.set()
        ctx.cancelled.wait(30)
        finished.set()

    statuses = []
    robot = Node("robot", bus_config=bus_config).start()
    server = CommandServer(robot, caps, execute=execute)
    planner = Node("planner", bus_config=bus_config).start()
    try:
        client = CommandClient(planner, statuses.append)
        assert server.status_pub.wait_for_subscribers(1, 5.0)
        client.send("pick up the red cup", "pick_up", {"object": "red cup"})
        assert started.wait(5.0)
        robot.shutdown()
        assert finished.is_set(), "shutdown returned before the command ended"
        wait_until(lambda: any(s.state is CommandState.PREEMPTED for s in statuses), 5.0, "the preempted status")
        assert robot.bus.stats.callback_errors == 0
    finally:
        robot.shutdown()
        planner.shutdown()
