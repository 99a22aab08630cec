"""The simulated controller: grammar, phases, failures, stop, one command at a time."""

import numpy as np
import pytest

from robix_planner import skills
from robix_planner.messages import Command, CommandState
from sim.controller import ControllerConfig, Phase, SimController
from sim.spec import GRIPPER, TABLE, Scene, SceneObject
from sim.world import World

S = CommandState


def make(config=None, rng=None):
    scene = Scene(
        objects=[
            SceneObject(name="red cup", kind="cup", colour="red", x_cm=16, y_cm=13),
            SceneObject(name="blue cup", kind="cup", colour="blue", x_cm=48, y_cm=13),
            SceneObject(name="white napkin", kind="napkin", colour="white", x_cm=80, y_cm=38),
        ],
        receptacles=["bus tub", "trash bin", "basket"],
    )
    world = World(scene)
    return world, SimController(world, config or ControllerConfig(), rng=rng)


def finish(ctl):
    out = []
    while ctl.busy:
        out += ctl.step(ctl.time_to_next_event_s())
    return out


def states(statuses):
    return [(s.state, s.detail) for s in statuses]


def test_capabilities_advertise_tabletop_grammar_and_scene_vocabulary():
    world, ctl = make()
    caps = ctl.capabilities()
    assert [s.name for s in caps.skills] == [s.name for s in skills.TABLETOP_SKILLS]
    assert caps.objects == ["red cup", "blue cup", "white napkin"]
    assert caps.receptacles == ["bus tub", "trash bin", "basket"]


def test_put_into_runs_four_phases_in_configured_time():
    cfg = ControllerConfig(approach_s=0.7, grasp_s=0.2, carry_s=1.1, release_s=0.3)
    world, ctl = make(cfg)
    first = ctl.submit("put the red cup into the bus tub", "c1")
    assert states(first) == [(S.ACCEPTED, "put the red cup into the bus tub"), (S.RUNNING, "approach")]
    rest = finish(ctl)
    assert [(s.state, s.detail) for s in rest] == [
        (S.RUNNING, "grasp"), (S.RUNNING, "carry"), (S.RUNNING, "release"), (S.SUCCEEDED, "put the red cup into the bus tub")
    ]
    assert all(s.command_id == "c1" for s in first + rest)
    assert rest[1].holding == "red cup" and rest[-1].holding is None  # held from the grasp until the release
    assert ctl.time_s == pytest.approx(0.7 + 0.2 + 1.1 + 0.3)
    assert rest[-1].stamp_ns == round(ctl.time_s * 1e9)
    assert world.location("red cup") == "bus tub" and world.holding is None


def test_pick_up_then_put_held_object_then_place_back():
    world, ctl = make()
    ctl.submit("pick up the red cup")
    statuses = finish(ctl)
    assert statuses[-1].state is S.SUCCEEDED and statuses[-1].holding == "red cup"
    assert world.location("red cup") == GRIPPER
    # put_into of the held object skips approach and grasp
    first = ctl.submit("put the red cup into the trash bin")
    assert first[-1].detail == "carry"
    finish(ctl)
    assert world.location("red cup") == "trash bin"
    ctl.submit("pick up the blue cup")
    finish(ctl)
    first = ctl.submit("Place the blue cup back on the table.")  # normalised like every command
    assert first[0].state is S.ACCEPTED and first[-1].detail == "carry"
    last = finish(ctl)[-1]
    assert last.state is S.SUCCEEDED and last.holding is None
    assert world.location("blue cup") == TABLE


def test_command_message_keeps_its_id():
    world, ctl = make()
    out = ctl.submit(Command(id="abc", text="pick up the white napkin", skill="pick_up", args={"object": "white napkin"}))
    assert {s.command_id for s in out} == {"abc"}
    assert ctl.current.id == "abc"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("put the teapot into the bus tub", "outside the vocabulary"),
        ("put the red cup into the sink", "outside the vocabulary"),
        ("put the cup into the bus tub", "outside the vocabulary"),  # ambiguous kind names are not objects
        ("navigate to the bus tub", "matches no skill"),  # a skill this controller does not advertise
        ("wash the red cup", "matches no skill"),
        ("", "empty"),
    ],
)
def test_unknown_words_and_forms_are_rejected_without_motion(text, fragment):
    world, ctl = make()
    before = world.locations()
    out = ctl.submit(text, "c1")
    assert len(out) == 1 and out[0].state is S.REJECTED and fragment in out[0].detail
    assert not ctl.busy and world.locations() == before


def test_preconditions_reject_with_reason():
    world, ctl = make()
    assert "does not hold" in ctl.submit("place the red cup back on the table")[0].detail
    ctl.submit("pick up the red cup")
    finish(ctl)
    assert "empty gripper" in ctl.submit("pick up the blue cup")[0].detail
    assert "already holds the red cup" in ctl.submit("put the blue cup into the bus tub")[0].detail
    ctl.submit("put the red cup into the bus tub")
    finish(ctl)
    out = ctl.submit("put the red cup into the basket")
    assert out[0].state is S.REJECTED and "in the bus tub" in out[0].detail


def test_second_command_while_busy_is_rejected_and_first_continues():
    world, ctl = make()
    ctl.submit("put the red cup into the bus tub", "c1")
    ctl.step(0.5)
    out = ctl.submit("put the blue cup into the bus tub", "c2")
    assert out[0].state is S.REJECTED and out[0].command_id == "c2"
    assert "busy" in out[0].detail and "c1" in out[0].detail and "stop" in out[0].detail
    last = finish(ctl)[-1]
    assert last.command_id == "c1" and last.state is S.SUCCEEDED
    assert world.location("blue cup") == TABLE


def test_injected_failure_reports_failed_and_object_stays_on_table():
    world, ctl = make()
    ctl.inject_failure("red cup", times=2)
    for _ in range(2):
        ctl.submit("put the red cup into the bus tub")
        last = finish(ctl)[-1]
        assert last.state is S.FAILED and "slipped" in last.detail and last.holding is None
        assert world.location("red cup") == TABLE and world.holding is None
    ctl.submit("put the red cup into the bus tub")
    assert finish(ctl)[-1].state is S.SUCCEEDED
    assert world.location("red cup") == "bus tub"


def test_injected_failure_on_any_object_and_random_failures_draw_from_rng():
    world, ctl = make()
    ctl.inject_failure(None)
    ctl.submit("pick up the white napkin")
    assert finish(ctl)[-1].state is S.FAILED
    with pytest.raises(ValueError, match="rng"):
        make(ControllerConfig(failure_prob=0.5))
    with pytest.raises(ValueError, match="not in the scene"):
        ctl.inject_failure("teapot")
    # failure_prob=1: every grasp slips; the same seed gives the same draws
    world, ctl = make(ControllerConfig(failure_prob=1.0), rng=np.random.default_rng(0))
    ctl.submit("put the blue cup into the bus tub")
    assert finish(ctl)[-1].state is S.FAILED
    assert world.location("blue cup") == TABLE


@pytest.mark.parametrize(
    "phase, held",
    [(Phase.APPROACH, None), (Phase.GRASP, None), (Phase.CARRY, "red cup"), (Phase.RELEASE, "red cup")],
)
def test_stop_in_every_phase(phase, held):
    world, ctl = make()
    ctl.submit("put the red cup into the bus tub", "c1")
    while ctl.phase is not phase:
        ctl.step(ctl.time_to_next_event_s())
    ctl.step(ctl.time_to_next_event_s() / 2)  # mid-phase
    assert ctl.phase is phase and ctl.target == "red cup"
    out = ctl.submit("stop", "c2")
    assert [(s.command_id, s.state) for s in out] == [("c1", S.PREEMPTED), ("c2", S.SUCCEEDED)]
    assert phase.value in out[0].detail
    assert out[0].holding == held and world.holding == held
    assert world.location("red cup") == (GRIPPER if held else TABLE)
    assert not ctl.busy and ctl.phase is Phase.IDLE
    assert ctl.step(10.0) == []  # nothing resumes
    assert world.location("red cup") == (GRIPPER if held else TABLE)


def test_stop_when_idle_succeeds_and_stop_during_place_back_keeps_object():
    world, ctl = make()
    out = ctl.submit("stop", "s1")
    assert states(out) == [(S.SUCCEEDED, "nothing was running")]
    ctl.submit("pick up the red cup")
    finish(ctl)
    ctl.submit("place the red cup back on the table", "c3")
    ctl.step(0.2)
    out = ctl.submit("stop")
    assert out[0].state is S.PREEMPTED and out[0].holding == "red cup"


def test_gripper_moves_towards_target_during_approach():
    world, ctl = make()
    start = world.gripper_cm
    ctl.submit("put the white napkin into the trash bin")
    ctl.step(ctl.config.approach_s / 2)
    mid = world.gripper_cm
    ctl.step(ctl.config.approach_s / 2)
    assert world.gripper_cm == pytest.approx(world.objects["white napkin"].home_cm)
    assert mid == pytest.approx(((start[0] + 80) / 2, (start[1] + 38) / 2))


def test_config_is_validated():
    with pytest.raises(ValueError, match="approach_s"):
        ControllerConfig(approach_s=0)
    with pytest.raises(ValueError, match="failure_prob"):
        ControllerConfig(failure_prob=1.5)
