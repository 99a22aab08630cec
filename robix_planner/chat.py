"""``robix chat``: a console where a person talks to the running robot.

    robix chat                          # as "user", on $ROBIX_DOMAIN
    robix chat --speaker alice --domain lab --no-thoughts
    printf 'bring me the red cup\\nstop\\n' | robix chat --wait-s 5     # scripted: send, listen 5 s, exit

Each line typed is published at once as an ``Utterance`` on ``/user/utterance``, so the person
can interrupt the robot mid-action. The console shows, as they happen and each with the time
it arrived, what the robot does:

==========  ================================================================================
``you``     what this console sent (other speakers on ``/user/utterance`` show by their name)
``robot``   its replies (``/tts/speech``); a flush (barge-in) shows as ``(interrupted)``
``think``   its thoughts (``/planner/step``), with the step number, trigger and time taken
``plan``    the command it decided on (``/planner/step``); ``error`` when a decision failed
``command`` the commands sent to the controller (``/controller/command``)
``status``  the controller's reports on them (``/controller/status``)
==========  ================================================================================

Console commands: ``/help``, ``/quit``; a line starting with ``//`` is sent with one ``/``.
Ctrl-D (end of input) or Ctrl-C leaves, closing the sockets.

On a terminal it uses prompt_toolkit when installed (``pip install 'robix-planner[chat]'``),
so incoming lines never garble what is being typed; otherwise readline with a redraw of the
input line. With stdin not a terminal (a pipe, a file) lines are sent in order, and after the
end of input it keeps listening ``--wait-s`` seconds before it exits (exit code 0).

Before the first line it waits up to ``--connect-timeout-s`` for a subscriber of
``/user/utterance`` (the planner) to connect, so a scripted first line is not lost; it says so
when nobody listens. This module imports the bus only when the command runs, never torch.
"""

from __future__ import annotations

import argparse
import collections
import logging
import math
import queue
import re
import shutil
import signal
import sys
import threading
import time
from typing import Callable, Optional, TextIO

from robix_planner import topics

log = logging.getLogger(__name__)

#: Shortest time the sockets stay open after the last line was sent, so it leaves (linger is 0).
LINGER_S = 0.3
#: What the prompt looks like on a terminal.
PROMPT = "> "
#: Width of the label column.
LABEL_WIDTH = 7
#: Commands and statuses remembered to drop re-sends (the command client re-sends until acknowledged).
DEDUP_MEMORY = 1000

HELP = """type a line and press Enter to say it to the robot (you can interrupt it at any time)
  /help    this text
  /quit    leave (also Ctrl-D or Ctrl-C)
  //text   send a line that starts with '/'"""

_ANSI = {"reset": "\x1b[0m", "bold": "\x1b[1m", "dim": "\x1b[2m", "red": "\x1b[31m", "green": "\x1b[32m",
         "yellow": "\x1b[33m", "blue": "\x1b[34m", "magenta": "\x1b[35m", "cyan": "\x1b[36m"}

#: The label and colour(s) of each kind of line.
STYLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "you": ("you", ("bold",)),
    "user": ("", ("bold", "magenta")),  # another speaker: labelled with the speaker's name
    "robot": ("robot", ("bold", "green")),
    "think": ("think", ("dim",)),
    "plan": ("plan", ("cyan",)),
    "error": ("error", ("bold", "red")),
    "command": ("command", ("yellow",)),
    "status": ("status", ("blue",)),
    "info": ("*", ("dim",)),
}
_STATUS_COLOURS = {"succeeded": ("green",), "failed": ("red",), "rejected": ("red",), "preempted": ("yellow",)}

# C0 controls but tab and newline, DEL and C1 controls: a peer's text must not drive the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` with terminal control characters (escape sequences, bells, carriage returns) made visible."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def format_line(kind: str, text: str, *, t: Optional[float] = None, color: bool = False, label: str = "",
                colour_of: tuple[str, ...] = ()) -> str:
    """One console line: ``HH:MM:SS.mmm label   text``; continuation lines are indented under the text.

    ``label`` overrides the kind's label (another speaker's name); ``colour_of`` its colour.
    """
    t = time.time() if t is None else t
    stamp = time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"
    default_label, styles = STYLES.get(kind, (kind, ()))
    label = clean(label or default_label)[:24]
    styles = colour_of or styles
    indent = " " * (len(stamp) + 1 + max(LABEL_WIDTH, len(label)) + 1)
    body = ("\n" + indent).join(clean(text).split("\n"))
    head = f"{label:<{LABEL_WIDTH}}"
    if not color:
        return f"{stamp} {head} {body}"
    on = "".join(_ANSI[s] for s in styles)
    text_on = on if kind in ("think", "error", "info", "robot", "you", "user") else ""
    return (f"{_ANSI['dim']}{stamp}{_ANSI['reset']} {on}{head}{_ANSI['reset']} "
            f"{text_on}{body}{_ANSI['reset'] if text_on else ''}")


def describe(msg, *, show_thoughts: bool = True) -> list[tuple[str, str, str]]:
    """What the console shows for one message: ``[(kind, text, label), ...]`` (empty: nothing)."""
    from robix_planner.messages import Command, CommandStatus, PlannerStep, Speech, Utterance

    if isinstance(msg, Speech):
        if msg.flush:
            return [("robot", "(interrupted)" + (f" {msg.text}" if msg.text.strip() else ""), "")]
        return [("robot", msg.text, "")] if msg.text.strip() else []
    if isinstance(msg, PlannerStep):
        out = []
        if show_thoughts and msg.thought.strip():
            meta = f"#{msg.step} {msg.trigger}"
            if "total" in msg.timings_ms:
                meta += f", {msg.timings_ms['total']:.0f} ms"
            out.append(("think", f"{msg.thought.strip()}  [{meta}]", ""))
        if msg.plan:
            out.append(("plan", msg.plan, ""))
        if msg.error:
            out.append(("error", msg.error, ""))
        return out
    if isinstance(msg, Command):
        return [("command", f"{msg.text}  [{msg.id}]", "")]
    if isinstance(msg, CommandStatus):
        text = f"{msg.state.value}  [{msg.command_id}]"
        if msg.detail:
            text += f" {msg.detail}"
        if msg.holding and msg.holding not in msg.detail:
            text += f" (holding the {msg.holding})"
        return [("status", text, "")]
    if isinstance(msg, Utterance):
        return [("user", msg.text, msg.speaker or "user")] if msg.final else []
    return []


class ChatSession:
    """The console's bus side: publishes what the person says, renders what the robot does.

    ``emit(line)`` writes one rendered line; it runs on the session's own printer thread, so
    lines from the bus and the person's own lines come out in order and never from the bus IO
    thread. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, bus_config=None, *, speaker: str = "user", show_thoughts: bool = True, color: bool = False,
                 emit: Optional[Callable[[str], None]] = None, connect_timeout_s: float = 2.0):
        from robix_planner.bus import Bus
        from robix_planner.messages import Command, CommandStatus, PlannerStep, Speech, Utterance

        if not speaker or len(speaker) > 256:
            raise ValueError("--speaker must be 1..256 characters")
        self.speaker = speaker
        self.show_thoughts = show_thoughts
        self.color = color
        self.connect_timeout_s = connect_timeout_s
        self._emit = emit or _print_line
        self._lines: queue.Queue = queue.Queue(maxsize=10000)
        self._seen: collections.OrderedDict = collections.OrderedDict()
        self._seen_lock = threading.Lock()
        self._printer = threading.Thread(target=self._print_loop, name="chat-printer", daemon=True)
        self._printer.start()
        self._warned_alone = False
        self._last_sent = 0.0
        self.sent = 0
        self._closed = False
        self.bus = Bus(bus_config, name="chat")
        try:
            self.pub = self.bus.publisher(topics.UTTERANCE, Utterance, node="chat")
            for topic, cls in ((topics.SPEECH, Speech), (topics.PLANNER_STEP, PlannerStep), (topics.COMMAND, Command),
                               (topics.STATUS, CommandStatus), (topics.UTTERANCE, Utterance)):
                self.bus.subscribe(topic, cls, self._deliver, node="chat")
        except BaseException:
            self.close(linger_s=0)
            raise

    # ---- bus side (IO thread: only queue lines)
    def _deliver(self, sub, rec) -> None:
        if sub.topic == topics.UTTERANCE and rec.src == self.pub.id:
            return  # our own line, shown when sent
        if not self._first_time(rec.msg):
            return
        for kind, text, label in describe(rec.msg, show_thoughts=self.show_thoughts):
            self._show(kind, text, label=label, colour_of=self._status_colour(rec.msg))

    def _first_time(self, msg) -> bool:
        """False for a command or status already shown (re-sends until acknowledged, re-sent statuses)."""
        from robix_planner.messages import Command, CommandStatus

        if isinstance(msg, Command):
            key = ("command", msg.id)
        elif isinstance(msg, CommandStatus):
            key = ("status", msg.command_id, msg.state.value, msg.detail, msg.holding)
        else:
            return True
        with self._seen_lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > DEDUP_MEMORY:
                self._seen.popitem(last=False)
            return True

    @staticmethod
    def _status_colour(msg) -> tuple[str, ...]:
        state = getattr(getattr(msg, "state", None), "value", None)
        return _STATUS_COLOURS.get(state, ()) if state else ()

    def _show(self, kind: str, text: str, *, label: str = "", colour_of: tuple[str, ...] = ()) -> None:
        line = format_line(kind, text, t=time.time(), color=self.color, label=label, colour_of=colour_of)
        try:
            self._lines.put_nowait(line)
        except queue.Full:  # a terminal far slower than the robot: skip rather than grow without bound
            pass

    def notice(self, text: str) -> None:
        """Show a line from the console itself (help, warnings)."""
        self._show("info", text)

    def _print_loop(self) -> None:
        while True:
            line = self._lines.get()
            if line is None:
                return
            try:
                self._emit(line)
            except BrokenPipeError:  # `robix chat | head`: the reader left
                return
            except Exception:
                log.exception("could not print a line")

    # ---- the person's side
    def handle_line(self, line: str) -> bool:
        """Act on one input line: send it, or run a console command. False means: leave."""
        from robix_planner.messages import MAX_TEXT

        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            cmd = text.split()[0].lower()
            if cmd in ("/quit", "/exit", "/q"):
                return False
            if cmd in ("/help", "/?", "/h"):
                for row in HELP.splitlines():
                    self.notice(row)
                return True
            self.notice(f"unknown command {cmd}; /help lists them (start with // to send a line beginning with /)")
            return True
        if text.startswith("//"):
            text = text[1:]
        if len(text) > MAX_TEXT:
            self.notice(f"not sent: a line may have at most {MAX_TEXT} characters ({len(text)} given)")
            return True
        self.send(text)
        return True

    def send(self, text: str):
        """Publish ``text`` as an ``Utterance`` now; returns the message."""
        from robix_planner.messages import Utterance

        self._wait_for_listeners()
        msg = Utterance(text=text, speaker=self.speaker)
        self.pub.publish(msg)
        self.sent += 1
        self._last_sent = time.monotonic()
        self._show("you", text)
        return msg

    def _listeners(self) -> tuple[int, int]:
        """(subscriber sockets of /user/utterance the graph lists in other processes, connected sockets
        of all, this process's own included)."""
        from robix_planner.bus import read_graph

        sockets = {(e.bus, s.policy) for e in read_graph(self.bus.root) for s in e.subscriptions
                   if s.topic == topics.UTTERANCE}
        others = sum(1 for bus_id, _ in sockets if bus_id != self.bus.id)
        return others, len(sockets)

    def _wait_for_listeners(self) -> None:
        """Before sending: wait until every subscriber the graph lists is connected. Only the first line
        waits (up to ``connect_timeout_s``) for a subscriber to appear at all."""
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            others, expected = self._listeners()
            connected = self.pub.subscriber_count
            if others and connected >= expected:
                self._warned_alone = False
                return
            if (not others and self.sent) or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if not others and not self._warned_alone:
            self._warned_alone = True
            self.notice(f"nobody is listening on {topics.UTTERANCE} (is the robot running, in domain "
                        f"{self.bus.root.name!r}?); sending anyway")

    # ---- lifecycle
    def linger(self, wait_s: float = 0.0) -> None:
        """Keep listening ``wait_s`` seconds, and at least until the last line had :data:`LINGER_S` to leave."""
        left = max(wait_s, LINGER_S - (time.monotonic() - self._last_sent) if self.sent else 0.0)
        if left > 0:
            time.sleep(left)

    def close(self, linger_s: Optional[float] = None) -> None:
        """Close the sockets and print what is still queued. Idempotent."""
        if self._closed:
            return
        if linger_s is None:
            self.linger(0.0)  # a Ctrl-C here leaves close() to be called again, with linger_s=0
        elif linger_s > 0:
            time.sleep(linger_s)
        self._closed = True
        bus = getattr(self, "bus", None)
        if bus is not None:
            bus.close()
        try:
            self._lines.put(None, timeout=1.0)
        except queue.Full:
            pass
        self._printer.join(2.0)

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _print_line(line: str) -> None:
    out = sys.stdout  # looked up each time: prompt_toolkit's patch_stdout swaps it
    out.write(line + "\n")
    out.flush()


# --------------------------------------------------------------------------- front ends


def run_pipe(chat: ChatSession, stream: TextIO, wait_s: float = 0.0) -> int:
    """Send each line of ``stream`` in order; after its end keep listening ``wait_s`` seconds."""
    while True:
        line = stream.readline()
        if not line:
            break
        if not chat.handle_line(line):
            return 0  # /quit: leave now (close() still lets the last line leave)
    chat.linger(wait_s)
    return 0


def run_prompt_toolkit(chat: ChatSession, *, pt_input=None, pt_output=None) -> int:
    """The terminal front end with prompt_toolkit: incoming lines print above the input line."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.patch_stdout import patch_stdout

    session = PromptSession(input=pt_input, output=pt_output, erase_when_done=True)
    with patch_stdout(raw=True):
        while True:
            try:
                line = session.prompt(PROMPT)
            except (EOFError, KeyboardInterrupt):
                break
            if not chat.handle_line(line):
                break
    return 0


class _ReadlineFrontEnd:
    """The terminal front end without prompt_toolkit: ``input()`` with readline editing and history;
    a line arriving while the person types is printed above, and the prompt and the typed text are
    drawn again below it."""

    def __init__(self):
        try:
            import readline
        except ImportError:  # no GNU readline (some builds): plain input(), lines may interleave
            readline = None
        self.readline = readline
        self.reading = False
        self._lock = threading.Lock()

    def emit(self, line: str) -> None:
        with self._lock:
            out = sys.stdout
            if self.reading and self.readline is not None:
                out.write("\r\x1b[2K" + line + "\n" + PROMPT + self.readline.get_line_buffer())
            else:
                out.write(line + "\n")
            out.flush()

    def run(self, chat: ChatSession) -> int:
        while True:
            with self._lock:
                self.reading = True
            try:
                line = input(PROMPT)
            except (EOFError, KeyboardInterrupt):
                sys.stdout.write("\n")
                break
            finally:
                with self._lock:
                    self.reading = False
            if line.strip():
                self._erase_echo(line)
            if not chat.handle_line(line):
                break
        return 0

    def _erase_echo(self, line: str) -> None:
        """Remove the echoed input (it comes back as a timestamped ``you`` line)."""
        columns = max(1, shutil.get_terminal_size().columns)
        rows = max(1, math.ceil((len(PROMPT) + len(line)) / columns))
        with self._lock:
            sys.stdout.write("\x1b[1A\x1b[2K" * rows)
            sys.stdout.flush()


def prompt_toolkit_available() -> bool:
    try:
        import prompt_toolkit  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- CLI


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt


def _main(args: argparse.Namespace) -> int:
    from robix_planner.bus import BusConfig

    if args.wait_s < 0 or args.connect_timeout_s < 0:
        print("robix chat: --wait-s and --connect-timeout-s must be >= 0", file=sys.stderr)
        return 2
    if not 1 <= len(args.speaker) <= 256:
        print("robix chat: --speaker must be 1..256 characters", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    front = None
    emit: Optional[Callable[[str], None]] = None
    if interactive and not prompt_toolkit_available():
        front = _ReadlineFrontEnd()
        emit = front.emit
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM leaves as cleanly as Ctrl-C
    chat = None
    try:
        chat = ChatSession(BusConfig(domain=args.domain), speaker=args.speaker, show_thoughts=not args.no_thoughts,
                           color=color, emit=emit, connect_timeout_s=args.connect_timeout_s)
        if interactive:
            chat.notice(f"talking to the robot in domain {chat.bus.root.name!r} as {args.speaker!r}; "
                        "/help for help, Ctrl-D to leave")
            if front is not None:
                front.run(chat)
            else:
                run_prompt_toolkit(chat)
        else:
            run_pipe(chat, sys.stdin, args.wait_s)
    except KeyboardInterrupt:
        pass
    finally:
        if chat is not None:
            try:
                chat.close()
            except KeyboardInterrupt:  # a second Ctrl-C while lingering: close at once
                chat.close(linger_s=0)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return 0


def register(sub) -> None:
    p = sub.add_parser("chat", help="talk to the running robot and watch what it does",
                       description=__doc__.split("\nBefore the first line")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speaker", default="user", help="your name in each Utterance (default: user)")
    p.add_argument("--domain", default=None, help="bus domain (default: $ROBIX_DOMAIN or 'default')")
    p.add_argument("--no-thoughts", action="store_true", help="do not show the planner's thoughts")
    p.add_argument("--wait-s", type=float, default=0.0, metavar="S",
                   help="input from a pipe: keep listening S seconds after its end (default 0)")
    p.add_argument("--connect-timeout-s", type=float, default=2.0, metavar="S",
                   help="wait up to S seconds for a listener on /user/utterance before the first line (default 2)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the output (auto: when stdout is a terminal)")
    p.set_defaults(func=_main)
