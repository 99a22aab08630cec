"""The simulated world on real sockets: the world looks like a robot, the user reacts to bus
messages alone, and a planner that ignores interrupts scores lower over the bus too."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from robix_planner.bus import read_graph
from robix_planner.config import ConfigError
from robix_planner.controller import CAPABILITIES_TOPIC, COMMAND_TOPIC, STATUS_TOPIC, CommandClient
from robix_planner.messages import (
    Capabilities,
    Command,
    CommandState,
    CommandStatus,
    Image,
    ImageEncoding,
    Speech,
    Utterance,
)
from robix_planner import topics
from robix_planner.node import HEARTBEAT_TOPIC, Node, NodeConfig
from sim.nodes import (
    CAMERA_TOPIC,
    OracleNode,
    SimClock,
    SimulationNode,
    UserNode,
    WorldNode,
)
from sim.runner import run_episode
from sim.scenarios import get_scenario
from sim.spec import GRIPPER, TABLE, PredicateType, Trigger

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 10.0
QUIET = NodeConfig(heartbeat_period_s=0)


class Inbox:
    """Everything a callback was given, with bounded waits."""

    def __init__(self):
        self.items: list = []
        self._cv = threading.Condition()

    def put(self, item) -> None:
        with self._cv:
            self.items.append(item)
            self._cv.notify_all()

    def wait_for(self, pred, timeout_s: float = TIMEOUT_S):
        """The first item matching ``pred``; fails after ``timeout_s``."""
        with self._cv:
            ok = self._cv.wait_for(lambda: any(pred(x) for x in self.items), timeout_s)
            assert ok, f"nothing matched within {timeout_s} s; got {self.items}"
            return next(x for x in self.items if pred(x))


def target_of(scenario_id: str) -> tuple[str, str]:
    """An object of the scenario and where it belongs (its first ``at`` predicate off the table)."""
    p = next(p for p in get_scenario(scenario_id).predicates if p.type is PredicateType.AT and p.location != TABLE)
    return p.object, p.location


@pytest.fixture
def nodes():
    started: list[Node] = []

    def start(node: Node) -> Node:
        started.append(node)
        return node.start()

    yield start
    for n in reversed(started):
        n.shutdown()


def make_world(nodes, bus_config, scenario_id: str, time_scale: float) -> WorldNode:
    return nodes(WorldNode(WorldNode.Params(scenario=scenario_id, time_scale=time_scale, camera_rate_hz=20),
                           bus_config=bus_config, node_config=QUIET))


def make_client(nodes, bus_config, on_status=None):
    """A planner-side node on its own bus (its own sockets, as in another process)."""
    node = Node("tester", bus_config=bus_config, node_config=QUIET)
    statuses = Inbox()

    def got(st):
        statuses.put(st)
        if on_status is not None:
            on_status(st)

    client = CommandClient(node, got, resend_period_s=0.05)
    nodes(node)
    assert client.pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
    return node, client, statuses


def let_sim_time_pass(clock: SimClock, sim_s: float) -> None:
    """Wait (bounded) until the simulated clock has moved on by ``sim_s``."""
    until = clock.now_s() + sim_s
    deadline = time.monotonic() + TIMEOUT_S
    while clock.now_s() < until:
        assert time.monotonic() < deadline, "the simulated clock does not run"
        time.sleep(0.002)


def until_final(statuses: Inbox, cid: str) -> list[CommandStatus]:
    final = statuses.wait_for(lambda s: s.command_id == cid and s.state.terminal)
    seen = [s for s in statuses.items if s.command_id == cid]
    return seen[: seen.index(final) + 1]


def test_world_node_looks_like_a_robot_rejects_unknown_words_and_executes_a_command(nodes, bus_config):
    sid = "task_complete-test-000"
    world = make_world(nodes, bus_config, sid, time_scale=20)
    obj, rec = target_of(sid)
    node, client, statuses = make_client(nodes, bus_config)
    caps, frames = Inbox(), Inbox()
    node.create_subscription(CAPABILITIES_TOPIC, Capabilities, caps.put)
    node.create_subscription(CAMERA_TOPIC, Image, frames.put)

    # What a planner learns: the grammar with this scene's vocabulary, and camera frames.
    cap = caps.wait_for(lambda c: c.objects)
    assert cap.objects == [o.name for o in get_scenario(sid).scene.objects]
    assert {s.template for s in cap.skills} >= {"put the {object} into the {receptacle}", "stop"}
    frame = frames.wait_for(lambda f: True)
    assert (frame.width, frame.height, frame.encoding) == (160, 120, ImageEncoding.RGB8)
    assert len(set(map(tuple, frame.array().reshape(-1, 3)))) > 5  # a drawn scene, not a blank frame

    bad = client.send("pick up the purple unicorn", "pick_up", {"object": "purple unicorn"})
    [rejected] = until_final(statuses, bad.id)
    assert rejected.state is CommandState.REJECTED and "purple unicorn" in rejected.detail

    cmd = client.send(f"put the {obj} into the {rec}", "put_into", {"object": obj, "receptacle": rec})
    seen = until_final(statuses, cmd.id)
    assert [s.state for s in seen] == [CommandState.ACCEPTED] + [CommandState.RUNNING] * 4 + [CommandState.SUCCEEDED]
    assert [s.detail for s in seen[1:5]] == ["approach", "grasp", "carry", "release"]
    assert [s.holding for s in seen[1:5]] == [None, None, obj, obj] and seen[-1].holding is None
    assert world.world.location(obj) == rec

    # The world state never goes on the bus: the world node publishes only what a robot would.
    [entry] = [e for e in read_graph(world.bus.root) if "world" in e.nodes]
    assert {p.topic for p in entry.publishers} == {STATUS_TOPIC, CAPABILITIES_TOPIC, CAMERA_TOPIC, HEARTBEAT_TOPIC}


@pytest.mark.parametrize("phase, held", [("approach", False), ("carry", True), ("release", True)])
def test_stop_over_the_bus_leaves_the_item_held_after_the_grasp(nodes, bus_config, phase, held):
    sid = "task_complete-test-000"
    world = make_world(nodes, bus_config, sid, time_scale=2)
    obj, rec = target_of(sid)
    stops: list[Command] = []

    def on_status(st: CommandStatus) -> None:  # runs on the client node's executor
        if st.state is CommandState.RUNNING and st.detail == phase and not stops:
            stops.append(client.send("stop", "stop"))

    _, client, statuses = make_client(nodes, bus_config, on_status)
    cmd = client.send(f"put the {obj} into the {rec}", "put_into", {"object": obj, "receptacle": rec})
    final = until_final(statuses, cmd.id)[-1]
    assert final.state is CommandState.PREEMPTED and final.detail.startswith(f"stopped during {phase}")
    assert until_final(statuses, stops[0].id)[-1].state is CommandState.SUCCEEDED
    assert final.holding == (obj if held else None)
    assert world.world.holding == (obj if held else None)
    assert world.world.location(obj) == (GRIPPER if held else TABLE)


@pytest.mark.parametrize("sid", ["interrupted-test-000", "interrupted-test-001"], ids=["on_approach", "on_hold"])
def test_user_node_interrupts_from_bus_messages_alone(nodes, bus_config, sid):
    scenario = get_scenario(sid)
    turn = scenario.turns[1]
    assert turn.trigger in (Trigger.ON_APPROACH, Trigger.ON_HOLD)
    x, rec = turn.object, "bus tub"
    other = next(o.name for o in scenario.scene.objects if o.name != x)
    clock = SimClock(time_scale=20)
    user = nodes(UserNode(clock=clock, bus_config=bus_config, node_config=QUIET))
    robot = Node("robot", bus_config=bus_config, node_config=QUIET)  # plays world and planner, on its own bus
    cmd_pub = robot.create_publisher(COMMAND_TOPIC, Command)
    status_pub = robot.create_publisher(STATUS_TOPIC, CommandStatus)
    heard = Inbox()
    robot.create_subscription(topics.UTTERANCE, Utterance, heard.put)
    nodes(robot)
    assert user.pub.wait_for_subscribers(1, TIMEOUT_S)
    assert cmd_pub.wait_for_subscribers(1, TIMEOUT_S) and status_pub.wait_for_subscribers(1, TIMEOUT_S)

    user.load(scenario)
    clock.start()
    user.start_script()
    heard.wait_for(lambda u: u.text == scenario.turns[0].text)

    def act_on(cid: str, obj: str) -> None:
        cmd_pub.publish(Command(id=cid, text=f"put the {obj} into the {rec}", skill="put_into",
                                args={"object": obj, "receptacle": rec}))
        if turn.trigger is Trigger.ON_APPROACH:
            status_pub.publish(CommandStatus(command_id=cid, state=CommandState.RUNNING, detail="approach"))
        else:
            status_pub.publish(CommandStatus(command_id=cid, state=CommandState.RUNNING, detail="carry", holding=obj))

    act_on("c1", other)  # acting on another object: no interrupt (it would come turn.delay_s later)
    status_pub.publish(CommandStatus(command_id="c1", state=CommandState.SUCCEEDED))
    let_sim_time_pass(clock, turn.delay_s + 0.5)
    t_x = clock.now_s()
    act_on("c2", x)
    said = heard.wait_for(lambda u: u.text == turn.text)
    assert said.stamp_ns / 1e9 >= t_x + turn.delay_s - 1e-6  # after the robot acted on x, by the reaction time
    assert [u.text for u in heard.items] == [scenario.turns[0].text, turn.text]


def test_user_node_answers_a_question_heard_on_the_tts_topic(nodes, bus_config):
    scenario = get_scenario("ambiguous-test-000")
    answer = scenario.turns[1]
    assert answer.trigger is Trigger.ON_QUESTION
    clock = SimClock(time_scale=20)
    user = nodes(UserNode(clock=clock, bus_config=bus_config, node_config=QUIET))
    robot = Node("robot", bus_config=bus_config, node_config=QUIET)
    tts = robot.create_publisher(topics.SPEECH, Speech)
    heard = Inbox()
    robot.create_subscription(topics.UTTERANCE, Utterance, heard.put)
    nodes(robot)
    assert user.pub.wait_for_subscribers(1, TIMEOUT_S) and tts.wait_for_subscribers(1, TIMEOUT_S)
    user.load(scenario)
    clock.start()
    user.start_script()
    heard.wait_for(lambda u: u.text == scenario.turns[0].text)
    tts.publish(Speech(id="s1", text="Okay."))  # not a question: no answer (it would come answer.delay_s later)
    let_sim_time_pass(clock, answer.delay_s + 0.5)
    t_q = clock.now_s()
    tts.publish(Speech(id="s2", text="Which one do you mean?"))
    said = heard.wait_for(lambda u: u.text == answer.text)
    assert said.stamp_ns / 1e9 >= t_q + answer.delay_s - 1e-6
    assert len(heard.items) == 2


class IgnoresInterrupts(OracleNode):
    """The oracle, except that it never sends ``stop`` (a planner that ignores interrupts)."""

    def _send(self, plan, caps):
        if plan != "stop":
            super()._send(plan, caps)


def test_a_planner_that_ignores_interrupts_scores_lower_over_the_bus(nodes, bus_config):
    sim = nodes(SimulationNode(SimulationNode.Params(oracle=False, time_scale=20, autostart=False,
                                                     exit_when_done=False, transcript=False),
                               bus_config=bus_config, node_config=QUIET))
    # An "external" planner: its own bus and sockets; the test lends it the world's state.
    nodes(IgnoresInterrupts(world=sim.world_node, bus_config=bus_config, node_config=QUIET))
    sim.wait_ready(TIMEOUT_S)
    for sid in ("interrupted-test-000", "interrupted-test-001"):  # before and after the grasp
        scenario = get_scenario(sid)
        ep = sim.run_episode(scenario, timeout_s=60)
        oracle = run_episode(scenario).score
        assert oracle.progress == 1.0 and oracle.checks["interrupt_honoured"] is True
        assert not ep.truncated
        assert ep.score.progress < oracle.progress and not ep.score.success
        assert ep.score.checks["interrupt_honoured"] is False
        assert not any(e.skill == "stop" for e in ep.events if e.kind.value == "command")
        # ... and the item the user still needed went into the receptacle anyway
        assert ep.world_locations[scenario.turns[1].object] != TABLE


@pytest.mark.parametrize("exit_code, expected", [("success", 1), ("finished", 0)])
def test_exit_code_finished_exits_0_after_a_failed_episode_that_ran_to_its_end(nodes, bus_config, exit_code,
                                                                               expected):
    sim = nodes(SimulationNode(SimulationNode.Params(oracle=False, time_scale=20, autostart=False,
                                                     exit_code=exit_code, transcript=False),
                               bus_config=bus_config, node_config=QUIET))
    nodes(IgnoresInterrupts(world=sim.world_node, bus_config=bus_config, node_config=QUIET))
    sim.wait_ready(TIMEOUT_S)
    ep = sim.run_episode(get_scenario("interrupted-test-000"), timeout_s=60)
    assert not ep.truncated and not ep.score.success
    assert sim.shutdown_requested and sim.exit_code == expected


def test_an_unknown_exit_code_is_a_config_error(bus_config):
    with pytest.raises(ConfigError, match="exit_code must be one of success, finished"):
        SimulationNode(SimulationNode.Params(exit_code="always"), bus_config=bus_config, node_config=QUIET)


def test_robix_launch_table_bussing_runs_a_scenario_and_exits_0(bus_env):
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "robix_planner.cli", "launch", "launch/table_bussing.yaml",
         "nodes.sim.params.time_scale=20", "--color", "never"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "[sim]" in out and "score interrupted-test-001: progress 100%" in out and "success" in out
    assert "command: stop" in out  # the interrupt went over the bus
    assert time.monotonic() - t0 < 30
