"""Every wire message round-trips, and invalid values are refused on receipt (pure unit tests, no sockets)."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import numpy as np
import pytest

from robix_planner import messages as m
from robix_planner import wire
from robix_planner.skills import TABLETOP_SKILLS


def _pixels(height: int = 4, width: int = 5) -> np.ndarray:
    return np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)


def sample(type_name: str) -> m.Message:
    """One message of each type with every field set to a non-default value."""
    samples = {
        "image": m.Image.from_array("head", _pixels(), stamp_ns=11),
        "utterance": m.Utterance(text="clear the table, please", speaker="ana", stamp_ns=12, final=False),
        "command": m.Command(id="c1", text="put the red cup into the bus tub", skill="put_into",
                             args={"object": "red cup", "receptacle": "bus tub"}, stamp_ns=13),
        "command_status": m.CommandStatus(command_id="c1", state=m.CommandState.RUNNING, detail="grasp",
                                          holding="red cup", stamp_ns=14),
        "speech": m.Speech(id="s1", text="On it.", flush=True, stamp_ns=15),
        "capabilities": m.Capabilities(robot="sim", skills=list(TABLETOP_SKILLS), objects=["red cup", "fork"],
                                       receptacles=["bus tub"], stamp_ns=16),
        "heartbeat": m.Heartbeat(node="planner", pid=42, state=m.NodeState.ACTIVE, uptime_s=1.5,
                                 stats={"received": 3, "gaps": 0}, stamp_ns=17),
        "planner_step": m.PlannerStep(step=3, trigger="utterance", thought="the cup is closest", plan="pick up the red cup",
                                      reply="Sure.", error=None, timings_ms={"model": 120.5}, stamp_ns=18),
        "session_start": m.SessionStart(session="scenario-7", stamp_ns=19),
    }
    assert set(samples) == set(m.MESSAGE_TYPES), "add a sample for every new message type"
    return samples[type_name]


def _fields(msg: m.Message) -> dict:
    return {f: getattr(msg, f) for f in msg.__struct_fields__ if f not in msg.blob_fields}


def _blob_bytes(msg: m.Message, name: str) -> bytes:
    value = getattr(msg, name)
    return bytes(memoryview(value).cast("B")) if not isinstance(value, bytes) else value


@pytest.mark.parametrize("tag", sorted(m.MESSAGE_TYPES))
def test_every_type_round_trips_over_the_wire(tag):
    msg = sample(tag)
    frames = wire.encode("/some/topic", msg, src="pub1", seq=7)
    # What ZeroMQ hands a receiver: every frame as its own bytes.
    received = [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in frames]
    rec = wire.decode(received)
    assert (rec.topic, rec.src, rec.seq) == ("/some/topic", "pub1", 7)
    assert type(rec.msg) is type(msg)
    assert _fields(rec.msg) == _fields(msg)
    for name in msg.blob_fields:
        assert _blob_bytes(rec.msg, name) == _blob_bytes(msg, name)
    assert rec.nbytes == sum(len(f) for f in received[1:])


@pytest.mark.parametrize("tag", sorted(m.MESSAGE_TYPES))
def test_every_type_round_trips_as_one_record(tag):
    msg = sample(tag)
    back = wire.unpack_message(wire.pack_message(msg))
    assert type(back) is type(msg)
    assert _fields(back) == _fields(msg)
    for name in msg.blob_fields:
        assert _blob_bytes(back, name) == _blob_bytes(msg, name)


def test_image_pixels_travel_as_their_own_frame_without_a_copy():
    pixels = _pixels(48, 64)
    frames = wire.encode("/camera/head", m.Image.from_array("head", pixels), src="p", seq=1)
    assert len(frames) == 3
    assert frames[2] is pixels  # handed to zmq as is: no base64, no copy into the header
    assert len(frames[1]) < 200
    rec = wire.decode([bytes(frames[0]), bytes(frames[1]), pixels.tobytes()])
    np.testing.assert_array_equal(rec.msg.array(), pixels)


def test_from_builtins_and_to_builtins_agree():
    msg = sample("command")
    data = wire.to_builtins(msg)
    assert data["type"] == "command"
    assert wire.from_builtins(m.Command, data) == msg
    assert wire.to_builtins(sample("image"))["data"] == f"<{4 * 5 * 3} bytes>"


def test_message_class_lookup():
    assert m.message_class("command") is m.Command
    assert m.message_class("CommandStatus") is m.CommandStatus
    assert m.type_name(m.PlannerStep) == "planner_step"
    with pytest.raises(KeyError, match="known: capabilities"):
        m.message_class("twist")


# --------------------------------------------------------------------------- invalid values


def _envelope(msg: dict, **over) -> list[bytes]:
    env = {"v": m.PROTOCOL_VERSION, "src": "p", "seq": 1, "msg": msg, **over}
    return [b"/t", msgspec.msgpack.encode(env)]


GOOD_IMAGE = {"type": "image", "camera": "head", "width": 2, "height": 1, "encoding": "rgb8", "stamp_ns": 1, "data": 2}
GOOD_COMMAND = {"type": "command", "id": "c1", "text": "stop", "skill": "stop", "args": {}, "stamp_ns": 1}


def test_valid_hand_built_frames_decode():
    """The invalid cases below differ from these in one thing only."""
    assert isinstance(wire.decode(_envelope(GOOD_IMAGE) + [b"\0" * 6]).msg, m.Image)
    assert isinstance(wire.decode(_envelope(GOOD_COMMAND)).msg, m.Command)


@pytest.mark.parametrize(
    "frames, reason",
    [
        (_envelope({**GOOD_IMAGE, "width": -2}) + [b"\0" * 6], "width"),
        (_envelope({**GOOD_IMAGE, "width": 10_000}) + [b"\0" * 6], "width"),
        (_envelope({**GOOD_IMAGE, "encoding": "yuv422"}) + [b"\0" * 6], "encoding"),
        (_envelope({k: v for k, v in GOOD_IMAGE.items() if k != "camera"}) + [b"\0" * 6], "camera"),
        (_envelope({**GOOD_IMAGE, "data": 3}) + [b"\0" * 6], "frame index 2"),
        (_envelope({**GOOD_IMAGE, "data": True}) + [b"\0" * 6], "frame index 2"),
        (_envelope({**GOOD_IMAGE, "data": 2.0}) + [b"\0" * 6], "frame index 2"),
        (_envelope(GOOD_IMAGE) + [b"\0" * 5], "needs 6 bytes"),
        (_envelope(GOOD_IMAGE), "needs 3 frames"),
        (_envelope({**GOOD_COMMAND, "text": "x" * (m.MAX_TEXT + 1)}), "text"),
        (_envelope({**GOOD_COMMAND, "id": ""}), "id"),
        (_envelope({k: v for k, v in GOOD_COMMAND.items() if k != "skill"}), "skill"),
        (_envelope({**GOOD_COMMAND, "stamp_ns": -1}), "stamp_ns"),
        (_envelope({**GOOD_COMMAND, "args": {"object": 3}}), "args"),
        (_envelope({**GOOD_COMMAND, "args": {f"k{i}": "v" for i in range(17)}}), "args"),
        (_envelope({**GOOD_COMMAND, "type": "teleport"}), "teleport"),
        (_envelope({k: v for k, v in GOOD_COMMAND.items() if k != "type"}), "type"),
        (_envelope({"type": "command_status", "command_id": "c1", "state": "exploded"}), "state"),
        (_envelope({"type": "heartbeat", "node": "n", "pid": 1, "state": "active", "uptime_s": -1.0}), "uptime_s"),
        (_envelope(GOOD_COMMAND) + [b"extra"], "needs 2 frames"),
        (_envelope(GOOD_COMMAND, v=m.PROTOCOL_VERSION + 1), "protocol version"),
        (_envelope(GOOD_COMMAND, seq="1"), "seq"),
        ([b"/t", b"\xc1"], "envelope"),
        ([b"/t", msgspec.msgpack.encode([1, 2, 3])], "envelope"),
        ([b"/t"], "at least 2 frames"),
        ([b"", _envelope(GOOD_COMMAND)[1]], "topic"),
        ([b"\xff\xfe", _envelope(GOOD_COMMAND)[1]], "UTF-8"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_invalid_frames_raise_protocol_error(frames, reason):
    with pytest.raises(wire.ProtocolError, match=reason):
        wire.decode(frames)


def test_size_limits_are_enforced():
    frames = _envelope(GOOD_COMMAND)
    with pytest.raises(wire.ProtocolError, match="limit"):
        wire.decode(frames, max_header_bytes=len(frames[1]) - 1)
    with pytest.raises(wire.ProtocolError, match="limit"):
        wire.decode(_envelope(GOOD_IMAGE) + [b"\0" * 6], max_blob_bytes=5)


def test_unpack_message_rejects_invalid_records():
    with pytest.raises(wire.ProtocolError):
        wire.unpack_message(msgspec.msgpack.encode({**GOOD_COMMAND, "skill": 3}))
    with pytest.raises(wire.ProtocolError, match="needs 6 bytes"):
        wire.unpack_message(msgspec.msgpack.encode({**GOOD_IMAGE, "data": b"\0" * 5}))
    with pytest.raises(wire.ProtocolError):
        wire.unpack_message(b"\x92\x01")


def test_from_builtins_rejects_invalid_data():
    with pytest.raises(wire.ProtocolError, match="text"):
        wire.from_builtins(m.Utterance, {"text": 5})
    with pytest.raises(wire.ProtocolError, match="mapping"):
        wire.from_builtins(m.Utterance, ["hi"])


def test_encode_refuses_an_image_without_pixels():
    with pytest.raises(ValueError, match="data is empty"):
        wire.encode("/camera/head", m.Image(camera="head", width=1, height=1, encoding=m.ImageEncoding.RGB8),
                    src="p", seq=1)


def test_command_state_terminal():
    assert {s for s in m.CommandState if s.terminal} == {
        m.CommandState.SUCCEEDED, m.CommandState.FAILED, m.CommandState.REJECTED, m.CommandState.PREEMPTED}


# --------------------------------------------------------------------------- docs/protocol.md stays true

PROTOCOL_MD = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def test_protocol_doc_lists_every_message_field():
    doc = PROTOCOL_MD.read_text()
    sections = {m_.group(1): m_.start() for m_ in re.finditer(r"^### `(\w+)` — ", doc, re.M)}
    assert set(sections) == set(m.MESSAGE_TYPES), "docs/protocol.md section 5 needs one section per message type"
    for tag, cls in m.MESSAGE_TYPES.items():
        start = sections[tag]
        end = min([p for p in sections.values() if p > start] + [doc.index("## 6. Topics")])
        body = doc[start:end]
        documented = re.findall(r"^\| `(\w+)` \|", body, re.M)
        fields = list(cls.__struct_fields__)
        if tag == "capabilities":
            fields += list(m.SkillSpec.__struct_fields__)
        assert sorted(documented) == sorted(fields), f"docs/protocol.md table of {tag} is out of date"


def test_protocol_doc_worked_example_is_what_encode_produces():
    doc = PROTOCOL_MD.read_text()
    example = doc[doc.index("## 13. Worked example"):doc.index("## 14.")]
    blocks = re.findall(r"```\n(.*?)```", example, re.S)
    hex_of = lambda block: bytes.fromhex(" ".join(line.split("  ")[0] for line in block.splitlines()))  # noqa: E731
    cmd = m.Command(id="c1", text="pick up the red cup", skill="pick_up", args={"object": "red cup"},
                    stamp_ns=1767225600000000000)
    frames = wire.encode("/controller/command", cmd, src="9f86d081884c7d65", seq=1)
    assert hex_of(blocks[0]) == frames[0]
    assert hex_of(blocks[1]) == frames[1]


def test_protocol_doc_lists_every_well_known_topic():
    from robix_planner import topics

    doc = PROTOCOL_MD.read_text()
    table = doc[doc.index("## 6. Topics"):doc.index("## 7.")]
    names = {v for k, v in vars(topics).items() if k.isupper() and isinstance(v, str) and v.startswith("/")}
    names = {n for n in names if not n.startswith("/camera/")} | {"/camera/<name>"}
    missing = sorted(n for n in names if f"| `{n}` |" not in table)
    assert missing == [], f"docs/protocol.md section 6 lacks {missing}"
