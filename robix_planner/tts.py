"""The TTS node: speaks the robot's replies (``/tts/speech``) and stops mid-sentence on a flush.

    robix tts                                  # espeak-ng if installed, else print the replies
    robix tts --engine print
    robix tts --voice en-us --rate-wpm 160
    robix run robix_planner.tts:TTSNode params.engine=espeak params.voice=de

==================  ==========================================================================
subscribes          /tts/speech (Speech)
publishes           nothing but its heartbeat
==================  ==========================================================================

Each ``Speech.text`` is queued and spoken in order. ``Speech(flush=True)`` (barge-in: the user
spoke) stops the sentence being spoken at once and drops the queue; a flush that carries text
then speaks that text. Speech never blocks the node's executor: a :class:`SpeechQueue` worker
thread owns the speaker.

Engines sit behind :class:`Speaker` (``say(text)`` blocks until spoken or stopped; ``stop()``
ends it from another thread): :class:`EspeakSpeaker` runs ``espeak-ng`` as a subprocess with
the text on its stdin (never through a shell; a stop terminates the process),
:class:`PrintSpeaker` prints the text, :class:`FakeSpeaker` records the calls for tests and
demos. ``engine=auto`` picks espeak-ng when ``shutil.which`` finds it, else print.
"""

from __future__ import annotations

import abc
import argparse
import collections
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable, Literal, Optional, TextIO

from robix_planner import topics
from robix_planner.config import Config, ConfigError
from robix_planner.messages import Speech
from robix_planner.node import Node

log = logging.getLogger(__name__)

#: How long a stopped espeak-ng may take to exit after SIGTERM before it is killed.
TERMINATE_GRACE_S = 0.5
#: How often the speaking thread looks at a running espeak-ng (for a stop that did not end it).
POLL_S = 0.05


# --------------------------------------------------------------------------- speakers


class Speaker(abc.ABC):
    """A voice. :meth:`say` blocks until the text is spoken or :meth:`stop` is called.

    :meth:`stop` is thread-safe and ends the ``say`` in progress at once. It also covers a
    ``say`` that its caller has begun but that has not started speaking yet (the call may be
    a few instructions away): the stop holds until :meth:`reset`, which :class:`SpeechQueue`
    calls before each new utterance. Subclasses implement :meth:`say` (checking
    :attr:`stopping` before they start) and, when there is something to interrupt,
    :meth:`_interrupt`.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()

    @abc.abstractmethod
    def say(self, text: str) -> None:
        """Speak ``text``; return when done, or at once after :meth:`stop`."""

    def stop(self) -> None:
        self._stop.set()
        self._interrupt()

    def reset(self) -> None:
        """Forget an earlier :meth:`stop` (called before the next utterance is handed to :meth:`say`)."""
        self._stop.clear()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _interrupt(self) -> None:
        """Hook: cut off the speech in progress (terminate a process, close a stream)."""

    def close(self) -> None:
        """Release resources (stops what is being said)."""
        self.stop()

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return self.name


class PrintSpeaker(Speaker):
    """Prints each text on a line (``robot: ...``): the engine when no speech synthesiser is installed."""

    def __init__(self, stream: Optional[TextIO] = None, prefix: str = "robot: "):
        super().__init__()
        self._stream = stream
        self.prefix = prefix

    def say(self, text: str) -> None:
        if self.stopping:
            return
        stream = self._stream or sys.stdout
        print(f"{self.prefix}{text}", file=stream, flush=True)


class EspeakSpeaker(Speaker):
    """Speaks through the ``espeak-ng`` program: one process per utterance, text on its stdin.

    The text never reaches a shell or the command line (no quoting, no option injection); a
    stop terminates the process (SIGTERM at once, without waiting; SIGKILL from the speaking thread
    if it is still there :data:`TERMINATE_GRACE_S` later).
    """

    def __init__(self, executable: str = "espeak-ng", *, voice: str = "en", rate_wpm: int = 175,
                 amplitude: int = 100, timeout_s: float = 120.0):
        super().__init__()
        path = shutil.which(executable)
        if path is None:
            raise ConfigError(f"{executable!r} is not installed or not on PATH; install it "
                              f"(apt-get install espeak-ng) or use engine=print")
        self.executable = path
        self.argv = [path, "--stdin", "-v", voice, "-s", str(int(rate_wpm)), "-a", str(int(amplitude))]
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        #: Exit status of the last process (None: none ran; negative: ended by a signal).
        self.last_returncode: Optional[int] = None
        self._last_error = ""

    def say(self, text: str) -> None:
        # One line: espeak-ng --stdin speaks line by line, and a newline is only a pause here.
        data = (" ".join(text.split()) + "\n").encode("utf-8")
        with self._lock:
            if self.stopping:
                return
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, close_fds=True)
            self._proc = proc
        # Long texts take long to say: allow ~8 characters a second on top of the timeout.
        deadline = time.monotonic() + self.timeout_s + len(data) / 8
        stopped_at: Optional[float] = None
        pending: Optional[bytes] = data
        try:
            while True:  # wait in short slices: a stopped process that lingers gets killed by this thread
                try:
                    _, err = proc.communicate(pending, timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pending = None  # communicate() keeps what it has not written yet
                now = time.monotonic()
                if self.stopping and stopped_at is None:
                    stopped_at = now
                if stopped_at is not None and now - stopped_at > TERMINATE_GRACE_S:
                    proc.kill()
                elif now > deadline:
                    log.warning("espeak-ng still speaking after %.0f s; terminating it",
                                now - deadline + self.timeout_s)
                    proc.terminate()
                    stopped_at = now
        finally:
            with self._lock:
                self._proc = None
        self.last_returncode = proc.returncode
        message = " | ".join(err.decode("utf-8", "replace").strip().splitlines()[-3:])[-500:]
        if self.stopping:
            return
        if proc.returncode != 0:
            log.warning("espeak-ng exited with status %s: %s", proc.returncode, message or "(no message)")
        elif message and message != self._last_error:
            # espeak-ng exits 0 when it cannot open the audio device ("Unknown PCM default"): say so once.
            log.warning("espeak-ng: %s%s", message,
                        " (no sound device? check `aplay -l`)" if "PCM" in message or "ALSA" in message else "")
        self._last_error = message or self._last_error

    def __repr__(self) -> str:
        return f"espeak-ng ({' '.join(self.argv)})"

    def _interrupt(self) -> None:
        # Only a signal: the caller (a node's executor) never waits. say() reaps the process, and
        # kills it if it is still there TERMINATE_GRACE_S later.
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.terminate()


class FakeSpeaker(Speaker):
    """Records every call, for tests and demos. ``duration_s``: how long each ``say`` "speaks"
    (it returns early on :meth:`stop`).

    ``calls`` is the list of ``("say", text)``, ``("said", text)`` (finished, not stopped),
    ``("stopped", text)`` and ``("stop", None)`` events in order; :meth:`wait_for` waits for one.
    """

    def __init__(self, duration_s: float = 0.0):
        super().__init__()
        self.duration_s = duration_s
        self.calls: list[tuple[str, Optional[str]]] = []
        self._cv = threading.Condition()

    def _record(self, kind: str, text: Optional[str]) -> None:
        with self._cv:
            self.calls.append((kind, text))
            self._cv.notify_all()

    def say(self, text: str) -> None:
        if self.stopping:
            self._record("stopped", text)
            return
        self._record("say", text)
        if self.duration_s > 0 and not self.stopping:
            self._stop.wait(self.duration_s)
        self._record("stopped" if self.stopping else "said", text)

    def _interrupt(self) -> None:
        self._record("stop", None)

    def texts(self, kind: str = "say") -> list[str]:
        """The texts of every call of one kind, in order."""
        with self._cv:
            return [t for k, t in self.calls if k == kind]

    def wait_for(self, predicate: Callable[[list], bool], timeout_s: float = 5.0) -> bool:
        """Wait until ``predicate(calls)`` holds; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not predicate(list(self.calls)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cv.wait(remaining)
            return True


# --------------------------------------------------------------------------- queue


class SpeechQueue:
    """Speaks texts in order on its own thread; :meth:`flush` stops at once and drops the rest.

    :meth:`put` and :meth:`flush` never block on speech (they only take a short lock), so a
    node's executor can call them. The queue is bounded: beyond ``max_queue`` texts the
    newest is dropped with a warning.
    """

    def __init__(self, speaker: Speaker, *, max_queue: int = 32):
        self.speaker = speaker
        self.max_queue = max_queue
        self._cv = threading.Condition()
        self._queue: collections.deque[str] = collections.deque()
        self._busy = False
        self._closed = False
        self.dropped = 0
        self.flushes = 0
        self._thread = threading.Thread(target=self._run, name=f"tts-{speaker.name}", daemon=True)
        self._thread.start()

    def put(self, text: str) -> bool:
        """Queue ``text``; False when the queue was full (the text is dropped)."""
        with self._cv:
            if self._closed:
                return False
            if len(self._queue) >= self.max_queue:
                self.dropped += 1
                log.warning("speech queue full (%d); dropping %r", self.max_queue, text[:60])
                return False
            self._queue.append(text)
            self._cv.notify()
            return True

    def flush(self) -> int:
        """Stop the text being spoken and drop the queued ones; returns how many were cut or dropped."""
        with self._cv:
            n = len(self._queue) + int(self._busy)
            self._queue.clear()
            self.flushes += 1
            if self._busy:
                self.speaker.stop()
            return n

    @property
    def idle(self) -> bool:
        with self._cv:
            return not self._busy and not self._queue

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop speaking, drop the queue and end the worker thread."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
            if self._busy:
                self.speaker.stop()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the speech thread did not end within %.1f s", timeout_s)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                text = self._queue.popleft()
                self.speaker.reset()  # under the lock: any stop() from now on is for this text
                self._busy = True
            try:
                self.speaker.say(text)
            except Exception:
                log.exception("the speaker (%s) failed on %r", self.speaker.name, text[:60])
            finally:
                with self._cv:
                    self._busy = False


# --------------------------------------------------------------------------- node


Engine = Literal["auto", "espeak", "print"]


class TTSNode(Node):
    """Speaks ``/tts/speech``. Pass ``speaker=`` to use your own :class:`Speaker` (tests: a FakeSpeaker)."""

    default_name = "tts"

    class Params(Config):
        #: auto: espeak-ng when installed, else print. espeak: fail at start if it is missing.
        engine: Engine = "auto"
        #: espeak-ng program (a name looked up on PATH, or a path).
        espeak_path: str = "espeak-ng"
        #: espeak-ng voice (``espeak-ng --voices`` lists them): en, en-us, de, fr, ...
        voice: str = "en"
        #: Speaking rate in words per minute (espeak-ng -s; 80..450).
        rate_wpm: int = 175
        #: Volume (espeak-ng -a; 0..200).
        amplitude: int = 100
        #: Most texts waiting to be spoken; more are dropped with a warning.
        max_queue: int = 32
        #: A single espeak-ng run is terminated after this long (plus ~1 s per 8 characters).
        say_timeout_s: float = 120.0

    def __init__(self, params: Optional[Params] = None, *, speaker: Optional[Speaker] = None, **kw):
        p = params if params is not None else self.Params()
        if not 80 <= p.rate_wpm <= 450:
            raise ConfigError(f"params.rate_wpm={p.rate_wpm} is out of range; use 80..450 (175 is espeak-ng's default)")
        if not 0 <= p.amplitude <= 200:
            raise ConfigError(f"params.amplitude={p.amplitude} is out of range; use 0..200")
        if p.max_queue < 1:
            raise ConfigError("params.max_queue must be >= 1")
        speaker = speaker if speaker is not None else make_speaker(p)  # before the bus: a bad engine leaks nothing
        super().__init__(params=p, **kw)
        self.speaker = speaker
        self.queue = SpeechQueue(self.speaker, max_queue=p.max_queue)
        self.log.info("speaking with %r", self.speaker)
        self.create_subscription(topics.SPEECH, Speech, self.on_speech)

    def on_speech(self, msg: Speech) -> None:
        if msg.flush:
            n = self.queue.flush()
            if n:
                self.log.info("flush: stopped speaking (%d text(s) cut or dropped)", n)
        if msg.text.strip():
            self.queue.put(msg.text)

    def on_shutdown(self) -> None:
        self.queue.close()
        self.speaker.close()


def make_speaker(p: TTSNode.Params) -> Speaker:
    """The speaker an engine setting names (``auto`` falls back to printing when espeak-ng is missing)."""
    if p.engine not in ("auto", "espeak", "print"):
        raise ConfigError(f"params.engine={p.engine!r}; use auto, espeak or print")
    if p.engine == "print" or (p.engine == "auto" and shutil.which(p.espeak_path) is None):
        if p.engine == "auto":
            log.info("%s not found; printing the robot's replies (install it: apt-get install espeak-ng)",
                     p.espeak_path)
        return PrintSpeaker()
    return EspeakSpeaker(p.espeak_path, voice=p.voice, rate_wpm=p.rate_wpm, amplitude=p.amplitude,
                         timeout_s=p.say_timeout_s)


# --------------------------------------------------------------------------- CLI


def _main(args: argparse.Namespace) -> int:
    from robix_planner.node import spin
    from robix_planner.runner import build_node, parse_remap

    overrides = []
    for key, value in (("engine", args.engine), ("voice", args.voice), ("rate_wpm", args.rate_wpm)):
        if value is not None:  # as a JSON (= YAML) string or number: `--voice no` stays the string "no"
            overrides.append(f"params.{key}={json.dumps(value)}")
    if args.domain:
        overrides.append(f"bus.domain={args.domain}")
    node = build_node("robix_planner.tts:TTSNode", config=args.config,
                      overrides=overrides + list(args.overrides or []), name=args.name,
                      remap=parse_remap(args.remap))
    return spin(node)


def register(sub) -> None:
    p = sub.add_parser("tts", help="speak the robot's replies (espeak-ng, or print them)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides: params.amplitude=150")
    p.add_argument("--engine", choices=("auto", "espeak", "print"), default=None,
                   help="auto (default): espeak-ng when installed, else print")
    p.add_argument("--voice", default=None, help="espeak-ng voice (default en; `espeak-ng --voices` lists them)")
    p.add_argument("--rate-wpm", type=int, default=None, help="speaking rate, words per minute (default 175)")
    p.add_argument("--domain", default=None, help="bus domain (default: $ROBIX_DOMAIN or 'default')")
    p.add_argument("--config", help="YAML file with params/bus/node sections")
    p.add_argument("--name", default=None, help="node name (default: tts)")
    p.add_argument("--remap", action="append", metavar="FROM:=TO", help="rename a topic (repeatable)")
    p.set_defaults(func=_main)
