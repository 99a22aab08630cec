"""The planner node end to end in the simulated world, over the bus, with the oracle behind the
backend interface (sim.oracle_backend): every category passes, interruptions included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from robix_planner.bus import BusConfig
from robix_planner.config import convert
from sim.oracle_backend import OraclePlannerSim
from sim.scenarios import get_scenario, load_scenarios
from sim.scoring import EventKind
from sim.spec import ScenarioCategory, TurnRole

ROOT = Path(__file__).resolve().parents[1]
TIME_SCALE = 20.0

#: Two test-split scenarios of every category, and every interruption variant (before and after
#: the grasp: "I still need that", "do X first", "stop"). Small talk during a command has its own
#: tests below (it depends on the halt setting).
SCENARIOS = [s.id for c in ScenarioCategory
             for s in [s for s in load_scenarios("test", c) if s.variant != "smalltalk_mid_task"][:2]]
SCENARIOS += [f"interrupted-test-00{i}" for i in range(2, 6)]


def make_sim(tmp_path_factory, **planner) -> OraclePlannerSim:
    graph = tmp_path_factory.mktemp("graph")
    params = convert(OraclePlannerSim.Params, {
        # Generous quiet periods: on a loaded machine a message can take a while to arrive, and
        # the end of an episode must not race the planner's last reply.
        "sim": {"time_scale": TIME_SCALE, "autostart": False, "exit_when_done": False, "transcript": False,
                "quiet_wall_s": 0.3, "session_gap_s": 0.1},
        "planner": {"planner": {"start_delay_s": 0.1, **planner}}})
    sim = OraclePlannerSim(params, bus_config=BusConfig(graph_dir=str(graph), domain="test", discovery_period_s=0.02),
                           name="eval")
    sim.start()
    sim.wait_ready(10.0)
    return sim


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """The planner with its defaults: every utterance during a command halts the robot at once."""
    s = make_sim(tmp_path_factory)
    yield s
    s.shutdown()


def describe(ep) -> str:
    lines = [f"{e.t_s:6.2f} {e.kind.value:9} {e.text or ''} {e.plan or ''} {e.reply or ''} "
             f"{e.state.value if e.state else ''} {e.detail}" for e in ep.events]
    return "\n".join(lines[-60:])


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_every_category_passes_end_to_end(sim, scenario_id):
    scenario = get_scenario(scenario_id)
    ep = sim.run_episode(scenario)
    score = ep.score
    assert not ep.truncated and score.progress == 1.0 and score.success, (score.failed(), describe(ep))
    assert all(v is not False for v in score.checks.values()), (score.checks, describe(ep))
    assert score.locations == ep.world_locations  # the bus log and the world agree
    for u, ev in enumerate(ep.events):
        turn = next((t for t in scenario.turns if t.text == ev.text), None)
        if ev.kind is not EventKind.UTTERANCE or turn is None or turn.role is not TurnRole.INTERRUPT:
            continue
        after = ep.events[u + 1:]
        first_cmd = next(e for e in after if e.kind is EventKind.COMMAND)
        # (A stop phrase's step is the planner's own, published with the halt: not the model's.)
        first_decision = next(e for e in after if e.kind is EventKind.DECISION and e.trigger != "stop_phrase")
        # The halt went out at once, before the model (here: the oracle) had answered.
        assert first_cmd.skill == "stop", describe(ep)
        assert after.index(first_cmd) < after.index(first_decision), describe(ep)
        assert first_cmd.t_s - ev.t_s < 0.5, describe(ep)
        held = next((e.holding for e in reversed(ep.events[:u]) if e.kind is EventKind.STATUS), None)
        if held:  # after the grasp: the held item was put back on the table
            assert any(e.kind is EventKind.COMMAND and e.text == f"place the {held} back on the table" for e in after)


def test_the_oracle_answered_through_the_planners_prompt(sim):
    """The answers came through the backend interface, and the stop-phrase steps (taken without
    the model) were replayed to the oracle from the prompt's history."""
    assert sim.backend.calls > len(SCENARIOS)
    assert sim.backend.replayed > 0
    assert sim.planner_node.steps > 0


def test_small_talk_during_a_command_halts_the_robot_at_once_by_default_and_it_resumes(sim):
    ep = sim.run_episode(get_scenario("chat-test-001"))
    # The halt went out before the model could tell it was small talk (the cost of halting at
    # once); the robot answered and finished the task: every object ends where it belongs.
    assert [e.skill for e in ep.events if e.kind is EventKind.COMMAND].count("stop") == 1
    assert ep.score.success, (ep.score.failed(), describe(ep))


def test_small_talk_with_a_halt_delay_is_answered_without_stopping(tmp_path_factory):
    # 20 ms of wall time is 0.4 simulated seconds: the oracle answers well within it.
    sim = make_sim(tmp_path_factory, halt_delay_ms=20)
    try:
        for sid in ("chat-test-001", "interrupted-test-001"):
            ep = sim.run_episode(get_scenario(sid))
            assert ep.score.success and all(v is not False for v in ep.score.checks.values()), describe(ep)
    finally:
        sim.shutdown()


def test_the_launch_files_run(bus_env):
    """launch/planner_oracle_sim.yaml runs an episode end to end (exit code 0 = success);
    launch/planner_sim.yaml (a real model beside the world) is valid."""
    cli = [sys.executable, "-m", "robix_planner.cli", "launch"]
    dry = subprocess.run(cli + ["launch/planner_sim.yaml", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "cli plan --config launch/planner.yaml" in dry.stdout and "SimulationNode" in dry.stdout
    run = subprocess.run(cli + ["launch/planner_oracle_sim.yaml", "nodes.sim.params.sim.time_scale=20",
                                "--timeout-s", "60", "--color", "never"],
                         cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "score interrupted-test-005: progress 100%" in run.stderr
