"""`robix record` / `robix replay`: MCAP files, lossless replay in order with the original timing."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import msgspec
import numpy as np
import pytest
from mcap.reader import make_reader
from waiting import wait_until

from robix_planner import cli, skills, wire
from robix_planner.messages import (
    Capabilities,
    Command,
    CommandState,
    CommandStatus,
    Heartbeat,
    Image,
    ImageEncoding,
    NodeState,
    PlannerStep,
    Speech,
    Utterance,
)
from robix_planner.node import Node, NodeConfig
from robix_planner.tools.record import McapLogReader, McapLogWriter

TIMEOUT_S = 10.0
#: How far a replayed gap between two messages may differ from the recorded one.
TIMING_TOLERANCE_S = 0.04


def plain(msg) -> dict:
    """Every field of a message, blobs as bytes: equal plain() means equal field for field, pixel for pixel."""
    out = msgspec.structs.asdict(msg)
    for name in msg.blob_fields:
        out[name] = bytes(memoryview(getattr(msg, name)).cast("B"))
    return out


class CliThread:
    def __init__(self, *argv: str):
        self.rc = None
        self._thread = threading.Thread(target=self._run, args=(list(argv),), daemon=True)
        self._thread.start()

    def _run(self, argv) -> None:
        self.rc = cli.main(argv)

    def join(self, timeout_s: float = TIMEOUT_S) -> int:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"robix did not finish within {timeout_s} s"
        return self.rc


@pytest.fixture
def nodes(bus_config, bus_env):
    made: list[Node] = []

    def make(name: str) -> Node:
        node = Node(name, bus_config=bus_config, node_config=NodeConfig(heartbeat_period_s=0))
        made.append(node)
        return node.start()

    yield make
    for node in reversed(made):
        node.shutdown()


def every_message() -> list:
    rng = np.random.default_rng(7)
    caps = Capabilities(robot="sim", skills=list(skills.TABLETOP_SKILLS), objects=["red cup"], receptacles=["bus tub"])
    return [
        Image.from_array("head", rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)),
        Image(camera="wrist", width=2, height=1, encoding=ImageEncoding.JPEG, data=b"\xff\xd8jpeg"),
        Utterance(text="clear the table", speaker="ana", final=False),
        Command(id="c1", text="put the red cup into the bus tub", skill="put_into",
                args={"object": "red cup", "receptacle": "bus tub"}),
        CommandStatus(command_id="c1", state=CommandState.SUCCEEDED, holding=None),
        Speech(id="s1", text="On it.", flush=True),
        caps,
        Heartbeat(node="planner", pid=42, state=NodeState.ACTIVE, uptime_s=1.5, stats={"gaps": 0}),
        PlannerStep(step=3, trigger="utterance", thought="cup first", plan=caps.skills[0].template,
                    timings_ms={"model": 12.5}),
    ]


# --------------------------------------------------------------------------- the file format (no sockets)


def test_mcap_file_round_trips_every_message_type_with_schemas(tmp_path):
    path = tmp_path / "all.mcap"
    sent = every_message()
    writer = McapLogWriter(path, metadata={"domain": "test"})
    for i, msg in enumerate(sent):
        writer.write(f"/t{i}", msg, log_time_ns=1_000 + i, seq=i + 1)
    writer.close()

    with McapLogReader(path) as reader:
        got = list(reader.messages())
    assert [g.topic for g in got] == [f"/t{i}" for i in range(len(sent))]
    assert [plain(g.msg) for g in got] == [plain(m) for m in sent]
    assert [g.log_time_ns for g in got] == [1_000 + i for i in range(len(sent))]
    assert [g.publish_time_ns for g in got] == [m.stamp_ns for m in sent]

    with open(path, "rb") as f:  # the layout other MCAP tools (Foxglove, mcap CLI) see
        summary = make_reader(f).get_summary()
    channels = sorted(summary.channels.values(), key=lambda c: c.topic)
    assert {c.message_encoding for c in channels} == {"msgpack"}
    schemas = {s.name: s for s in summary.schemas.values()}
    assert set(schemas) == {type(m).__name__ for m in sent}  # one schema per class, two Images share one
    assert {s.encoding for s in schemas.values()} == {"jsonschema"}
    assert msgspec.json.decode(schemas["Command"].data) == msgspec.json.schema(Command)
    assert summary.channels[1].metadata == {"robix_type": "image", "policy": "latest"}
    with open(path, "rb") as f:  # data is exactly wire.pack_message: readable without our reader
        raw = [(c.topic, m.data) for _, c, m in make_reader(f).iter_messages()]
    assert raw[3] == ("/t3", wire.pack_message(sent[3]))


def test_log_times_never_go_backwards_so_file_order_is_replay_order(tmp_path):
    path = tmp_path / "clock.mcap"
    writer = McapLogWriter(path)
    texts = ["a", "b", "c"]
    for text, t in zip(texts, [5_000, 4_000, 6_000]):  # the wall clock stepped back between a and b
        writer.write("/user/utterance", Utterance(text=text), log_time_ns=t)
    writer.close()
    with McapLogReader(path) as reader:
        got = list(reader.messages())
    assert [g.msg.text for g in got] == texts
    assert [g.log_time_ns for g in got] == [5_000, 5_000, 6_000]


# --------------------------------------------------------------------------- record then replay on the bus


def test_record_then_replay_reproduces_messages_order_and_timing(nodes, tmp_path, capsys):
    path = str(tmp_path / "run.mcap")
    robot = nodes("robot")
    pubs = {"/camera/head": robot.create_publisher("/camera/head", Image),
            "/controller/command": robot.create_publisher("/controller/command", Command),
            "/user/utterance": robot.create_publisher("/user/utterance", Utterance)}
    rng = np.random.default_rng(0)
    frames = [Image.from_array("head", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]
    assert plain(frames[0])["data"] != plain(frames[1])["data"]
    script = [  # (seconds after the first message, topic, message)
        (0.00, "/camera/head", frames[0]),
        (0.10, "/user/utterance", Utterance(text="clear the table")),
        (0.25, "/controller/command", Command(id="c1", text="pick up the red cup", skill="pick_up",
                                              args={"object": "red cup"})),
        (0.35, "/camera/head", frames[1]),
        (0.55, "/controller/command", Command(id="c2", text="stop", skill="stop")),
        (0.70, "/camera/head", frames[2]),
    ]

    record = CliThread("record", "-o", path, *pubs, "--count", str(len(script)), "--duration-s", "20")
    for topic, pub in pubs.items():
        assert pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S), f"the recorder never subscribed to {topic}"
    start = time.monotonic()
    for at, topic, msg in script:  # the timing is the data under test here
        time.sleep(max(0.0, start + at - time.monotonic()))
        pubs[topic].publish(msg)
    assert record.join() == 0
    out = capsys.readouterr().out
    assert out.startswith(f"recorded {len(script)} messages on 3 topics")

    with McapLogReader(path) as reader:
        logged = list(reader.messages())
    assert [plain(g.msg) for g in logged] == [plain(m) for _, _, m in script]
    recorded_gaps = np.diff([g.log_time_ns / 1e9 for g in logged])
    assert np.allclose(recorded_gaps, np.diff([at for at, _, _ in script]), atol=TIMING_TOLERANCE_S)

    # Replay into a fresh subscriber.
    got: list[tuple[float, str, object]] = []  # (receive time, topic, message), appended on the viewer's executor
    viewer = nodes("viewer")
    for topic, pub in pubs.items():
        viewer.create_subscription(topic, pub.msg_type, lambda m, t=topic: got.append((time.monotonic(), t, m)))
    for pub in pubs.values():  # the recorded publishers leave; replay brings its own
        pub.close()
    replay = CliThread("replay", path, "--wait-s", str(TIMEOUT_S))
    assert replay.join() == 0
    wait_until(lambda: len(got) == len(script), what="all replayed messages")
    assert f"replayed {len(script)} messages on 3 topics" in capsys.readouterr().out

    assert [t for _, t, _ in got] == [t for _, t, _ in script]
    assert [plain(m) for _, _, m in got] == [plain(m) for _, _, m in script]  # field for field, pixel for pixel
    replayed_gaps = np.diff([t for t, _, _ in got])
    assert np.allclose(replayed_gaps, recorded_gaps, atol=TIMING_TOLERANCE_S), (replayed_gaps, recorded_gaps)

    # --rate 4 keeps the order and plays four times as fast; --topics filters.
    got.clear()
    assert cli.main(["replay", path, "--rate", "4", "--topics", "/controller/command", "/user/utterance",
                     "--wait-s", str(TIMEOUT_S)]) == 0
    wait_until(lambda: len(got) == 3, what="the filtered replay")
    assert [m.text for _, _, m in got] == ["clear the table", "pick up the red cup", "stop"]
    fast_gaps = np.diff([t for t, _, _ in got])
    assert np.allclose(fast_gaps, np.array([0.15, 0.30]) / 4, atol=TIMING_TOLERANCE_S), fast_gaps


def test_record_all_picks_up_late_topics_and_closes_the_file_on_ctrl_c(nodes, tmp_path):
    path = tmp_path / "late.mcap"
    proc = subprocess.Popen([sys.executable, "-m", "robix_planner.cli", "record", "-o", str(path), "--all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        user = nodes("late_user")  # appears after the recorder started
        pub = user.create_publisher("/user/utterance", Utterance)
        sent = []

        def tick():
            sent.append(Utterance(text=str(len(sent))))
            pub.publish(sent[-1])

        assert pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S), "the recorder never found the new topic"
        connected_at = len(sent)
        user.create_timer(0.01, tick)
        wait_until(lambda: len(sent) >= connected_at + 20, what="20 messages after the recorder connected")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=TIMEOUT_S)
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "/user/utterance" in out

    with McapLogReader(path) as reader:  # a complete file: the summary was written on Ctrl-C
        texts = [g.msg.text for g in reader.messages(topics=["/user/utterance"])]
    assert len(texts) >= 10
    first = int(texts[0])
    assert texts == [str(i) for i in range(first, first + len(texts))]  # no gap, no reordering


def test_record_refuses_to_overwrite_and_replay_names_missing_topics(bus_env, tmp_path, capsys):
    path = tmp_path / "old.mcap"
    path.write_bytes(b"precious")
    assert cli.main(["record", "-o", str(path), "/x"]) == 2
    assert "exists" in capsys.readouterr().err and path.read_bytes() == b"precious"

    writer = McapLogWriter(tmp_path / "one.mcap")
    writer.write("/user/utterance", Utterance(text="hi"), log_time_ns=1)
    writer.close()
    assert cli.main(["replay", str(tmp_path / "one.mcap"), "--topics", "/camera/head"]) == 2
    err = capsys.readouterr().err
    assert "has no topic /camera/head; it has /user/utterance" in err
    assert cli.main(["replay", str(path)]) == 2
    assert "not a readable MCAP file" in capsys.readouterr().err
