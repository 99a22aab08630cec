"""The scorer works on the episode log alone: replayed locations, promptness, repeats, round trips."""

import msgspec
import pytest

from robix_planner.messages import Command, CommandState, CommandStatus
from sim.oracle import Decision, OraclePlanner
from sim.runner import EpisodeRunner, RunnerConfig
from sim.scenarios import generate, load_scenarios
from sim.scoring import Event, replay_locations, score_episode
from sim.spec import Predicate, PredicateType


def test_replayed_locations_match_the_world_and_a_json_log_scores_the_same():
    for s in load_scenarios("validation")[::4]:
        runner = EpisodeRunner(s)
        result = runner.run(OraclePlanner(runner.privileged))
        assert replay_locations(s, result.events) == runner.world.locations(), s.id
        wire = msgspec.json.encode(result.events)
        events = msgspec.json.decode(wire, type=list[Event])
        again = score_episode(s, events)  # no world: locations replayed from statuses
        assert again.progress == result.score.progress and again.checks == result.score.checks


def test_a_late_stop_fails_the_interrupt_checks():
    s = next(x for x in load_scenarios("test", "interrupted") if x.variant == "still_need_before_grasp")
    late = EpisodeRunner(s, RunnerConfig(planner_latency_s=1.2))
    result = late.run(OraclePlanner(late.privileged))
    by = {r.predicate.type: r.met for r in result.score.predicates}
    assert by[PredicateType.STOPPED] is False
    assert result.score.checks["interrupt_honoured"] is False
    prompt = EpisodeRunner(s, RunnerConfig(planner_latency_s=0.2))
    assert prompt.run(OraclePlanner(prompt.privileged)).score.success


class OracleExcept:
    """Plans as the oracle does, except where ``twist(obs, seen)`` returns a decision (``seen``: its own notes)."""

    needs_images = False

    def __init__(self, runner, twist):
        self.oracle = OraclePlanner(runner.privileged)
        self.twist = twist
        self.seen: set = set()

    def decide(self, obs):
        return self.twist(obs, self.seen) or self.oracle.decide(obs)


def repeat_each_success(obs, seen):
    if obs.status is not None and obs.status.state is CommandState.SUCCEEDED and obs.command not in seen | {"stop"}:
        seen.add(obs.command)
        return Decision(thought="once more", plan=obs.command)
    return None


def nonsense_first(obs, seen):
    if not seen:
        seen.add("sent")
        return Decision(thought="try", plan="juggle the plates")
    return None


def test_pointless_repeats_are_counted():
    s = load_scenarios("test", "task_complete")[1]
    runner = EpisodeRunner(s)
    result = runner.run(OracleExcept(runner, repeat_each_success))
    assert result.score.repeats >= 1
    assert result.score.checks["no_pointless_repeats"] is False


def test_commands_the_controller_rejects_are_counted():
    s = load_scenarios("test", "multi_stage")[0]
    clean = EpisodeRunner(s)
    assert clean.run(OracleExcept(clean, lambda obs, seen: None)).score.rejected == 0
    runner = EpisodeRunner(s)
    score = runner.run(OracleExcept(runner, nonsense_first)).score
    assert score.rejected == 1 and score.rejections[0].startswith("juggle the plates: ")
    assert len(score.rejections[0]) > len("juggle the plates: ")  # the controller's reason is kept


def _log(*events):
    return list(events)


def test_predicates_on_a_handwritten_log():
    s = generate("ambiguous", "test", 1)
    cup_a, cup_b = [o.name for o in s.scene.objects if o.kind == s.turns[0].slots["kind"]][:2]
    rec = s.turns[0].slots["receptacle"]
    cmd = Command(id="c1", text=f"put the {cup_a} into the {rec}", skill="put_into", args={"object": cup_a, "receptacle": rec})
    asked_first = _log(
        Event.utterance(0.0, s.turns[0].text),
        Event.reply_of(0.0, f"Which one, the {cup_a} or the {cup_b}?"),
        Event.utterance(1.0, s.turns[1].text),
        Event.command(1.0, cmd),
        Event.status(4.5, CommandStatus(command_id="c1", state=CommandState.SUCCEEDED)),
    )
    moved_first = _log(
        Event.utterance(0.0, s.turns[0].text),
        Event.command(0.0, cmd),
        Event.reply_of(0.0, f"Which one, the {cup_a} or the {cup_b}?"),
        Event.status(3.5, CommandStatus(command_id="c1", state=CommandState.SUCCEEDED)),
    )
    asked = Predicate(type=PredicateType.ASKED, turn=0)
    s_asked = msgspec.structs.replace(s, predicates=[asked])
    assert score_episode(s_asked, asked_first).success
    assert not score_episode(s_asked, moved_first).success
    assert score_episode(s_asked, moved_first).checks["asked_when_ambiguous"] is False
    loc = replay_locations(s, asked_first)
    assert loc[cup_a] == rec and loc[cup_b] == "table"
    never_b = msgspec.structs.replace(s, predicates=[Predicate(type=PredicateType.NEVER, object=cup_a)])
    assert score_episode(never_b, asked_first).progress == 0.0


def test_progress_is_the_share_of_predicates_met():
    s = generate("multi_stage", "test", 0)
    first = s.predicates[0]
    cmd = Command(id="c1", text=f"put the {first.object} into the {first.location}", skill="put_into",
                  args={"object": first.object, "receptacle": first.location})
    events = [Event.command(0.0, cmd), Event.status(3.5, CommandStatus(command_id="c1", state=CommandState.SUCCEEDED))]
    score = score_episode(s, events)
    n_table = sum(p.type is PredicateType.AT and p.location == "table" for p in s.predicates)
    n_never = sum(p.type is PredicateType.NEVER for p in s.predicates)
    assert score.progress == pytest.approx((1 + n_table + n_never) / len(s.predicates))
    assert not score.success and score.commands == 1 and score.sim_time_s == 3.5
