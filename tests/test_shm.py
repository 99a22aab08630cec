"""Shared-memory blobs (docs/protocol.md section 15): same-host camera frames without socket copies.

A latest-policy publisher puts large blobs into a ring of slots in /dev/shm and sends a small
descriptor in their place; subscribers read leased, read-only views of the slots. These tests
check what a user relies on: the pixels arrive intact between processes, a held frame is never
overwritten, hostile descriptors are counted and never crash or read outside the segment,
segments disappear when their publisher closes or dies, and peers that do not read shared
memory still get every frame as a ZeroMQ frame.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_record import CliThread, plain
from test_wire_hostile import envelope, register_raw_publisher
from waiting import wait_until

from robix_planner import shm, wire
from robix_planner.bus import Bus, GraphEntry, PublisherEntry, read_graph
from robix_planner.messages import PROTOCOL_VERSION, Image, ImageEncoding
from robix_planner.node import Node, NodeConfig
from robix_planner.tools.record import McapLogReader

pytestmark = pytest.mark.skipif(not shm.supported(), reason="shared-memory blobs need Linux /dev/shm")

TIMEOUT_S = 10.0
H, W = 120, 160  # 57,600 bytes: below the default 64 KiB threshold, so tests lower it
SHAPE = (H, W, 3)


def frame(i: int) -> np.ndarray:
    """A frame that differs from every other in content, not just in one pixel."""
    return np.random.default_rng(i).integers(0, 256, SHAPE, dtype=np.uint8)


@pytest.fixture
def shm_config(bus_config):
    return msgspec.structs.replace(bus_config, shm_min_bytes=1024)


@pytest.fixture
def nodes(shm_config):
    made: list[Node] = []

    def make(name: str, **over) -> Node:
        cfg = msgspec.structs.replace(shm_config, **over) if over else shm_config
        node = Node(name, bus_config=cfg, node_config=NodeConfig(heartbeat_period_s=0))
        made.append(node)
        return node.start()

    yield make
    for node in reversed(made):
        node.shutdown()


def wait_for_shm(pub, expected: bool = True) -> None:
    wait_until(lambda: pub.uses_shm == expected, timeout_s=TIMEOUT_S,
               what=f"the publisher to {'use' if expected else 'stop using'} shared memory")


def our_segments(bus: Bus) -> list[str]:
    prefix = shm.segment_prefix(bus.id)
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix))


# --------------------------------------------------------------------------- two processes


CAMERA = textwrap.dedent("""
    import sys, time
    import numpy as np
    from robix_planner.bus import Bus, BusConfig
    from robix_planner.messages import Image
    with Bus(BusConfig(shm_min_bytes=1024, discovery_period_s=0.02), name="camera") as bus:
        pub = bus.publisher("/camera/shm", Image)
        assert pub.wait_for_subscribers(1, timeout_s=10), "no subscriber"
        deadline = time.monotonic() + 10
        while not pub.uses_shm:
            assert time.monotonic() < deadline, "shared memory never enabled"
            time.sleep(0.01)
        for i in range(1, 11):
            pixels = np.random.default_rng(i).integers(0, 256, (120, 160, 3), dtype=np.uint8)
            pub.publish(Image.from_array("shm", pixels, stamp_ns=i))
            time.sleep(0.02)
        print(pub.shm_segment, bus.stats.shm_published, flush=True)
        sys.stdin.readline()  # the test SIGKILLs us here: no chance to clean up
""")


def test_an_image_crosses_processes_through_shared_memory_and_a_killed_publishers_segment_goes(nodes, bus_env):
    viewer = nodes("viewer")
    got: queue.Queue = queue.Queue()
    viewer.create_subscription("/camera/shm", Image, got.put)
    proc = subprocess.Popen([sys.executable, "-c", CAMERA], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        frames = [got.get(timeout=TIMEOUT_S) for _ in range(3)]  # the callback is fast: it sees most of the ten
        segment, published = proc.stdout.readline().split()
        assert int(published) == 10
        for msg in frames:
            np.testing.assert_array_equal(msg.array(), frame(msg.stamp_ns))
        stats = viewer.bus.stats
        assert stats.shm_received >= 3 and stats.protocol_errors == 0
        assert os.path.exists(segment) and os.stat(segment).st_mode & 0o777 == 0o600
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT_S)
    del frames, msg
    # The viewer's discovery scan finds the dead process's graph file, removes it and its segment.
    wait_until(lambda: not os.path.exists(segment), what="the dead publisher's segment to be removed")
    wait_until(lambda: not viewer.bus._shm_reader.mapped, what="the viewer to unmap the removed segment")
    assert [e.bus for e in read_graph(viewer.bus.root)] == [viewer.bus.id]


# --------------------------------------------------------------------------- in one process


def test_a_held_frame_is_never_overwritten_and_close_removes_the_segment(shm_config):
    got: queue.Queue = queue.Queue()
    with Bus(shm_config, name="viewer") as rx, Bus(shm_config, name="camera") as tx:
        rx.subscribe("/camera/head", Image, lambda _s, rec: got.put(rec.msg))
        pub = tx.publisher("/camera/head", Image)
        assert pub.wait_for_subscribers(1, TIMEOUT_S)
        wait_for_shm(pub)
        pub.publish(Image.from_array("head", frame(0)))
        held = got.get(timeout=TIMEOUT_S)
        view = held.array()
        for i in range(1, 3 * tx.config.shm_slots):  # far more frames than the ring has slots
            pub.publish(Image.from_array("head", frame(i)))
            np.testing.assert_array_equal(got.get(timeout=TIMEOUT_S).array(), frame(i))
        np.testing.assert_array_equal(view, frame(0))  # the held slot was skipped, not rewritten
        assert not view.flags.writeable
        assert tx.stats.shm_published == 3 * tx.config.shm_slots and rx.stats.shm_received == 3 * tx.config.shm_slots
        assert rx.stats.protocol_errors == rx.stats.shm_stale == 0

        segment = pub.shm_segment
        assert os.path.exists(segment) and our_segments(tx) == [os.path.basename(segment)]
        del held, view
        pub.close()
        assert not os.path.exists(segment)
        wait_until(lambda: not rx._shm_reader.mapped, what="the subscriber to unmap the closed segment")
        tx.publisher("/camera/wrist", Image)  # a bus closing with publishers removes their segments too
    assert our_segments(tx) == []


def test_a_loaned_frame_is_published_without_a_copy(nodes):
    viewer = nodes("viewer")
    got: queue.Queue = queue.Queue()
    viewer.create_subscription("/camera/head", Image, got.put)
    pub = nodes("camera").create_publisher("/camera/head", Image)
    assert pub.wait_for_subscribers(1, TIMEOUT_S)
    wait_for_shm(pub)
    ring = pub._ring

    for i in range(3 * ring.slots):  # loans dropped unpublished give their slots back
        pub.loan(SHAPE)
    loaned = pub.loan(SHAPE)
    loaned[...] = frame(7)  # the camera writes into the slot
    before = ring.written
    pub.publish(Image.from_array("head", loaned))
    assert not loaned.flags.writeable  # readers see it now
    np.testing.assert_array_equal(got.get(timeout=TIMEOUT_S).array(), frame(7))
    assert ring.written == before + 1 and ring.full == 0

    # Without shared memory in use, loan() hands out an ordinary array and publish() sends it as a frame.
    quiet = nodes("plain", shm="off")
    quiet.create_subscription("/camera/head", Image, got.put)
    assert pub.wait_for_subscribers(2, TIMEOUT_S)
    wait_for_shm(pub, expected=False)
    plain_array = pub.loan(SHAPE)
    plain_array[...] = frame(8)
    pub.publish(Image.from_array("head", plain_array))
    for _ in range(2):
        np.testing.assert_array_equal(got.get(timeout=TIMEOUT_S).array(), frame(8))
    assert quiet.bus.stats.shm_received == 0


# --------------------------------------------------------------------------- interoperation


def test_peers_that_do_not_read_shared_memory_get_frames(nodes, shm_config):
    """The rule: shared memory only while every connected subscriber is a local one that declared it."""
    camera = nodes("camera")
    pub = camera.create_publisher("/camera/head", Image)
    reader = nodes("reader")
    got: queue.Queue = queue.Queue()
    reader.create_subscription("/camera/head", Image, got.put)
    assert pub.wait_for_subscribers(1, TIMEOUT_S)
    wait_for_shm(pub)

    # 1. A node with bus.shm=off joins: its graph entry says it cannot read shared memory.
    legacy = nodes("legacy", shm="off")
    legacy_got: queue.Queue = queue.Queue()
    legacy.create_subscription("/camera/head", Image, legacy_got.put)
    assert pub.wait_for_subscribers(2, TIMEOUT_S)
    wait_for_shm(pub, expected=False)
    pub.publish(Image.from_array("head", frame(1)))
    np.testing.assert_array_equal(got.get(timeout=TIMEOUT_S).array(), frame(1))
    np.testing.assert_array_equal(legacy_got.get(timeout=TIMEOUT_S).array(), frame(1))
    assert reader.bus.stats.shm_received == 0

    # 2. It leaves: the publisher goes back to shared memory.
    legacy.shutdown()
    wait_for_shm(pub)
    pub.publish(Image.from_array("head", frame(2)))
    np.testing.assert_array_equal(got.get(timeout=TIMEOUT_S).array(), frame(2))
    assert reader.bus.stats.shm_received == 1

    # 3. A foreign subscriber that never registered connects: more SUB sockets than the graph
    #    accounts for, so frames again; it decodes them with a frames-only decoder.
    ctx = zmq.Context()
    raw = ctx.socket(zmq.SUB)
    try:
        raw.setsockopt(zmq.LINGER, 0)
        raw.setsockopt(zmq.SUBSCRIBE, b"/camera/head")
        raw.connect(pub.endpoint)
        assert pub.wait_for_subscribers(2, TIMEOUT_S)
        assert not pub.uses_shm
        pub.publish(Image.from_array("head", frame(3)))
        assert raw.poll(TIMEOUT_S * 1000)
        np.testing.assert_array_equal(wire.decode(raw.recv_multipart()).msg.array(), frame(3))
        np.testing.assert_array_equal(got.get(timeout=TIMEOUT_S).array(), frame(3))
    finally:
        raw.close(linger=0)
        ctx.term()

    # 4. A publisher with shared memory off, to a subscriber that reads it: plain frames.
    old = nodes("old_camera", shm="off")
    old_pub = old.create_publisher("/camera/wrist", Image)
    reader.create_subscription("/camera/wrist", Image, got.put)
    assert old_pub.wait_for_subscribers(1, TIMEOUT_S)
    assert not old_pub.uses_shm and old_pub.shm_segment is None
    old_pub.publish(Image.from_array("wrist", frame(4)))
    np.testing.assert_array_equal(got.get(timeout=TIMEOUT_S).array(), frame(4))
    assert reader.bus.stats.protocol_errors == 0


def test_reliable_latched_small_and_remote_publishers_never_use_shared_memory(nodes, shm_config):
    node = nodes("camera")
    assert node.create_publisher("/camera/a", Image, policy="reliable")._ring is None
    assert node.create_publisher("/camera/b", Image, latched=True)._ring is None
    assert node.create_publisher("/camera/c", Image, shm=False)._ring is None  # a node may opt out per topic
    with Bus(msgspec.structs.replace(shm_config, host="192.0.2.7")) as lan:  # remote peers may connect
        assert lan.shm_reads and not lan.shm_writes
    assert nodes("local_ipc", transport="ipc").create_publisher("/camera/d", Image)._ring is not None

    viewer = nodes("viewer")
    got: queue.Queue = queue.Queue()
    viewer.create_subscription("/camera/e", Image, got.put)
    pub = node.create_publisher("/camera/e", Image)
    assert pub.wait_for_subscribers(1, TIMEOUT_S)
    wait_for_shm(pub)
    small = np.zeros((8, 8, 3), np.uint8)  # below shm_min_bytes: a frame
    pub.publish(Image.from_array("e", small))
    np.testing.assert_array_equal(got.get(timeout=TIMEOUT_S).array(), small)
    assert viewer.bus.stats.shm_received == 0


# --------------------------------------------------------------------------- hostile descriptors


@pytest.fixture
def raw_image_pub(nodes):
    """A victim node subscribed to /hostile/cam, and a raw XPUB registered as that topic's Image publisher."""
    victim = nodes("victim")
    got: queue.Queue = queue.Queue()
    victim.create_subscription("/hostile/cam", Image, got.put)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # report every subscriber, not only the first of a topic
    sock.bind("tcp://127.0.0.1:*")
    path = register_raw_publisher(victim.bus.root, "/hostile/cam", "image", sock.getsockopt(zmq.LAST_ENDPOINT).decode())
    assert sock.poll(TIMEOUT_S * 1000), "the victim never connected"
    sock.recv()
    yield victim, got, sock
    path.unlink(missing_ok=True)
    sock.close(linger=0)
    ctx.term()


def image_msg(data, encoding: str = "rgb8") -> dict:
    return {"type": "image", "camera": "x", "width": W, "height": H, "encoding": encoding, "stamp_ns": 1,
            "data": data}


def test_hostile_descriptors_are_counted_and_the_node_keeps_delivering(raw_image_pub):
    victim, got, sock = raw_image_pub
    ring = shm.ShmRing("hostiletest", uuid.uuid4().hex[:8], slots=8, min_bytes=1)
    fake = os.path.join(shm.SHM_DIR, f"robix-hostiletest-{uuid.uuid4().hex[:8]}")
    shared = os.path.join(shm.SHM_DIR, f"robix-hostiletest-{uuid.uuid4().hex[:8]}")
    try:
        old = msgspec.to_builtins(ring.put(frame(0)))  # gen 1 in slot 0
        for i in range(1, 8):
            ring.put(frame(i))
        good = msgspec.to_builtins(ring.put(frame(8)))  # gen 9: slot 0 again (nobody holds it)
        assert good["slot"] == old["slot"] and good["gen"] == old["gen"] + 8
        seg = ring._seg
        last = seg.slot_offset(seg.slots - 1)
        with open(os.open(fake, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "wb") as f:
            f.write(b"\0" * (2 * shm.DATA_OFFSET))  # right name, not a segment
        with open(os.open(shared, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "wb") as f:
            f.write(open(shm.segment_path(seg.name), "rb").read())  # a real segment's bytes, readable by all
        os.chmod(shared, 0o644)

        hostile = [
            {**good, "shm": "../../etc/passwd"},  # bad names
            {**good, "shm": "robix-../x"},
            {**good, "shm": "robix-doesnotexist"},
            {**good, "shm": os.path.basename(fake)},
            {**good, "shm": os.path.basename(shared)},
            {**good, "slot": 8},  # slot out of range (8 slots)
            {**good, "slot": 255},
            {**good, "slot": -1},
            {**good, "offset": good["offset"] + 4096},  # not in its slot
            {**good, "offset": 10**12},
            {**good, "gen": good["gen"] + 1000},  # a generation from the future
            {**good, "gen": 0},
            {**good, "gen": "9"},
            {**good, "size": 10},  # disagrees with width * height * 3
            [good["shm"], good["slot"]],
            "robix-x",
            {k: v for k, v in good.items() if k != "offset"},
        ]
        frames = [[b"/hostile/cam", envelope(image_msg(d), src=f"h{i}")] for i, d in enumerate(hostile)]
        # Lengths past the end of the slot and of the segment (jpeg: any size is a valid image).
        frames += [[b"/hostile/cam", envelope(image_msg({**good, "offset": last, "size": seg.slot_bytes + 1}, "jpeg"),
                                              src="past_slot")],
                   [b"/hostile/cam", envelope(image_msg({**good, "offset": last, "size": 10**9}, "jpeg"),
                                              src="past_file")]]
        for f in frames:
            sock.send_multipart(f)
        sock.send_multipart([b"/hostile/cam", envelope(image_msg(old), src="stale")])  # slot 0 moved on: stale
        sock.send_multipart([b"/hostile/cam", envelope(image_msg(good), src="honest")])

        msg = got.get(timeout=TIMEOUT_S)  # the one valid message, after all the others (one connection: in order)
        np.testing.assert_array_equal(msg.array(), frame(8))
        stats = victim.bus.stats
        assert stats.protocol_errors == len(frames)
        assert stats.shm_stale == 1 and stats.shm_received == 1
        assert victim.bus._thread.is_alive() and victim._executor.thread.is_alive()
        assert got.empty()
    finally:
        ring.close()
        for path in (fake, shared):
            os.unlink(path)


def test_a_subscriber_with_shared_memory_off_rejects_descriptors(nodes, raw_image_pub):
    _, _, sock = raw_image_pub
    legacy = nodes("legacy", shm="off")
    got: queue.Queue = queue.Queue()
    legacy.create_subscription("/hostile/cam", Image, got.put)
    assert sock.poll(TIMEOUT_S * 1000) and sock.recv() == b"\x01/hostile/cam"
    ring = shm.ShmRing("hostiletest", uuid.uuid4().hex[:8], slots=2, min_bytes=1)
    try:
        ref = msgspec.to_builtins(ring.put(frame(1)))
        sock.send_multipart([b"/hostile/cam", envelope(image_msg(ref), src="a")])
        sock.send_multipart([b"/hostile/cam", envelope(image_msg(2), src="b"), frame(2).tobytes()])
        np.testing.assert_array_equal(got.get(timeout=TIMEOUT_S).array(), frame(2))
        assert legacy.bus.stats.protocol_errors == 1 and legacy.bus.stats.shm_received == 0
    finally:
        ring.close()


@pytest.fixture(scope="module")
def target_ring():
    ring = shm.ShmRing("fuzztest", uuid.uuid4().hex[:8], slots=4, min_bytes=1)
    refs = [ring.put(frame(i)) for i in range(6)]
    yield ring, refs
    ring.close()


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_reading_any_descriptor_only_ever_raises_protocol_error_or_stale(target_ring, data):
    ring, refs = target_ring
    seg = ring._seg
    ref = data.draw(st.sampled_from(refs))
    big = st.integers(0, 2 * (shm.DATA_OFFSET + seg.slots * seg.slot_bytes))
    ref = msgspec.structs.replace(
        ref,
        slot=data.draw(st.integers(0, wire.SHM_MAX_SLOTS - 1) | st.just(ref.slot)),
        offset=data.draw(big | st.just(ref.offset)),
        size=data.draw(big | st.just(ref.size)),
        gen=data.draw(st.integers(1, 20) | st.just(ref.gen)),
    )
    reader = shm.ShmReader(max_blob_bytes=wire.DEFAULT_MAX_BLOB_BYTES)
    try:
        view = reader.read(ref)
    except (wire.ProtocolError, shm.StaleBlob):
        return
    finally:
        reader.close()
    # Whatever is read is exactly the bytes of the slot that holds that generation.
    start = seg.slot_offset(ref.slot)
    assert start <= ref.offset and ref.offset + ref.size <= start + seg.slot_bytes
    assert bytes(view) == bytes(seg.view[ref.offset:ref.offset + ref.size])
    assert seg.words[ref.slot] == ref.gen << 1


# --------------------------------------------------------------------------- tools


def test_record_echo_and_replay_carry_the_pixels_of_shared_memory_frames(nodes, bus_env, tmp_path, capsys):
    path = str(tmp_path / "shm.mcap")
    camera = nodes("camera")
    pub = camera.create_publisher("/camera/head", Image)
    sent = [Image.from_array("head", frame(i)) for i in range(3)]

    record = CliThread("record", "-o", path, "/camera/head", "--count", "3", "--duration-s", "20")
    echo = CliThread("topic", "echo", "/camera/head", "--count", "3", "--json")
    assert pub.wait_for_subscribers(2, timeout_s=TIMEOUT_S)
    wait_for_shm(pub)
    for msg in sent:
        pub.publish(msg)
        time.sleep(0.05)  # latest policy: give both a chance to take each frame
    assert record.join() == 0 and echo.join() == 0
    assert camera.bus.stats.shm_published == 3
    echoed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [e["data"] for e in echoed] == [  # echo read the pixels: their mean colour
        {"nbytes": H * W * 3, "mean_rgb": [round(float(v), 1) for v in frame(i).reshape(-1, 3).mean(axis=0)]}
        for i in range(3)]

    with McapLogReader(path) as reader:  # the file holds the pixels, not descriptors
        logged = [g.msg for g in reader.messages()]
    assert [plain(m) for m in logged] == [plain(m) for m in sent]

    viewer = nodes("viewer")
    got: queue.Queue = queue.Queue()
    viewer.create_subscription("/camera/head", Image, got.put)
    pub.close()
    replay = CliThread("replay", path, "--wait-s", str(TIMEOUT_S))
    assert replay.join() == 0
    replayed = [got.get(timeout=TIMEOUT_S) for _ in range(3)]
    assert [plain(m) for m in replayed] == [plain(m) for m in sent]


def test_dead_process_segments_are_removed_when_its_graph_entry_is_pruned(shm_config):
    """Without any process: a graph entry of a pid that does not exist, and a segment of its bus."""
    bus_id = "dead" + uuid.uuid4().hex[:8]
    segment = shm.segment_path(f"{shm.segment_prefix(bus_id)}0123456789abcdef-1")
    os.close(os.open(segment, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    dead_pid = 2**22 + 12345  # above pid_max's default: never a live process
    try:
        entry = GraphEntry(protocol=PROTOCOL_VERSION, bus=bus_id, pid=dead_pid, host=socket.gethostname(),
                           publishers=[PublisherEntry(topic="/camera/x", type="image", endpoint="tcp://127.0.0.1:1",
                                                      node="ghost", policy="latest", id="0123456789abcdef")])
        with Bus(shm_config) as bus:
            (bus.root / f"{bus_id}.json").write_bytes(msgspec.json.encode(entry))
            assert [e.bus for e in read_graph(bus.root)] == [bus.id]
        assert not os.path.exists(segment)
    finally:
        if os.path.exists(segment):
            os.unlink(segment)


def test_bad_shm_config_is_refused(shm_config):
    from robix_planner.config import ConfigError

    with pytest.raises(ConfigError, match="shm_slots"):
        Bus(msgspec.structs.replace(shm_config, shm_slots=0))


def test_image_encoding_jpeg_sizes_vary_and_the_ring_grows(nodes):
    viewer = nodes("viewer")
    got: queue.Queue = queue.Queue()
    viewer.create_subscription("/camera/jpeg", Image, got.put)
    pub = nodes("camera").create_publisher("/camera/jpeg", Image)
    assert pub.wait_for_subscribers(1, TIMEOUT_S)
    wait_for_shm(pub)
    first_segment = None
    for size in (5_000, 20_000, 9_000, 70_000):  # fake JPEG payloads: only the bytes matter here
        blob = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
        pub.publish(Image(camera="jpeg", width=W, height=H, encoding=ImageEncoding.JPEG, data=blob))
        assert bytes(got.get(timeout=TIMEOUT_S).data) == blob.tobytes()
        first_segment = first_segment or pub.shm_segment
    assert pub.shm_segment != first_segment  # a bigger blob made a bigger segment
    assert viewer.bus.stats.shm_received == 4 and viewer.bus.stats.protocol_errors == 0
