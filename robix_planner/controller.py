"""Both ends of the command channel: :class:`CommandServer` for controller authors and
:class:`CommandClient` for planners.

Delivery is exactly-once end to end: the client re-sends a command (same ``id``) until
the first status for it arrives; the server executes each id once and answers a
duplicate by re-sending that command's latest status.

A controller in a few lines (blocking style: one command at a time, on a worker thread)::

    def execute(cmd: Command, ctx: CommandContext) -> None:
        for _ in range(30):              # your robot's control loop
            if ctx.cancelled.is_set():
                return                   # reported as "preempted"
            time.sleep(0.1)
        ctx.holding = None               # what the gripper holds afterwards
        # returning means "succeeded"; ctx.fail("slipped") or raising means "failed"

    node = Node("my_robot")
    CommandServer(node, capabilities, execute=execute)
    spin(node)
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Optional

from robix_planner import skills, topics
from robix_planner.messages import Capabilities, Command, CommandState, CommandStatus
from robix_planner.node import Node, new_id

COMMAND_TOPIC = topics.COMMAND
STATUS_TOPIC = topics.STATUS
CAPABILITIES_TOPIC = topics.CAPABILITIES


class CommandContext:
    """What an ``execute`` function gets for one command."""

    def __init__(self, server: "CommandServer", command: Command):
        self.server = server
        self.command = command
        #: Set when a ``stop`` command arrives: finish quickly and return.
        self.cancelled = threading.Event()
        #: What the gripper holds when the command ends (reported with the final status).
        self.holding: Optional[str] = server.holding
        self._failure: Optional[str] = None

    def running(self, detail: str = "") -> None:
        """Report progress (state ``running``), e.g. ``ctx.running("grasp")``."""
        self.server.report(self.command.id, CommandState.RUNNING, detail, holding=self.holding)

    def fail(self, detail: str) -> None:
        """Mark the command failed when ``execute`` returns (e.g. the object slipped)."""
        self._failure = detail


class CommandServer:
    """Receives commands on ``/controller/command``, executes each id once, reports statuses.

    Give either ``execute(cmd, ctx)`` (blocking style, run on a worker thread, one command
    at a time, ``stop`` sets ``ctx.cancelled``) or ``on_command(cmd)`` (event style: called
    on the node's executor; report progress yourself with :meth:`report`).
    With ``validate`` (default), a command outside the advertised grammar or vocabulary
    is rejected before your code sees it.
    """

    def __init__(self, node: Node, capabilities: Capabilities, *,
                 execute: Optional[Callable[[Command, CommandContext], None]] = None,
                 on_command: Optional[Callable[[Command], None]] = None,
                 validate: bool = True, capabilities_period_s: float = 1.0, remember: int = 4096):
        if (execute is None) == (on_command is None):
            raise ValueError("give exactly one of execute= (blocking style) or on_command= (event style)")
        self.node = node
        self.validate = validate
        self.holding: Optional[str] = None
        self._execute, self._on_command = execute, on_command
        self._caps = capabilities
        self._last_status: collections.OrderedDict[str, CommandStatus] = collections.OrderedDict()
        self._remember = remember
        self._lock = threading.Lock()
        self._current: Optional[CommandContext] = None
        self._worker: Optional[threading.Thread] = None
        self.status_pub = node.create_publisher(STATUS_TOPIC, CommandStatus)
        self.caps_pub = node.create_publisher(CAPABILITIES_TOPIC, Capabilities, latched=True)
        node.create_subscription(COMMAND_TOPIC, Command, self._on_message)
        if capabilities_period_s > 0:
            node.create_timer(capabilities_period_s, self.publish_capabilities)
        node.add_shutdown_callback(self._cancel_on_shutdown)
        self.publish_capabilities()

    def _cancel_on_shutdown(self, wait_s: float = 2.0) -> None:
        """At node shutdown: cancel the running command and let it report (preempted) while the
        status publisher is still open."""
        current, worker = self._current, self._worker
        if current is not None:
            current.cancelled.set()
        if worker is not None and worker is not threading.current_thread():
            worker.join(wait_s)

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def set_capabilities(self, caps: Capabilities) -> None:
        """Change the grammar or vocabulary (e.g. a new scene) and announce it at once."""
        self._caps = caps
        self.publish_capabilities()

    def publish_capabilities(self) -> None:
        self.caps_pub.publish(self._caps)

    def report(self, command_id: str, state: CommandState, detail: str = "", *, holding: Optional[str] = ...) -> None:
        """Publish a status for ``command_id`` (and remember it to answer duplicates)."""
        if holding is not ...:
            self.holding = holding
        status = CommandStatus(command_id=command_id, state=state, detail=detail, holding=self.holding)
        with self._lock:
            self._last_status[command_id] = status
            self._last_status.move_to_end(command_id)
            while len(self._last_status) > self._remember:
                self._last_status.popitem(last=False)
        self.status_pub.publish(status)

    def _on_message(self, cmd: Command) -> None:
        with self._lock:
            seen = self._last_status.get(cmd.id)
        if seen is not None:  # a re-send: the client missed our status; never execute twice
            self.status_pub.publish(seen)
            return
        if self.validate:
            try:
                skills.parse(cmd.text, self._caps)
            except skills.GrammarError as exc:
                self.report(cmd.id, CommandState.REJECTED, str(exc))
                return
        if self._on_command is not None:
            self.report(cmd.id, CommandState.ACCEPTED)
            self._on_command(cmd)
            return
        self._blocking(cmd)

    # ---- blocking style
    def _blocking(self, cmd: Command) -> None:
        current = self._current
        if cmd.skill == "stop":
            self.report(cmd.id, CommandState.ACCEPTED)
            if current is not None:
                current.cancelled.set()
            self.report(cmd.id, CommandState.SUCCEEDED, "stopped" if current else "nothing to stop")
            return
        if current is not None:
            self.report(cmd.id, CommandState.REJECTED,
                        f"busy with {current.command.text!r}; send 'stop' first (one command at a time)")
            return
        ctx = CommandContext(self, cmd)
        self._current = ctx
        self.report(cmd.id, CommandState.ACCEPTED)
        self._worker = threading.Thread(target=self._run, args=(ctx,), name=f"cmd-{cmd.id}", daemon=True)
        self._worker.start()

    def _run(self, ctx: CommandContext) -> None:
        cmd = ctx.command
        try:
            ctx.running()
            self._execute(cmd, ctx)
            if ctx.cancelled.is_set():
                state, detail = CommandState.PREEMPTED, "stopped"
            elif ctx._failure is not None:
                state, detail = CommandState.FAILED, ctx._failure
            else:
                state, detail = CommandState.SUCCEEDED, ""
        except Exception as exc:
            self.node.log.exception("command %r failed", cmd.text)
            state, detail = CommandState.FAILED, f"{type(exc).__name__}: {exc}"
        self._current = None
        self.report(cmd.id, state, detail, holding=ctx.holding)


class CommandClient:
    """Sends commands and re-sends each until the controller acknowledges it.

    ``on_status`` runs on the node's executor for every status of a command this client
    sent. If no status arrives within ``ack_timeout_s``, ``on_status`` gets a local
    ``failed`` status whose detail says the controller did not answer.
    """

    def __init__(self, node: Node, on_status: Callable[[CommandStatus], None], *,
                 resend_period_s: float = 0.2, ack_timeout_s: float = 10.0):
        self.node = node
        self.on_status = on_status
        self.resend_period_s = resend_period_s
        self.ack_timeout_s = ack_timeout_s
        self.pub = node.create_publisher(COMMAND_TOPIC, Command)
        node.create_subscription(STATUS_TOPIC, CommandStatus, self._on_status)
        self._unacked: dict[str, tuple[Command, float]] = {}
        self._mine: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.resends = 0
        node.create_timer(resend_period_s, self._resend)

    def send(self, text: str, skill: str, args: Optional[dict[str, str]] = None, *,
             command_id: Optional[str] = None) -> Command:
        """Publish one command now (thread-safe); returns it (its ``id`` keys the statuses)."""
        cmd = Command(id=command_id or new_id(), text=text, skill=skill, args=dict(args or {}))
        self._unacked[cmd.id] = (cmd, time.monotonic())
        self._mine[cmd.id] = None
        while len(self._mine) > 4096:
            self._mine.popitem(last=False)
        self.pub.publish(cmd)
        return cmd

    def send_parsed(self, parsed: skills.ParsedCommand) -> Command:
        return self.send(parsed.text, parsed.skill, parsed.args)

    @property
    def unacknowledged(self) -> list[Command]:
        return [c for c, _ in self._unacked.values()]

    def _on_status(self, status: CommandStatus) -> None:
        if status.command_id not in self._mine:
            return
        self._unacked.pop(status.command_id, None)
        self.on_status(status)

    def _resend(self) -> None:
        now = time.monotonic()
        for cid, (cmd, sent) in list(self._unacked.items()):
            if now - sent > self.ack_timeout_s:
                del self._unacked[cid]
                self.node.log.warning("controller never acknowledged %r", cmd.text)
                self.on_status(CommandStatus(command_id=cid, state=CommandState.FAILED,
                                             detail=f"no status from the controller within {self.ack_timeout_s:g} s"))
                continue
            self.resends += 1
            self.pub.publish(cmd)
