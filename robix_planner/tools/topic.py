"""``robix topic``: inspect and feed bus topics, like ``ros2 topic``.

    robix topic list [-v]                               topics, types, publisher/subscriber counts
    robix topic echo TOPIC [--count N] [--json]         print messages (images summarised)
    robix topic hz TOPIC [--window N]                   message rate and period statistics
    robix topic pub TOPIC TYPE DATA [--rate HZ]         publish a message given as YAML/JSON

Every tool joins the bus of ``--domain`` (default ``$ROBIX_DOMAIN``) through a plain
:class:`~robix_planner.bus.Bus`, not a :class:`~robix_planner.node.Node`: a tool has no
heartbeat publisher and sends no heartbeats, so watching a graph never adds traffic to
it. Its subscriptions and publishers show in ``robix topic list`` under the node name
``_robix_<tool>``. Every tool stops cleanly on Ctrl-C (SIGINT) or SIGTERM.

This module imports only the standard library at import time (the bus, numpy and YAML
are imported by the command that runs), and never torch.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

log = logging.getLogger(__name__)

#: How long a publishing tool keeps its sockets open after the last send, so the message leaves.
LINGER_S = 0.3
#: How often the tools poll the graph directory while waiting for a topic.
GRAPH_POLL_S = 0.05


class ToolError(Exception):
    """A failure a tool reports in one line on stderr and turns into an exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- shared helpers (record.py uses them)


def bus_config(args: argparse.Namespace):
    """The BusConfig of a tool: ``--domain`` if given, else the environment's."""
    from robix_planner.bus import BusConfig

    return BusConfig(domain=args.domain)


def add_domain_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", default=None,
                        help="bus domain (default: $ROBIX_DOMAIN or 'default')")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM while the block runs (only the main thread can catch signals)."""
    stop = threading.Event()
    old = {}
    if threading.current_thread() is threading.main_thread():
        def _on_signal(signum, _frame):
            log.debug("received %s, stopping", signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, _on_signal)
    try:
        yield stop
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_tool(name: str, fn, args: argparse.Namespace) -> int:
    """Run ``fn(args)``; a :class:`ToolError` becomes one line on stderr and its exit code."""
    try:
        return int(fn(args) or 0)
    except ToolError as exc:
        print(f"robix {name}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `robix topic echo /x | head`: the reader left; not an error
        import os

        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


@dataclass
class Endpoint:
    node: str
    pid: int
    policy: str
    type: str


@dataclass
class TopicInfo:
    """One topic as the graph directory shows it."""

    name: str
    types: set = field(default_factory=set)
    publishers: list = field(default_factory=list)  # Endpoint
    subscribers: list = field(default_factory=list)  # Endpoint

    @property
    def type(self) -> str:
        return "|".join(sorted(self.types))

    @property
    def publisher_types(self) -> set:
        return {p.type for p in self.publishers}

    @property
    def publisher_policy(self) -> Optional[str]:
        policies = {p.policy for p in self.publishers}
        return policies.pop() if len(policies) == 1 else None


def read_topics(root) -> dict[str, TopicInfo]:
    """Every topic registered under the graph directory ``root`` (publishers and subscriptions)."""
    from robix_planner.bus import read_graph

    topics: dict[str, TopicInfo] = {}
    for entry in read_graph(root):
        for p in entry.publishers:
            info = topics.setdefault(p.topic, TopicInfo(p.topic))
            info.types.add(p.type)
            info.publishers.append(Endpoint(p.node, entry.pid, p.policy, p.type))
        for s in entry.subscriptions:
            info = topics.setdefault(s.topic, TopicInfo(s.topic))
            info.types.add(s.type)
            info.subscribers.append(Endpoint(s.node, entry.pid, s.policy, s.type))
    return topics


def wait_for_publisher(root, topic: str, timeout_s: float, stop: Optional[threading.Event] = None) -> TopicInfo:
    """The topic's graph entry once it has a publisher; :class:`ToolError` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = read_topics(root).get(topic)
        if info is not None and info.publishers:
            if len(info.publisher_types) > 1:
                raise ToolError(f"{topic} is published with several types "
                                f"({', '.join(sorted(info.publisher_types))}); fix the publishers")
            return info
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            raise ToolError(f"no publisher on {topic} after {timeout_s:g} s in graph {root} "
                            f"(check the topic with `robix topic list` and the domain with --domain)")
        time.sleep(GRAPH_POLL_S)


def expected_subscribers(root, *, exclude_bus: str = "") -> collections.Counter:
    """Per topic, how many SUB sockets the graph says will connect to a publisher of it.

    A process opens one socket per (topic, policy), shared by its subscriptions, and each
    socket counts as one subscriber at the publisher.
    """
    from robix_planner.bus import read_graph

    sockets = {(e.bus, s.topic, s.policy) for e in read_graph(root) if e.bus != exclude_bus for s in e.subscriptions}
    return collections.Counter(topic for _, topic, _ in sockets)


def wait_for_subscribers(bus, pubs: dict, timeout_s: float, stop: Optional[threading.Event] = None) -> list[str]:
    """Wait until every subscriber the graph lists for the topics of ``pubs`` (topic -> Publisher)
    is connected, and at least one in all; at most ``timeout_s``. Returns the topics left with none."""
    deadline = time.monotonic() + timeout_s
    while True:
        expected = expected_subscribers(bus.root, exclude_bus=bus.id)
        have = {topic: pub.subscriber_count for topic, pub in pubs.items()}
        if all(have[t] >= expected[t] for t in pubs) and any(have.values()):
            break
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            break
        time.sleep(GRAPH_POLL_S)
    return [t for t, n in have.items() if n == 0]


def message_type(name: str):
    """The message class for a wire tag or class name, or a :class:`ToolError` (exit 2) listing them."""
    from robix_planner.messages import message_class

    try:
        return message_class(name)
    except KeyError as exc:
        raise ToolError(exc.args[0], exit_code=2) from None


# --------------------------------------------------------------------------- formatting


def image_summary(msg) -> dict:
    """What echo shows of an image's pixels: byte count and mean colour (never the bytes)."""
    from robix_planner.messages import ImageEncoding

    data = msg.data
    nbytes = data.nbytes if hasattr(data, "nbytes") else len(data)
    out: dict = {"nbytes": nbytes}
    if msg.encoding is not ImageEncoding.JPEG and nbytes == msg.width * msg.height * 3 and nbytes > 0:
        import numpy as np

        pixels = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3)
        mean = pixels.mean(axis=0, dtype=np.float64)
        if msg.encoding is ImageEncoding.BGR8:
            mean = mean[::-1]
        out["mean_rgb"] = [round(float(v), 1) for v in mean]
    return out


def printable(msg) -> dict:
    """A message as plain data for echo: every field, blobs replaced by a summary."""
    import msgspec

    from robix_planner.messages import Image

    plain = msgspec.to_builtins(msgspec.structs.replace(msg, **{n: None for n in msg.blob_fields}))
    for name in msg.blob_fields:
        value = getattr(msg, name)
        if isinstance(msg, Image) and name == "data":
            plain[name] = image_summary(msg)
        else:
            plain[name] = {"nbytes": value.nbytes if hasattr(value, "nbytes") else len(value)}
    return plain


def format_message(msg, as_json: bool) -> str:
    """One message as YAML (ending with ``---``) or as one line of JSON."""
    plain = printable(msg)
    if as_json:
        import msgspec

        return msgspec.json.encode(plain).decode()
    import textwrap

    import yaml

    lines = []
    for key, value in plain.items():  # top level as a block, short nested values on one line
        if isinstance(value, (dict, list)) and value:
            flow = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, allow_unicode=True,
                                  width=1 << 16).strip()
            if len(flow) <= 100:
                lines.append(f"{key}: {flow}")
            else:
                block = yaml.safe_dump(value, default_flow_style=False, sort_keys=False, allow_unicode=True,
                                       width=1 << 16)
                lines.append(f"{key}:\n{textwrap.indent(block.rstrip(), '  ')}")
        else:
            lines.append(yaml.safe_dump({key: value}, allow_unicode=True, width=1 << 16).rstrip())
    return "\n".join(lines) + "\n---"


# --------------------------------------------------------------------------- list


def cmd_list(args: argparse.Namespace) -> int:
    from robix_planner.bus import graph_root

    root = graph_root(bus_config(args))
    topics = read_topics(root)
    if not topics:
        print(f"no topics in domain {root.name!r} (graph directory {root.parent})", file=sys.stderr)
        return 0
    if args.verbose:
        for name in sorted(topics):
            info = topics[name]
            print(f"{name} [{info.type}]")
            print(f"  publishers ({len(info.publishers)}): {_endpoints(info.publishers, policy=True)}")
            print(f"  subscribers ({len(info.subscribers)}): {_endpoints(info.subscribers, policy=False)}")
        return 0
    width = max(len("TOPIC"), *(len(n) for n in topics))
    twidth = max(len("TYPE"), *(len(t.type) for t in topics.values()))
    print(f"{'TOPIC':<{width}}  {'TYPE':<{twidth}}  PUBS  SUBS")
    for name in sorted(topics):
        info = topics[name]
        print(f"{name:<{width}}  {info.type:<{twidth}}  {len(info.publishers):>4}  {len(info.subscribers):>4}")
    return 0


def _endpoints(items: list, policy: bool) -> str:
    if not items:
        return "-"
    parts = []
    for e in items:
        detail = f"pid {e.pid}, {e.policy}" if policy else f"pid {e.pid}"
        parts.append(f"{e.node or '?'} ({detail})")
    return ", ".join(parts)


# --------------------------------------------------------------------------- echo


def cmd_echo(args: argparse.Namespace) -> int:
    import queue

    from robix_planner.bus import Bus

    with stop_on_signals() as stop, Bus(bus_config(args), name="_robix_echo") as bus:
        info = wait_for_publisher(bus.root, args.topic, args.timeout_s, stop)
        cls = message_type(info.publisher_types.pop())
        inbox: queue.Queue = queue.Queue(maxsize=1000)

        def deliver(_sub, rec) -> None:
            try:
                inbox.put_nowait(rec.msg)
            except queue.Full:  # a terminal far slower than the topic: skip rather than grow without bound
                pass

        bus.subscribe(args.topic, cls, deliver, policy=info.publisher_policy)
        shown = 0
        while not stop.is_set() and (args.count is None or shown < args.count):
            try:
                msg = inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            print(format_message(msg, args.json), flush=True)
            shown += 1
    return 0


# --------------------------------------------------------------------------- hz


class RateWindow:
    """Receive times of the last ``window`` messages -> rate and period statistics (like ros2 topic hz)."""

    def __init__(self, window: int):
        self._times = collections.deque(maxlen=window + 1)
        self._lock = threading.Lock()
        self.total = 0

    def add(self, t: float) -> None:
        with self._lock:
            self._times.append(t)
            self.total += 1

    def stats(self) -> Optional[dict]:
        """``{rate_hz, min_s, max_s, std_s, window}`` over the window; None with fewer than 2 messages."""
        with self._lock:
            times = list(self._times)
        if len(times) < 2:
            return None
        periods = [b - a for a, b in zip(times, times[1:])]
        mean = sum(periods) / len(periods)
        std = (sum((p - mean) ** 2 for p in periods) / len(periods)) ** 0.5
        return {"rate_hz": 1.0 / mean if mean > 0 else float("inf"), "min_s": min(periods), "max_s": max(periods),
                "std_s": std, "window": len(periods)}


def format_rate(stats: dict) -> str:
    return (f"average rate: {stats['rate_hz']:.3f}\n"
            f"\tmin: {stats['min_s']:.4f}s max: {stats['max_s']:.4f}s std dev: {stats['std_s']:.5f}s "
            f"window: {stats['window']}")


def cmd_hz(args: argparse.Namespace) -> int:
    from robix_planner.bus import Bus

    if args.window < 1:
        raise ToolError("--window must be >= 1", exit_code=2)
    if args.report_period_s <= 0:
        raise ToolError("--report-period-s must be > 0", exit_code=2)
    with stop_on_signals() as stop, Bus(bus_config(args), name="_robix_hz") as bus:
        info = wait_for_publisher(bus.root, args.topic, args.timeout_s, stop)
        window = RateWindow(args.window)
        bus.subscribe(args.topic, message_type(info.publisher_types.pop()), lambda _s, _r: window.add(time.monotonic()),
                      policy=info.publisher_policy)
        start = time.monotonic()
        end = start + args.duration_s if args.duration_s is not None else float("inf")
        next_report = start + args.report_period_s
        reported_at = 0
        while not stop.is_set():
            now = time.monotonic()
            if now >= end:
                break
            stop.wait(min(next_report, end) - now)
            if time.monotonic() >= next_report:
                next_report += args.report_period_s
                reported_at = _report(window, reported_at)
        if window.total != reported_at:
            _report(window, reported_at)
    return 0


def _report(window: RateWindow, reported_at: int) -> int:
    if window.total == reported_at:
        print("no new messages", flush=True)
        return reported_at
    stats = window.stats()
    if stats is not None:
        print(format_rate(stats), flush=True)
    return window.total


# --------------------------------------------------------------------------- pub


def parse_data(text: str) -> dict:
    """DATA of ``topic pub``: a YAML or JSON mapping (empty means no fields)."""
    import yaml

    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ToolError(f"DATA is not valid YAML/JSON: {exc}", exit_code=2) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ToolError(f"DATA must be a mapping of field: value, got {type(data).__name__} {data!r}", exit_code=2)
    return data


def build_message(cls, data: dict):
    """Validate ``data`` into a ``cls`` message; fill a fresh ``id`` and blank image pixels when absent.

    Unknown fields are errors (a typo would otherwise vanish silently); field errors name the field.
    """
    import msgspec

    from robix_planner import wire
    from robix_planner.messages import Image, ImageEncoding
    from robix_planner.node import new_id

    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    unknown = sorted(set(data) - set(fields) - {"type"})
    if unknown:
        raise ToolError(f"unknown field(s) {', '.join(map(repr, unknown))} for {cls.__name__}; "
                        f"its fields are: {', '.join(fields)}", exit_code=2)
    data = dict(data)
    if "id" in fields and fields["id"].required and "id" not in data:
        data["id"] = new_id()
    if "type" in data and data["type"] not in (cls.__struct_config__.tag, cls.__name__):
        raise ToolError(f"DATA says type {data['type']!r} but TYPE is {cls.__name__}", exit_code=2)
    for name in cls.blob_fields:
        if name in data and cls is Image:
            raise ToolError("Image.data cannot be given on the command line; leave it out for a black frame",
                            exit_code=2)
    try:
        msg = wire.from_builtins(cls, data)
    except wire.ProtocolError as exc:
        raise ToolError(str(exc), exit_code=2) from None
    if isinstance(msg, Image) and msg.data is None:
        if msg.encoding is ImageEncoding.JPEG:
            raise ToolError("a jpeg Image needs data, which the command line cannot give; use rgb8 or bgr8",
                            exit_code=2)
        msg.data = bytes(msg.width * msg.height * 3)
    return msg


def cmd_pub(args: argparse.Namespace) -> int:
    from robix_planner.bus import Bus

    from robix_planner.bus import graph_root
    from robix_planner.messages import type_name

    cls = message_type(args.type)
    data = parse_data(args.data)
    build_message(cls, data)  # validate before touching the bus: a bad field exits 2 at once
    if args.rate is not None and args.rate <= 0:
        raise ToolError("--rate must be > 0", exit_code=2)
    if args.count is not None and args.count < 0:
        raise ToolError("--count must be >= 0 (0: until Ctrl-C)", exit_code=2)
    existing = read_topics(graph_root(bus_config(args))).get(args.topic)
    if existing is not None and existing.types - {type_name(cls)}:
        raise ToolError(f"{args.topic} carries {existing.type}, not {type_name(cls)}; "
                        "its subscribers would not connect", exit_code=2)
    count = args.count if args.count is not None else (0 if args.rate is not None else 1)
    period = 1.0 / args.rate if args.rate is not None else 1.0
    with stop_on_signals() as stop, Bus(bus_config(args), name="_robix_pub") as bus:
        pub = bus.publisher(args.topic, cls, latched=args.latched)
        if wait_for_subscribers(bus, {args.topic: pub}, args.wait_s, stop):
            log.warning("no subscriber on %s after %.1f s; publishing anyway", args.topic, args.wait_s)
        sent = 0
        next_t = time.monotonic()
        while not stop.is_set() and (count == 0 or sent < count):
            msg = build_message(cls, data)  # fresh stamp (and id) for every message
            pub.publish(msg)
            sent += 1
            print(f"publishing #{sent}: {format_message(msg, as_json=True)}", flush=True)
            if count and sent >= count:
                break
            next_t += period
            stop.wait(max(0.0, next_t - time.monotonic()))
        # Closing with linger=0 drops what is still queued: give the last message time to leave.
        stop.wait(args.linger_s)
    return 0


# --------------------------------------------------------------------------- argparse


def register(sub) -> None:
    p = sub.add_parser("topic", help="list, echo, measure and publish topics (like ros2 topic)",
                       description=__doc__.split("\nThis module imports")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    tsub = p.add_subparsers(dest="topic_command", metavar="SUBCOMMAND", required=True)

    q = tsub.add_parser("list", help="topics with their type and publisher/subscriber counts")
    q.add_argument("-v", "--verbose", action="store_true", help="name the publishing and subscribing nodes")
    add_domain_option(q)
    q.set_defaults(func=lambda a: run_tool("topic list", cmd_list, a))

    q = tsub.add_parser("echo", help="print the messages on a topic (images summarised)")
    q.add_argument("topic")
    q.add_argument("--count", type=int, default=None, metavar="N", help="exit after N messages")
    q.add_argument("--timeout-s", type=float, default=10.0, metavar="S",
                   help="fail if the topic has no publisher within S seconds (default 10)")
    q.add_argument("--json", action="store_true", help="one JSON object per line instead of YAML")
    add_domain_option(q)
    q.set_defaults(func=lambda a: run_tool("topic echo", cmd_echo, a))

    q = tsub.add_parser("hz", help="average rate and period statistics of a topic")
    q.add_argument("topic")
    q.add_argument("--window", type=int, default=10000, metavar="N", help="periods kept for the statistics")
    q.add_argument("--duration-s", type=float, default=None, metavar="S", help="stop after S seconds")
    q.add_argument("--report-period-s", type=float, default=1.0, metavar="S", help="print every S seconds")
    q.add_argument("--timeout-s", type=float, default=10.0, metavar="S",
                   help="fail if the topic has no publisher within S seconds (default 10)")
    add_domain_option(q)
    q.set_defaults(func=lambda a: run_tool("topic hz", cmd_hz, a))

    q = tsub.add_parser("pub", help="publish a message given as YAML/JSON",
                        description="Publish TYPE on TOPIC. DATA is a YAML or JSON mapping of the message's fields, "
                                    "e.g. '{text: put the red cup into the bus tub, skill: put_into}'. A missing id "
                                    "gets a fresh one per message; stamp_ns defaults to now; an Image without data "
                                    "is a black frame.")
    q.add_argument("topic")
    q.add_argument("type", help="message type: wire tag or class name (command, Command, utterance, ...)")
    q.add_argument("data", nargs="?", default="{}", help="YAML/JSON mapping of the fields")
    q.add_argument("--rate", type=float, default=None, metavar="HZ",
                   help="publish repeatedly at HZ (until Ctrl-C unless --count)")
    q.add_argument("--count", type=int, default=None, metavar="N",
                   help="publish N messages (default 1, or unlimited with --rate)")
    q.add_argument("--wait-s", type=float, default=2.0, metavar="S",
                   help="wait up to S seconds for the topic's subscribers to connect before the first message (default 2)")
    q.add_argument("--linger-s", type=float, default=LINGER_S, metavar="S",
                   help=f"keep the socket open S seconds after the last message (default {LINGER_S})")
    q.add_argument("--latched", action="store_true", help="late subscribers get the last message")
    add_domain_option(q)
    q.set_defaults(func=lambda a: run_tool("topic pub", cmd_pub, a))
