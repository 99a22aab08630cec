"""Every message that travels on the Robix bus: one typed class per message.

The wire format is specified in ``docs/protocol.md``; this module is its single source
of truth. Each class is a ``msgspec.Struct`` tagged by a ``type`` string, so a decoder
validates the tag, every field's presence and type, enum values and bounds in one pass
(see :mod:`robix_planner.wire`).

Bulk data (an image's pixels) never goes inside the msgpack header: a *blob field*
holds, on the wire, the index of the ZeroMQ frame that carries the bytes, and in
Python the bytes themselves (``bytes``, ``memoryview`` or a numpy array).
"""

from __future__ import annotations

import enum
import time
from typing import Annotated, Any, ClassVar, Optional, Union

import msgspec
from msgspec import Meta, field

#: Protocol version carried in every envelope. Bump on any incompatible change.
PROTOCOL_VERSION = 1

# Bounds that keep a hostile peer from making us allocate without limit.
MAX_TEXT = 16 * 1024
MAX_NAME = 256
MAX_LIST = 4096
MAX_SIDE_PX = 8192

Text = Annotated[str, Meta(max_length=MAX_TEXT)]
Name = Annotated[str, Meta(max_length=MAX_NAME)]
NonEmptyName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME)]
StampNs = Annotated[int, Meta(ge=0)]
Count = Annotated[int, Meta(ge=0)]


def now_ns() -> int:
    """Wall-clock time in nanoseconds since the epoch: the ``stamp_ns`` of every message."""
    return time.time_ns()


class ImageEncoding(str, enum.Enum):
    RGB8 = "rgb8"
    BGR8 = "bgr8"
    JPEG = "jpeg"


class CommandState(str, enum.Enum):
    ACCEPTED = "accepted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    PREEMPTED = "preempted"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = {CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED, CommandState.PREEMPTED}


class NodeState(str, enum.Enum):
    STARTING = "starting"
    ACTIVE = "active"
    SHUTTING_DOWN = "shutting_down"


class Message(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=False):
    """Base of all wire messages. ``type`` (the tag) is the discriminator on the wire."""

    #: Fields whose bytes travel as separate ZeroMQ frames (zero-copy).
    blob_fields: ClassVar[tuple[str, ...]] = ()
    #: Default delivery policy for topics carrying this type: "latest" or "reliable".
    default_policy: ClassVar[str] = "reliable"


class Image(Message, tag="image"):
    """A camera frame. ``data`` is a blob: rgb8/bgr8 rows of ``width*3`` bytes, or JPEG bytes."""

    blob_fields: ClassVar[tuple[str, ...]] = ("data",)
    default_policy: ClassVar[str] = "latest"

    camera: NonEmptyName
    width: Annotated[int, Meta(ge=1, le=MAX_SIDE_PX)]
    height: Annotated[int, Meta(ge=1, le=MAX_SIDE_PX)]
    encoding: ImageEncoding
    stamp_ns: StampNs = field(default_factory=now_ns)
    # On the wire: the index (>= 2) of the frame holding the bytes. In Python: the bytes.
    data: Any = None

    def expected_nbytes(self) -> Optional[int]:
        """Exact size of ``data`` for raw encodings; None for JPEG (variable)."""
        if self.encoding is ImageEncoding.JPEG:
            return None
        return self.width * self.height * 3

    def array(self):
        """The pixels as a read-only ``(height, width, 3)`` uint8 numpy array (raw encodings)."""
        import numpy as np

        if self.encoding is ImageEncoding.JPEG:
            raise ValueError("Image.array() needs rgb8/bgr8; decode JPEG with cv2.imdecode")
        if isinstance(self.data, np.ndarray):
            return self.data.reshape(self.height, self.width, 3)
        return np.frombuffer(self.data, dtype=np.uint8).reshape(self.height, self.width, 3)

    @classmethod
    def from_array(cls, camera: str, pixels, encoding: ImageEncoding = ImageEncoding.RGB8, **kw) -> "Image":
        """Wrap an ``(H, W, 3)`` uint8 array without copying it (it must be C-contiguous)."""
        import numpy as np

        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got shape {pixels.shape}")
        return cls(camera=camera, width=pixels.shape[1], height=pixels.shape[0], encoding=encoding, data=pixels, **kw)


class Utterance(Message, tag="utterance"):
    """Something a person said (or typed). ``final`` is False for partial speech recognition."""

    text: Text
    speaker: Name = "user"
    stamp_ns: StampNs = field(default_factory=now_ns)
    final: bool = True


class Command(Message, tag="command"):
    """One atomic command for the low-level controller, as text and parsed.

    ``text`` is exactly the controller's grammar ("put the red cup into the bus tub");
    ``skill`` and ``args`` are its parse (see :mod:`robix_planner.skills`). The
    special skill ``stop`` halts whatever runs.
    """

    id: NonEmptyName
    text: Text
    skill: Name
    args: Annotated[dict[Name, Text], Meta(max_length=16)] = {}
    stamp_ns: StampNs = field(default_factory=now_ns)


class CommandStatus(Message, tag="command_status"):
    """The controller's report on one command. ``holding`` is what the gripper holds (None: empty)."""

    command_id: NonEmptyName
    state: CommandState
    detail: Text = ""
    holding: Optional[Name] = None
    stamp_ns: StampNs = field(default_factory=now_ns)


class Speech(Message, tag="speech"):
    """Text for the TTS. ``flush`` means stop speaking now and drop anything queued (barge-in)."""

    id: NonEmptyName
    text: Text
    flush: bool = False
    stamp_ns: StampNs = field(default_factory=now_ns)


class SkillSpec(msgspec.Struct, kw_only=True):
    """One skill in a controller's grammar.

    ``template`` names its arguments in braces; each argument's kind says which
    vocabulary list it draws from: ``{object}`` -> ``objects``, ``{receptacle}`` ->
    ``receptacles``. Example: ``put the {object} into the {receptacle}``.
    """

    name: NonEmptyName
    template: Text
    description: Text = ""


class Capabilities(Message, tag="capabilities"):
    """What a controller understands: its skills (grammar) and the current vocabulary."""

    robot: Name
    skills: Annotated[list[SkillSpec], Meta(max_length=256)]
    objects: Annotated[list[Name], Meta(max_length=MAX_LIST)] = []
    receptacles: Annotated[list[Name], Meta(max_length=MAX_LIST)] = []
    stamp_ns: StampNs = field(default_factory=now_ns)


class Heartbeat(Message, tag="heartbeat"):
    """Periodic liveness of a node, with its counters (protocol errors, gaps, ...)."""

    default_policy: ClassVar[str] = "latest"

    node: NonEmptyName
    pid: Count
    state: NodeState
    uptime_s: Annotated[float, Meta(ge=0)]
    stats: Annotated[dict[Name, int], Meta(max_length=64)] = {}
    stamp_ns: StampNs = field(default_factory=now_ns)


class PlannerStep(Message, tag="planner_step"):
    """One planner decision, for logs and UIs: the thought, the plan (command), the reply, timings."""

    step: Count
    trigger: Name
    thought: Text = ""
    plan: Optional[Text] = None
    reply: Optional[Text] = None
    error: Optional[Text] = None
    timings_ms: Annotated[dict[Name, float], Meta(max_length=32)] = {}
    stamp_ns: StampNs = field(default_factory=now_ns)


class SessionStart(Message, tag="session_start"):
    """A new session begins (a new user, a new task, an evaluation episode).

    Planners drop their dialogue history and memory of earlier commands; controllers
    keep running. ``session`` names the session (e.g. a scenario id in evaluation).
    """

    session: NonEmptyName
    stamp_ns: StampNs = field(default_factory=now_ns)


#: Every message class, keyed by its wire tag. Add new classes here.
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.__struct_config__.tag: cls
    for cls in (Image, Utterance, Command, CommandStatus, Speech, Capabilities, Heartbeat, PlannerStep, SessionStart)
}

AnyMessage = Union[tuple(MESSAGE_TYPES.values())]  # type: ignore[valid-type]


def type_name(cls_or_msg) -> str:
    """The wire tag of a message class or instance ("command", "image", ...)."""
    cls = cls_or_msg if isinstance(cls_or_msg, type) else type(cls_or_msg)
    return cls.__struct_config__.tag


def message_class(name: str) -> type[Message]:
    """Look up a message class by wire tag or class name (``command`` or ``Command``)."""
    if name in MESSAGE_TYPES:
        return MESSAGE_TYPES[name]
    for cls in MESSAGE_TYPES.values():
        if cls.__name__ == name:
            return cls
    raise KeyError(f"unknown message type {name!r}; known: {', '.join(sorted(MESSAGE_TYPES))}")
