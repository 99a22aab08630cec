"""The planner node: frames and dialogue in; thoughts, one command at a time and replies out.

    robix plan --config launch/planner.yaml model.backend=openai model.base_url=http://127.0.0.1:8000/v1

==================  ==========================================================================
subscribes          /camera/head (latest frame kept), /user/utterance, /controller/status,
                    /controller/capabilities, /robix/session
publishes           /controller/command (through a CommandClient), /tts/speech (Speech),
                    /planner/step (PlannerStep, one per decision)
==================  ==========================================================================

**Decisions** are taken on one worker thread, one at a time (the backend streams there);
the node's own executor thread handles messages and never waits for the model. A decision
is triggered by: start-up once the capabilities are known, and every ``SessionStart``
(``start``, after ``start_delay_s`` so the user's opening words join it); a new utterance
(``utterance``); the end of the robot's command, when nothing is left in flight
(``status``: succeeded, failed, rejected, preempted; a halted command and its ``stop`` count
as one event); and, with ``check_period_s > 0``, a periodic check while idle or executing
(``periodic``; a check that neither acts nor speaks is not kept in the memory). A decision
whose inputs were superseded while it ran (a new utterance, a new final status) is cancelled
and discarded, and a new one is taken with all inputs.

**Interruption.** A new utterance while the robot acts or the model generates: (a) the
in-flight generation's cancel event is set (the backend stops within one decoding step);
(b) ``stop`` goes to the controller at once, before the model is asked
(``halt_on_utterance``; ``halt_delay_ms > 0`` lets a model that answers within that time
decide itself, e.g. to reply to small talk without stopping); (c) ``Speech(flush=True)`` is
published when the robot may be speaking (barge-in); (d) the model is asked — as soon as
the controller reports the halted command ended, or ``halt_settle_ms`` after the halt — with
the utterance, the interrupted command (preempted, or still running) and what the gripper
holds in its prompt, so it can put a grasped item back. An utterance that is a *stop phrase*
("stop", "halt", "freeze", "wait, stop!" ...: ``stop_phrases`` after dropping fillers such
as "wait", "please", "right now") halts without consulting the model, says a short
acknowledgement and pauses: no decision is taken until the user speaks again.

**Validation.** A plan is sent only if :func:`robix_planner.skills.parse` accepts it in the
controller's grammar and vocabulary. Otherwise (or when the output breaks the format) the
model is asked once more with the error as an extra status line, and then the user is asked
instead of acting. Nothing the model writes is ever executed as code. At most one command is
in flight: a plan decided while a command runs is the same command (nothing to do), a
``stop``, or a change of course, for which ``stop`` goes out first and the new command waits
until the controller reports the old one preempted (if it ended otherwise the planner
decides again, with that outcome in view).

**Outputs.** The command is sent as soon as ``<|plan_end|>`` is decoded; the reply is spoken
while it is decoded, cut at sentence ends into pieces of at least ``speech_chunk_chars``
characters; a ``PlannerStep`` (thought, plan, reply, error, timings in ms: first_token,
plan, total, prefill, decode, halt) follows each decision. A backend error is said to the
user ("I can't think right now: ...") and logged in ``PlannerStep.error``; the node keeps
running.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from robix_planner import format as fmt
from robix_planner import skills, topics
from robix_planner.backends import base as backends_base
from robix_planner.backends.base import Backend, BackendError, ImagePart, ModelConfig
from robix_planner.config import Config, ConfigError
from robix_planner.controller import CAPABILITIES_TOPIC, CommandClient
from robix_planner.memory import Memory, MemoryConfig
from robix_planner.messages import (
    Capabilities,
    Command,
    CommandState,
    CommandStatus,
    Image,
    ImageEncoding,
    PlannerStep,
    SessionStart,
    Speech,
    Utterance,
)
from robix_planner.node import Node, Timer, new_id

log = logging.getLogger(__name__)


#: Words around a stop phrase that do not change its meaning ("Wait, stop!", "Stop right now, please").
STOP_FILLERS_BEFORE = ("wait", "hold on", "hey", "okay", "ok", "no", "please", "robot", "robix", "oh")
STOP_FILLERS_AFTER = ("please", "now", "right now", "right there", "immediately", "at once", "robot", "robix")
_WORDS = re.compile(r"[^a-z0-9' ]+")
#: Speech rate assumed to guess whether the robot may still be speaking (for barge-in).
_CHARS_PER_S = 15.0


class PlannerSettings(Config):
    """The ``planner`` section of the planner config."""

    #: Camera topics whose latest frames are the current views (in this order).
    camera_topics: tuple[str, ...] = (topics.CAMERA_HEAD,)
    #: Wall seconds the start decision waits for the user's opening words.
    start_delay_s: float = 0.5
    #: A periodic decision while idle or executing every this many seconds (0 = off).
    check_period_s: float = 0.0
    #: Send ``stop`` at once when the user speaks while a command runs.
    halt_on_utterance: bool = True
    #: Wait this long (ms) for the model's own decision before that halt (0 = at once).
    halt_delay_ms: float = 0.0
    #: After a halt, the next decision waits up to this long (ms) for the halted command to end,
    #: so the model sees how it ended (where the object is).
    halt_settle_ms: float = 500.0
    #: Utterances that halt without consulting the model (compared lower-case, without
    #: punctuation and fillers such as "wait", "please", "right now").
    stop_phrases: tuple[str, ...] = ("stop", "stop it", "stop stop", "halt", "freeze", "stop moving", "don't move",
                                     "stop what you're doing", "stop what you are doing", "emergency stop")
    #: What the robot says after a stop phrase ({object}: what the gripper holds).
    stop_reply: str = "Okay, I've stopped. What would you like me to do?"
    stop_reply_holding: str = "Okay, I've stopped; I'm holding the {object}. What would you like me to do?"
    #: How many times the model is asked again after an invalid plan or a malformed output.
    retries: int = 1
    #: Said when the model's answer still cannot be used after the retries.
    ask_reply: str = "Sorry, I'm not sure how to do that. Could you tell me in other words?"
    #: Said when the backend fails ({error}: what failed); said once until a decision succeeds.
    error_reply: str = "I can't think right now: {error}"
    #: Reply pieces for the TTS are cut at sentence ends once they hold this many characters (0 = every sentence).
    speech_chunk_chars: int = 100
    #: A command with no status within this many seconds counts as failed.
    ack_timeout_s: float = 10.0
    #: A generation running longer than this is cancelled and reported as a backend error.
    max_decision_s: float = 120.0


class PlannerConfig(Config):
    """The planner's whole config tree: ``robix plan --config FILE`` (plus ``bus`` and ``node`` sections)."""

    model: ModelConfig = ModelConfig()
    memory: MemoryConfig = MemoryConfig()
    planner: PlannerSettings = PlannerSettings()


def normalize_phrase(text: str) -> str:
    """Lower case, no punctuation, single spaces, no stop fillers at either end."""
    words = _WORDS.sub(" ", text.lower().replace("\u2019", "'")).split()
    before = sorted((f.split() for f in STOP_FILLERS_BEFORE), key=len, reverse=True)
    after = sorted((f.split() for f in STOP_FILLERS_AFTER), key=len, reverse=True)
    changed = True
    while changed:
        changed = False
        for f in before:
            if len(words) > len(f) and words[:len(f)] == f:
                words, changed = words[len(f):], True
                break
        for f in after:
            if len(words) > len(f) and words[-len(f):] == f:
                words, changed = words[:-len(f)], True
                break
    return " ".join(words)


def image_part(img: Image) -> ImagePart:
    """A camera frame as an RGB :class:`ImagePart` of its own (a copy: memory keeps it for many
    steps, and an rgb8 frame may be a view of a shared-memory slot the publisher reuses)."""
    import numpy as np

    if img.encoding is ImageEncoding.JPEG:
        import io

        from PIL import Image as PILImage

        with PILImage.open(io.BytesIO(bytes(img.data))) as pil:
            return ImagePart(np.asarray(pil.convert("RGB")), camera=img.camera)
    pixels = img.array()
    if img.encoding is ImageEncoding.BGR8:
        return ImagePart(np.ascontiguousarray(pixels[..., ::-1]), camera=img.camera)
    return ImagePart(np.array(pixels, copy=True), camera=img.camera)


@dataclass
class _Cmd:
    """A command in flight."""

    cmd: Command
    motion: bool
    phase: str = ""
    halting: bool = False  # a stop was sent for it
    halted_at: float = 0.0


@dataclass
class _Job:
    """One model call. Executor fields: discarded, committed; the rest is written by the worker."""

    id: int
    trigger: str
    step: fmt.StepInput
    prompt: list
    caps: Capabilities
    plan_choices: Optional[list[str]]  # the controller's commands, for a backend that constrains plans
    attempt: int
    upto: int  # pending items up to this sequence number are in the prompt
    halt_ms: Optional[float]
    cancel: threading.Event = field(default_factory=threading.Event)
    t0: float = field(default_factory=time.perf_counter)
    discarded: bool = False  # superseded before it decided: nothing of it is kept
    committed: bool = False  # its decision stands (plan acted on or no plan)
    finished: bool = False
    thought: Optional[str] = None
    plan: Optional[str] = None
    reply: Optional[str] = None
    complete: bool = False
    invalid: Optional[str] = None
    format_error: Optional[str] = None
    backend_error: Optional[str] = None
    sentences: list = field(default_factory=list)
    spoken: int = 0
    timings: dict = field(default_factory=dict)


class PlannerNode(Node):
    """The Robix reasoning loop on the bus (see the module docstring).

    ``backend``: a :class:`~robix_planner.backends.base.Backend` instance to use instead of
    loading ``params.model`` (the simulator's oracle, test fakes).
    """

    default_name = "planner"
    Params = PlannerConfig

    def __init__(self, params: Optional[PlannerConfig] = None, *, backend: Optional[Backend] = None, **kw):
        super().__init__(params=params, **kw)
        s = self.params.planner
        if min(s.start_delay_s, s.check_period_s, s.halt_delay_ms, s.halt_settle_ms, s.retries) < 0:
            raise ConfigError("planner.start_delay_s, check_period_s, halt_delay_ms, halt_settle_ms and retries "
                              "must be >= 0")
        if s.speech_chunk_chars < 0 or s.max_decision_s <= 0 or s.ack_timeout_s <= 0:
            raise ConfigError("planner.speech_chunk_chars must be >= 0, max_decision_s and ack_timeout_s > 0")
        self.memory = Memory(self.params.memory)
        if backend is None:
            from robix_planner.backends import load_backend

            backend = load_backend(self.params.model)
        self.backend = backend
        self._stop_phrases = {normalize_phrase(p) for p in s.stop_phrases}
        # State, touched only on the executor thread (the worker reads jobs it was given).
        self.caps: Optional[Capabilities] = None
        self._choices: tuple = (None, None)  # (skills, objects, receptacles) -> skills.commands of them
        self.session: Optional[str] = None
        self.holding: Optional[str] = None  # fmt.EMPTY: nothing; None: unknown
        self._frames: dict[str, Image] = {}
        self._inflight: dict[str, _Cmd] = {}
        self._queued: Optional[skills.ParsedCommand] = None
        self._last_motion_end: Optional[CommandState] = None
        self._settle_timer: Optional[Timer] = None
        self._pending: list[tuple[int, str, Any]] = []  # (seq, kind, value): utt, outcome, note, halt
        self._seq = itertools.count(1)
        self._job: Optional[_Job] = None
        self._job_ids = itertools.count(1)
        self._wanted: Optional[str] = None
        self._paused = False
        self._awaiting_start = False
        self._start_timer: Optional[Timer] = None
        self._halt_wait: Optional[tuple[str, int]] = None  # (command id, utterance seq)
        self._halt_ms: Optional[float] = None
        self._stop_record: Optional[fmt.ModelOutput] = None
        self._stop_upto = 0  # sequence number of the stop phrase that _stop_record answers
        self._said_error = False
        self._last_decision_end = time.monotonic()
        self._speaking_until = 0.0
        self._born = time.monotonic()
        self._warned_caps = False
        self.steps = 0  # PlannerSteps published
        # Wiring.
        self.client = CommandClient(self, self._on_status, ack_timeout_s=s.ack_timeout_s)
        self.speech_pub = self.create_publisher(topics.SPEECH, Speech)
        self.step_pub = self.create_publisher(topics.PLANNER_STEP, PlannerStep)
        self.create_subscription(CAPABILITIES_TOPIC, Capabilities, self._on_capabilities)
        self.create_subscription(topics.SESSION, SessionStart, self._on_session)
        self.create_subscription(topics.UTTERANCE, Utterance, self._on_utterance)
        for topic in s.camera_topics:
            self.create_subscription(topic, Image, lambda img, t=topic: self._frames.__setitem__(t, img))
        self.create_timer(min(0.5, s.check_period_s or 0.5), self._housekeeping)
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name=f"{self.name}-model", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def on_start(self) -> None:
        self._worker.start()
        self.log.info("planner up: backend %s, %d stop phrase(s), halt on utterance %s", type(self.backend).__name__,
                      len(self._stop_phrases), "on" if self.params.planner.halt_on_utterance else "off")

    def on_shutdown(self) -> None:
        job = self._job
        if job is not None:
            job.cancel.set()
        while True:  # jobs still queued (after a SessionStart) must not start now
            try:
                queued = self._jobs.get_nowait()
            except queue.Empty:
                break
            if queued is not None:
                queued.cancel.set()
                queued.finished = True
        self._jobs.put(None)
        if self._worker.is_alive():
            self._worker.join(5.0)
        try:
            self.backend.close()
        except Exception:
            self.log.exception("backend close failed")

    # ------------------------------------------------------------------ inputs
    def _on_capabilities(self, caps: Capabilities) -> None:
        first = self.caps is None
        self.caps = caps
        if first:
            self._schedule_start()
        self._start_job()

    def _plan_choices(self, caps: Capabilities) -> Optional[list[str]]:
        """Every command ``caps`` accepts, for a backend that constrains plans; listed again only when
        the grammar or vocabulary changed (controllers re-publish their Capabilities periodically)."""
        if not self.backend.accepts_plan_choices:
            return None
        key = (caps.skills, caps.objects, caps.receptacles)
        if self._choices[0] != key:
            self._choices = (key, skills.commands(caps))
        return self._choices[1]

    def _on_session(self, msg: SessionStart) -> None:
        self.log.info("session %s starts: memory cleared", msg.session)
        if self._job is not None:
            self._job.cancel.set()
            self._job.discarded = True
            self._job = None  # its late end is ignored; the worker runs jobs one after another
        self.session = msg.session
        self.memory.reset()
        self._pending.clear()
        self._inflight.clear()
        self._queued = None
        self._wanted = None
        self._paused = False
        self._halt_wait = None
        self._halt_ms = None
        self._stop_record = None
        self.holding = None
        self._speaking_until = 0.0
        self._schedule_start()

    def _schedule_start(self) -> None:
        self._awaiting_start = True
        if self._start_timer is not None:
            self._start_timer.cancel()
        self._start_timer = self.create_timer(self.params.planner.start_delay_s, self._start_due, oneshot=True)

    def _start_due(self) -> None:
        self._start_timer = None
        if self._awaiting_start:
            self._request("start", by_user=False)

    def _on_utterance(self, msg: Utterance) -> None:
        text = msg.text.strip()
        if not msg.final or not text:
            return
        heard = time.perf_counter()
        # Every final utterance ends the running generation (a stop phrase, and _request below,
        # supersede it), so stop the model first: that is one Event.set, while the halt and the
        # barge-in below publish messages, and each of those can wait for the interpreter's
        # lock while the model thread computes (p99 4 ms on robix-tiny's 4 ms decoding steps).
        if self._job is not None:
            self._job.cancel.set()
        if normalize_phrase(text) in self._stop_phrases:
            self._on_stop_phrase(text, heard)
            return
        s = self.params.planner
        motion = self._motion()
        generating = self._job is not None
        seq = self._add("utt", text)
        if motion is not None and s.halt_on_utterance and not motion.halting:
            if s.halt_delay_ms <= 0:
                self._halt(motion, heard)
            else:
                token = (motion.cmd.id, seq)
                self._halt_wait = token
                self.create_timer(s.halt_delay_ms / 1000.0, lambda: self._halt_timeout(token, heard), oneshot=True)
        if generating or time.monotonic() < self._speaking_until:
            self._flush_speech()
        self._paused = False
        self._queued = None
        self._request("start" if self._awaiting_start else "utterance", by_user=True)

    def _on_stop_phrase(self, text: str, heard: float) -> None:
        motion = self._motion()
        halted = motion is not None and not motion.halting
        if halted:
            self._halt(motion, heard, note=False)
        held = self.holding
        reply = (self.params.planner.stop_reply_holding.format(object=held) if held
                 else self.params.planner.stop_reply)
        self._speak(Speech(id=new_id(), text=reply, flush=True))
        self.log.info("stop phrase %r: %s", text, "halted" if halted else "nothing was running")
        job = self._job
        if job is not None:
            job.cancel.set()
            job.discarded = job.discarded or not job.committed
        self._stop_upto = self._add("utt", text)
        self._queued = None
        self._wanted = None
        self._halt_wait = None
        self._paused = True
        self._awaiting_start = False
        out = fmt.ModelOutput(
            thought=f'The user said "{fmt.one_line(text)}", a stop phrase: I halt at once and wait for instructions.',
            plan="stop" if halted else None, reply=reply)
        self._publish_step("stop_phrase", out, timings={"halt": (time.perf_counter() - heard) * 1e3})
        self._stop_record = out
        if self._job is None:
            self._record_stop_phrase()

    def _record_stop_phrase(self) -> None:
        # Only what came up to the stop phrase belongs to its step: an utterance heard while
        # the cancelled generation was winding down stays pending for the next decision.
        out, self._stop_record = self._stop_record, None
        if out is not None:
            upto = self._stop_upto
            self.memory.append(self._step_input(upto=upto), out)
            self._pending = [it for it in self._pending if it[0] > upto]

    def _on_status(self, st: CommandStatus) -> None:
        c = self._inflight.get(st.command_id)
        if c is None:
            return  # not ours, or from an earlier session
        if not st.detail.startswith("no status from the controller"):
            self.holding = st.holding or fmt.EMPTY
        if not st.state.terminal:
            if c.motion and st.state is CommandState.RUNNING and st.detail:
                c.phase = st.detail
            return
        del self._inflight[st.command_id]
        if c.motion:
            self._last_motion_end = st.state
        if c.motion or st.state is not CommandState.SUCCEEDED:
            self._add("outcome", fmt.Outcome(c.cmd.text, st.state.value, st.detail))
        if self._inflight:
            return  # a stop and the command it halted end as one event
        queued, self._queued = self._queued, None
        if queued is not None and self._last_motion_end in (None, CommandState.PREEMPTED):
            if self._send_checked(queued):
                return
        if self._paused:
            return
        self._request("status", by_user=False)

    def _housekeeping(self) -> None:
        s = self.params.planner
        job = self._job
        now = time.monotonic()
        if job is not None and not job.cancel.is_set() and time.perf_counter() - job.t0 > s.max_decision_s:
            self.log.warning("decision %d took over %g s; cancelling it", job.id, s.max_decision_s)
            job.backend_error = f"the model took longer than {s.max_decision_s:g} s"
            job.cancel.set()
        if self.caps is None and self._wanted is not None and not self._warned_caps and now - self._born > 5.0:
            self._warned_caps = True
            self.log.warning("no capabilities on %s yet: no decision until a controller announces its grammar",
                             self.resolve(CAPABILITIES_TOPIC))
        if (s.check_period_s > 0 and job is None and not self._paused and not self._awaiting_start
                and self.caps is not None and now - self._last_decision_end >= s.check_period_s):
            self._request("periodic", by_user=False, supersede=False)

    # ------------------------------------------------------------------ acting
    def _motion(self) -> Optional[_Cmd]:
        return next((c for c in self._inflight.values() if c.motion), None)

    def _add(self, kind: str, value: Any) -> int:
        seq = next(self._seq)
        self._pending.append((seq, kind, value))
        return seq

    def _halt(self, motion: _Cmd, heard: float, note: bool = True) -> None:
        self._send_stop(motion)
        self._halt_ms = (time.perf_counter() - heard) * 1e3
        if note:
            self._add("halt", None)
        self.log.info("halted %r %.1f ms after the utterance", motion.cmd.text, self._halt_ms)

    def _halt_timeout(self, token: tuple[str, int], heard: float) -> None:
        if self._halt_wait != token:
            return  # the model decided in time
        self._halt_wait = None
        motion = self._motion()
        if motion is not None and motion.cmd.id == token[0] and not motion.halting:
            self._halt(motion, heard)

    def _send_stop(self, motion: _Cmd) -> None:
        cmd = self.client.send("stop", "stop")
        self._inflight[cmd.id] = _Cmd(cmd, motion=False)
        motion.halting = True
        motion.halted_at = time.monotonic()

    def _send(self, parsed: skills.ParsedCommand) -> None:
        cmd = self.client.send_parsed(parsed)
        self._inflight[cmd.id] = _Cmd(cmd, motion=parsed.skill != "stop")
        if parsed.skill != "stop":
            self._last_motion_end = None
        self.log.info("command: %s", cmd.text)

    def _send_checked(self, parsed: skills.ParsedCommand) -> bool:
        """Send a plan that waited, if it still parses in the current grammar."""
        try:
            skills.parse(parsed.text, self.caps)
        except skills.GrammarError as exc:
            self.log.warning("dropping the waiting plan %r: %s", parsed.text, exc)
            return False
        self._send(parsed)
        return True

    def _dispatch(self, parsed: skills.ParsedCommand) -> None:
        """Act on a validated plan, keeping at most one command in flight (see the module docstring)."""
        motion = self._motion()
        if parsed.skill == "stop":
            self._queued = None
            if motion is not None and not motion.halting:
                self._send_stop(motion)
            return
        if motion is not None:
            if not motion.halting and parsed.text == motion.cmd.text:
                return  # the model wants what already runs
            if not motion.halting:
                self.log.info("change of course: stopping %r for %r", motion.cmd.text, parsed.text)
                self._send_stop(motion)
            self._queued = parsed
            return
        if self._inflight:  # only a stop in flight
            self._queued = parsed
            return
        self._send(parsed)

    # ------------------------------------------------------------------ speech
    def _speak(self, speech: Speech) -> None:
        self.speech_pub.publish(speech)
        if speech.text:
            self._speaking_until = time.monotonic() + len(speech.text) / _CHARS_PER_S

    def _flush_speech(self) -> None:
        self._speak(Speech(id=new_id(), text="", flush=True))

    # ------------------------------------------------------------------ decisions (executor side)
    def _request(self, trigger: str, *, by_user: bool, supersede: bool = True) -> None:
        """Ask for a decision; a running one is superseded (utterances always, statuses if undecided)."""
        if self._wanted is None or _PRIORITY[trigger] > _PRIORITY[self._wanted]:
            self._wanted = trigger
        job = self._job
        if job is not None:
            if supersede and (by_user or not job.committed):
                if not job.committed and not job.discarded:
                    self.log.debug("decision %d superseded by a new %s", job.id, trigger)
                job.discarded = job.discarded or not job.committed
                job.cancel.set()
            return
        self._start_job()

    def _step_input(self, extra_notes: tuple[str, ...] = (), upto: Optional[int] = None) -> fmt.StepInput:
        """The pending inputs as one step; ``upto``: only those with a sequence number <= it."""
        items = self._pending if upto is None else [it for it in self._pending if it[0] <= upto]
        motion = self._motion()
        return fmt.StepInput(
            utterances=tuple(v for _, k, v in items if k == "utt"),
            outcomes=tuple(v for _, k, v in items if k == "outcome"),
            running=motion.cmd.text if motion is not None else None,
            phase=motion.phase if motion is not None else "",
            halted=any(k == "halt" for _, k, _ in items),
            holding=self.holding,
            notes=tuple(v for _, k, v in items if k == "note") + extra_notes,
            images=tuple(image_part(self._frames[t]) for t in self.params.planner.camera_topics if t in self._frames),
        )

    def _start_job(self, trigger: Optional[str] = None, attempt: int = 0, note: Optional[str] = None) -> None:
        if self._job is not None or self.caps is None:
            return
        motion = self._motion()
        if motion is not None and motion.halting:
            # Let the halted command end first (briefly), so the model sees how it ended.
            wait_s = motion.halted_at + self.params.planner.halt_settle_ms / 1000.0 - time.monotonic()
            if wait_s > 0:
                if self._settle_timer is None:
                    self._settle_timer = self.create_timer(wait_s, self._settled, oneshot=True)
                return
        if trigger is None:
            if self._wanted is None:
                return
            trigger, self._wanted = self._wanted, None
        self._awaiting_start = False
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        try:
            step = self._step_input((note,) if note else ())
            prompt = self.memory.prompt(self.caps, step)
        except Exception as exc:  # a frame that cannot be decoded, a broken history: report, keep running
            self.log.exception("cannot build the prompt")
            self._publish_step(trigger, None, error=f"cannot build the prompt: {exc}")
            return
        job = _Job(id=next(self._job_ids), trigger=trigger, step=step, prompt=prompt, caps=self.caps,
                   plan_choices=self._plan_choices(self.caps), attempt=attempt,
                   upto=self._pending[-1][0] if self._pending else 0, halt_ms=self._halt_ms)
        self._halt_ms = None
        self._job = job
        self._jobs.put(job)

    def _settled(self) -> None:
        self._settle_timer = None
        self._start_job()

    def _on_plan(self, job: _Job, parsed: Optional[skills.ParsedCommand]) -> None:
        """The model has decided (plan or no plan); act unless the decision was superseded."""
        if job is not self._job or job.discarded:
            return
        job.committed = True
        if self._halt_wait is not None and job.upto >= self._halt_wait[1]:
            self._halt_wait = None  # the model answered the utterance in time: its decision stands
        if parsed is not None:
            self._dispatch(parsed)

    def _finish(self, job: _Job) -> None:
        if job is not self._job:
            return  # from before a SessionStart
        self._job = None
        self._last_decision_end = time.monotonic()
        s = self.params.planner
        if job.discarded:
            self.log.debug("decision %d discarded", job.id)
        elif job.backend_error is not None and not job.committed:
            self.log.error("backend error: %s", job.backend_error)
            if not self._said_error:
                self._said_error = True
                self._speak(Speech(id=new_id(), text=s.error_reply.format(error=job.backend_error[:200])))
            self._publish_step(job.trigger, None, job, error=f"backend: {job.backend_error}")
        elif not job.committed and (job.invalid or job.format_error):
            error = (f"invalid plan {job.plan!r}: {job.invalid}" if job.invalid else f"format: {job.format_error}")
            self.log.warning("unusable answer (attempt %d): %s", job.attempt + 1, error)
            if job.attempt < s.retries and self._wanted is None:
                self._publish_step(job.trigger, None, job, error=error)
                self._start_job(job.trigger, job.attempt + 1, note=_retry_note(job))
                return
            reply = s.ask_reply
            out = fmt.ModelOutput(thought=job.thought or "My answer could not be used, so I ask the user.", reply=reply)
            self._speak(Speech(id=new_id(), text=reply))
            self._record(job, out, error=error)
        elif job.committed:
            # The reply as the user heard it: all of it, or the sentences said before a cancel.
            reply = job.reply if job.complete else (" ".join(job.sentences[:job.spoken]) or None)
            out = fmt.ModelOutput(thought=job.thought or "", plan=job.plan, reply=reply)
            error = None
            if job.format_error:
                error = f"format: {job.format_error}"
            elif job.backend_error:
                error = f"backend: {job.backend_error}"
            keep = job.trigger != "periodic" or out.plan or out.reply
            self._record(job, out, error=error, keep=bool(keep))
        else:  # cancelled before deciding (not superseded: a watchdog or shutdown)
            self._publish_step(job.trigger, None, job, error="cancelled")
        if self._stop_record is not None:
            self._record_stop_phrase()
        if not self._paused:
            self._start_job()

    def _record(self, job: _Job, out: fmt.ModelOutput, *, error: Optional[str] = None, keep: bool = True) -> None:
        if keep:
            self.memory.append(job.step, out)
            self._pending = [it for it in self._pending if it[0] > job.upto]
        if error is None:
            self._said_error = False
        self._publish_step(job.trigger, out, job, error=error)

    def _publish_step(self, trigger: str, out: Optional[fmt.ModelOutput], job: Optional[_Job] = None, *,
                      error: Optional[str] = None, timings: Optional[dict] = None) -> None:
        self.steps += 1
        t = dict(timings or {})
        if job is not None:
            t.update(job.timings)
            if job.halt_ms is not None:
                t["halt"] = job.halt_ms
        thought = out.thought if out is not None else (job.thought if job is not None else "") or ""
        plan = out.plan if out is not None else (job.plan if job is not None else None)
        self.step_pub.publish(PlannerStep(
            step=self.steps, trigger=trigger, thought=thought[:16000], plan=plan,
            reply=out.reply if out is not None else None, error=error[:16000] if error else None,
            timings_ms={k: round(float(v), 3) for k, v in t.items()}))

    # ------------------------------------------------------------------ decisions (worker side)
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._generate(job)
            except Exception as exc:  # never let the worker die
                self.log.exception("decision %d failed", job.id)
                job.backend_error = job.backend_error or f"{type(exc).__name__}: {exc}"
            job.finished = True
            self.call_soon(lambda j=job: self._finish(j))

    def _generate(self, job: _Job) -> None:
        parser = fmt.StreamParser()
        stream = None
        ms = lambda: (time.perf_counter() - job.t0) * 1e3  # noqa: E731
        try:
            if job.cancel.is_set():
                return
            stream = backends_base.stream(self.backend, job.prompt, cancel=job.cancel, plan_choices=job.plan_choices)
            for delta in stream:
                if "first_token" not in job.timings:
                    job.timings["first_token"] = ms()
                try:
                    events = parser.feed(delta)
                except fmt.FormatError as exc:
                    job.format_error = str(exc)
                    job.cancel.set()
                    break
                self._handle(job, parser, events, ms)
                if job.cancel.is_set():
                    break
            else:
                if not job.cancel.is_set():
                    try:
                        self._handle(job, parser, parser.close(), ms)
                        job.complete = True
                    except fmt.FormatError as exc:
                        job.format_error = str(exc)
        except BackendError as exc:
            job.backend_error = str(exc) or type(exc).__name__
        except Exception as exc:
            self.log.exception("the backend failed")
            job.backend_error = f"{type(exc).__name__}: {exc}"
        finally:
            if stream is not None and hasattr(stream, "close"):
                try:
                    stream.close()
                except Exception:
                    self.log.exception("closing the backend stream failed")
            job.thought = parser.thought
            if job.complete:
                job.reply = parser.result().reply
            job.timings["total"] = ms()
            stats = getattr(self.backend, "last_stats", None)
            if stats is not None:
                job.timings["prefill"] = stats.prefill_ms
                job.timings["decode"] = stats.decode_ms

    def _handle(self, job: _Job, parser: fmt.StreamParser, events: list, ms: Callable[[], float]) -> None:
        chunk = self.params.planner.speech_chunk_chars
        for ev in events:
            if isinstance(ev, fmt.PlanDone):
                job.timings["plan"] = ms()
                job.plan = ev.plan
                parsed = None
                if ev.plan is not None:
                    try:
                        parsed = skills.parse(ev.plan, job.caps)
                    except skills.GrammarError as exc:
                        job.invalid = str(exc)
                        job.cancel.set()  # no need to decode a reply for a plan that will not run
                        return
                self.call_soon(lambda p=parsed: self._on_plan(job, p))
            elif isinstance(ev, fmt.ReplySentence):
                job.sentences.append(ev.text)
                if sum(len(x) + 1 for x in job.sentences[job.spoken:]) > chunk:
                    self._say_sentences(job)
            elif isinstance(ev, fmt.ReplyDone):
                self._say_sentences(job)

    def _say_sentences(self, job: _Job) -> None:
        text = " ".join(job.sentences[job.spoken:])
        job.spoken = len(job.sentences)
        if text and not job.cancel.is_set():
            self._speak(Speech(id=f"{self.name}-{job.id}-{job.spoken}", text=text))


_PRIORITY = {"periodic": 0, "status": 1, "utterance": 2, "start": 3}


def _retry_note(job: _Job) -> str:
    if job.invalid:
        return (f"Your plan '{fmt.one_line(job.plan or '')}' was not sent: {job.invalid}. Answer again, with a "
                "command worded exactly as one of the skills and naming only the listed objects and receptacles, "
                "or with no command.")
    return (f"Your last answer could not be read: {job.format_error}. Answer again: a thought, at most one command "
            "and an optional reply, each in its tags, with nothing outside them.")


# ---------------------------------------------------------------------- CLI


def load_config(path: Optional[str], overrides=()) -> tuple[PlannerConfig, dict, dict]:
    """The planner config and the ``bus`` / ``node`` sections from a YAML file and dotted overrides."""
    from robix_planner.config import apply_overrides, convert, read_yaml

    tree = read_yaml(path) if path else {}
    apply_overrides(tree, overrides)
    bus, node = tree.pop("bus", {}) or {}, tree.pop("node", {}) or {}
    return convert(PlannerConfig, tree, source=path or "overrides"), bus, node


def _main(args: argparse.Namespace) -> int:
    from robix_planner.bus import BusConfig
    from robix_planner.config import convert
    from robix_planner.node import NodeConfig, spin

    params, bus, node = load_config(args.config, args.overrides)
    planner = PlannerNode(params=params, name=args.name, bus_config=convert(BusConfig, bus, source="bus"),
                          node_config=convert(NodeConfig, node, source="node"))
    return spin(planner)


def register(sub) -> None:
    """``robix plan``."""
    p = sub.add_parser("plan", help="run the planner node (the model's reasoning loop)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides: model.backend=hf model.path=DIR planner.check_period_s=5 bus.domain=lab")
    p.add_argument("--config", help="YAML file with model / memory / planner sections (and bus / node)")
    p.add_argument("--name", default=None, help="node name (default: planner)")
    p.set_defaults(func=_main)
