"""Nodes: timers, the serial executor, failing callbacks, heartbeats, remapping, shutdown and signals."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from waiting import wait_until

from robix_planner.bus import Bus, read_graph
from robix_planner.messages import Heartbeat, Image, NodeState, Utterance
from robix_planner.node import HEARTBEAT_TOPIC, Node, NodeConfig, spin

TIMEOUT_S = 5.0


def quiet(name: str, bus_config, **kw) -> Node:
    return Node(name, bus_config=bus_config, node_config=kw.pop("node_config", NodeConfig(heartbeat_period_s=0)), **kw)


@pytest.fixture
def node(bus_config):
    n = quiet("unit", bus_config)
    yield n
    n.shutdown()


def test_timers_fire_periodically_once_and_stop_when_cancelled(node):
    ticks, once, cancelled = [], [], []
    created = time.monotonic()
    node.create_timer(0.01, lambda: ticks.append(time.monotonic()))
    node.create_timer(0.02, lambda: once.append(1), oneshot=True)
    timer = node.create_timer(0.01, lambda: cancelled.append(1))
    timer.cancel()
    node.start()
    wait_until(lambda: len(ticks) >= 10, what="ten ticks")
    time.sleep(0.05)
    assert once == [1]
    assert cancelled == []
    # Periodic, not a burst: tick k never comes before its due time (k + 1) periods after creation.
    assert all(t - created >= (k + 1) * 0.01 for k, t in enumerate(ticks))


def test_callbacks_run_one_at_a_time_on_one_thread(node, bus_config):
    threads: set[int] = set()
    active = [0]
    overlaps = [0]
    done = threading.Event()
    calls = [0]

    def callback(*_):
        threads.add(threading.get_ident())
        active[0] += 1
        if active[0] > 1:
            overlaps[0] += 1
        time.sleep(0.002)
        active[0] -= 1
        calls[0] += 1
        if calls[0] >= 60:
            done.set()

    node.create_subscription("/chat", Utterance, callback)
    node.create_timer(0.001, callback)
    node.create_timer(0.003, callback)
    node.start()
    talker = quiet("talker", bus_config)
    try:
        pub = talker.create_publisher("/chat", Utterance)
        assert pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
        for i in range(30):
            pub.publish(Utterance(text=str(i)))
        assert done.wait(TIMEOUT_S)
    finally:
        talker.shutdown()
    assert overlaps[0] == 0
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_a_failing_callback_is_logged_and_counted_and_the_node_keeps_working(node, bus_config, caplog):
    got: queue.Queue = queue.Queue()

    def callback(msg: Utterance) -> None:
        if msg.text == "boom":
            raise RuntimeError("callback exploded")
        got.put(msg.text)

    node.create_subscription("/chat", Utterance, callback)
    node.create_timer(0.01, lambda: 1 / 0, oneshot=True)
    node.start()
    talker = quiet("talker", bus_config)
    try:
        pub = talker.create_publisher("/chat", Utterance)
        assert pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
        pub.publish(Utterance(text="boom"))
        pub.publish(Utterance(text="after"))
        assert got.get(timeout=TIMEOUT_S) == "after"
        wait_until(lambda: node.bus.stats.callback_errors == 2, what="both failures to be counted")
    finally:
        talker.shutdown()
    assert "callback exploded" in caplog.text and "ZeroDivisionError" in caplog.text
    assert "callback failed (/chat)" in caplog.text and "callback failed (timer)" in caplog.text


def test_heartbeats_carry_the_node_state_and_bus_stats(bus_config):
    monitor = quiet("monitor", bus_config)
    beats: queue.Queue[Heartbeat] = queue.Queue()
    monitor.create_subscription(HEARTBEAT_TOPIC, Heartbeat, beats.put)
    monitor.start()
    beating = Node("beating", bus_config=bus_config, node_config=NodeConfig(heartbeat_period_s=0.05))
    beating.bus.stats.protocol_errors = 7  # as if a peer had sent garbage
    beating.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        mine = []
        while len(mine) < 3:
            hb = beats.get(timeout=max(0.0, deadline - time.monotonic()))
            if hb.node == "beating":
                mine.append(hb)
    finally:
        beating.shutdown()
        monitor.shutdown()
    hb = mine[-1]
    assert hb.state is NodeState.ACTIVE
    assert hb.pid > 0 and hb.uptime_s > 0
    assert hb.stats["protocol_errors"] == 7
    assert hb.stats["published"] >= 3
    assert set(hb.stats) >= {"received", "gaps", "duplicates", "callback_errors"}
    assert mine[0].uptime_s < mine[-1].uptime_s


def test_remapping_renames_published_and_subscribed_topics(bus_config):
    robot = quiet("robot", bus_config, remap={"/camera/head": "/robot1/camera/head", "/cmd": "/robot1/cmd"})
    got: queue.Queue = queue.Queue()
    robot.create_subscription("/cmd", Utterance, got.put)
    cam = robot.create_publisher("/camera/head", Image)
    robot.start()
    other = quiet("other", bus_config)
    try:
        assert cam.topic == "/robot1/camera/head"
        entry = next(e for e in read_graph(robot.bus.root) if "robot" in e.nodes)
        assert {s.topic for s in entry.subscriptions} == {"/robot1/cmd"}
        pub = other.create_publisher("/robot1/cmd", Utterance)
        unmapped = other.create_publisher("/cmd", Utterance)
        assert pub.wait_for_subscribers(1, timeout_s=TIMEOUT_S)
        unmapped.publish(Utterance(text="wrong topic"))
        pub.publish(Utterance(text="right topic"))
        assert got.get(timeout=TIMEOUT_S).text == "right topic"
        assert unmapped.subscriber_count == 0
    finally:
        other.shutdown()
        robot.shutdown()


def test_spin_returns_when_a_node_requests_shutdown_and_closes_everything(bus_config):
    node = quiet("finisher", bus_config)
    node.create_timer(0.05, lambda: node.request_shutdown(3), oneshot=True)
    graph_file = node.bus.root / f"{node.bus.id}.json"
    assert graph_file.exists()
    t0 = time.monotonic()
    assert spin(node, handle_signals=False, timeout_s=TIMEOUT_S) == 3
    assert time.monotonic() - t0 < 2.0
    assert not graph_file.exists()  # the bus closed and removed its registration
    assert not node.bus._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        node.create_publisher("/late", Utterance)


def test_spin_leaves_a_shared_bus_open(bus_config):
    with Bus(bus_config) as bus:
        node = Node("guest", bus=bus, node_config=NodeConfig(heartbeat_period_s=0))
        node.create_timer(0.01, node.request_shutdown, oneshot=True)
        assert spin(node, handle_signals=False, timeout_s=TIMEOUT_S) == 0
        assert read_graph(bus.root)[0].nodes == []
        bus.publisher("/still/open", Utterance)  # the bus belongs to its creator, not the node


def test_node_names_are_checked(bus_config):
    for bad in ("", "a/b", "two words"):
        with pytest.raises(ValueError, match="node name"):
            Node(bad, bus_config=bus_config)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_node_process_exits_cleanly_on_signals(bus_env, bus_config, sig):
    """`robix run` a camera node; it is publishing; a signal takes it down with exit code 0 and no leftovers."""
    watcher = quiet("watcher", bus_config)
    frames: queue.Queue = queue.Queue()
    watcher.create_subscription("/camera/head", Image, frames.put)
    watcher.start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "robix_planner.cli", "run", "robix_planner.demo:CameraNode", "params.rate_hz=50",
         "bus.discovery_period_s=0.02"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        frame = frames.get(timeout=15)  # the node is up and publishing
        assert frame.camera == "head"
        entries = [e for e in read_graph(watcher.bus.root) if e.pid == proc.pid]
        assert len(entries) == 1 and entries[0].nodes == ["camera"]
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        watcher.shutdown()
    assert proc.returncode == 0, stderr
    assert took < 3.0
    assert f"received {sig.name}, shutting down" in stderr
    assert "Traceback" not in stderr
    # Bus.close() ran: the registration is gone (nobody had to prune it) and no socket file remains.
    root = watcher.bus.root
    assert sorted(p.name for p in root.iterdir()) == []
