"""Scenario data types: the scene, the user's script and the success predicates.

A :class:`Scenario` is plain data (``msgspec`` structs, one JSON object per line in
``sim/data/scenarios.jsonl``), so the generator, the scripted user, the oracle and the
scorer all read the same thing, in process or over the bus.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Iterable, Optional, Union

import msgspec

#: Locations an object can have besides a receptacle.
TABLE = "table"
GRIPPER = "gripper"


class ScenarioCategory(str, enum.Enum):
    """The behaviour a scenario exercises (the Robix SFT categories, plus recovery and completion)."""

    MULTI_STAGE = "multi_stage"
    CONSTRAINED = "constrained"
    OPEN_ENDED = "open_ended"
    INTERRUPTED = "interrupted"
    INVALID = "invalid"
    AMBIGUOUS = "ambiguous"
    CHAT = "chat"
    FAILURE_RETRY = "failure_retry"
    PROACTIVE = "proactive"
    TASK_COMPLETE = "task_complete"


class Split(str, enum.Enum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


class Trigger(str, enum.Enum):
    """When the scripted user says a turn (turns are said in script order, one after another)."""

    START = "start"  #: at the start of the episode
    AFTER_ACTIONS = "after_actions"  #: once ``actions`` motion commands have succeeded
    ON_APPROACH = "on_approach"  #: when the robot starts approaching ``object`` (before the grasp)
    ON_HOLD = "on_hold"  #: when the gripper holds ``object`` (after the grasp)
    ON_QUESTION = "on_question"  #: when the robot asks something (a reply ending with '?')
    ON_DONE = "on_done"  #: when the robot says it is done


class TurnRole(str, enum.Enum):
    """What a turn does in the dialogue; the scorer's per-category checks key on it."""

    INSTRUCTION = "instruction"
    INTERRUPT = "interrupt"
    ANSWER = "answer"
    CHAT = "chat"
    INVALID = "invalid"
    AMBIGUOUS = "ambiguous"
    CLOSING = "closing"


SlotValue = Union[str, list[str]]


class Turn(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One thing the user says, and when.

    ``intent`` and ``template`` identify the paraphrase template it was written from
    (``template`` is "<intent>/<index>", see :mod:`sim.templates`); ``slots`` are the values
    filled in. ``object`` is the trigger object (on_approach / on_hold), ``actions`` the
    count for after_actions; ``delay_s`` is the user's reaction time after the trigger.
    """

    text: str
    intent: str
    template: str
    role: TurnRole
    trigger: Trigger
    delay_s: float = 0.0
    object: Optional[str] = None
    actions: int = 0
    slots: dict[str, SlotValue] = {}


class SceneObject(msgspec.Struct, kw_only=True):
    """An object on the table at the start: its unique name, kind, colour and spot (table frame, cm)."""

    name: str
    kind: str
    colour: str
    x_cm: float
    y_cm: float


class Scene(msgspec.Struct, kw_only=True):
    objects: list[SceneObject]
    receptacles: list[str]


class Failure(msgspec.Struct, kw_only=True):
    """A forced failure: the next ``times`` grasps of ``object`` slip (the object stays on the table)."""

    object: str
    times: int = 1


class PredicateType(str, enum.Enum):
    """Success predicates. Each is checked on the episode log (see :mod:`sim.scoring`)."""

    AT = "at"  #: ``object`` ends at ``location`` (a receptacle or "table")
    ORDER = "order"  #: ``object`` reaches its receptacle before ``other`` reaches its own
    ASKED = "asked"  #: after turn ``turn``, a question (mentioning one of ``mentions``) before any motion
    OFFERED = "offered"  #: a question mentioning ``object`` before any command naming it
    ASKED_HELP = "asked_help"  #: after a failure on ``object``, a question about it; <= ``max_attempts`` tries, none after
    REFUSED = "refused"  #: after turn ``turn``, a refusal reply and no command until the next turn
    REPLIED = "replied"  #: after turn ``turn``, a reply and no stop until the next turn
    SAID_DONE = "said_done"  #: the robot said it is done and asked if anything else is needed
    NEVER = "never"  #: no command with ``skills`` (empty: any motion) on ``object`` after turn ``turn``
    STOPPED = "stopped"  #: after turn ``turn``, the running command was stopped within ``within_s``


class Predicate(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: PredicateType
    object: Optional[str] = None
    location: Optional[str] = None
    other: Optional[str] = None
    turn: Optional[int] = None
    mentions: list[str] = []
    skills: list[str] = []
    within_s: float = 1.0
    max_attempts: int = 3

    def describe(self) -> str:
        """One line for logs and reports: ``at(red cup, bus tub)``."""
        defaults = Predicate(type=self.type)
        fields = [
            f"{k}={v!r}" for k, v in msgspec.structs.asdict(self).items()
            if k != "type" and v != getattr(defaults, k)
        ]
        return f"{self.type.value}({', '.join(fields)})"


class Scenario(msgspec.Struct, kw_only=True):
    id: str
    category: ScenarioCategory
    split: Split
    seed: int
    scene: Scene
    turns: list[Turn]
    predicates: list[Predicate]
    failures: list[Failure] = []
    #: Generator sub-type ("before_grasp", "nonexistent", ...), for reports.
    variant: str = ""

    def object(self, name: str) -> SceneObject:
        for obj in self.scene.objects:
            if obj.name == name:
                return obj
        raise KeyError(f"scenario {self.id} has no object {name!r}")


_decoder = msgspec.json.Decoder(Scenario)
_encoder = msgspec.json.Encoder()


def dumps(scenario: Scenario) -> bytes:
    return _encoder.encode(scenario)


def loads(line: Union[str, bytes]) -> Scenario:
    """Decode and validate one scenario; raises ``msgspec.ValidationError`` naming the bad field."""
    return _decoder.decode(line)


def write_jsonl(scenarios: Iterable[Scenario], path: Union[str, Path]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("wb") as f:
        for sc in scenarios:
            f.write(dumps(sc) + b"\n")
            n += 1
    return n


def read_jsonl(path: Union[str, Path]) -> list[Scenario]:
    out = []
    with Path(path).open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(loads(line))
                except msgspec.ValidationError as e:
                    raise ValueError(f"{path}:{lineno}: invalid scenario: {e}") from e
    return out


# -- dialogue conventions shared by the scripted user and the scorer ---------------------
_DONE = re.compile(r"\b(all done|done|finished|all set|completed?)\b", re.IGNORECASE)
_REFUSAL = re.compile(r"\b(sorry|can't|cannot|can not|unable|won't|not able|don't see|there is no|there's no)\b", re.IGNORECASE)


def is_question(reply: str) -> bool:
    """A reply that asks something: it ends with a question mark."""
    return reply.rstrip().endswith("?")


def says_done(reply: str) -> bool:
    """A reply that announces the task is done ("All done.", "I've finished.")."""
    return bool(_DONE.search(reply))


def is_refusal(reply: str) -> bool:
    """A reply that declines a request ("Sorry, I can't ...")."""
    return bool(_REFUSAL.search(reply.replace("\u2019", "'")))
