"""``robix record`` and ``robix replay``: bus traffic to and from MCAP files (Foxglove opens them).

    robix record -o run.mcap                      every topic published now
    robix record -o run.mcap --all                ... and every topic that appears later
    robix record -o run.mcap /camera/head /controller/command --duration-s 60
    robix replay run.mcap [--rate 2] [--topics /camera/head] [--loop]

File layout (one MCAP file, zstd-compressed chunks by default):

* one **channel** per topic, ``message_encoding = "msgpack"``, metadata
  ``{"robix_type": <wire tag>, "policy": <the publisher's delivery policy>}``;
* one **schema** per message class: ``name`` = the class name (``Image``), ``encoding =
  "jsonschema"``, ``data`` = ``msgspec.json.schema(cls)``;
* one **message** record per bus message: ``data`` = :func:`robix_planner.wire.pack_message`
  (one msgpack map, the ``type`` tag included, an image's pixels inline as ``bin``);
  ``log_time`` = when the recorder received it (ns since the epoch, never decreasing);
  ``publish_time`` = the message's ``stamp_ns`` (the receive time for a message without
  one); ``sequence`` = the publisher's sequence number (low 32 bits);
* a metadata record ``robix`` with the protocol version and the domain.

Replay is lossless: every message is republished exactly as recorded (the same ids and
stamps, pixel for pixel), in log-time order, with the recorded gaps between messages
divided by ``--rate`` (``--rate 0``: as fast as possible).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from robix_planner.tools.topic import (
    LINGER_S,
    ToolError,
    add_domain_option,
    bus_config,
    read_topics,
    run_tool,
    stop_on_signals,
    wait_for_subscribers,
)

log = logging.getLogger(__name__)

MESSAGE_ENCODING = "msgpack"
SCHEMA_ENCODING = "jsonschema"
#: How often the recorder looks for topics it still waits for (named ones not yet published, or --all).
RESCAN_S = 0.2
#: Received but not yet written bytes beyond which the recorder drops messages (and says so).
MAX_PENDING_BYTES = 512 << 20


def schema_for(cls) -> bytes:
    """The JSON schema of a message class, as stored in the MCAP schema record."""
    import msgspec

    return msgspec.json.encode(msgspec.json.schema(cls))


class McapLogWriter:
    """Writes bus messages to an MCAP file: one channel per topic, one schema per message class."""

    def __init__(self, path: str | os.PathLike, *, compression: str = "zstd", metadata: Optional[dict] = None):
        from mcap.writer import CompressionType, Writer

        from robix_planner import __version__

        self.path = Path(path)
        self._file = open(self.path, "wb")
        try:
            self._writer = Writer(self._file, compression=CompressionType[compression.upper()])
            self._writer.start(profile="", library=f"robix-planner {__version__}")
        except Exception:
            self._file.close()
            raise
        if metadata:
            self._writer.add_metadata("robix", {k: str(v) for k, v in metadata.items()})
        self._schemas: dict[type, int] = {}
        self._channels: dict[str, int] = {}
        self._last_log_time = 0
        self.counts: collections.Counter = collections.Counter()
        self._closed = False

    def channel(self, topic: str, cls, policy: str) -> int:
        """The channel id for ``topic`` (registered on first use)."""
        from robix_planner.messages import type_name

        if topic not in self._channels:
            if cls not in self._schemas:
                self._schemas[cls] = self._writer.register_schema(cls.__name__, SCHEMA_ENCODING, schema_for(cls))
            self._channels[topic] = self._writer.register_channel(
                topic, MESSAGE_ENCODING, self._schemas[cls], {"robix_type": type_name(cls), "policy": policy})
        return self._channels[topic]

    def write(self, topic: str, msg, *, log_time_ns: int, seq: int = 0, policy: Optional[str] = None) -> None:
        """Append one message. ``log_time_ns`` is clamped so it never decreases (replay order = write order)."""
        from robix_planner import wire

        channel = self.channel(topic, type(msg), policy or type(msg).default_policy)
        log_time_ns = max(log_time_ns, self._last_log_time)
        self._last_log_time = log_time_ns
        stamp = getattr(msg, "stamp_ns", None)
        self._writer.add_message(channel, log_time=log_time_ns, data=wire.pack_message(msg),
                                 publish_time=stamp if isinstance(stamp, int) else log_time_ns,
                                 sequence=seq & 0xFFFFFFFF)
        self.counts[topic] += 1

    def close(self) -> None:
        """Write the summary and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.finish()
        finally:
            self._file.close()


@dataclass(frozen=True)
class LoggedChannel:
    topic: str
    cls: type
    policy: str


@dataclass(frozen=True)
class LoggedMessage:
    topic: str
    msg: object
    log_time_ns: int
    publish_time_ns: int


def _channel_class(channel, schema):
    """The message class of an MCAP channel, or None if it is not a Robix channel."""
    from robix_planner.messages import message_class

    if channel.message_encoding != MESSAGE_ENCODING:
        return None
    for name in (channel.metadata.get("robix_type"), schema.name if schema is not None else None):
        if name:
            try:
                return message_class(name)
            except KeyError:
                pass
    return None


class McapLogReader:
    """Reads a file written by :class:`McapLogWriter` (or any MCAP file with Robix msgpack channels)."""

    def __init__(self, path: str | os.PathLike):
        from mcap.reader import make_reader

        self.path = Path(path)
        if not self.path.is_file():
            raise ToolError(f"{str(self.path)!r} does not exist", exit_code=2)
        self._file = open(self.path, "rb")
        try:
            self._reader = make_reader(self._file)
            summary = self._reader.get_summary()
        except Exception as exc:
            self._file.close()
            raise ToolError(f"{str(self.path)!r} is not a readable MCAP file: {exc}", exit_code=2) from None
        if summary is None:
            self._file.close()
            raise ToolError(f"{str(self.path)!r} has no MCAP summary (was the recorder killed with SIGKILL?); "
                            "recover it with `mcap recover`", exit_code=2)
        self.channels: dict[int, LoggedChannel] = {}
        for cid, ch in summary.channels.items():
            cls = _channel_class(ch, summary.schemas.get(ch.schema_id))
            if cls is None:
                log.warning("skipping channel %s: not a Robix msgpack channel (encoding %r)",
                            ch.topic, ch.message_encoding)
                continue
            self.channels[cid] = LoggedChannel(ch.topic, cls, ch.metadata.get("policy") or cls.default_policy)
        self.message_count = summary.statistics.message_count if summary.statistics else None

    def messages(self, topics: Optional[list[str]] = None) -> Iterator[LoggedMessage]:
        """Messages in log-time order (ties in file order), decoded and validated."""
        from robix_planner import wire

        for _schema, channel, record in self._reader.iter_messages(topics=topics, log_time_order=True):
            info = self.channels.get(channel.id)
            if info is None:
                continue
            try:
                msg = wire.unpack_message(record.data)
            except wire.ProtocolError as exc:
                raise ToolError(f"{self.path}: bad message on {channel.topic} at log time {record.log_time}: {exc}")
            if not isinstance(msg, info.cls):
                raise ToolError(f"{self.path}: {channel.topic} should carry {info.cls.__name__}, "
                                f"found {type(msg).__name__}")
            yield LoggedMessage(channel.topic, msg, record.log_time, record.publish_time)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "McapLogReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- record


def cmd_record(args: argparse.Namespace) -> int:
    from robix_planner.bus import Bus
    from robix_planner.messages import PROTOCOL_VERSION, message_class

    if args.all and args.topics:
        raise ToolError("give topics or --all, not both", exit_code=2)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise ToolError(f"{str(out)!r} exists; choose another name or pass --overwrite", exit_code=2)
    pending: collections.deque = collections.deque()
    cond = threading.Condition()
    state = {"bytes": 0, "dropped": 0, "last_ns": 0}

    def deliver(sub, rec) -> None:  # bus IO thread: stamp and queue, nothing more
        with cond:
            if state["bytes"] + rec.nbytes > MAX_PENDING_BYTES:
                state["dropped"] += 1
                return
            now = max(time.time_ns(), state["last_ns"])
            state["last_ns"] = now
            state["bytes"] += rec.nbytes
            pending.append((sub.topic, rec, now))
            cond.notify()

    with stop_on_signals() as stop:
        bus = Bus(bus_config(args), name="_robix_record")
        writer = None
        started = time.monotonic()
        try:
            graph = read_topics(bus.root)
            if args.topics:
                wanted: Optional[set] = set(args.topics)
            elif args.all:
                wanted = None  # everything, now and later
            else:
                wanted = {name for name, info in graph.items() if info.publishers}
                if not wanted:
                    raise ToolError(f"no topic has a publisher in {bus.root}; name the topics to wait for them, "
                                    "or use --all", exit_code=1)
            writer = McapLogWriter(out, compression=args.compression,
                                   metadata={"protocol": PROTOCOL_VERSION, "domain": bus.root.name})
            recording: dict[str, str] = {}  # topic -> policy of its publishers
            refused: set[str] = set()

            def scan() -> None:
                for name, info in read_topics(bus.root).items():
                    if name in recording or not info.publishers or (wanted is not None and name not in wanted):
                        continue
                    published = info.publisher_types
                    if len(published) != 1:
                        if name not in refused:
                            refused.add(name)
                            log.error("%s is published with several types (%s); not recording it",
                                      name, ", ".join(sorted(published)))
                        continue
                    cls = message_class(published.pop())
                    recording[name] = info.publisher_policy or cls.default_policy
                    # "reliable" on our side: deep queues and gap counting, whatever the topic's policy.
                    bus.subscribe(name, cls, deliver, policy="reliable")
                    writer.channel(name, cls, recording[name])
                    log.info("recording %s [%s]", name, cls.__name__)

            scan()
            missing = sorted((wanted or set()) - set(recording))
            if missing:
                log.info("waiting for a publisher on %s", ", ".join(missing))
            end = started + args.duration_s if args.duration_s is not None else float("inf")
            next_scan = time.monotonic() + RESCAN_S
            written = 0
            while not stop.is_set() and (args.count is None or written < args.count):
                now = time.monotonic()
                if now >= end:
                    break
                if now >= next_scan and (wanted is None or len(recording) < len(wanted)):
                    scan()
                    next_scan = now + RESCAN_S
                with cond:
                    if not pending:
                        cond.wait(min(0.05, max(0.0, end - now)))
                    batch = []
                    while pending and (args.count is None or written + len(batch) < args.count):
                        batch.append(pending.popleft())
                for topic, rec, log_ns in batch:
                    writer.write(topic, rec.msg, log_time_ns=log_ns, seq=rec.seq, policy=recording[topic])
                    with cond:
                        state["bytes"] -= rec.nbytes
                written += len(batch)
        finally:
            bus.close()  # no more deliveries after this
            if writer is not None:
                room = None if args.count is None else max(0, args.count - sum(writer.counts.values()))
                for topic, rec, log_ns in list(pending)[:room]:
                    writer.write(topic, rec.msg, log_time_ns=log_ns, seq=rec.seq, policy=recording[topic])
                writer.close()
    _print_record_summary(writer, time.monotonic() - started, lost=bus.stats.gaps, dropped=state["dropped"])
    return 0


def _print_record_summary(writer: McapLogWriter, elapsed_s: float, *, lost: int, dropped: int) -> None:
    total = sum(writer.counts.values())
    size_mb = writer.path.stat().st_size / 1e6
    print(f"recorded {total} messages on {len(writer.counts)} topics in {elapsed_s:.1f} s "
          f"to {writer.path} ({size_mb:.2f} MB)")
    if writer.counts:
        width = max(len(t) for t in writer.counts)
        for topic in sorted(writer.counts):
            print(f"  {topic:<{width}}  {writer.counts[topic]:>7}")
    if lost or dropped:
        print(f"warning: {lost} message(s) lost in transit (sequence gaps), {dropped} dropped because the disk "
              f"could not keep up", file=sys.stderr)


# --------------------------------------------------------------------------- replay


def cmd_replay(args: argparse.Namespace) -> int:
    from robix_planner.bus import Bus

    if args.rate < 0:
        raise ToolError("--rate must be >= 0 (0: as fast as possible)", exit_code=2)
    with McapLogReader(args.file) as reader, stop_on_signals() as stop, \
            Bus(bus_config(args), name="_robix_replay") as bus:
        channels = [c for c in reader.channels.values() if not args.topics or c.topic in args.topics]
        unknown = sorted(set(args.topics or ()) - {c.topic for c in channels})
        if unknown:
            raise ToolError(f"{args.file} has no topic {', '.join(unknown)}; it has "
                            f"{', '.join(sorted(c.topic for c in reader.channels.values())) or 'none'}", exit_code=2)
        pubs = {}
        for c in channels:
            if c.topic in pubs and pubs[c.topic].msg_type is not c.cls:
                raise ToolError(f"{args.file} has {c.topic} with two types ({pubs[c.topic].msg_type.__name__}, "
                                f"{c.cls.__name__}); replay the others with --topics", exit_code=2)
            if c.topic not in pubs:
                pubs[c.topic] = bus.publisher(c.topic, c.cls, policy=c.policy)
        lonely = wait_for_subscribers(bus, pubs, args.wait_s, stop)
        if lonely:
            log.warning("no subscriber on %s; replaying anyway", ", ".join(lonely))
        sent = 0
        started = time.monotonic()
        while not stop.is_set():
            t0 = time.monotonic()
            first_ns = None
            sent_before = sent
            for item in reader.messages(topics=[c.topic for c in channels]):
                if args.rate > 0:
                    if first_ns is None:
                        first_ns = item.log_time_ns
                    target = t0 + (item.log_time_ns - first_ns) / 1e9 / args.rate
                    if stop.wait(max(0.0, target - time.monotonic())):
                        break
                elif stop.is_set():
                    break
                pubs[item.topic].publish(item.msg)
                sent += 1
            if not args.loop or sent == sent_before:
                break
        stop.wait(LINGER_S)  # sockets close with linger 0: let the last messages leave
    print(f"replayed {sent} messages on {len(pubs)} topics in {time.monotonic() - started:.1f} s")
    return 0


# --------------------------------------------------------------------------- argparse


def register(sub) -> None:
    p = sub.add_parser("record", help="record topics to an MCAP file", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, metavar="FILE.mcap", help="the file to write")
    p.add_argument("topics", nargs="*", metavar="TOPIC",
                   help="topics to record, waiting for those not yet published (default: every topic published now)")
    p.add_argument("--all", action="store_true", help="every topic, including those that appear later")
    p.add_argument("--duration-s", type=float, default=None, metavar="S", help="stop after S seconds")
    p.add_argument("--count", type=int, default=None, metavar="N", help="stop after N messages")
    p.add_argument("--compression", choices=("zstd", "lz4", "none"), default="zstd")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    add_domain_option(p)
    p.set_defaults(func=lambda a: run_tool("record", cmd_record, a))

    p = sub.add_parser("replay", help="republish an MCAP recording with its original timing", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE.mcap")
    p.add_argument("--rate", type=float, default=1.0,
                   help="speed factor: 2 plays twice as fast, 0 as fast as possible (default 1)")
    p.add_argument("--topics", nargs="+", metavar="TOPIC", help="replay only these topics")
    p.add_argument("--loop", action="store_true", help="start again at the end, until Ctrl-C")
    p.add_argument("--wait-s", type=float, default=2.0, metavar="S",
                   help="before starting, wait up to S seconds for the subscribers of the replayed topics to connect "
                        "(every one the graph lists, and at least one; default 2)")
    add_domain_option(p)
    p.set_defaults(func=lambda a: run_tool("replay", cmd_replay, a))
