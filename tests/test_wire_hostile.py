"""Hostile bytes never crash a node: every bad message is counted, and valid ones still get through.

A raw ZeroMQ socket (or a raw TCP socket speaking ZMTP by hand) registers itself in the
test's graph directory exactly as a Bus would, so the node under test connects to it.
"""

from __future__ import annotations

import os
import queue
import socket
import struct
import time
import uuid
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robix_planner import wire
from robix_planner.bus import GraphEntry, PublisherEntry
from robix_planner.messages import PROTOCOL_VERSION, Command, Image, Utterance
from robix_planner.node import Node, NodeConfig

TOPIC = "/hostile"
T = TOPIC.encode()
TIMEOUT_S = 5.0


def register_raw_publisher(root: Path, topic: str, type_name: str, endpoint: str) -> Path:
    """Announce a foreign publisher in the graph directory, the way bus.Bus._write_entry does."""
    bus_id = "raw" + uuid.uuid4().hex[:9]
    entry = GraphEntry(protocol=PROTOCOL_VERSION, bus=bus_id, pid=os.getpid(), host=socket.gethostname(),
                       nodes=["raw"], stamp_ns=time.time_ns(),
                       publishers=[PublisherEntry(topic=topic, type=type_name, endpoint=endpoint, node="raw",
                                                  policy="reliable", id=bus_id)])
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{bus_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(entry))
    os.replace(tmp, path)
    return path


def envelope(msg: dict, *, v: int = PROTOCOL_VERSION, src: str = "raw", seq: int = 1) -> bytes:
    return msgspec.msgpack.encode({"v": v, "src": src, "seq": seq, "msg": msg})


def command(seq: int, text: str = "stop") -> dict:
    return {"type": "command", "id": f"c{seq}", "text": text, "skill": "stop", "args": {}, "stamp_ns": 1}


class Victim:
    """A live node subscribed to TOPIC; collects what its callback receives."""

    def __init__(self, bus_config):
        self.node = Node("victim", bus_config=bus_config, node_config=NodeConfig(heartbeat_period_s=0))
        self.got: queue.Queue = queue.Queue()
        self.node.create_subscription(TOPIC, Command, self.got.put)
        self.node.start()

    def next(self) -> Command:
        return self.got.get(timeout=TIMEOUT_S)

    def alive(self) -> bool:
        return self.node.bus._thread.is_alive() and self.node._executor.thread.is_alive()


@pytest.fixture
def victim(bus_config):
    v = Victim(bus_config)
    yield v
    v.node.shutdown()


@pytest.fixture
def raw_pub(victim):
    """A raw XPUB socket registered as a Command publisher on TOPIC, with the victim subscribed."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.bind("tcp://127.0.0.1:*")
    path = register_raw_publisher(victim.node.bus.root, TOPIC, "command", sock.getsockopt(zmq.LAST_ENDPOINT).decode())
    assert sock.poll(TIMEOUT_S * 1000), "the node never connected to the registered raw publisher"
    assert sock.recv() == b"\x01" + T
    yield sock
    path.unlink(missing_ok=True)
    sock.close(linger=0)
    ctx.term()


def _hostile_frame_lists() -> list[list[bytes]]:
    rng = np.random.default_rng(0)
    good = envelope(command(1))
    image = {"type": "image", "camera": "head", "width": 4, "height": 2, "encoding": "rgb8", "stamp_ns": 1, "data": 2}
    cases = [
        # random bytes
        *[[T, rng.bytes(int(n))] for n in rng.integers(1, 200, size=20)],
        [T, rng.bytes(16), rng.bytes(16), rng.bytes(16)],
        # truncated envelopes
        *[[T, good[:n]] for n in (1, 5, len(good) // 2, len(good) - 1)],
        [T, b""],
        # wrong field types
        [T, envelope({**command(1), "text": 5})],
        [T, envelope({**command(1), "args": ["object", "cup"]})],
        [T, envelope({**command(1), "stamp_ns": "yesterday"})],
        [T, msgspec.msgpack.encode({"v": PROTOCOL_VERSION, "src": 7, "seq": 1, "msg": command(1)})],
        [T, msgspec.msgpack.encode({"v": PROTOCOL_VERSION, "src": "raw", "seq": "1", "msg": command(1)})],
        [T, msgspec.msgpack.encode([PROTOCOL_VERSION, "raw", 1, command(1)])],
        [T, good.replace(b"\xa3raw", b"\xa3r\xffw")],  # a str that is not UTF-8
        # unknown type tags, missing tag
        [T, envelope({**command(1), "type": "teleport"})],
        [T, envelope({k: v for k, v in command(1).items() if k != "type"})],
        # another protocol version
        [T, envelope(command(1), v=PROTOCOL_VERSION + 1)],
        [T, envelope(command(1), v=0)],
        # images whose blob disagrees with the header
        [T, envelope(image), b"\0" * (4 * 2 * 3 - 1)],
        [T, envelope(image), b"\0" * (4 * 2 * 3 + 1)],
        [T, envelope({**image, "data": 3}), b"\0" * 24],
        [T, envelope({**image, "data": 2.0}), b"\0" * 24],
        [T, envelope(image)],
        # msgpack that claims 4 GiB: str32, bin32, array32 and map32 lengths of 2**32 - 1
        [T, b"\x84\xa1v\x01\xa3src\xdb\xff\xff\xff\xffab"],
        [T, b"\x84\xa1v\x01\xa3src\xc6\xff\xff\xff\xffab"],
        [T, b"\x84\xa1v\x01\xa3msg\xdd\xff\xff\xff\xff\x01"],
        [T, b"\xdf\xff\xff\xff\xff\xa1v\x01"],
        # an envelope over the 1 MiB header limit
        [T, msgspec.msgpack.encode({"pad": b"\0" * wire.DEFAULT_MAX_HEADER_BYTES})],
        # too many / too few frames
        [T, good, b"extra"],
        [T],
        # a topic that is not UTF-8 (but passes ZeroMQ's prefix filter)
        [T + b"\xff\xfe", good],
        # a valid message of the wrong type for this topic
        [T, envelope({"type": "utterance", "text": "hi", "speaker": "u", "stamp_ns": 1, "final": True}, src="liar")],
    ]
    return cases


def test_hostile_messages_are_counted_and_never_crash_a_node(victim, raw_pub):
    bus = victim.node.bus
    hostile = _hostile_frame_lists()
    for frames in hostile:
        raw_pub.send_multipart(frames)
    raw_pub.send_multipart([T, envelope(command(1), seq=1)])

    first = victim.next()  # one connection keeps order: every hostile message was handled before this one
    assert first.id == "c1"
    assert bus.stats.protocol_errors == len(hostile)
    assert victim.alive()

    raw_pub.send_multipart([T, envelope(command(2), seq=2)])
    assert victim.next().id == "c2"
    assert victim.got.empty()
    assert bus.stats.callback_errors == 0


def test_messages_on_longer_topics_are_ignored_not_counted(victim, raw_pub):
    """ZeroMQ filters by prefix: /hostile_other reaches the socket but is not this topic."""
    raw_pub.send_multipart([T + b"_other", envelope(command(1))])
    raw_pub.send_multipart([T, envelope(command(2), seq=1)])
    assert victim.next().id == "c2"
    assert victim.node.bus.stats.protocol_errors == 0


# --------------------------------------------------------------------------- a frame that claims 4 GiB


def _zmtp_command(name: bytes, props: dict[bytes, bytes]) -> bytes:
    body = bytes([len(name)]) + name
    for key, value in props.items():
        body += bytes([len(key)]) + key + struct.pack(">I", len(value)) + value
    return bytes([0x04, len(body)]) + body  # flags 0x04: a short command frame


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed during the handshake")
        buf += chunk
    return buf


def test_a_frame_header_claiming_4_gib_makes_libzmq_drop_the_peer(victim):
    """A fake ZMTP 3.0 publisher: greeting, NULL handshake, then a frame header of 2**32 bytes.

    The bus's SUB sockets set ZMQ_MAXMSGSIZE, so libzmq closes the connection on reading the
    header, before allocating anything; the node keeps running and serves other publishers.
    """
    # A well-behaved publisher, bound first so that the fake's port cannot be recycled for it:
    # libzmq does not reconnect after a protocol error, and the bus identifies peers by endpoint.
    pub = victim.node.create_publisher(TOPIC, Command)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(TIMEOUT_S)
    port = server.getsockname()[1]
    path = register_raw_publisher(victim.node.bus.root, TOPIC, "command", f"tcp://127.0.0.1:{port}")
    try:
        conn, _ = server.accept()
        conn.settimeout(TIMEOUT_S)
        with conn:
            # Greeting: signature, version 3.0, mechanism NULL, as-server 0, filler.
            conn.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" * 32)
            peer = _recv_exactly(conn, 64)
            assert peer[0] == 0xFF and peer[9] == 0x7F and peer[12:16] == b"NULL"
            conn.sendall(_zmtp_command(b"READY", {b"Socket-Type": b"PUB"}))
            flags, size = _recv_exactly(conn, 2)
            ready = _recv_exactly(conn, size)
            assert flags == 0x04 and ready.startswith(b"\x05READY") and b"SUB" in ready
            # A long message frame (flags 0x02) whose 8-byte size says 4 GiB, then a few bytes of it.
            conn.sendall(b"\x02" + struct.pack(">Q", 2**32) + b"x" * 64)
            closed = False
            try:
                while conn.recv(4096):  # the SUB may still send its subscription first; the timeout bounds this
                    pass
                closed = True
            except ConnectionResetError:
                closed = True
            except socket.timeout:
                pass
            assert closed, "libzmq kept a peer that announced a 4 GiB frame"
    finally:
        path.unlink()
        server.close()

    # The node is unharmed and still receives from a well-behaved publisher.
    assert victim.alive()
    assert pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
    pub.publish(Command(id="after", text="stop", skill="stop"))
    assert victim.next().id == "after"


def test_a_real_frame_over_the_size_limit_cuts_that_publisher_off(bus_config):
    """The same ZMQ_MAXMSGSIZE path with a real frame: a blob over the subscriber's limit never arrives.

    libzmq treats it as a protocol error and closes that connection for good (it does not
    reconnect); the node keeps serving every other publisher.
    """
    cfg = msgspec.structs.replace(bus_config, max_blob_bytes=1 << 16, max_header_bytes=1 << 12)
    node = Node("small", bus_config=cfg, node_config=NodeConfig(heartbeat_period_s=0))
    got: queue.Queue = queue.Queue()
    node.create_subscription("/camera/head", Image, got.put, policy="reliable")
    node.start()
    try:
        big_pub = node.create_publisher("/camera/head", Image, policy="reliable")
        assert big_pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
        big_pub.publish(Image.from_array("head", np.zeros((256, 256, 3), np.uint8)))  # 192 KiB > 64 KiB
        deadline = time.monotonic() + TIMEOUT_S
        while big_pub.subscriber_count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert big_pub.subscriber_count == 0, "the subscriber should have dropped the oversized peer"
        assert got.empty()

        small = np.full((64, 64, 3), 7, np.uint8)  # 12 KiB
        other = node.create_publisher("/camera/head", Image, policy="reliable")
        assert other.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
        other.publish(Image.from_array("head", small))
        np.testing.assert_array_equal(got.get(timeout=TIMEOUT_S).array(), small)
        assert got.empty()
        assert node.bus.stats.protocol_errors == 0
    finally:
        node.shutdown()


# --------------------------------------------------------------------------- fuzzing


def _valid_frames() -> list[list[bytes]]:
    cmd = wire.encode(TOPIC, Command(id="c", text="stop", skill="stop", stamp_ns=1), src="p", seq=1)
    img = wire.encode("/camera/head", Image.from_array("head", np.zeros((2, 3, 3), np.uint8), stamp_ns=1),
                      src="p", seq=1)
    utt = wire.encode("/user/utterance", Utterance(text="hello", stamp_ns=1), src="p", seq=1)
    return [[bytes(memoryview(f).cast("B")) for f in frames] for frames in (cmd, img, utt)]


VALID = _valid_frames()

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_envelopes(draw) -> list[bytes]:
    """A valid message with one field of its envelope or body replaced by an arbitrary value."""
    frames = list(draw(st.sampled_from(VALID)))
    env = msgspec.msgpack.decode(frames[1])
    target = draw(st.sampled_from(["envelope", "msg"]))
    obj = env if target == "envelope" else env["msg"]
    key = draw(st.sampled_from(sorted(obj)) | st.text(max_size=8))
    if draw(st.booleans()):
        obj[key] = draw(msgpack_values)
    else:
        obj.pop(key, None)
    frames[1] = msgspec.msgpack.encode(env)
    if draw(st.booleans()):
        frames = frames[:draw(st.integers(0, len(frames)))] + draw(st.lists(st.binary(max_size=64), max_size=2))
    return frames


@st.composite
def flipped_bytes(draw) -> list[bytes]:
    """A valid message with a few bytes of one frame overwritten, or the frame cut short."""
    frames = list(draw(st.sampled_from(VALID)))
    i = draw(st.integers(0, len(frames) - 1))
    data = bytearray(frames[i])
    if data and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    else:
        data = data[:draw(st.integers(0, len(data)))]
    frames[i] = bytes(data)
    return frames


frame_lists = (
    st.lists(st.binary(max_size=128), max_size=5)
    | st.lists(msgpack_values.map(msgspec.msgpack.encode), min_size=1, max_size=4).map(lambda fs: [T] + fs)
    | mutated_envelopes()
    | flipped_bytes()
)


@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame_lists)
def test_decode_only_ever_raises_protocol_error(frames):
    try:
        rec = wire.decode(frames)
    except wire.ProtocolError:
        return
    # Whatever decodes is a valid, fully typed message.
    assert isinstance(rec.topic, str) and isinstance(rec.src, str) and isinstance(rec.seq, int)
    for name in rec.msg.blob_fields:
        assert isinstance(getattr(rec.msg, name), memoryview)


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=256) | msgpack_values.map(msgspec.msgpack.encode))
def test_unpack_message_only_ever_raises_protocol_error(data):
    try:
        wire.unpack_message(data)
    except wire.ProtocolError:
        pass


shm_descriptors = st.fixed_dictionaries(
    {},
    optional={"shm": st.sampled_from(["robix-a-b-1", "../etc/passwd", "robix-", "x" * 300, "robix-ok"]) | msgpack_values,
              "slot": st.integers(-5, 300) | msgpack_values, "offset": st.integers(-1, 2**64 - 1) | msgpack_values,
              "size": st.integers(-1, 2**64 - 1) | msgpack_values, "gen": st.integers(-1, 2**64 - 1) | msgpack_values},
)


@settings(max_examples=500, deadline=None, database=None)
@given(shm_descriptors, st.lists(st.binary(max_size=8), max_size=2))
def test_decode_of_shared_memory_descriptors_only_ever_raises_protocol_error(descriptor, extra_frames):
    """A receiver that reads shared memory validates every descriptor field before anything is mapped."""
    img = {"type": "image", "camera": "head", "width": 4, "height": 2, "encoding": "jpeg", "stamp_ns": 1,
           "data": descriptor}
    try:
        rec = wire.decode([b"/camera/head", envelope(img)] + extra_frames, allow_shm=True)
    except wire.ProtocolError:
        return
    assert rec.shm and not extra_frames
    ref = rec.msg.data
    assert isinstance(ref, wire.ShmBlob) and ref.shm.startswith("robix-") and "/" not in ref.shm
    assert 0 <= ref.slot < wire.SHM_MAX_SLOTS and ref.gen >= 1
    assert 0 <= ref.offset and 0 <= ref.size <= wire.DEFAULT_MAX_BLOB_BYTES
