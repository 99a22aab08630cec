"""Episode logs and their scoring: task progress, success and behaviour checks.

An episode log is a list of :class:`Event` (utterances, planner decisions, commands,
command statuses, replies), each stamped with simulated (or wall) time in seconds. The
scorer needs nothing else: object locations are replayed from the command statuses, so the
same :func:`score_episode` scores an in-process run and a run recorded off the bus.

- **progress**: the share of the scenario's predicates met at the end (as Robix and Hi Robot
  report task progress); **success**: all of them met.
- **checks** (None where the scenario has no such turn): ``interrupt_honoured`` (a stop was
  the first command after each interrupt, within ``STOP_WITHIN_S``, and an item held at the
  interrupt was placed back), ``asked_when_ambiguous`` (a question before any motion),
  ``refused_when_invalid`` (a refusal and no command until the user spoke again),
  ``no_pointless_repeats`` (no command re-sent after it succeeded or was rejected).
- plus counts: decisions, commands, repeats, simulated time used.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional

import msgspec

from robix_planner.messages import Command, CommandState, CommandStatus
from sim.spec import (
    GRIPPER,
    TABLE,
    Predicate,
    PredicateType,
    Scenario,
    TurnRole,
    is_question,
    is_refusal,
    says_done,
)

log = logging.getLogger(__name__)

#: How soon after an interrupt utterance the stop must be sent (simulated seconds).
STOP_WITHIN_S = 1.0


class EventKind(str, enum.Enum):
    UTTERANCE = "utterance"
    DECISION = "decision"
    COMMAND = "command"
    STATUS = "status"
    REPLY = "reply"


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One entry of an episode log. ``text``: the utterance, command, reply, or (decision) thought."""

    t_s: float
    kind: EventKind
    text: str = ""
    command_id: Optional[str] = None
    skill: Optional[str] = None
    args: dict[str, str] = {}
    state: Optional[CommandState] = None
    detail: str = ""
    holding: Optional[str] = None
    plan: Optional[str] = None
    reply: Optional[str] = None
    trigger: Optional[str] = None

    @classmethod
    def utterance(cls, t_s: float, text: str) -> "Event":
        return cls(t_s=t_s, kind=EventKind.UTTERANCE, text=text)

    @classmethod
    def command(cls, t_s: float, cmd: Command) -> "Event":
        return cls(t_s=t_s, kind=EventKind.COMMAND, text=cmd.text, command_id=cmd.id, skill=cmd.skill, args=dict(cmd.args))

    @classmethod
    def status(cls, t_s: float, st: CommandStatus) -> "Event":
        return cls(t_s=t_s, kind=EventKind.STATUS, command_id=st.command_id, state=st.state, detail=st.detail, holding=st.holding)

    @classmethod
    def reply_of(cls, t_s: float, text: str) -> "Event":
        return cls(t_s=t_s, kind=EventKind.REPLY, text=text)

    @classmethod
    def decision(cls, t_s: float, thought: str, plan: Optional[str], reply: Optional[str], trigger: str) -> "Event":
        return cls(t_s=t_s, kind=EventKind.DECISION, text=thought, plan=plan, reply=reply, trigger=trigger)


@dataclass
class PredicateResult:
    predicate: Predicate
    met: bool


@dataclass
class Score:
    progress: float
    success: bool
    predicates: list[PredicateResult]
    checks: dict[str, Optional[bool]]
    repeats: int
    commands: int
    decisions: int
    sim_time_s: float
    locations: dict[str, str] = field(default_factory=dict)
    #: Commands the controller refused, each as "command: the controller's reason": outside its grammar
    #: or vocabulary, impossible in the world's state, or sent while another ran. A planner that
    #: validates before dispatch sends none of the first kind.
    rejections: list[str] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.rejections)

    def failed(self) -> list[str]:
        """The predicates not met, described."""
        return [r.predicate.describe() for r in self.predicates if not r.met]


@dataclass
class _Cmd:
    idx: int
    t_s: float
    id: str
    text: str
    skill: str
    obj: Optional[str]
    receptacle: Optional[str]
    end_idx: Optional[int] = None
    end_state: Optional[CommandState] = None

    @property
    def motion(self) -> bool:
        return self.skill != "stop"


class _Log:
    """Indexes of an event list, for the predicate checks."""

    def __init__(self, scenario: Scenario, events: list[Event]):
        self.events = events
        self.cmds: list[_Cmd] = []
        by_id: dict[str, _Cmd] = {}
        self.replies: list[tuple[int, float, str]] = []
        self.utts: list[int] = []
        self.statuses: list[int] = []
        for i, ev in enumerate(events):
            if ev.kind is EventKind.COMMAND:
                c = _Cmd(i, ev.t_s, ev.command_id or "", ev.text, ev.skill or "", ev.args.get("object"), ev.args.get("receptacle"))
                self.cmds.append(c)
                by_id[c.id] = c
            elif ev.kind is EventKind.STATUS:
                self.statuses.append(i)
                c = by_id.get(ev.command_id or "")
                if c is not None and ev.state is not None and ev.state.terminal and c.end_idx is None:
                    c.end_idx, c.end_state = i, ev.state
            elif ev.kind is EventKind.REPLY:
                self.replies.append((i, ev.t_s, ev.text))
            elif ev.kind is EventKind.UTTERANCE:
                self.utts.append(i)
        self.by_id = by_id
        # Utterances matched to script turns, in order.
        self.turn_idx: dict[int, int] = {}
        p = 0
        for i in self.utts:
            for j in range(p, len(scenario.turns)):
                if scenario.turns[j].text == events[i].text:
                    self.turn_idx[j] = i
                    p = j + 1
                    break

    def next_utt(self, idx: int) -> int:
        for i in self.utts:
            if i > idx:
                return i
        return len(self.events)

    def cmds_between(self, lo: int, hi: int) -> list[_Cmd]:
        return [c for c in self.cmds if lo < c.idx < hi]

    def replies_between(self, lo: int, hi: int) -> list[tuple[int, float, str]]:
        return [r for r in self.replies if lo < r[0] < hi]

    def running_at(self, idx: int) -> Optional[_Cmd]:
        for c in self.cmds:
            if c.motion and c.idx < idx and (c.end_idx is None or c.end_idx > idx):
                return c
        return None

    def holding_at(self, idx: int) -> Optional[str]:
        held = None
        for i in self.statuses:
            if i > idx:
                break
            held = self.events[i].holding
        return held


def _mentions(text: str, words: Iterable[str]) -> bool:
    low = text.lower()
    words = list(words)
    return not words or any(w.lower() in low for w in words)


def replay_locations(scenario: Scenario, events: list[Event]) -> dict[str, str]:
    """Where every object is after ``events``, replayed from the command statuses."""
    loc = {o.name: TABLE for o in scenario.scene.objects}
    cmds: dict[str, Event] = {}
    for ev in events:
        if ev.kind is EventKind.COMMAND and ev.command_id:
            cmds[ev.command_id] = ev
        elif ev.kind is EventKind.STATUS:
            cmd = cmds.get(ev.command_id or "")
            if cmd is not None and ev.state is CommandState.SUCCEEDED:
                obj = cmd.args.get("object")
                if cmd.skill == "put_into" and obj in loc:
                    loc[obj] = cmd.args.get("receptacle", TABLE)
                elif cmd.skill == "place_back" and obj in loc:
                    loc[obj] = TABLE
            for name, where in loc.items():
                if where == GRIPPER and name != ev.holding:
                    loc[name] = TABLE
            if ev.holding in loc:
                loc[ev.holding] = GRIPPER
    return loc


def _stop_ok(lg: _Log, u: int, within_s: float) -> bool:
    """After utterance ``u``: if a motion command was running, the first command is a prompt stop."""
    if lg.running_at(u) is None:
        return True
    after = lg.cmds_between(u, len(lg.events))
    if not after or after[0].skill != "stop":
        return False
    return after[0].t_s - lg.events[u].t_s <= within_s + 1e-9


def _asked_ok(lg: _Log, u: int, mentions: Iterable[str] = ()) -> bool:
    end = lg.next_utt(u)
    qs = [r for r in lg.replies_between(u, end) if is_question(r[2]) and _mentions(r[2], mentions)]
    if not qs:
        return False
    moves = [c for c in lg.cmds_between(u, len(lg.events)) if c.motion]
    return not moves or qs[0][0] < moves[0].idx


def _refused_ok(lg: _Log, u: int) -> bool:
    end = lg.next_utt(u)
    refused = any(is_refusal(r[2]) for r in lg.replies_between(u, end))
    moved = any(c.motion for c in lg.cmds_between(u, end))
    return refused and not moved


def _check(p: Predicate, lg: _Log, loc: dict[str, str]) -> bool:
    T = PredicateType
    if p.type is T.AT:
        return loc.get(p.object) == p.location
    if p.type is T.ORDER:
        def done_idx(obj):
            idx = [c.end_idx for c in lg.cmds if c.obj == obj and c.skill == "put_into" and c.end_state is CommandState.SUCCEEDED]
            return idx[-1] if idx else None
        a, b = done_idx(p.object), done_idx(p.other)
        return a is not None and b is not None and a < b
    if p.type is T.NEVER:
        start = -1
        if p.turn is not None:
            if p.turn not in lg.turn_idx:
                return True
            start = lg.turn_idx[p.turn]
        bad = [c for c in lg.cmds_between(start, len(lg.events))
               if c.obj == p.object and (c.skill in p.skills if p.skills else c.motion)]
        return not bad
    if p.type is T.OFFERED:
        qs = [r for r in lg.replies if is_question(r[2]) and _mentions(r[2], [p.object])]
        touches = [c for c in lg.cmds if c.obj == p.object]
        return bool(qs) and (not touches or qs[0][0] < touches[0].idx)
    if p.type is T.ASKED_HELP:
        fails = [c.end_idx for c in lg.cmds if c.obj == p.object and c.end_state is CommandState.FAILED]
        if not fails:
            return False
        qs = [r for r in lg.replies if r[0] > fails[0] and is_question(r[2]) and _mentions(r[2], [p.object])]
        if not qs:
            return False
        tries = [c for c in lg.cmds if c.obj == p.object and c.skill in ("put_into", "pick_up")]
        later = [c for c in lg.cmds if c.obj == p.object and c.idx > qs[0][0]]
        return len(tries) <= p.max_attempts and not later
    if p.type is T.SAID_DONE:
        for i, _, text in lg.replies:
            if says_done(text) and is_question(text):
                end = lg.next_utt(i)
                if not any(c.motion for c in lg.cmds_between(i, end)):
                    return True
        return False
    # The rest are about the response to one turn.
    if p.turn not in lg.turn_idx:
        return False
    u = lg.turn_idx[p.turn]
    if p.type is T.ASKED:
        return _asked_ok(lg, u, p.mentions)
    if p.type is T.REFUSED:
        return _refused_ok(lg, u)
    if p.type is T.REPLIED:
        end = lg.next_utt(u)
        # A halt on hearing the user is the planner's default (issue 4: halt at once, then
        # replan); small talk then resumes the task, which the `at` predicates check.
        return bool(lg.replies_between(u, end))
    if p.type is T.STOPPED:
        return _stop_ok(lg, u, p.within_s)
    raise ValueError(f"unknown predicate type {p.type!r}")


def _repeats(lg: _Log) -> int:
    n = 0
    for i, c in enumerate(lg.cmds):
        if c.motion and any(
            e.text == c.text and e.end_state in (CommandState.SUCCEEDED, CommandState.REJECTED) and e.end_idx is not None and e.end_idx < c.idx
            for e in lg.cmds[:i]
        ):
            n += 1
    return n


def score_episode(scenario: Scenario, events: list[Event], final_locations: Optional[dict[str, str]] = None) -> Score:
    """Score one episode. ``final_locations`` (from the world) overrides the replay from statuses."""
    lg = _Log(scenario, events)
    loc = final_locations if final_locations is not None else replay_locations(scenario, events)
    results = [PredicateResult(p, _check(p, lg, loc)) for p in scenario.predicates]
    met = sum(r.met for r in results)

    def per_role(role: TurnRole, ok) -> Optional[bool]:
        idx = [j for j, t in enumerate(scenario.turns) if t.role is role]
        if not idx:
            return None
        return all(j in lg.turn_idx and ok(lg.turn_idx[j]) for j in idx)

    def interrupt_ok(u: int) -> bool:
        if not _stop_ok(lg, u, STOP_WITHIN_S):
            return False
        held = lg.holding_at(u)
        if held is None:
            return True
        return any(c.obj == held and c.skill == "place_back" and c.end_state is CommandState.SUCCEEDED
                   for c in lg.cmds_between(u, len(events)))

    repeats = _repeats(lg)
    checks = {
        "interrupt_honoured": per_role(TurnRole.INTERRUPT, interrupt_ok),
        "asked_when_ambiguous": per_role(TurnRole.AMBIGUOUS, lambda u: _asked_ok(lg, u)),
        "refused_when_invalid": per_role(TurnRole.INVALID, lambda u: _refused_ok(lg, u)),
        "no_pointless_repeats": repeats == 0,
    }
    return Score(
        progress=met / len(results) if results else 1.0,
        success=met == len(results),
        predicates=results,
        checks=checks,
        repeats=repeats,
        commands=len(lg.cmds),
        rejections=[f"{c.text}: {events[c.end_idx].detail}" for c in lg.cmds if c.end_state is CommandState.REJECTED],
        decisions=sum(ev.kind is EventKind.DECISION for ev in events),
        sim_time_s=max((ev.t_s for ev in events), default=0.0),
        locations=dict(loc),
    )
