"""The training data's steps are the run-time planner's: the in-process adaptor
(training.data.adaptor) builds the same step inputs, and the oracle answers the same, as a real
PlannerNode over the bus with the oracle behind its backend interface."""

from __future__ import annotations

import pytest

from robix_planner import format as fmt
from robix_planner.bus import BusConfig
from robix_planner.config import convert
from sim.oracle_backend import OracleBackend, OraclePlannerSim
from sim.runner import EpisodeRunner
from sim.scenarios import get_scenario
from training.data.adaptor import STOP_PHRASE, AdaptorError, PlannerAdaptor

#: Different categories and every path of the node's input handling: a stop phrase after the
#: grasp, "I still need that" after the grasp (halt, preempted, put back), "do X first" before
#: the grasp, three slips and a request for help, small talk during a command (halt, resume),
#: a clarifying question, a refusal, an offer.
SCENARIOS = ["interrupted-test-005", "interrupted-test-001", "interrupted-test-002", "failure_retry-test-002",
             "chat-test-001", "ambiguous-test-000", "invalid-test-000", "proactive-test-000"]


def play_in_process(scenario_id: str) -> tuple[PlannerAdaptor, object]:
    runner = EpisodeRunner(get_scenario(scenario_id))
    adaptor = PlannerAdaptor(OracleBackend(privileged=runner.privileged).answer)
    return adaptor, runner.run(adaptor)


def comparable(steps: list[fmt.Step]) -> list[tuple]:
    """Steps without timing: the phase a command had reached and a start decision taken before the
    user's opening words arrived (over the bus a timer may fire first) are left out."""
    out = []
    for s in steps:
        i, o = s.input, s.output
        if not i.utterances and not i.outcomes and o.plan is None and o.reply is None:
            continue
        out.append((i.utterances, i.outcomes, i.running, i.halted, i.holding, i.notes, len(i.images),
                    o.thought, o.plan, o.reply))
    return out


@pytest.fixture(scope="module")
def bus_sim(tmp_path_factory):
    graph = tmp_path_factory.mktemp("graph")
    params = convert(OraclePlannerSim.Params, {
        "sim": {"time_scale": 20.0, "autostart": False, "exit_when_done": False, "transcript": False,
                "quiet_wall_s": 0.3, "session_gap_s": 0.1},
        "planner": {"planner": {"start_delay_s": 0.1}}})
    sim = OraclePlannerSim(params, bus_config=BusConfig(graph_dir=str(graph), domain="test", discovery_period_s=0.02),
                           name="eval")
    sim.start()
    sim.wait_ready(10.0)
    yield sim
    sim.shutdown()


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_the_adaptor_builds_the_planner_nodes_steps(bus_sim, scenario_id):
    ep = bus_sim.run_episode(get_scenario(scenario_id))
    assert ep.score.success, ep.score.failed()
    node_steps = comparable(bus_sim.planner_node.memory.steps)
    adaptor, result = play_in_process(scenario_id)
    assert result.score.success, result.score.failed()
    ours = comparable(adaptor.memory.steps)
    assert len(ours) == len(node_steps)
    for k, (a, b) in enumerate(zip(ours, node_steps)):
        assert a == b, f"step {k} differs:\n in process: {a}\n on the bus: {b}"


def test_an_utterance_during_a_command_halts_first_and_the_model_sees_how_it_ended():
    adaptor, result = play_in_process("interrupted-test-001")  # "Wait, I need that one." after the grasp
    step = next(s for s in adaptor.memory.steps if s.input.utterances == ("Wait, I need that one.",))
    # The planner sent stop before asking the model; the model sees the preempted command, the
    # halt and what the gripper holds, and nothing is running any more.
    assert step.input.halted and step.input.running is None
    outcomes = [(o.state, o.command) for o in step.input.outcomes]
    assert outcomes == [("preempted", "put the pink wrapper into the trash bin")]
    assert step.input.holding == "pink wrapper"
    assert step.output.plan == "place the pink wrapper back on the table"
    commands = [e.text for e in result.events if e.kind.value == "command"]
    assert commands[commands.index("stop") + 1] == "place the pink wrapper back on the table"


def test_a_stop_phrase_is_the_planners_own_step_and_waits_for_the_user():
    adaptor, _ = play_in_process("interrupted-test-005")  # "Stop what you're doing." after the grasp
    i = next(k for k, r in enumerate(adaptor.records) if r.trigger == STOP_PHRASE)
    assert not adaptor.records[i].by_model
    stop = adaptor.memory.steps[i]
    assert stop.input.running == "put the green can into the trash bin" and stop.input.phase == "carry"
    assert stop.output.plan == "stop" and stop.output.reply.endswith("What would you like me to do?")
    nxt = adaptor.memory.steps[i + 1]  # no decision until the user spoke again
    assert nxt.input.utterances == ("Forget that one, do the others.",)
    assert [o.state for o in nxt.input.outcomes] == ["preempted"] and not nxt.input.halted


def test_a_bad_model_answer_is_an_error_not_a_silent_step():
    runner = EpisodeRunner(get_scenario("chat-test-000"))
    with pytest.raises(AdaptorError, match="format"):
        runner.run(PlannerAdaptor(lambda prompt: "I would put the cup away"))
    runner = EpisodeRunner(get_scenario("chat-test-000"))
    bad = "<|think_start|>t<|think_end|><|plan_start|>throw the cup at me<|plan_end|>"
    with pytest.raises(AdaptorError, match="would not be sent"):
        runner.run(PlannerAdaptor(lambda prompt: bad))
