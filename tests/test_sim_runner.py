"""The in-process runner: determinism, what the planner sees, when it is called."""

import numpy as np

from sim.oracle import OraclePlanner
from sim.runner import EpisodeRunner, Observation, RunnerConfig, run_episode
from sim.scenarios import get_scenario
from sim.scoring import EventKind


class Recorder:
    """The oracle, plus a record of every observation (with images)."""

    needs_images = True

    def __init__(self, runner):
        self.oracle = OraclePlanner(runner.privileged)
        self.seen: list[Observation] = []

    def decide(self, obs):
        self.seen.append(obs)
        return self.oracle.decide(obs)


def _run_recorded(sid):
    runner = EpisodeRunner(get_scenario(sid))
    rec = Recorder(runner)
    return runner.run(rec), rec


def test_same_scenario_gives_the_same_log_and_the_same_frames():
    a, rec_a = _run_recorded("interrupted-test-001")
    b, rec_b = _run_recorded("interrupted-test-001")
    assert a.events == b.events
    assert len(rec_a.seen) == len(rec_b.seen) == a.decisions
    for x, y in zip(rec_a.seen, rec_b.seen):
        assert np.array_equal(x.images["head"], y.images["head"])
    # the frames show the world changing
    assert not np.array_equal(rec_a.seen[0].images["head"], rec_a.seen[-1].images["head"])


def test_observation_holds_images_utterance_status_and_capabilities_not_the_world():
    result, rec = _run_recorded("failure_retry-test-000")
    first = rec.seen[0]
    assert first.trigger == "start" and first.utterance and first.status is None
    assert first.images["head"].shape == (120, 160, 3) and first.images["head"].dtype == np.uint8
    assert first.capabilities.objects == [o.name for o in result.scenario.scene.objects]
    assert not hasattr(first, "world")
    failed = [o for o in rec.seen if o.status is not None and o.status.state.value == "failed"]
    assert failed and failed[0].command.startswith("put the ") and failed[0].trigger == "status"


def test_oracle_runs_without_rendering():
    result = run_episode(get_scenario("multi_stage-test-000"))
    assert result.frames == 0 and result.score.success
    forced = EpisodeRunner(get_scenario("task_complete-test-000"), RunnerConfig(render=True))
    assert forced.run(OraclePlanner(forced.privileged)).frames > 0


def test_an_utterance_during_a_command_reaches_the_planner_at_once():
    result, rec = _run_recorded("chat-test-001")  # small talk after the first action
    chat = next(o for o in rec.seen if o.trigger == "utterance" and o.time_s > 0)
    utt = next(e for e in result.events if e.kind is EventKind.UTTERANCE and e.t_s > 0)
    assert chat.time_s == utt.t_s and chat.utterance == utt.text
    # the running command was not stopped by the chat
    assert not any(e.kind is EventKind.COMMAND and e.skill == "stop" for e in result.events)


def test_quiet_planner_ends_the_episode():
    class Silent:
        needs_images = False

        def decide(self, obs):
            from sim.oracle import Decision

            return Decision(thought="I do nothing.")

    result = run_episode(get_scenario("multi_stage-test-000"), Silent())
    assert result.decisions == 1 and not result.truncated
    assert result.score.progress < 0.5
