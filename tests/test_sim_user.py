"""The scripted user: every trigger fires, at the right time, in script order."""

import pytest

from robix_planner.messages import CommandState, CommandStatus
from sim.spec import Trigger, Turn, TurnRole
from sim.user import ScriptedUser


def turn(text, trigger, **kw):
    return Turn(text=text, intent="x", template="x/0", role=TurnRole.INSTRUCTION, trigger=trigger, **kw)


def status(state, holding=None):
    return CommandStatus(command_id="c1", state=state, holding=holding)


def test_start_turn_is_said_at_once_and_next_waits_for_its_trigger():
    user = ScriptedUser([turn("clear the table", Trigger.START), turn("thanks", Trigger.ON_DONE, delay_s=1.0)])
    assert user.poll(0.0) == []  # not started yet
    user.start(0.0)
    said = user.poll(0.0)
    assert [u.text for u in said] == ["clear the table"] and said[0].speaker == "user"
    assert user.next_due_s() is None and user.poll(50.0) == []
    assert not user.finished


def test_after_actions_counts_succeeded_motion_commands_only():
    user = ScriptedUser([turn("go", Trigger.START), turn("by the way", Trigger.AFTER_ACTIONS, actions=2, delay_s=0.5)])
    user.start(0.0)
    user.poll(0.0)
    user.on_status(status(CommandState.SUCCEEDED), "put_into", 3.5)
    user.on_status(status(CommandState.SUCCEEDED), "stop", 3.6)  # a stop is not an action
    user.on_status(status(CommandState.FAILED), "put_into", 4.0)
    assert user.next_due_s() is None
    user.on_status(status(CommandState.SUCCEEDED), "put_into", 7.0)
    assert user.next_due_s() == pytest.approx(7.5)
    assert user.poll(7.4) == []
    assert [u.text for u in user.poll(7.5)] == ["by the way"]
    assert user.fired[-1].t_s == 7.5 and user.fired[-1].index == 1


def test_on_approach_fires_only_for_its_object_before_the_grasp():
    user = ScriptedUser([turn("go", Trigger.START), turn("wait, I need that", Trigger.ON_APPROACH, object="red cup", delay_s=0.3)])
    user.start(0.0)
    user.poll(0.0)
    user.observe(0.0, "approach", "blue cup", None)
    user.observe(1.0, "grasp", "red cup", None)
    assert user.next_due_s() is None
    user.observe(3.5, "approach", "red cup", None)
    assert user.next_due_s() == pytest.approx(3.8)
    assert [u.text for u in user.poll(3.8)] == ["wait, I need that"]
    assert user.finished


def test_on_hold_fires_when_the_gripper_holds_the_object():
    user = ScriptedUser([turn("go", Trigger.START), turn("stop", Trigger.ON_HOLD, object="red cup", delay_s=0.3)])
    user.start(0.0)
    user.poll(0.0)
    user.observe(1.0, "grasp", "red cup", None)
    assert user.next_due_s() is None
    user.on_status(status(CommandState.RUNNING, holding="red cup"), "put_into", 1.5)
    assert user.next_due_s() == pytest.approx(1.8)
    assert [u.text for u in user.poll(2.0)] == ["stop"]


def test_on_question_answers_only_questions_said_after_the_previous_turn():
    user = ScriptedUser([turn("put the cup away", Trigger.START), turn("the red one", Trigger.ON_QUESTION, delay_s=1.0)])
    user.on_reply("Which cup?", 0.0)  # before the user spoke: ignored
    user.start(0.0)
    user.poll(0.0)
    user.on_reply("Sure, I'll do that.", 0.1)
    assert user.next_due_s() is None
    user.on_reply("Which cup do you mean, the red cup or the blue cup?", 0.2)
    assert user.next_due_s() == pytest.approx(1.2)
    assert [u.text for u in user.poll(1.2)] == ["the red one"]


def test_on_done_fires_when_the_robot_says_it_is_done():
    user = ScriptedUser([turn("go", Trigger.START), turn("no, that's all", Trigger.ON_DONE, delay_s=1.0)])
    user.start(0.0)
    user.poll(0.0)
    user.on_reply("Should I also take the fork?", 5.0)
    assert user.next_due_s() is None
    user.on_reply("All done. Is there anything else I can help with?", 9.0)
    assert [u.text for u in user.poll(10.0)] == ["no, that's all"]
    assert user.finished and user.next_due_s() is None


def test_turns_with_zero_delay_chain_in_one_poll():
    user = ScriptedUser([turn("a", Trigger.START), turn("b", Trigger.START)])
    user.start(2.0)
    assert [u.text for u in user.poll(2.0)] == ["a", "b"]
    assert [f.index for f in user.fired] == [0, 1]


def test_status_stream_alone_drives_approach_triggers():
    """What a bus node sees: command statuses (phase in the RUNNING detail) and the command's object."""
    user = ScriptedUser([turn("go", Trigger.START), turn("wait", Trigger.ON_APPROACH, object="red cup", delay_s=0.3)])
    user.start(0.0)
    user.poll(0.0)
    running = CommandStatus(command_id="c1", state=CommandState.RUNNING, detail="approach")
    user.on_status(running, "put_into", 1.0, obj="blue cup")
    assert user.next_due_s() is None
    user.on_status(running, "put_into", 4.0, obj="red cup")
    assert [u.text for u in user.poll(4.3)] == ["wait"]
