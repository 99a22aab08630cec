"""The planner node over real sockets: a fake controller (CommandServer), a scripted model, a probe.

Every node has its own bus (its own sockets, as in separate processes) in the test's isolated
graph directory; every wait is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
from waiting import wait_until

from robix_planner import format as fmt
from robix_planner import skills
from robix_planner.backends.base import ModelConfig
from robix_planner.backends.scripted import ScriptedBackend
from robix_planner.controller import CommandServer
from robix_planner.messages import (
    Capabilities,
    Command,
    CommandState,
    CommandStatus,
    PlannerStep,
    SessionStart,
    Speech,
    Utterance,
)
from robix_planner.node import Node, NodeConfig
from robix_planner.planner import PlannerConfig, PlannerNode, PlannerSettings, normalize_phrase

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 10.0
QUIET = NodeConfig(heartbeat_period_s=0)
CAPS = Capabilities(robot="fake", skills=list(skills.TABLETOP_SKILLS), objects=["red cup", "fork", "napkin"],
                    receptacles=["bus tub", "trash bin"])
PUT_CUP = "put the red cup into the bus tub"


def out(thought: str, plan: Optional[str] = None, reply: Optional[str] = None) -> str:
    return fmt.serialize(fmt.ModelOutput(thought, plan, reply))


class Inbox:
    """Items with their arrival time (monotonic), and bounded waits."""

    def __init__(self):
        self.items: list = []
        self._cv = threading.Condition()

    def put(self, item) -> None:
        with self._cv:
            self.items.append((time.monotonic(), item))
            self._cv.notify_all()

    def wait_for(self, pred, timeout_s: float = TIMEOUT_S):
        """(arrival time, item) of the first item matching ``pred``; fails after ``timeout_s``."""
        with self._cv:
            ok = self._cv.wait_for(lambda: any(pred(x) for _, x in self.items), timeout_s)
            assert ok, f"nothing matched within {timeout_s} s; got {[x for _, x in self.items]}"
            return next((t, x) for t, x in self.items if pred(x))

    def values(self, pred=lambda x: True) -> list:
        with self._cv:
            return [x for _, x in self.items if pred(x)]


class FakeController:
    """A tabletop controller behind a real CommandServer: timed phases, holds the object after the grasp."""

    PHASES = {"put_into": ("approach", "grasp", "carry", "release"), "pick_up": ("approach", "grasp"),
              "place_back": ("carry", "release")}

    def __init__(self, bus_config, durations_s: dict):
        self.node = Node("controller", bus_config=bus_config, node_config=QUIET)
        self.durations_s = {"approach": 0.02, "grasp": 0.02, "carry": 0.02, "release": 0.02, **durations_s}
        self.server = CommandServer(self.node, CAPS, execute=self.execute, capabilities_period_s=0.2)

    def execute(self, cmd: Command, ctx) -> None:
        obj = cmd.args.get("object")
        for phase in self.PHASES[cmd.skill]:
            ctx.running(phase)
            if ctx.cancelled.wait(self.durations_s[phase]):
                return
            if phase == "grasp":
                ctx.holding = obj
            elif phase == "release":
                ctx.holding = None

    def close(self) -> None:
        self.node.shutdown()  # the server cancels a running command and lets it report first


class Recording(ScriptedBackend):
    """The scripted backend, remembering when each generation started and its stats."""

    def __init__(self, respond: Callable, chunk_delay_s: float = 0.0):
        super().__init__(ModelConfig(chunk_delay_s=chunk_delay_s), respond=respond)
        self.started: list[float] = []
        self.stats: list = []

    def generate(self, prompt, *, cancel):
        self.started.append(time.monotonic())
        try:
            yield from super().generate(prompt, cancel=cancel)
        finally:
            self.stats.append(self.last_stats)


class Rig:
    """Controller + planner + probe, each on its own bus."""

    def __init__(self, bus_config, respond, *, chunk_delay_s=0.0, durations_s=None, backend=None, **settings):
        self.nodes: list[Node] = []
        self.controller = FakeController(bus_config, durations_s or {})
        self.backend = backend if backend is not None else Recording(respond, chunk_delay_s)
        params = PlannerConfig(planner=PlannerSettings(**{"start_delay_s": 0.05, **settings}))
        self.planner = PlannerNode(params, backend=self.backend, bus_config=bus_config, node_config=QUIET)
        probe = self.probe = Node("probe", bus_config=bus_config, node_config=QUIET)
        self.commands, self.statuses, self.speech, self.steps = Inbox(), Inbox(), Inbox(), Inbox()
        probe.create_subscription("/controller/command", Command, self.commands.put)
        probe.create_subscription("/controller/status", CommandStatus, self.statuses.put)
        probe.create_subscription("/tts/speech", Speech, self.speech.put)
        probe.create_subscription("/planner/step", PlannerStep, self.steps.put)
        self.say_pub = probe.create_publisher("/user/utterance", Utterance)
        for n in (self.planner, probe):
            self.nodes.append(n.start())
        self.controller.node.start()
        assert self.say_pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
        for pub in (self.planner.client.pub, self.planner.speech_pub, self.planner.step_pub):
            assert pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
        # The start decision (capabilities known) comes first.
        self.steps.wait_for(lambda s: s.trigger == "start")

    def say(self, text: str) -> float:
        t = time.monotonic()
        self.say_pub.publish(Utterance(text=text))
        return t

    def close(self) -> None:
        self.controller.close()
        for n in reversed(self.nodes):
            n.shutdown()


@pytest.fixture
def rig(bus_config):
    made: list[Rig] = []

    def make(respond=None, **kw) -> Rig:
        r = Rig(bus_config, respond, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def current(prompt) -> fmt.StepInput:
    return fmt.last_user_turn(prompt)


# --------------------------------------------------------------------------- the loop


def test_a_plan_is_sent_the_reply_spoken_and_the_outcome_comes_back_in_the_next_prompt(rig):
    def respond(prompt):
        step = current(prompt)
        if step.utterances:
            return out("The red cup is on the table.", PUT_CUP, "Sure, I'll put the red cup into the bus tub.")
        return out("Nothing to do." if not step.outcomes else "The cup is in the tub; the task is done.",
                   reply=None if not step.outcomes else "All done. Anything else?")

    r = rig(respond)
    r.say("Please put the red cup away.")
    _, cmd = r.commands.wait_for(lambda c: True)
    assert (cmd.text, cmd.skill, cmd.args) == (PUT_CUP, "put_into", {"object": "red cup", "receptacle": "bus tub"})
    r.speech.wait_for(lambda s: s.text == "Sure, I'll put the red cup into the bus tub.")
    _, step = r.steps.wait_for(lambda s: s.trigger == "utterance")
    assert (step.plan, step.reply, step.error) == (PUT_CUP, "Sure, I'll put the red cup into the bus tub.", None)
    assert {"first_token", "plan", "total", "prefill", "decode"} <= set(step.timings_ms)
    # The command's success triggers the next decision, with the outcome in its prompt.
    r.speech.wait_for(lambda s: s.text == "All done. Anything else?")
    last = current(r.backend.prompts[-1])
    assert last.outcomes == (fmt.Outcome(PUT_CUP, "succeeded"),) and last.holding == fmt.EMPTY
    assert last.running is None and not last.utterances
    # The history holds the earlier step exactly as it happened.
    history = fmt.read_history(r.backend.prompts[-1])
    assert history[-1].input.utterances == ("Please put the red cup away.",)
    assert history[-1].output == fmt.ModelOutput("The red cup is on the table.", PUT_CUP,
                                                 "Sure, I'll put the red cup into the bus tub.")
    assert len(r.commands.values()) == 1


def test_an_invalid_plan_is_never_sent_retried_once_with_the_error_then_the_user_is_asked(rig):
    def respond(prompt):
        if current(prompt).utterances:
            return out("The user wants the banana moved.", "put the banana into the bus tub", "On it!")
        return out("Waiting.")

    r = rig(respond)
    r.say("Put the banana in the tub.")
    settings = r.planner.params.planner
    r.speech.wait_for(lambda s: s.text == settings.ask_reply)
    time.sleep(0.2)  # anything sent would have arrived by now
    assert r.commands.values() == []
    assert r.speech.values(lambda s: s.text == "On it!") == []  # the reply of a rejected plan is not said
    prompts = [p for p in r.backend.prompts if current(p).utterances]
    assert len(prompts) == 2
    note = current(prompts[1]).notes[-1]
    assert "put the banana into the bus tub" in note and "banana" in note and "not sent" in note
    r.steps.wait_for(lambda s: bool(s.error) and s.reply == settings.ask_reply)
    errors = [s for s in r.steps.values() if s.error]
    assert len(errors) == 2 and all("invalid plan" in e.error for e in errors)
    step = r.planner.memory.steps[-1]
    assert step.output.plan is None and step.output.reply == settings.ask_reply
    assert step.input.notes == (note,)


class Choosing(Recording):
    """A backend that constrains plans: records the choices it is given."""

    accepts_plan_choices = True

    def __init__(self, respond: Callable):
        super().__init__(respond)
        self.choices: list = []

    def generate(self, prompt, *, cancel, plan_choices=None):
        self.choices.append(plan_choices)
        yield from super().generate(prompt, cancel=cancel)


def test_a_backend_that_constrains_plans_gets_every_command_of_the_controller(rig):
    r = rig(backend=Choosing(lambda prompt: out("Picking up the cup.", PUT_CUP) if current(prompt).utterances
                             else out("Nothing to do.")))
    r.say("Please put the red cup away.")
    r.commands.wait_for(lambda c: c.text == PUT_CUP)
    assert r.backend.choices and all(c == skills.commands(CAPS) for c in r.backend.choices)
    # Listed once: the controller re-publishes the same Capabilities every 0.2 s.
    assert all(c is r.backend.choices[0] for c in r.backend.choices)
    assert len(r.backend.choices[0]) == 3 * 2 + 3 + 3 + 1  # put (3 objects x 2 receptacles), pick, place, stop


def test_a_malformed_output_is_retried_with_the_error_in_context(rig):
    answers = iter(['{"thought": "cup", "plan": "put the red cup into the bus tub"}',
                    out("The red cup is there.", PUT_CUP)])

    def respond(prompt):
        return next(answers) if current(prompt).utterances else out("Waiting.")

    r = rig(respond)
    r.say("Put the red cup away.")
    _, cmd = r.commands.wait_for(lambda c: True)
    assert cmd.text == PUT_CUP
    retry = [p for p in r.backend.prompts if current(p).utterances][1]
    assert "JSON" in current(retry).notes[-1]
    r.steps.wait_for(lambda s: bool(s.error) and s.error.startswith("format:"))


def test_a_backend_error_is_said_to_the_user_and_the_node_keeps_running(rig):
    calls = []

    def respond(prompt):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the GPU caught fire")
        return out("The cup.", PUT_CUP) if current(prompt).utterances else out("Waiting.")

    r = rig(respond)
    r.say("Put the red cup away.")
    _, sp = r.speech.wait_for(lambda s: s.text.startswith("I can't think right now"))
    assert "GPU caught fire" in sp.text
    _, step = r.steps.wait_for(lambda s: s.error is not None)
    assert "backend" in step.error and "GPU caught fire" in step.error
    r.say("Please try again.")
    _, cmd = r.commands.wait_for(lambda c: True)
    assert cmd.text == PUT_CUP
    # Both utterances reached the model: the failed step's input was not lost.
    assert current(r.backend.prompts[-1]).utterances == ("Put the red cup away.", "Please try again.")


# --------------------------------------------------------------------------- interruption


def test_an_utterance_while_acting_halts_at_once_cancels_the_generation_and_replans_with_the_held_item(rig):
    long_reply = ("Sure. I'll put the red cup into the bus tub. Then I will look at the rest of the table. "
                  "After that I will wipe it. Then I will tell you.")
    long_thought = " ".join(["The user still needs the red cup, which I am holding, so I put it back."] * 3)

    def respond(prompt):
        step = current(prompt)
        if step.utterances == ("Please clear the red cup.",):
            return out("The red cup is on the table.", PUT_CUP, long_reply)
        if step.utterances:
            return out(long_thought, "place the red cup back on the table", "Sorry! I'll leave it for you.")
        return out("Waiting.")

    r = rig(respond, chunk_delay_s=0.02, durations_s={"carry": 5.0}, speech_chunk_chars=0)
    r.say("Please clear the red cup.")
    _, cmd = r.commands.wait_for(lambda c: c.text == PUT_CUP)
    # The gripper holds the cup, and the model is still decoding its reply.
    r.statuses.wait_for(lambda s: s.command_id == cmd.id and s.detail == "carry" and s.holding == "red cup")
    r.speech.wait_for(lambda s: s.text == "Sure.")
    assert r.planner._job is not None, "the first generation should still be running"
    t_utt = r.say("Wait, I still need that!")
    t_stop, stop = r.commands.wait_for(lambda c: c.skill == "stop")
    t_back, back = r.commands.wait_for(lambda c: c.text == "place the red cup back on the table")
    _, step2 = r.steps.wait_for(lambda s: s.plan == "place the red cup back on the table")
    t_step2 = next(t for t, s in r.steps.items if s is step2)
    # The halt went out at once, long before the (slow) model answered.
    assert t_stop - t_utt < 0.5
    interrupt_call = next(i for i, p in enumerate(r.backend.prompts) if current(p).utterances == ("Wait, I still need that!",))
    assert t_stop < t_step2 and t_stop < t_back
    assert r.backend.started[interrupt_call] > t_utt
    assert step2.timings_ms["halt"] < 500
    # The first generation was cancelled mid-reply: only part of it was decoded and said.
    first_call = next(i for i, p in enumerate(r.backend.prompts) if current(p).utterances == ("Please clear the red cup.",))
    assert r.backend.stats[first_call].cancelled
    first = r.planner.memory.steps[1].output  # steps: start, the first utterance, ...
    said_before = [s.text for t, s in r.speech.items if s.text and t < t_utt]
    assert first.plan == PUT_CUP and first.reply is not None and first.reply.startswith(" ".join(said_before))
    assert long_reply.startswith(first.reply) and len(first.reply) < len(long_reply)
    # Barge-in: speech flushed after the utterance.
    assert any(t >= t_utt and s.flush for t, s in r.speech.items)
    # The replanning prompt holds the utterance, the interrupted command, the halt and what the gripper holds.
    step = current(r.backend.prompts[interrupt_call])
    assert step.utterances == ("Wait, I still need that!",)
    assert step.running == PUT_CUP or fmt.Outcome(PUT_CUP, "preempted", "stopped") in step.outcomes
    assert step.halted and step.holding == "red cup"
    # The place-back went out only after the cup's command ended, and then the cup is put down.
    _, preempted = r.statuses.wait_for(lambda s: s.command_id == cmd.id and s.state.terminal)
    assert preempted.state is CommandState.PREEMPTED
    r.statuses.wait_for(lambda s: s.command_id == back.id and s.state is CommandState.SUCCEEDED and s.holding is None)
    assert len(r.commands.values(lambda c: c.skill == "stop")) == 1


@pytest.mark.parametrize("utterance", ["Wait, I still need that!", "stop"])
def test_the_generation_is_cancelled_before_the_halt_and_the_flush_are_published(rig, utterance):
    # Publishing can wait for the interpreter while the model thread computes: the cancel must not wait behind it.
    def respond(prompt):
        if current(prompt).utterances == ("Please clear the red cup.",):
            return out("The red cup is on the table.", PUT_CUP, "Sure. " + "I am on it. " * 40)
        return out("Waiting.")

    r = rig(respond, chunk_delay_s=0.02, durations_s={"carry": 5.0}, speech_chunk_chars=0)
    r.say("Please clear the red cup.")
    _, cmd = r.commands.wait_for(lambda c: c.text == PUT_CUP)
    r.statuses.wait_for(lambda s: s.command_id == cmd.id and s.detail == "carry")
    job = r.planner._job
    assert job is not None and not job.cancel.is_set(), "the first generation should still be running"
    seen = []
    send, speak = r.planner.client.send, r.planner._speak
    r.planner.client.send = lambda *a, **kw: (seen.append(("halt", job.cancel.is_set())), send(*a, **kw))[1]
    r.planner._speak = lambda *a, **kw: (seen.append(("speech", job.cancel.is_set())), speak(*a, **kw))[1]
    r.say(utterance)
    r.commands.wait_for(lambda c: c.skill == "stop")
    wait_until(lambda: any(kind == "speech" for kind, _ in seen), TIMEOUT_S)
    assert seen[0][0] == "halt" and all(cancelled for _, cancelled in seen), seen


def test_a_stop_phrase_halts_without_asking_the_model_and_waits_for_the_user(rig):
    def respond(prompt):
        step = current(prompt)
        if step.utterances == ("Put the red cup away.",):
            return out("The cup.", PUT_CUP)
        if step.utterances:
            return out("The user wants the cup put back.", "place the red cup back on the table", "Okay.")
        return out("Waiting.")

    r = rig(respond, durations_s={"carry": 5.0})
    r.say("Put the red cup away.")
    _, cmd = r.commands.wait_for(lambda c: c.text == PUT_CUP)
    r.statuses.wait_for(lambda s: s.command_id == cmd.id and s.holding == "red cup")
    wait_until(lambda: r.planner.holding == "red cup")  # the planner has heard that status too
    calls = r.backend.calls
    t_utt = r.say("Hold on, STOP right now!")
    t_stop, _ = r.commands.wait_for(lambda c: c.skill == "stop")
    _, ack = r.speech.wait_for(lambda s: "stopped" in s.text)
    assert ack.flush and "red cup" in ack.text and ack.text.endswith("?")
    _, step = r.steps.wait_for(lambda s: s.trigger == "stop_phrase")
    assert step.plan == "stop" and step.timings_ms["halt"] < 500 and t_stop - t_utt < 0.5
    r.statuses.wait_for(lambda s: s.command_id == cmd.id and s.state is CommandState.PREEMPTED)
    time.sleep(0.3)  # paused: the preempted status asks nothing of the model
    assert r.backend.calls == calls
    r.say("Put it back, please.")
    r.commands.wait_for(lambda c: c.text == "place the red cup back on the table")
    prompt = r.backend.prompts[-1]
    assert r.backend.calls == calls + 1
    stop_step = fmt.read_history(prompt)[-1]
    assert stop_step.input.utterances == ("Hold on, STOP right now!",) and stop_step.output.plan == "stop"
    assert fmt.Outcome(PUT_CUP, "preempted", "stopped") in current(prompt).outcomes


class SlowToStop(Recording):
    """A backend whose forward pass in flight finishes before it sees the cancel (like a real model)."""

    def generate(self, prompt, *, cancel):
        yield from super().generate(prompt, cancel=cancel)
        if cancel.is_set():
            time.sleep(0.3)


def test_an_utterance_right_after_a_stop_phrase_is_answered_not_swallowed(rig):
    """A request heard while the cancelled generation winds down belongs to the next decision,
    not to the stop phrase's step (it used to be filed there and never answered)."""
    fork = "put the fork into the bus tub"

    def respond(prompt):
        step = current(prompt)
        if "Put the fork away, please." in step.utterances:
            return out("They want the fork put away.", fork)
        if step.utterances == ("Put the red cup away.",):
            return out(" ".join(["Thinking about the cup."] * 40), PUT_CUP)
        return out("Waiting.")

    r = rig(backend=SlowToStop(respond, chunk_delay_s=0.02))
    r.say("Put the red cup away.")
    wait_until(lambda: len(r.backend.started) >= 2)  # the start decision, then this one
    time.sleep(0.1)  # inside its long thought
    r.say("Stop!")
    r.steps.wait_for(lambda s: s.trigger == "stop_phrase")
    r.say("Put the fork away, please.")  # the cancelled generation is still winding down
    _, cmd = r.commands.wait_for(lambda c: c.text == fork)
    assert "Put the fork away, please." in current(r.backend.prompts[-1]).utterances
    stop_step = next(s for s in r.planner.memory.steps if "Stop!" in s.input.utterances)
    assert "Put the fork away, please." not in stop_step.input.utterances


def test_a_superseded_decision_is_cancelled_and_discarded(rig):
    def respond(prompt):
        step = current(prompt)
        if step.utterances == ("Put the red cup away.",):
            return out(" ".join(["Thinking about the cup."] * 20), PUT_CUP)
        if step.utterances:
            return out("They changed their mind: the fork.", "put the fork into the bus tub")
        return out("Waiting.")

    r = rig(respond, chunk_delay_s=0.02, durations_s={"carry": 5.0})
    r.say("Put the red cup away.")
    wait_until(lambda: len(r.backend.started) >= 2)  # the start decision, then this one
    time.sleep(0.1)  # well inside its long thought
    r.say("No, the fork instead.")
    _, cmd = r.commands.wait_for(lambda c: True)
    assert cmd.text == "put the fork into the bus tub"
    time.sleep(0.1)
    assert [c.text for c in r.commands.values()] == ["put the fork into the bus tub"]  # the cup plan never went out
    assert r.backend.stats[1].cancelled and r.backend.stats[1].new_tokens < 20
    # Nothing of the discarded decision is kept; the new one saw both utterances at once.
    assert current(r.backend.prompts[-1]).utterances == ("Put the red cup away.", "No, the fork instead.")
    assert [s.input.utterances for s in r.planner.memory.steps] == [(), ("Put the red cup away.", "No, the fork instead.")]
    r.steps.wait_for(lambda s: s.trigger == "utterance")
    assert [s.trigger for s in r.steps.values()] == ["start", "utterance"]


def test_a_decision_superseded_by_the_end_of_the_command_is_discarded(rig):
    def respond(prompt):
        step = current(prompt)
        if step.utterances:
            return out("The cup.", PUT_CUP)
        if step.running:  # the periodic check while the command runs: a slow look at the scene
            return out(" ".join(["The arm is still moving the cup."] * 10), reply="Still working.")
        if step.outcomes:
            return out("The cup is in the tub.", reply="Done!")
        return out("Waiting.")

    r = rig(respond, chunk_delay_s=0.02, durations_s={"carry": 0.8}, check_period_s=0.15)
    r.say("Put the red cup away.")
    _, cmd = r.commands.wait_for(lambda c: c.text == PUT_CUP)
    t_end, _ = r.statuses.wait_for(lambda s: s.command_id == cmd.id and s.state is CommandState.SUCCEEDED)
    r.steps.wait_for(lambda s: s.reply == "Done!")
    checks = [i for i, p in enumerate(r.backend.prompts) if current(p).running]
    assert checks and all(r.backend.stats[i].cancelled for i in checks if r.backend.started[i] < t_end)
    assert r.speech.values(lambda s: s.text == "Still working.") == []
    assert "periodic" not in [s.trigger for s in r.steps.values()]
    assert [s.output.reply for s in r.planner.memory.steps] == [None, None, "Done!"]


def test_a_session_start_clears_the_memory(rig):
    def respond(prompt):
        return out("Chat.", reply="Hello!") if current(prompt).utterances else out("Waiting.")

    r = rig(respond)
    r.say("Hi!")
    r.speech.wait_for(lambda s: s.text == "Hello!")
    session = r.probe.create_publisher("/robix/session", SessionStart)
    assert session.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
    calls = r.backend.calls
    session.publish(SessionStart(session="episode-2"))
    r.steps.wait_for(lambda s: s.trigger == "start" and s.step > 2)
    assert fmt.count_steps(r.backend.prompts[calls]) == 0 and len(r.planner.memory) == 1


def test_a_changed_plan_while_acting_stops_first_and_then_sends_the_new_command(rig):
    def respond(prompt):
        step = current(prompt)
        if step.utterances == ("Put the red cup away.",):
            return out("The cup.", PUT_CUP)
        if step.utterances:
            return out("The fork first.", "put the fork into the bus tub", "Sure, the fork first.")
        return out("Waiting.")

    r = rig(respond, durations_s={"carry": 5.0}, halt_on_utterance=False)
    r.say("Put the red cup away.")
    _, cup = r.commands.wait_for(lambda c: c.text == PUT_CUP)
    r.statuses.wait_for(lambda s: s.command_id == cup.id and s.detail == "carry")
    r.say("Do the fork first.")
    _, fork = r.commands.wait_for(lambda c: c.text == "put the fork into the bus tub")
    texts = [c.text for c in r.commands.values()]
    assert texts == [PUT_CUP, "stop", "put the fork into the bus tub"]
    t_end, _ = r.statuses.wait_for(lambda s: s.command_id == cup.id and s.state.terminal)
    t_fork = next(t for t, c in r.commands.items if c is fork)
    assert t_end <= t_fork  # at most one command in flight


def test_with_a_halt_delay_a_model_that_answers_in_time_decides_itself(rig):
    def respond(prompt):
        step = current(prompt)
        if step.utterances == ("Put the red cup away.",):
            return out("The cup.", PUT_CUP)
        if step.utterances:
            return out("Small talk; I keep working.", reply="Not long, but I'm learning fast.")
        return out("Waiting.")

    r = rig(respond, durations_s={"carry": 3.0}, halt_delay_ms=300)
    r.say("Put the red cup away.")
    _, cup = r.commands.wait_for(lambda c: c.text == PUT_CUP)
    r.statuses.wait_for(lambda s: s.command_id == cup.id and s.detail == "carry")
    r.say("How long have you been working here?")
    r.speech.wait_for(lambda s: s.text == "Not long, but I'm learning fast.")
    time.sleep(0.5)  # past the halt delay
    assert [c.text for c in r.commands.values()] == [PUT_CUP]


def test_a_long_reply_is_spoken_in_sentences_while_it_is_decoded(rig):
    reply = ("I see three things on the table. The red cup goes into the bus tub. The fork goes there too. "
             "The napkin goes into the trash bin. Shall I start?")

    def respond(prompt):
        return out("Plenty to do.", reply=reply) if current(prompt).utterances else out("Waiting.")

    r = rig(respond, chunk_delay_s=0.02, speech_chunk_chars=40)
    r.say("What do you see?")
    t_first, first = r.speech.wait_for(lambda s: bool(s.text))
    t_step, _ = r.steps.wait_for(lambda s: s.trigger == "utterance")
    assert t_first < t_step - 0.1  # said while the rest was still being decoded
    r.speech.wait_for(lambda s: s.text.endswith("Shall I start?"))
    pieces = [s.text for s in r.speech.values(lambda s: bool(s.text))]
    assert len(pieces) >= 3 and " ".join(pieces) == reply
    assert all(p.endswith((".", "?")) for p in pieces)


def test_stop_phrases_are_matched_without_punctuation_case_or_fillers():
    phrases = {normalize_phrase(p) for p in PlannerSettings().stop_phrases}
    for said in ("Stop!", "Stop, please.", "Wait, stop.", "Hold on, stop right there.", "FREEZE!!",
                 "Stop what you\u2019re doing.", "halt now"):
        assert normalize_phrase(said) in phrases, said
    for said in ("Stop throwing away the food.", "Don't stop now, finish the table.", "Wait, I need that one."):
        assert normalize_phrase(said) not in phrases, said


# --------------------------------------------------------------------------- robix plan


def test_robix_plan_runs_the_node_from_a_config_file(bus_config, bus_env, tmp_path):
    controller = FakeController(bus_config, {})
    probe = Node("probe", bus_config=bus_config, node_config=QUIET)
    commands, steps = Inbox(), Inbox()
    probe.create_subscription("/controller/command", Command, commands.put)
    probe.create_subscription("/planner/step", PlannerStep, steps.put)
    controller.node.start()
    probe.start()
    answer = out("A red cup is on the table.", PUT_CUP)
    env = {**os.environ, **bus_env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "robix_planner.cli", "plan", "--config", str(ROOT / "launch/planner.yaml"),
         "model.backend=scripted", f"model.outputs=[{answer!r}]", "planner.start_delay_s=0",
         "bus.discovery_period_s=0.02", "node.heartbeat_period_s=0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, step = steps.wait_for(lambda s: s.trigger == "start", timeout_s=30)
        assert step.plan == PUT_CUP
        _, cmd = commands.wait_for(lambda c: True, timeout_s=10)
        assert cmd.text == PUT_CUP
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        probe.shutdown()
        controller.close()
    assert proc.returncode == 0, err[-2000:]


def test_the_planner_modules_and_robix_plan_help_do_not_import_torch():
    code = ("import sys, robix_planner.planner, robix_planner.format, robix_planner.memory, robix_planner.cli; "
            "robix_planner.cli.make_parser(); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_tiny_random_vlm_runs_the_loop_and_its_nonsense_is_never_sent(rig, tmp_path):
    """The hf backend on a tiny random Qwen2.5-VL built from config: it writes nonsense, which is
    never dispatched; the planner retries once with the error, asks the user, and keeps running."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import numpy as np
    from helpers_tiny_vlm import build_tiny_qwen_vl

    from robix_planner.backends import load_backend
    from robix_planner.messages import Image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = build_tiny_qwen_vl(tmp_path / "tiny")
        backend = load_backend(ModelConfig(backend="hf", path=str(path), max_new_tokens=24))
        r = rig(backend=backend)
        camera = r.probe.create_publisher("/camera/head", Image)
        assert camera.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
        pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
        deadline = time.monotonic() + TIMEOUT_S
        while "/camera/head" not in r.planner._frames:
            assert time.monotonic() < deadline, "the planner never got a camera frame"
            camera.publish(Image.from_array("head", pixels))
            time.sleep(0.02)
        r.say("Please put the red cup into the bus tub.")
        _, step = r.steps.wait_for(lambda s: s.trigger == "utterance" and s.reply is not None, timeout_s=60)
        assert step.reply == r.planner.params.planner.ask_reply and step.plan is None
        errors = [s for s in r.steps.values() if s.trigger == "utterance" and s.error]
        assert len(errors) == 2 and all(e.error.startswith(("format:", "invalid plan")) for e in errors)
        r.speech.wait_for(lambda s: s.text == r.planner.params.planner.ask_reply)
        assert r.commands.values() == []
        # The model saw the camera frame and, on the retry, why its first answer was refused.
        assert backend.last_stats.prompt_tokens > 0 and backend.last_stats.new_tokens > 0
        history = r.planner.memory.steps[-1]
        assert history.input.utterances == ("Please put the red cup into the bus tub.",)
        assert len(history.input.images) == 1 and history.input.notes[-1].startswith(("Your last answer", "Your plan"))
    finally:
        torch.set_num_threads(threads)
