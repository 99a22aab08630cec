"""The Robix bus: topic publish/subscribe over ZeroMQ, brokerless, with discovery by directory.

Topology (specified in docs/protocol.md):

* every publisher owns one ZeroMQ XPUB socket bound to an ephemeral loopback port
  (``tcp://127.0.0.1:*``, or an ``ipc://`` path); data flows straight from publisher to
  subscriber, with no broker hop;
* every process (one :class:`Bus`, shared by all nodes in it) registers its publishers and
  subscriptions as one JSON file in the *graph directory*
  ``$ROBIX_GRAPH_DIR/<domain>/`` and scans that directory to find the endpoints of the
  topics it subscribes to; stale files of dead processes are removed;
* one IO thread per bus owns every SUB socket, validates what arrives
  (:func:`robix_planner.wire.decode`), and hands messages to the subscriptions;
* large blobs of *latest* publishers travel through shared memory when every subscriber is
  on this host and says it reads shared memory (:mod:`robix_planner.shm`); the rest of the
  message still goes over the publisher's socket.

Delivery policies, per topic (by default from the message class):

* ``latest``: camera frames, heartbeats. Small queues; a slow subscriber gets the newest
  message of each publisher, never a backlog.
* ``reliable``: commands, statuses, utterances, speech. Large queues and sequence numbers
  per publisher: gaps are detected, counted and reported; duplicates are dropped.
  End-to-end acknowledgement of commands lives in :mod:`robix_planner.controller`.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import socket as _socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import msgspec
import zmq

from robix_planner import shm, wire
from robix_planner.config import Config, ConfigError, env
from robix_planner.messages import PROTOCOL_VERSION, Message, type_name

log = logging.getLogger(__name__)

Policy = Literal["latest", "reliable"]


class BusConfig(Config):
    """How a process joins the bus."""

    #: Nodes only see nodes of the same domain (like ROS_DOMAIN_ID). Default: $ROBIX_DOMAIN or "default".
    domain: Optional[str] = None
    #: Where processes register. Default: $ROBIX_GRAPH_DIR, else $XDG_RUNTIME_DIR/robix, else /tmp/robix-<uid>.
    graph_dir: Optional[str] = None
    #: "tcp" (loopback ports) or "ipc" (unix sockets in the graph directory).
    transport: Literal["tcp", "ipc"] = "tcp"
    #: Address publishers bind to. Loopback by default; set an interface address to accept remote peers.
    host: str = "127.0.0.1"
    #: How often the graph directory is scanned for new publishers.
    discovery_period_s: float = 0.1
    #: Queue bounds (messages) per socket and policy.
    reliable_hwm: int = 10000
    latest_hwm: int = 2
    #: Size limits on what is accepted from a peer.
    max_header_bytes: int = wire.DEFAULT_MAX_HEADER_BYTES
    max_blob_bytes: int = wire.DEFAULT_MAX_BLOB_BYTES
    #: Shared-memory blobs (docs/protocol.md section 15). "auto": this process reads them, and its
    #: latest-policy publishers send blobs of >= shm_min_bytes through a ring in /dev/shm when they
    #: are bound to loopback or ipc and every subscriber of the topic is on this host and reads
    #: them; "off": neither (every blob travels in a ZeroMQ frame).
    shm: Literal["auto", "off"] = "auto"
    shm_min_bytes: int = 64 * 1024
    #: Slots per publisher ring (a slot is rewritten only when no subscriber holds it).
    shm_slots: int = 8


def graph_root(cfg: BusConfig) -> Path:
    base = cfg.graph_dir or env("ROBIX_GRAPH_DIR")
    if base is None:
        runtime = env("XDG_RUNTIME_DIR")
        base = os.path.join(runtime, "robix") if runtime else os.path.join(tempfile.gettempdir(), f"robix-{os.getuid()}")
    return Path(base) / (cfg.domain or env("ROBIX_DOMAIN", "default"))


# --------------------------------------------------------------------------- graph entries


class PublisherEntry(msgspec.Struct, kw_only=True):
    topic: str
    type: str
    endpoint: str
    node: str
    policy: str
    id: str


class SubscriptionEntry(msgspec.Struct, kw_only=True):
    topic: str
    type: str
    node: str
    policy: str
    #: This subscription's process reads shared-memory blob descriptors (protocol section 15).
    shm: bool = False


class GraphEntry(msgspec.Struct, kw_only=True):
    """One process's registration file in the graph directory (JSON)."""

    protocol: int
    bus: str
    pid: int
    host: str
    nodes: list[str] = []
    publishers: list[PublisherEntry] = []
    subscriptions: list[SubscriptionEntry] = []
    stamp_ns: int = 0


_graph_decoder = msgspec.json.Decoder(GraphEntry)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_graph(root: Path, *, prune: bool = True) -> list[GraphEntry]:
    """Every live process registered under ``root``; files of dead processes are removed."""
    entries = []
    try:
        names = [e for e in os.scandir(root) if e.name.endswith(".json")]
    except FileNotFoundError:
        return []
    for item in names:
        try:
            entry = _graph_decoder.decode(Path(item.path).read_bytes())
        except FileNotFoundError:
            continue
        except (msgspec.DecodeError, msgspec.ValidationError, OSError) as exc:
            log.debug("ignoring unreadable graph file %s: %s", item.path, exc)
            continue
        if entry.host == _socket.gethostname() and not _pid_alive(entry.pid):
            if prune:
                try:
                    os.unlink(item.path)
                    log.info("removed stale graph entry of dead pid %d", entry.pid)
                except FileNotFoundError:
                    pass
                if shm.remove_segments(entry.bus):
                    log.info("removed shared-memory segments of dead pid %d", entry.pid)
            continue
        entries.append(entry)
    return entries


# --------------------------------------------------------------------------- stats


@dataclass
class BusStats:
    """Counters a node reports in its heartbeat."""

    published: int = 0
    received: int = 0
    protocol_errors: int = 0
    gaps: int = 0  # messages known lost on reliable topics (sequence jumps)
    duplicates: int = 0  # reliable messages seen twice and dropped
    superseded: int = 0  # latest-only messages replaced by a newer one before delivery
    callback_errors: int = 0
    type_mismatches: int = 0
    shm_published: int = 0  # messages whose blobs this process sent through shared memory
    shm_received: int = 0  # messages whose blobs this process read from shared memory
    shm_stale: int = 0  # shared-memory blobs overwritten by newer ones before they were read: dropped

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- publisher


class Publisher:
    """Publishes one message type on one topic. Thread-safe. Create with :meth:`Bus.publisher`."""

    def __init__(self, bus: "Bus", topic: str, msg_type: type[Message], *, node: str, policy: Policy, latched: bool,
                 shm_ring: bool = False):
        self.bus, self.topic, self.msg_type, self.node, self.policy, self.latched = (
            bus, topic, msg_type, node, policy, latched)
        self.id = uuid.uuid4().hex[:16]
        self._lock = threading.Lock()
        self._seq = 0
        self._subscribers = 0
        self._last: Optional[list] = None
        self._topic_b = topic.encode()
        # Shared-memory blobs: a ring, and how many SUB sockets the graph says may connect, all
        # of them able to read it (0: some cannot, or none known). Set by the bus IO thread.
        self._ring: Optional[shm.ShmRing] = (
            shm.ShmRing(bus.id, self.id, slots=bus.config.shm_slots, min_bytes=bus.config.shm_min_bytes)
            if shm_ring else None)
        self._shm_peers = 0
        sock = bus.ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every subscribe and unsubscribe reaches us
        sock.setsockopt(zmq.SNDHWM, bus.config.reliable_hwm if policy == "reliable" else bus.config.latest_hwm)
        sock.setsockopt(zmq.RCVHWM, 1000)
        self.endpoint = bus._bind(sock)
        self._sock = sock

    def _drain_subscriptions(self) -> bool:
        """Read pending (un)subscribe notices. Caller holds the lock. True if someone new subscribed."""
        new = False
        while True:
            try:
                note = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return new
            if note[1:] != self._topic_b:
                continue
            if note[:1] == b"\x01":
                self._subscribers += 1
                new = True
            elif note[:1] == b"\x00":
                self._subscribers = max(0, self._subscribers - 1)

    def publish(self, msg: Message) -> int:
        """Send ``msg``; returns its sequence number. Never blocks (full queues drop, see policies)."""
        if not isinstance(msg, self.msg_type):
            raise TypeError(f"{self.topic} carries {self.msg_type.__name__}, not {type(msg).__name__}")
        with self._lock:
            if self._sock is None:
                raise RuntimeError(f"publisher on {self.topic} is closed")
            self._seq += 1
            self._drain_subscriptions()
            # Every connected SUB socket must be one the graph lists as able to read shared memory.
            ring = self._ring if self._ring is not None and 0 < self._subscribers <= self._shm_peers else None
            written = ring.written if ring is not None else 0
            frames = wire.encode(self.topic, msg, src=self.id, seq=self._seq, shm=ring.put if ring else None)
            self._sock.send_multipart(frames, copy=False)
            if self.latched:
                self._last = frames
            self.bus.stats.published += 1
            if ring is not None and ring.written != written:
                self.bus.stats.shm_published += 1
            return self._seq

    def service(self) -> None:
        """Re-send a latched message to subscribers that arrived since (called by the IO thread)."""
        with self._lock:
            if self._sock is not None and self._drain_subscriptions() and self._last is not None:
                self._sock.send_multipart(self._last, copy=False)  # same seq: old subscribers drop it

    def loan(self, shape: tuple[int, ...]):
        """A writable ``uint8`` numpy array of ``shape`` to fill and publish without a copy.

        While this publisher uses shared memory (:attr:`uses_shm`) the array is a slot of its
        ring: write the pixels into it (``cv2.cvtColor(raw, code, dst=frame)``, ``np.copyto``,
        a camera SDK's buffer argument) and publish it, e.g. ``Image.from_array("head", frame)``:
        it goes out with no copy. Otherwise (or with every slot busy) it is a plain array and
        is sent as a frame. Do not write to it after publishing (it is made read-only); an array
        dropped unpublished gives its slot back.
        """
        with self._lock:
            if self._sock is not None and self._ring is not None and 0 < self._subscribers <= self._shm_peers:
                array = self._ring.loan(tuple(shape))
                if array is not None:
                    return array
        import numpy as np

        return np.empty(shape, dtype=np.uint8)

    @property
    def uses_shm(self) -> bool:
        """Whether large blobs published now go through shared memory (section 15 of docs/protocol.md)."""
        with self._lock:
            if self._sock is None or self._ring is None or self._ring.failed:
                return False
            self._drain_subscriptions()
            return 0 < self._subscribers <= self._shm_peers

    @property
    def shm_segment(self) -> Optional[str]:
        """Path of this publisher's shared-memory segment, once it has one."""
        name = self._ring.name if self._ring is not None else None
        return shm.segment_path(name) if name else None

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            if self._sock is not None:
                self._drain_subscriptions()
            return self._subscribers

    def wait_for_subscribers(self, count: int = 1, timeout_s: float = 2.0) -> bool:
        """Block until ``count`` subscribers are connected (their subscription arrived), or time out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.subscriber_count >= count:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(0.005, remaining))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None
            if self._ring is not None:
                self._ring.close()
        self.bus._remove_publisher(self)


# --------------------------------------------------------------------------- subscription


Deliver = Callable[["Subscription", wire.Received], None]


class Subscription:
    """Receives one message type on one topic. Create with :meth:`Bus.subscribe`.

    ``deliver(subscription, received)`` is called on the bus IO thread and must return
    fast; :class:`robix_planner.node.Node` queues the message for its own executor.
    """

    def __init__(self, bus: "Bus", topic: str, msg_type: type[Message], deliver: Deliver, *, node: str, policy: Policy):
        self.bus, self.topic, self.msg_type, self.deliver, self.node, self.policy = (
            bus, topic, msg_type, deliver, node, policy)
        self.type_name = type_name(msg_type)

    def close(self) -> None:
        self.bus._remove_subscription(self)


class _TopicSocket:
    """One SUB socket per (topic, policy) in a bus, shared by its subscriptions. IO thread only."""

    def __init__(self, bus: "Bus", topic: str, policy: Policy):
        self.topic = topic
        self.policy = policy
        self.sock = bus.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, bus.config.reliable_hwm if policy == "reliable" else bus.config.latest_hwm)
        # A peer that announces a frame larger than this is disconnected by libzmq before
        # anything is allocated (a header "claiming 4 GiB").
        self.sock.setsockopt(zmq.MAXMSGSIZE, bus.config.max_blob_bytes + bus.config.max_header_bytes)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.endpoints: set[str] = set()
        self.last_seq: dict[str, int] = {}


# --------------------------------------------------------------------------- bus


class Bus:
    """One process's connection to the bus. Nodes in the same process share one.

    Use as a context manager or call :meth:`close`. All sockets close with ``linger=0``.
    """

    def __init__(self, config: Optional[BusConfig] = None, *, name: str = ""):
        self.config = config or BusConfig()
        if self.config.discovery_period_s <= 0:
            raise ConfigError("bus.discovery_period_s must be > 0")
        if not 1 <= self.config.shm_slots <= wire.SHM_MAX_SLOTS:
            raise ConfigError(f"bus.shm_slots must be 1..{wire.SHM_MAX_SLOTS}, got {self.config.shm_slots}")
        #: This process reads shared-memory blobs (and says so in its subscriptions' graph entries).
        self.shm_reads = self.config.shm == "auto" and shm.supported()
        #: Its latest publishers may send them: only where every peer is on this host.
        self.shm_writes = self.shm_reads and (self.config.transport == "ipc" or _is_loopback(self.config.host))
        self._shm_reader = shm.ShmReader(max_blob_bytes=self.config.max_blob_bytes) if self.shm_reads else None
        self.root = graph_root(self.config)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.id = uuid.uuid4().hex[:12]
        self.name = name
        self.ctx = zmq.Context()
        self.stats = BusStats()
        self._lock = threading.RLock()
        self._publishers: list[Publisher] = []
        self._subs: list[Subscription] = []
        self._nodes: list[str] = []
        self._sockets: dict[tuple[str, str], _TopicSocket] = {}
        self._dirty = threading.Event()  # subscriptions changed: IO thread must (re)build sockets
        self._graph_changed = True
        self._closed = threading.Event()
        self._file = self.root / f"{self.id}.json"
        self._errors_logged = 0
        self._write_entry()
        self._thread = threading.Thread(target=self._io_loop, name=f"robix-bus-{self.id[:6]}", daemon=True)
        self._thread.start()

    # ---- context manager
    def __enter__(self) -> "Bus":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- registration
    def add_node(self, name: str) -> None:
        with self._lock:
            self._nodes.append(name)
        self._write_entry()

    def remove_node(self, name: str) -> None:
        with self._lock:
            if name in self._nodes:
                self._nodes.remove(name)
        self._write_entry()

    def _bind(self, sock: zmq.Socket) -> str:
        if self.config.transport == "ipc":
            path = self.root / f"{self.id}-{uuid.uuid4().hex[:8]}.sock"
            sock.bind(f"ipc://{path}")
        else:
            sock.bind(f"tcp://{self.config.host}:*")
        return sock.getsockopt(zmq.LAST_ENDPOINT).decode()

    def publisher(self, topic: str, msg_type: type[Message], *, node: str = "", policy: Optional[Policy] = None,
                  latched: bool = False, shm: Optional[bool] = None) -> Publisher:
        """Create a publisher. ``latched``: new subscribers get the last message (like ROS transient-local).

        ``shm``: whether large blobs may go through shared memory (only for ``latest``, not latched,
        message types with blobs). None: per ``bus.shm`` (on for loopback and ipc publishers);
        False: never; True: also when bound to another address (still only to local peers that read it).
        """
        _check_topic(topic)
        self._check_open()
        policy = policy or msg_type.default_policy
        ring = (bool(msg_type.blob_fields) and policy == "latest" and not latched and self.shm_reads
                and (self.shm_writes if shm is None else shm))
        pub = Publisher(self, topic, msg_type, node=node or self.name, policy=policy, latched=latched, shm_ring=ring)
        with self._lock:
            self._publishers.append(pub)
        self._write_entry()
        return pub

    def subscribe(self, topic: str, msg_type: type[Message], deliver: Deliver, *, node: str = "",
                  policy: Optional[Policy] = None) -> Subscription:
        """Create a subscription; ``deliver`` runs on the IO thread (keep it short)."""
        _check_topic(topic)
        self._check_open()
        sub = Subscription(self, topic, msg_type, deliver, node=node or self.name,
                           policy=policy or msg_type.default_policy)
        with self._lock:
            self._subs.append(sub)
        self._write_entry()
        self._dirty.set()
        return sub

    def _remove_publisher(self, pub: Publisher) -> None:
        with self._lock:
            if pub in self._publishers:
                self._publishers.remove(pub)
        if not self._closed.is_set():
            self._write_entry()

    def _remove_subscription(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
        if not self._closed.is_set():
            self._write_entry()
            self._dirty.set()

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise RuntimeError("the bus is closed")

    def _write_entry(self) -> None:
        with self._lock:
            entry = GraphEntry(
                protocol=PROTOCOL_VERSION, bus=self.id, pid=os.getpid(), host=_socket.gethostname(),
                nodes=list(self._nodes),
                publishers=[PublisherEntry(topic=p.topic, type=type_name(p.msg_type), endpoint=p.endpoint,
                                           node=p.node, policy=p.policy, id=p.id) for p in self._publishers],
                subscriptions=[SubscriptionEntry(topic=s.topic, type=s.type_name, node=s.node, policy=s.policy,
                                                 shm=self.shm_reads)
                               for s in self._subs],
                stamp_ns=time.time_ns(),
            )
            tmp = self._file.with_suffix(".tmp")
            tmp.write_bytes(msgspec.json.encode(entry))
            os.replace(tmp, self._file)  # atomic: readers never see half a file

    # ---- IO thread
    def _sync_sockets(self, poller: zmq.Poller) -> None:
        with self._lock:
            wanted = {(s.topic, s.policy) for s in self._subs}
        for key in list(self._sockets):
            if key not in wanted:
                ts = self._sockets.pop(key)
                poller.unregister(ts.sock)
                ts.sock.close(linger=0)
        for key in wanted:
            if key not in self._sockets:
                ts = _TopicSocket(self, *key)
                self._sockets[key] = ts
                poller.register(ts.sock, zmq.POLLIN)
        self._graph_changed = True

    def _discover(self) -> None:
        graph = read_graph(self.root)
        by_topic: dict[str, list[PublisherEntry]] = collections.defaultdict(list)
        for entry in graph:
            for p in entry.publishers:
                by_topic[p.topic].append(p)
        self._negotiate_shm(graph)
        if self._shm_reader is not None:
            self._shm_reader.prune()
        with self._lock:
            types = {(s.topic, s.policy): s.type_name for s in self._subs}
        for key, ts in list(self._sockets.items()):
            want_type = types.get(key)
            if want_type is None:
                continue  # its subscription just closed; the socket goes at the next sync
            endpoints = set()
            for p in by_topic.get(ts.topic, ()):
                if p.type != want_type:
                    self.stats.type_mismatches += 1
                    log.error("%s: publisher %s sends %s but this node expects %s; not connecting",
                              ts.topic, p.node, p.type, want_type)
                    continue
                endpoints.add(p.endpoint)
            if ts.endpoints - endpoints:
                # A publisher left. Rebuild the socket rather than disconnect(): after libzmq
                # has dropped a peer itself (e.g. an oversized frame), disconnect() of that
                # endpoint can tear down a different, healthy connection (libzmq #4196).
                self._drain(ts)
                ts = self._rebuild(key, ts)
            for ep in endpoints - ts.endpoints:
                ts.sock.connect(ep)
            ts.endpoints = endpoints

    def _negotiate_shm(self, graph: list[GraphEntry]) -> None:
        """For each shared-memory publisher here: may the graph's subscribers of its topic read it?

        A publisher uses shared memory only while every SUB socket connected to it is one of
        those counted here (Publisher.publish compares with its XPUB subscriber count), so a
        subscriber that cannot read it, or that is not in the graph, gets frames.
        """
        with self._lock:
            pubs = [p for p in self._publishers if p._ring is not None]
        if not pubs:
            return
        host = _socket.gethostname()
        for pub in pubs:
            want = type_name(pub.msg_type)
            sockets: set[tuple[str, str]] = set()
            able = True
            for entry in graph:
                for s in entry.subscriptions:
                    if s.topic != pub.topic or s.type != want:
                        continue  # another type does not connect (type mismatch)
                    if not s.shm or entry.host != host:
                        able = False
                    sockets.add((entry.bus, s.policy))  # one SUB socket per (process, topic, policy)
            pub._shm_peers = len(sockets) if able else 0

    def _rebuild(self, key: tuple[str, str], old: _TopicSocket) -> _TopicSocket:
        ts = _TopicSocket(self, *key)
        ts.last_seq = old.last_seq  # keep duplicate/gap tracking across the rebuild
        self._poller.unregister(old.sock)
        old.sock.close(linger=0)
        self._poller.register(ts.sock, zmq.POLLIN)
        self._sockets[key] = ts
        return ts

    def _io_loop(self) -> None:
        poller = self._poller = zmq.Poller()
        next_scan = 0.0
        period = self.config.discovery_period_s
        try:
            while not self._closed.is_set():
                if self._dirty.is_set():
                    self._dirty.clear()
                    self._sync_sockets(poller)
                now = time.monotonic()
                if now >= next_scan:
                    self._discover()
                    next_scan = now + period
                    with self._lock:
                        latched = [p for p in self._publishers if p.latched]
                    for p in latched:
                        p.service()
                timeout_ms = max(1, int(min(period, 0.02) * 1000))
                if not self._sockets:  # zmq's poll returns at once with nothing registered: don't spin
                    self._closed.wait(timeout_ms / 1000)
                    continue
                for sock, _ in poller.poll(timeout_ms):
                    ts = next(t for t in self._sockets.values() if t.sock is sock)
                    self._drain(ts)
        except Exception:  # a bug here would silently stop all delivery: make it loud
            log.exception("bus IO thread died")
            raise
        finally:
            for ts in self._sockets.values():
                ts.sock.close(linger=0)
            self._sockets.clear()

    def _drain(self, ts: _TopicSocket, budget: int = 256) -> None:
        batch: list[wire.Received] = []
        for _ in range(budget):
            try:
                frames = ts.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                rec = wire.decode(frames, max_header_bytes=self.config.max_header_bytes,
                                  max_blob_bytes=self.config.max_blob_bytes, allow_shm=self.shm_reads)
            except wire.ProtocolError as exc:
                self._protocol_error(ts.topic, str(exc))
                continue
            except Exception as exc:  # a decoder bug must not stop all delivery in this process
                log.exception("unexpected error decoding a message on %s", ts.topic)
                self._protocol_error(ts.topic, f"{type(exc).__name__}: {exc}")
                continue
            if rec.topic != ts.topic:
                continue  # ZeroMQ filters by prefix; "/cam" also matches "/camera"
            batch.append(rec)
        newest: dict[str, int] = {}
        if ts.policy == "latest":
            # Shared-memory descriptors are small, so many can queue in the kernel's socket
            # buffers where frames of pixels could not: read only the newest of each publisher
            # (the older ones' slots are likely rewritten already: each read would be stale).
            newest = {rec.src: i for i, rec in enumerate(batch) if rec.shm}
        for i, rec in enumerate(batch):
            if rec.shm and newest and newest.get(rec.src, i) != i:
                self.stats.superseded += 1
                continue
            self._accept(ts, rec)

    def _accept(self, ts: _TopicSocket, rec: wire.Received) -> None:
        last = ts.last_seq.get(rec.src)
        if last is not None and rec.seq <= last:
            self.stats.duplicates += 1  # a re-send (latched, or a re-delivery): deliver once
            return
        if rec.shm:
            try:
                self._shm_reader.resolve(rec.msg)
            except shm.StaleBlob as exc:
                self.stats.shm_stale += 1  # the publisher has moved on: a newer message follows
                ts.last_seq[rec.src] = rec.seq
                log.debug("%s: dropped a shared-memory blob: %s", ts.topic, exc)
                return
            except wire.ProtocolError as exc:
                self._protocol_error(ts.topic, str(exc))
                return
            except Exception as exc:  # a reader bug must not stop all delivery in this process
                log.exception("unexpected error reading a shared-memory blob on %s", ts.topic)
                self._protocol_error(ts.topic, f"{type(exc).__name__}: {exc}")
                return
            self.stats.shm_received += 1
        if ts.policy == "reliable":
            if last is not None:
                if rec.seq > last + 1:
                    missed = rec.seq - last - 1
                    self.stats.gaps += missed
                    log.warning("%s: %d message(s) lost from publisher %s (seq %d -> %d)",
                                ts.topic, missed, rec.src, last, rec.seq)
        ts.last_seq[rec.src] = rec.seq
        self.stats.received += 1
        with self._lock:
            subs = [s for s in self._subs if s.topic == ts.topic and s.policy == ts.policy]
        for sub in subs:
            if not isinstance(rec.msg, sub.msg_type):
                self._protocol_error(ts.topic, f"got {type(rec.msg).__name__}, expected {sub.msg_type.__name__}")
                continue
            try:
                sub.deliver(sub, rec)
            except Exception:  # e.g. BrokenPipeError in `robix topic echo | head`
                self.stats.callback_errors += 1
                log.exception("delivery to %s on %s failed", sub.node, ts.topic)

    def _protocol_error(self, topic: str, detail: str) -> None:
        self.stats.protocol_errors += 1
        self._errors_logged += 1
        if self._errors_logged <= 10 or self._errors_logged % 1000 == 0:
            log.warning("protocol error on %s (%d so far): %s", topic, self.stats.protocol_errors, detail)

    # ---- graph queries (for tools)
    def graph(self) -> list[GraphEntry]:
        return read_graph(self.root)

    # ---- shutdown
    def close(self) -> None:
        """Close every socket (linger 0), stop the IO thread, remove the graph entry. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        for pub in list(self._publishers):
            pub.close()
        self._thread.join(timeout=5)
        try:
            self._file.unlink()
        except FileNotFoundError:
            pass
        if self._shm_reader is not None and not self._thread.is_alive():
            self._shm_reader.close()
        shm.remove_segments(self.id)  # normally none is left: this catches a ring that failed half-way
        if self.config.transport == "ipc":
            for path in self.root.glob(f"{self.id}-*.sock"):
                path.unlink(missing_ok=True)
        self.ctx.destroy(linger=0)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_topic(topic: str) -> None:
    if not topic.startswith("/") or len(topic.encode()) > wire.MAX_TOPIC_BYTES or any(c.isspace() for c in topic):
        raise ValueError(f"topic {topic!r} must start with '/', have no spaces and be <= {wire.MAX_TOPIC_BYTES} bytes")
