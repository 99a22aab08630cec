"""The planner node's input handling, played on the fast in-process runner.

:class:`PlannerAdaptor` is a :class:`sim.runner.Planner` (``decide(observation) ->
Decision``) that does what :class:`robix_planner.planner.PlannerNode` does with the same
events, without sockets, threads or wall-clock time:

- it keeps the node's pending inputs (utterances, command outcomes, the halt note), what the
  gripper holds (unknown until the first status of one of its commands), the commands in
  flight and their last reported phase, and builds each step's
  :class:`~robix_planner.format.StepInput` from them exactly as ``PlannerNode._step_input``;
- the prompt comes from :class:`robix_planner.memory.Memory` (``build_prompt`` through the
  memory, as at run time) and the model's answer is parsed with :func:`robix_planner.format.parse`
  and validated with :func:`robix_planner.skills.parse` before anything is sent;
- an utterance while a command runs sends ``stop`` at once (``halt_on_utterance``) and the
  model is asked once the halted command has ended, with the utterance, the preempted
  command's outcome, the halt note and what the gripper holds;
- a stop phrase ("Stop!", "Wait, stop.") halts without the model, says the node's stop
  reply and records the node's own step; no decision follows until the user speaks again;
- a plan decided while a command runs is a no-op (same command), a ``stop``, or a change of
  course (``stop`` first, the new command once the old one is reported preempted).

The runner calls ``decide`` at every event (start, utterance, terminal status); calls at
which the node would take no decision, and the node's own actions (a halt, a waiting command
going out), return a :class:`~sim.oracle.Decision` that is not a model step. The model steps
and the node's stop-phrase steps are in :attr:`PlannerAdaptor.memory` (the run-time history)
and :attr:`PlannerAdaptor.records`. ``tests/test_training_data_adaptor.py`` checks the steps
against a real ``PlannerNode`` on the bus.

The runner numbers the commands it is given ``c1``, ``c2``, ... (see
:meth:`sim.runner.EpisodeRunner._apply`); a status for an id the adaptor never sent raises
:class:`AdaptorError`, so a change there cannot go unnoticed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from robix_planner import format as fmt
from robix_planner import skills
from robix_planner.backends.base import ImagePart, Prompt
from robix_planner.memory import Memory, MemoryConfig
from robix_planner.messages import Capabilities, CommandState, CommandStatus
from robix_planner.planner import PlannerSettings, normalize_phrase

log = logging.getLogger(__name__)

#: Memory settings for synthesis: every image of every step stays in the prompt (episodes are
#: shorter than 64 steps), so prompts are append-only and a whole episode is one conversation.
SYNTH_MEMORY = MemoryConfig(max_images=64, image_drop_batch=1, token_budget=0)

#: Triggers of the steps in :attr:`PlannerAdaptor.records`.
STOP_PHRASE = "stop_phrase"


class AdaptorError(RuntimeError):
    """The episode cannot be played as the planner node would (a bad model answer, a runner change)."""


@dataclass
class _Cmd:
    text: str
    motion: bool
    phase: str = ""
    halting: bool = False


@dataclass
class StepRecord:
    """One step of the history: the trigger, whether the model took it, and ``on_step``'s note."""

    trigger: str
    by_model: bool
    note: Any = None


@dataclass
class _Out:
    thought: str
    plan: Optional[str] = None
    reply: Optional[str] = None


#: (step input, model output, taken by the model?) -> a note stored in the step's record.
OnStep = Callable[[fmt.StepInput, fmt.ModelOutput, bool], Any]


class PlannerAdaptor:
    """The planner node's part in a :class:`sim.runner.EpisodeRunner` (see the module docstring).

    ``answer(prompt) -> raw model output`` is the model, e.g. ``OracleBackend(...).answer``.
    ``on_step`` is called after each step is recorded (with the world as it was when the
    step was taken).
    """

    needs_images = True

    def __init__(self, answer: Callable[[Prompt], str], *, settings: Optional[PlannerSettings] = None,
                 memory: Optional[MemoryConfig] = None, on_step: Optional[OnStep] = None):
        self.answer = answer
        self.settings = settings or PlannerSettings()
        if self.settings.halt_delay_ms > 0:
            raise ValueError("PlannerAdaptor plays planner.halt_delay_ms=0 only (a halt at once)")
        self.memory = Memory(memory or SYNTH_MEMORY)
        self.on_step = on_step
        self.records: list[StepRecord] = []
        self.caps: Optional[Capabilities] = None
        self.holding: Optional[str] = None
        self._stop_phrases = {normalize_phrase(p) for p in self.settings.stop_phrases}
        self._images: tuple[ImagePart, ...] = ()
        self._inflight: dict[str, _Cmd] = {}
        self._known: set[str] = set()
        self._n_cmd = 0
        self._pending: list[tuple[int, str, Any]] = []
        self._seq = 0
        self._wanted: Optional[str] = None
        self._paused = False
        self._awaiting_start = True
        self._queued: Optional[skills.ParsedCommand] = None
        self._last_motion_end: Optional[CommandState] = None
        self._send: Optional[str] = None  # the one command this runner step sends
        self._said: list[_Out] = []

    # ------------------------------------------------------------------ the runner's call
    def decide(self, obs):
        from sim.oracle import Decision

        self.caps = obs.capabilities
        self._images = tuple(ImagePart(px, camera=name) for name, px in obs.images.items())
        self._send = None
        self._said = []
        for st in obs.statuses:
            self._on_status(st)
        if obs.utterance:
            self._on_utterance(obs.utterance)
        if obs.trigger == "start" and self._awaiting_start:
            self._want("start")
        if self._wanted is not None and not self._paused and not self._halting():
            self._decide_now()
        plan = self._send
        said = self._said
        if not said:
            what = f"(planner: send '{plan}')" if plan else "(planner: no decision)"
            return Decision(thought=what, plan=plan)
        reply = " ".join(o.reply for o in said if o.reply) or None
        return Decision(thought=" ".join(o.thought for o in said), plan=plan, reply=reply)

    # ------------------------------------------------------------------ inputs (PlannerNode._on_*)
    def _add(self, kind: str, value: Any) -> int:
        self._seq += 1
        self._pending.append((self._seq, kind, value))
        return self._seq

    def _motion(self) -> Optional[_Cmd]:
        return next((c for c in self._inflight.values() if c.motion), None)

    def _halting(self) -> bool:
        motion = self._motion()
        return motion is not None and motion.halting

    def _want(self, trigger: str) -> None:
        order = {"status": 1, "utterance": 2, "start": 3}
        if self._wanted is None or order[trigger] > order[self._wanted]:
            self._wanted = trigger

    def _on_utterance(self, text: str) -> None:
        text = text.strip()
        if not text:
            return
        if normalize_phrase(text) in self._stop_phrases:
            self._on_stop_phrase(text)
            return
        motion = self._motion()
        self._add("utt", text)
        if motion is not None and self.settings.halt_on_utterance and not motion.halting:
            self._halt(motion, note=True)
        self._paused = False
        self._queued = None
        self._want("start" if self._awaiting_start else "utterance")

    def _on_stop_phrase(self, text: str) -> None:
        s = self.settings
        motion = self._motion()
        halted = motion is not None and not motion.halting
        if halted:
            self._halt(motion, note=False)
        held = self.holding
        reply = s.stop_reply_holding.format(object=held) if held else s.stop_reply
        upto = self._add("utt", text)
        self._queued = None
        self._wanted = None
        self._paused = True
        self._awaiting_start = False
        out = fmt.ModelOutput(
            thought=f'The user said "{fmt.one_line(text)}", a stop phrase: I halt at once and wait for instructions.',
            plan="stop" if halted else None, reply=reply)
        step = self._step_input(upto=upto)
        self._pending = [it for it in self._pending if it[0] > upto]
        self._record(step, out, STOP_PHRASE, by_model=False)

    def _on_status(self, st: CommandStatus) -> None:
        if st.command_id not in self._known:
            raise AdaptorError(f"a status for command {st.command_id!r}, which the adaptor never sent: "
                               "sim.runner numbers commands c1, c2, ... in the order it is given them")
        c = self._inflight.get(st.command_id)
        if c is None:
            return
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
            self._add("outcome", fmt.Outcome(c.text, st.state.value, st.detail))
        if self._inflight:
            return  # a stop and the command it halted end as one event
        queued, self._queued = self._queued, None
        if queued is not None and self._last_motion_end in (None, CommandState.PREEMPTED):
            try:
                skills.parse(queued.text, self.caps)
            except skills.GrammarError:
                pass
            else:
                self._do_send(queued)
                return
        if self._paused:
            return
        self._want("status")

    # ------------------------------------------------------------------ acting
    def _do_send(self, parsed: skills.ParsedCommand) -> None:
        if self._send is not None:
            raise AdaptorError(f"two commands in one runner step ({self._send!r}, then {parsed.text!r}); "
                               "the in-process runner takes one")
        self._n_cmd += 1
        cid = f"c{self._n_cmd}"
        self._known.add(cid)
        self._inflight[cid] = _Cmd(parsed.text, motion=parsed.skill != skills.STOP.name)
        if parsed.skill != skills.STOP.name:
            self._last_motion_end = None
        self._send = parsed.text

    def _halt(self, motion: _Cmd, note: bool) -> None:
        self._do_send(skills.ParsedCommand(skill=skills.STOP.name, text="stop"))
        motion.halting = True
        if note:
            self._add("halt", None)

    def _dispatch(self, parsed: skills.ParsedCommand) -> None:
        motion = self._motion()
        if parsed.skill == skills.STOP.name:
            self._queued = None
            if motion is not None and not motion.halting:
                self._halt(motion, note=False)
            return
        if motion is not None:
            if not motion.halting and parsed.text == motion.text:
                return
            if not motion.halting:
                self._halt(motion, note=False)
            self._queued = parsed
            return
        if self._inflight:
            self._queued = parsed
            return
        self._do_send(parsed)

    # ------------------------------------------------------------------ the model's step
    def _step_input(self, upto: Optional[int] = None) -> fmt.StepInput:
        items = self._pending if upto is None else [it for it in self._pending if it[0] <= upto]
        motion = self._motion()
        return fmt.StepInput(
            utterances=tuple(v for _, k, v in items if k == "utt"),
            outcomes=tuple(v for _, k, v in items if k == "outcome"),
            running=motion.text if motion is not None else None,
            phase=motion.phase if motion is not None else "",
            halted=any(k == "halt" for _, k, _ in items),
            holding=self.holding,
            notes=tuple(v for _, k, v in items if k == "note"),
            images=self._images,
        )

    def _decide_now(self) -> None:
        trigger, self._wanted = self._wanted, None
        self._awaiting_start = False
        step = self._step_input()
        prompt = self.memory.prompt(self.caps, step)
        text = self.answer(prompt)
        try:
            out = fmt.parse(text)
        except fmt.FormatError as exc:
            raise AdaptorError(f"the model's answer breaks the format ({exc}): {text[:200]!r}") from None
        parsed = None
        if out.plan is not None:
            try:
                parsed = skills.parse(out.plan, self.caps)
            except skills.GrammarError as exc:
                raise AdaptorError(f"the model's plan would not be sent: {exc}") from None
        self._pending.clear()
        if parsed is not None:
            self._dispatch(parsed)
        self._record(step, out, trigger, by_model=True)

    def _record(self, step: fmt.StepInput, out: fmt.ModelOutput, trigger: str, by_model: bool) -> None:
        self.memory.append(step, out)
        note = self.on_step(step, out, by_model) if self.on_step is not None else None
        self.records.append(StepRecord(trigger=trigger, by_model=by_model, note=note))
        self._said.append(_Out(out.thought, out.plan, out.reply))
