"""Nodes in the ROS 2 style: publishers, subscriptions, timers, parameters, heartbeats.

A node's callbacks (subscriptions and timers) run one at a time on the node's own
executor thread, so node code needs no locks of its own. A slow callback never blocks
the bus: messages on *latest* topics are replaced by newer ones while it runs (only the
newest is delivered), messages on *reliable* topics queue in order.

    class Echo(Node):
        default_name = "echo"

        class Params(Config):
            prefix: str = "heard: "

        def __init__(self, params=None, **kw):   # kw: name, bus, bus_config, remap, node_config
            super().__init__(params=params, **kw)
            self.pub = self.create_publisher("/tts/speech", Speech)
            self.create_subscription("/user/utterance", Utterance, self.on_utterance)

        def on_utterance(self, msg: Utterance) -> None:
            self.pub.publish(Speech(id=new_id(), text=self.params.prefix + msg.text))

    spin(Echo())  # until SIGINT/SIGTERM or node.request_shutdown()
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import signal
import threading
import time
import uuid
from typing import Any, Callable, ClassVar, Optional

from robix_planner import topics, wire
from robix_planner.bus import Bus, BusConfig, Policy, Publisher, Subscription
from robix_planner.config import Config
from robix_planner.messages import Heartbeat, Message, NodeState

HEARTBEAT_TOPIC = topics.HEARTBEAT


def new_id() -> str:
    """A fresh unique id for commands, speech, requests."""
    return uuid.uuid4().hex[:12]


class NodeConfig(Config):
    """Settings every node has, besides its own Params."""

    heartbeat_period_s: float = 1.0


class Timer:
    """A periodic (or one-shot) callback on the node's executor. Cancel with :meth:`cancel`."""

    def __init__(self, node: "Node", period_s: float, callback: Callable[[], Any], oneshot: bool):
        if period_s < 0:
            raise ValueError("timer period must be >= 0")
        self.node, self.period_s, self.callback, self.oneshot = node, period_s, callback, oneshot
        self.due = time.monotonic() + period_s
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Executor:
    """Runs a node's callbacks serially on one thread; latest-only slots keep memory flat."""

    def __init__(self, node: "Node"):
        self.node = node
        self._cv = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._latest: dict[tuple[int, str], wire.Received] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._tie = itertools.count()
        self._stop = False
        self.thread: Optional[threading.Thread] = None

    def put(self, sub: Subscription, rec: wire.Received) -> None:
        with self._cv:
            if sub.policy == "latest":
                key = (id(sub), rec.src)
                if key in self._latest:
                    self.node.bus.stats.superseded += 1
                else:
                    self._queue.append((sub, key))
                self._latest[key] = rec
            else:
                self._queue.append((sub, rec))
            self._cv.notify()

    def call_soon(self, fn: Callable[[], Any]) -> None:
        with self._cv:
            self._queue.append((None, fn))
            self._cv.notify()

    def add_timer(self, timer: Timer) -> None:
        with self._cv:
            heapq.heappush(self._timers, (timer.due, next(self._tie), timer))
            self._cv.notify()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"node-{self.node.name}", daemon=True)
        self.thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout_s)

    def _next(self):
        with self._cv:
            while not self._stop:
                now = time.monotonic()
                if self._timers and self._timers[0][0] <= now:
                    _, _, timer = heapq.heappop(self._timers)
                    if timer.cancelled:
                        continue
                    if not timer.oneshot:
                        timer.due = max(timer.due + timer.period_s, now)
                        heapq.heappush(self._timers, (timer.due, next(self._tie), timer))
                    return None, timer.callback
                if self._queue:
                    sub, item = self._queue.popleft()
                    if sub is None:
                        return None, item
                    if sub.policy == "latest":
                        item = self._latest.pop(item)
                    return sub, item
                wait = self._timers[0][0] - now if self._timers else None
                self._cv.wait(wait)
            return None, None

    def _run(self) -> None:
        log = self.node.log
        while True:
            sub, item = self._next()
            if item is None:
                return
            try:
                if sub is None:
                    item()
                else:
                    self.node._callbacks[id(sub)](item.msg)
            except Exception:
                self.node.bus.stats.callback_errors += 1
                log.exception("callback failed (%s)", sub.topic if sub is not None else "timer")


class Node:
    """A unit of computation on the bus. Subclass it, or use it directly.

    ``bus``: share a :class:`Bus` between nodes of one process; if omitted the node makes
    its own and closes it on shutdown. ``remap``: topic renames applied to every
    publisher and subscription (``{"/camera/head": "/robot1/camera/head"}``).
    """

    #: Subclasses set this to their parameter class (a :class:`Config`).
    Params: ClassVar[Optional[type[Config]]] = None
    #: The node's name when none is given.
    default_name: ClassVar[str] = ""

    def __init__(self, name: Optional[str] = None, *, params: Optional[Config] = None, bus: Optional[Bus] = None,
                 bus_config: Optional[BusConfig] = None, remap: Optional[dict[str, str]] = None,
                 node_config: Optional[NodeConfig] = None):
        name = name or self.default_name
        if not name or "/" in name or any(c.isspace() for c in name):
            raise ValueError(f"node name {name!r} must be non-empty with no '/' or spaces")
        self.name = name
        if params is None and self.Params is not None:
            params = self.Params()
        self.params = params
        self.node_config = node_config or NodeConfig()
        self.log = logging.getLogger(f"robix.node.{name}")
        self._owns_bus = bus is None
        self.bus = bus if bus is not None else Bus(bus_config, name=name)
        self.remap = dict(remap or {})
        self._publishers: list[Publisher] = []
        self._subscriptions: list[Subscription] = []
        self._callbacks: dict[int, Callable[[Message], Any]] = {}
        self._executor = _Executor(self)
        self._started = time.monotonic()
        self._state = NodeState.STARTING
        self._shutdown = threading.Event()
        self.exit_code = 0
        self.on_shutdown_requested: Optional[Callable[["Node"], None]] = None
        self._shutdown_callbacks: list[Callable[[], Any]] = []
        self.bus.add_node(name)
        self._hb_pub = self.create_publisher(HEARTBEAT_TOPIC, Heartbeat)
        if self.node_config.heartbeat_period_s > 0:
            self.create_timer(self.node_config.heartbeat_period_s, self._heartbeat)

    # ---- graph
    def resolve(self, topic: str) -> str:
        return self.remap.get(topic, topic)

    def create_publisher(self, topic: str, msg_type: type[Message], *, policy: Optional[Policy] = None,
                         latched: bool = False, shm: Optional[bool] = None) -> Publisher:
        """A publisher on ``topic`` (resolved in the node's namespace); see :meth:`Bus.publisher` for
        ``policy``, ``latched`` and ``shm`` (None: per ``bus.shm``; False: never shared memory)."""
        pub = self.bus.publisher(self.resolve(topic), msg_type, node=self.name, policy=policy, latched=latched,
                                 shm=shm)
        self._publishers.append(pub)
        return pub

    def create_subscription(self, topic: str, msg_type: type[Message], callback: Callable[[Any], Any], *,
                            policy: Optional[Policy] = None) -> Subscription:
        sub = self.bus.subscribe(self.resolve(topic), msg_type, self._executor.put, node=self.name, policy=policy)
        self._callbacks[id(sub)] = callback
        self._subscriptions.append(sub)
        return sub

    def create_timer(self, period_s: float, callback: Callable[[], Any], *, oneshot: bool = False) -> Timer:
        timer = Timer(self, period_s, callback, oneshot)
        self._executor.add_timer(timer)
        return timer

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on this node's executor (thread-safe; for input threads and tests)."""
        self._executor.call_soon(fn)

    # ---- lifecycle
    def start(self) -> "Node":
        """Start the executor thread (idempotent). :func:`spin` calls this."""
        if self._executor.thread is None:
            self._state = NodeState.ACTIVE
            self._executor.start()
            self.on_start()
            self._heartbeat()
        return self

    def on_start(self) -> None:
        """Hook: runs once when the node starts (on the caller's thread)."""

    def on_shutdown(self) -> None:
        """Hook: runs once before the node's sockets close."""

    def add_shutdown_callback(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` at shutdown, after :meth:`on_shutdown` and while the sockets are still open
        (helpers composed into a node, such as a CommandServer, finish their work here)."""
        self._shutdown_callbacks.append(fn)

    def request_shutdown(self, exit_code: int = 0) -> None:
        """Ask :func:`spin` to take the process down (e.g. a node that finished its job)."""
        self.exit_code = exit_code
        self._shutdown.set()
        if self.on_shutdown_requested is not None:
            self.on_shutdown_requested(self)

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown.is_set()

    def shutdown(self) -> None:
        """Stop callbacks, publish a last heartbeat, close sockets. Idempotent."""
        if self._state is NodeState.SHUTTING_DOWN:
            return
        self._state = NodeState.SHUTTING_DOWN
        for fn in [self.on_shutdown, *self._shutdown_callbacks]:
            try:
                fn()
            except Exception:
                self.log.exception("shutdown callback %r failed", fn)
        self._executor.stop()
        try:
            self._heartbeat()
        except Exception:  # the bus may already be gone
            pass
        for sub in self._subscriptions:
            sub.close()
        for pub in self._publishers:
            pub.close()
        self.bus.remove_node(self.name)
        if self._owns_bus:
            self.bus.close()

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _heartbeat(self) -> None:
        self._hb_pub.publish(Heartbeat(node=self.name, pid=os.getpid(), state=self._state,
                                       uptime_s=time.monotonic() - self._started,
                                       stats=self.bus.stats.as_dict()))


def spin(*nodes: Node, handle_signals: bool = True, timeout_s: Optional[float] = None) -> int:
    """Run nodes until SIGINT/SIGTERM, a node's :meth:`Node.request_shutdown`, or ``timeout_s``.

    Returns the exit code: the first non-zero code a node requested, else 0. Every node is
    shut down (sockets closed) before it returns, whatever happened.
    """
    stop = threading.Event()
    old = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        def _on_signal(signum, _frame):
            logging.getLogger(__name__).info("received %s, shutting down", signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, _on_signal)
    for node in nodes:
        node.on_shutdown_requested = lambda _n: stop.set()
    try:
        for node in nodes:
            node.start()
        if any(n.shutdown_requested for n in nodes):
            stop.set()
        stop.wait(timeout_s)
    finally:
        for node in reversed(nodes):
            node.shutdown()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return next((n.exit_code for n in nodes if n.exit_code), 0)
