"""The scripted user: says a scenario's turns, in order, each when its trigger fires.

Triggers (:class:`~sim.spec.Trigger`): at the start; after k motion commands succeeded;
when the robot starts approaching object X (before the grasp); when it holds X (after the
grasp); when the robot asks a question (answering it); when the robot says it is done.
Each turn is said ``delay_s`` after its trigger (the user's reaction time).

The user is driven from outside, with explicit times: :meth:`ScriptedUser.observe` (the
controller's phase, target and gripper), :meth:`~ScriptedUser.on_status` (command
statuses), :meth:`~ScriptedUser.on_reply` (what the robot said), then
:meth:`~ScriptedUser.poll` returns the utterances due. A bus node can call these from its
subscriptions and a timer; the in-process runner calls them directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from robix_planner.messages import CommandState, CommandStatus, Utterance
from sim.spec import Trigger, Turn, is_question, says_done

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FiredTurn:
    index: int
    turn: Turn
    t_s: float


class ScriptedUser:
    """Says ``turns`` one after another; the next turn is armed only after the previous one is said."""

    def __init__(self, turns: list[Turn], speaker: str = "user"):
        self.turns = list(turns)
        self.speaker = speaker
        self.fired: list[FiredTurn] = []
        self._next = 0
        self._due_s: Optional[float] = None
        self._actions_done = 0
        self._asked = False  # a question since the last turn was said
        self._said_done = False
        self._phase: str = "idle"
        self._target: Optional[str] = None
        self._holding: Optional[str] = None
        self._started = False

    @property
    def finished(self) -> bool:
        """Every turn has been said."""
        return self._next >= len(self.turns)

    @property
    def next_turn(self) -> Optional[Turn]:
        return None if self.finished else self.turns[self._next]

    def next_due_s(self) -> Optional[float]:
        """When the next utterance is due (simulated seconds), or None if none is scheduled."""
        return self._due_s

    # -- inputs ------------------------------------------------------------------------
    def start(self, t_s: float = 0.0) -> None:
        self._started = True
        self._arm(t_s)

    def observe(self, t_s: float, phase: str, target: Optional[str], holding: Optional[str]) -> None:
        """The controller's state now: its phase ("approach", ...), the object it acts on, what it holds."""
        self._phase, self._target, self._holding = str(getattr(phase, "value", phase)), target, holding
        self._arm(t_s)

    def on_status(self, status: CommandStatus, skill: str, t_s: float, obj: Optional[str] = None) -> None:
        """A command status (``skill`` and ``obj``: the command's skill and object argument).

        Motion commands that succeed count as completed actions. With ``obj`` given, RUNNING
        statuses (whose detail is the phase) also stand in for :meth:`observe`, so a bus node
        can drive the user from the status stream alone.
        """
        if status.state is CommandState.SUCCEEDED and skill != "stop":
            self._actions_done += 1
        if obj is not None and status.state is CommandState.RUNNING:
            self._phase, self._target = status.detail, obj
        elif obj is not None and status.state.terminal and skill != "stop":
            self._phase, self._target = "idle", None
        self._holding = status.holding
        self._arm(t_s)

    def on_reply(self, text: str, t_s: float) -> None:
        """Something the robot said."""
        if is_question(text):
            self._asked = True
        if says_done(text):
            self._said_done = True
        self._arm(t_s)

    # -- output ------------------------------------------------------------------------
    def poll(self, t_s: float) -> list[Utterance]:
        """The utterances due at ``t_s`` (said now; each one arms the next turn)."""
        out = []
        while self._due_s is not None and self._due_s <= t_s + 1e-9:
            turn = self.turns[self._next]
            self.fired.append(FiredTurn(self._next, turn, t_s))
            out.append(Utterance(text=turn.text, speaker=self.speaker, stamp_ns=int(round(t_s * 1e9))))
            log.debug("t=%.2f user says %r (%s)", t_s, turn.text, turn.template)
            self._next += 1
            self._due_s = None
            self._asked = self._said_done = False
            self._arm(t_s)
        return out

    def _arm(self, t_s: float) -> None:
        if not self._started or self._due_s is not None or self.finished:
            return
        turn = self.turns[self._next]
        if self._triggered(turn):
            self._due_s = t_s + turn.delay_s

    def _triggered(self, turn: Turn) -> bool:
        trig = turn.trigger
        if trig is Trigger.START:
            return True
        if trig is Trigger.AFTER_ACTIONS:
            return self._actions_done >= turn.actions
        if trig is Trigger.ON_APPROACH:
            return self._phase == "approach" and self._target == turn.object
        if trig is Trigger.ON_HOLD:
            return self._holding is not None and self._holding == turn.object
        if trig is Trigger.ON_QUESTION:
            return self._asked
        if trig is Trigger.ON_DONE:
            return self._said_done
        raise ValueError(f"unknown trigger {trig!r}")
