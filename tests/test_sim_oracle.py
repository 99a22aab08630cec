"""The oracle solves every test scenario; crafted bad planners score lower on the checks meant to catch them."""

from collections import defaultdict

import pytest

from robix_planner import skills
from robix_planner.messages import CommandState
from sim import catalog
from sim.oracle import Decision, OraclePlanner
from sim.runner import EpisodeRunner, run_episode
from sim.scenarios import load_scenarios
from sim.scoring import EventKind
from sim.spec import ScenarioCategory, TurnRole

TEST = load_scenarios("test")


@pytest.fixture(scope="module")
def oracle_results():
    return {s.id: run_episode(s) for s in TEST}


def test_oracle_reaches_full_progress_on_every_test_scenario_in_every_category(oracle_results):
    per_category = defaultdict(list)
    for s in TEST:
        r = oracle_results[s.id]
        per_category[s.category].append(r.score.progress)
        assert r.score.success, (s.id, r.score.failed())
        assert not r.truncated, s.id
        assert all(v is not False for v in r.score.checks.values()), (s.id, r.score.checks)
    assert set(per_category) == set(ScenarioCategory)
    assert {cat: sum(p) / len(p) for cat, p in per_category.items()} == {cat: 1.0 for cat in ScenarioCategory}


def test_oracle_decisions_are_well_formed(oracle_results):
    tabletop = {s.name for s in skills.TABLETOP_SKILLS}
    for s in TEST:
        events = oracle_results[s.id].events
        decisions = [e for e in events if e.kind is EventKind.DECISION]
        assert decisions and decisions[0].trigger == "start"
        for d in decisions:
            assert d.text.strip() and len(d.text.split()) < 120, d.text
        commands = [e for e in events if e.kind is EventKind.COMMAND]
        assert all(c.skill in tabletop for c in commands), s.id
        rejected = [e for e in events if e.kind is EventKind.STATUS and e.state is CommandState.REJECTED]
        assert not rejected, (s.id, rejected)


def test_oracle_is_called_after_every_command_end_and_every_utterance(oracle_results):
    for s in TEST[:20]:
        events = oracle_results[s.id].events
        for i, e in enumerate(events):
            ends = e.kind is EventKind.STATUS and e.state.terminal
            if ends or e.kind is EventKind.UTTERANCE:
                later = [x for x in events[i + 1:] if x.kind is EventKind.DECISION]
                assert later and later[0].t_s == e.t_s, (s.id, e)


# -- crafted bad planners -------------------------------------------------------------------
class _Wrapped:
    """An oracle with one flaw; ``role_of`` reads the script like the oracle does."""

    needs_images = False

    def __init__(self, runner: EpisodeRunner, **kw):
        self.oracle = OraclePlanner(runner.privileged, **kw)
        self.world = runner.world
        self.turns = {t.text: t for t in runner.scenario.turns}

    def turn(self, obs):
        return self.turns.get(obs.utterance) if obs.utterance else None

    def decide(self, obs):
        return self.oracle.decide(obs)


class IgnoresInterrupts(_Wrapped):
    def decide(self, obs):
        t = self.turn(obs)
        if t is not None and t.role is TurnRole.INTERRUPT:
            obs.utterance = None
        return self.oracle.decide(obs)


class ActsWithoutAsking(_Wrapped):
    def decide(self, obs):
        t = self.turn(obs)
        if t is not None and t.role is TurnRole.AMBIGUOUS:
            kind = t.slots["kind"]
            first = next(n for n, o in self.world.objects.items() if o.kind == kind)
            return Decision(thought="I'll take the first one.", plan=f"put the {first} into the {catalog.home_receptacle(kind)}", reply="Okay.")
        return self.oracle.decide(obs)


class MovesOnInvalid(_Wrapped):
    def decide(self, obs):
        t = self.turn(obs)
        if t is not None and t.role is TurnRole.INVALID:
            name = next(iter(self.world.objects))
            return Decision(thought="I'll try.", plan=f"pick up the {name}", reply="Okay!")
        return self.oracle.decide(obs)


def _run(scenarios, make):
    out = []
    for s in scenarios:
        runner = EpisodeRunner(s)
        out.append(runner.run(make(runner)))
    return out


def _mean(results):
    return sum(r.score.progress for r in results) / len(results)


def test_ignoring_interrupts_scores_lower_and_fails_the_interrupt_check(oracle_results):
    scs = load_scenarios("test", "interrupted")
    bad = _run(scs, IgnoresInterrupts)
    assert _mean(bad) < _mean([oracle_results[s.id] for s in scs])
    assert all(r.score.checks["interrupt_honoured"] is False for r in bad)
    assert all(oracle_results[s.id].score.checks["interrupt_honoured"] is True for s in scs)


def test_acting_on_an_ambiguous_request_fails_the_question_check(oracle_results):
    scs = load_scenarios("test", "ambiguous")
    bad = _run(scs, ActsWithoutAsking)
    assert all(r.score.checks["asked_when_ambiguous"] is False and not r.score.success for r in bad)
    assert _mean(bad) < _mean([oracle_results[s.id] for s in scs])
    assert all(oracle_results[s.id].score.checks["asked_when_ambiguous"] is True for s in scs)


def test_moving_on_an_invalid_request_fails_refusal(oracle_results):
    scs = load_scenarios("test", "invalid")
    bad = _run(scs, MovesOnInvalid)
    assert all(r.score.checks["refused_when_invalid"] is False and not r.score.success for r in bad)
    assert all(oracle_results[s.id].score.checks["refused_when_invalid"] is True for s in scs)


def test_retrying_forever_instead_of_asking_for_help_scores_lower(oracle_results):
    scs = [s for s in load_scenarios("test", "failure_retry") if s.variant == "ask_for_help"]
    assert scs
    bad = _run(scs, lambda runner: _Wrapped(runner, max_attempts=100))
    assert all(not r.score.success for r in bad)
    assert _mean(bad) < _mean([oracle_results[s.id] for s in scs])
