"""The format between the planner and the model: one module, used at training and at run time.

**Output.** The model writes, in this order and nothing else (whitespace between blocks is
allowed)::

    <|think_start|>short reasoning<|think_end|>            always
    <|plan_start|>put the red cup into the bus tub<|plan_end|>   at most one command, optional
    <|response_start|>Sure, I'll clear the table.<|response_end|>  what to say, optional

:func:`serialize` writes a :class:`ModelOutput` in that form (the training target);
:func:`parse` reads it back strictly and raises :class:`FormatError` with a message that
says what is wrong (missing thought, wrong order, two plans, text outside tags, an unclosed
tag, an empty plan, JSON instead of tags, ...). :class:`StreamParser` does the same on a
stream of text deltas and emits :data:`Event` objects as soon as they can be decoded: the
thought as it grows, the plan when ``<|plan_end|>`` arrives, the reply as it grows and
sentence by sentence (so speech can start while decoding goes on). :func:`parse` *is* a
stream parser fed the whole text, so the two cannot disagree.

**Prompt.** :func:`build_prompt` turns the robot's capabilities, the history of earlier
steps and the current step into a :data:`~robix_planner.backends.base.Prompt`: a system
message (role, skills and vocabulary from :func:`robix_planner.skills.describe`, the output
format, the rules), then per step a user turn and an assistant turn (the serialized
:class:`ModelOutput`). A user turn, Robix style::

    <|system_info_start|>Command 'put the red cup into the bus tub' succeeded.
    The gripper holds nothing.
    Your current views are
    head: <IMAGE><|system_info_end|><|human_start|>Thanks! Now the fork.<|human_end|>

Its text is a pure function of its :class:`StepInput`, so a step's turn never changes once
written: the prompt only grows at its end and a backend can reuse the cached prefix. The
one exception is an old image, replaced by :data:`IMAGE_DROPPED` when the memory stops
showing it (the text around it stays the same; see :mod:`robix_planner.memory` for when).
:func:`read_user_turn` reads a user turn back into a :class:`StepInput` (utterances, command
outcomes, what runs, what the gripper holds, notes), for rule-based backends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

from robix_planner import skills
from robix_planner.backends.base import ChatMessage, ImagePart, Prompt
from robix_planner.messages import Capabilities

# --------------------------------------------------------------------------- tags

THINK_START, THINK_END = "<|think_start|>", "<|think_end|>"
PLAN_START, PLAN_END = "<|plan_start|>", "<|plan_end|>"
RESPONSE_START, RESPONSE_END = "<|response_start|>", "<|response_end|>"
SYSTEM_INFO_START, SYSTEM_INFO_END = "<|system_info_start|>", "<|system_info_end|>"
HUMAN_START, HUMAN_END = "<|human_start|>", "<|human_end|>"

#: Every tag of the format (tokenizers of trained models may add them as special tokens).
TAGS = (THINK_START, THINK_END, PLAN_START, PLAN_END, RESPONSE_START, RESPONSE_END,
        SYSTEM_INFO_START, SYSTEM_INFO_END, HUMAN_START, HUMAN_END)

# The output blocks, in their only allowed order.
_BLOCKS = ("think", "plan", "response")
_BLOCK_NAME = {"think": "thought", "plan": "plan", "response": "response"}
_MAX_TAG_NAME = 32
_TAG_NAME_CHARS = re.compile(r"[a-z_]*")
#: Stray text outside tags longer than this is reported at once (a model rambling on).
_MAX_STRAY = 80


class FormatError(ValueError):
    """A model output (or a value to serialize) that breaks the format; the message says how."""


@dataclass(frozen=True)
class ModelOutput:
    """One model step: a thought (always), at most one command, an optional reply."""

    thought: str
    plan: Optional[str] = None
    reply: Optional[str] = None


def _check_text(what: str, text: str) -> str:
    text = text.strip()
    if "<|" in text:
        raise FormatError(f"the {what} contains '<|', which would be read as a tag: {text[:60]!r}")
    return text


def serialize(out: ModelOutput) -> str:
    """The model output as the model must write it (the training target). Texts are stripped."""
    thought = _check_text("thought", out.thought)
    if not thought:
        raise FormatError("empty thought: every step needs a thought")
    text = f"{THINK_START}{thought}{THINK_END}"
    if out.plan is not None:
        plan = _check_text("plan", out.plan)
        if not plan:
            raise FormatError("empty plan: use plan=None for a step without a command")
        if "\n" in plan:
            raise FormatError(f"the plan must be one command on one line, got {plan!r}")
        text += f"{PLAN_START}{plan}{PLAN_END}"
    if out.reply is not None:
        reply = _check_text("reply", out.reply)
        if not reply:
            raise FormatError("empty reply: use reply=None for a step that says nothing")
        text += f"{RESPONSE_START}{reply}{RESPONSE_END}"
    return text


def parse(text: str) -> ModelOutput:
    """Parse a complete model output strictly; raise :class:`FormatError` saying what is wrong."""
    parser = StreamParser()
    parser.feed(text)
    parser.close()
    return parser.result()


# --------------------------------------------------------------------------- streaming


@dataclass(frozen=True)
class ThoughtDelta:
    text: str


@dataclass(frozen=True)
class ThoughtDone:
    thought: str


@dataclass(frozen=True)
class PlanDone:
    """Emitted exactly once: the plan at ``<|plan_end|>``, or None as soon as it is clear there is none."""

    plan: Optional[str]


@dataclass(frozen=True)
class ReplyDelta:
    text: str


@dataclass(frozen=True)
class ReplySentence:
    """A complete sentence of the reply (it ended with . ! or ? and whitespace, or the reply ended)."""

    text: str


@dataclass(frozen=True)
class ReplyDone:
    reply: str


Event = Union[ThoughtDelta, ThoughtDone, PlanDone, ReplyDelta, ReplySentence, ReplyDone]

_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s)")


class StreamParser:
    """Parses a model output incrementally: ``feed(delta) -> events``, then ``close() -> events``.

    Events come as soon as they are decodable, whatever the chunking: for any split of a
    text the non-delta events are the same and the deltas concatenate to the same text.
    A format violation raises :class:`FormatError` from :meth:`feed` as soon as it is
    certain (so a caller can cancel the generation), else from :meth:`close`; the parser is
    then dead. :meth:`result` gives the :class:`ModelOutput` after a successful close.
    """

    def __init__(self):
        self._buf = ""
        self._block: Optional[str] = None  # the block we are inside
        self._done: list[str] = []  # blocks completed, in order
        self._content: dict[str, str] = {}
        self._stray = ""  # non-whitespace text outside tags, pending an error
        self._seen_text = False  # any non-whitespace seen (for the JSON check)
        self._plan_emitted = False
        self._reply_from = 0  # reply chars already cut into sentences
        self._error: Optional[FormatError] = None
        self._closed = False
        self._output: Optional[ModelOutput] = None

    # -- public
    def feed(self, delta: str) -> list[Event]:
        self._alive()
        self._buf += delta
        events: list[Event] = []
        try:
            self._scan(events, final=False)
        except FormatError as exc:
            self._error = exc
            raise
        return events

    def close(self) -> list[Event]:
        """The end of the output: flush, check completeness, return the last events."""
        self._alive()
        events: list[Event] = []
        try:
            self._scan(events, final=True)
            if self._block is not None:
                raise FormatError(f"unclosed tag: <|{self._block}_start|> is never closed "
                                  f"(expected <|{self._block}_end|>)")
            self._raise_stray(None)
            if "think" not in self._done:
                if not self._seen_text:
                    raise FormatError("empty output: expected <|think_start|>…<|think_end|>")
                raise FormatError("missing thought: the output must start with <|think_start|>…<|think_end|>")
            if not self._plan_emitted:
                self._plan_emitted = True
                events.append(PlanDone(None))
        except FormatError as exc:
            self._error = exc
            raise
        self._closed = True
        c = self._content
        self._output = ModelOutput(thought=c["think"], plan=c.get("plan"), reply=c.get("response"))
        return events

    def result(self) -> ModelOutput:
        if self._output is None:
            raise RuntimeError("StreamParser.result() before a successful close()")
        return self._output

    @property
    def thought(self) -> Optional[str]:
        """The thought, once complete (also after a later format error)."""
        return self._content.get("think") if "think" in self._done else None

    @property
    def plan(self) -> Optional[str]:
        return self._content.get("plan") if "plan" in self._done else None

    @property
    def reply_so_far(self) -> str:
        """The reply text decoded so far (stripped), complete or not."""
        return self._content.get("response", "").strip()

    # -- internals
    def _alive(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise RuntimeError("StreamParser already closed")

    def _scan(self, events: list[Event], final: bool) -> None:
        while self._buf:
            i = self._buf.find("<|")
            if i < 0:
                # Hold back a trailing "<": it may start a tag.
                cut = len(self._buf) - 1 if (self._buf.endswith("<") and not final) else len(self._buf)
                self._text(self._buf[:cut], events)
                self._buf = self._buf[cut:]
                return
            if i > 0:
                self._text(self._buf[:i], events)
                self._buf = self._buf[i:]
            # The buffer starts with "<|": read the tag name.
            name = _TAG_NAME_CHARS.match(self._buf, 2).group(0)
            end = 2 + len(name)
            if len(name) > _MAX_TAG_NAME:
                raise FormatError(f"malformed tag {self._buf[:end][:_MAX_TAG_NAME + 2]!r}…")
            if end + 2 > len(self._buf):  # "|>" not here yet
                if final or (end < len(self._buf) and self._buf[end] != "|"):
                    raise FormatError(f"malformed tag {self._buf[:end + 1]!r}: expected '<|name|>'")
                return
            if self._buf[end:end + 2] != "|>":
                raise FormatError(f"malformed tag {self._buf[:end + 2]!r}: expected '<|name|>'")
            tag = self._buf[:end + 2]
            self._buf = self._buf[end + 2:]
            self._tag(tag, name, events)

    def _text(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        if self._block is None:
            stripped = text.strip()
            if not stripped:
                return
            if not self._seen_text and not self._done and stripped[0] in "{[`":
                raise FormatError("the output looks like JSON or a code block; write the tags "
                                  "<|think_start|>…<|think_end|><|plan_start|>…<|plan_end|><|response_start|>…"
                                  "<|response_end|> instead")
            self._seen_text = True
            self._stray += text
            if len(self._stray.strip()) >= _MAX_STRAY:
                self._raise_stray(None)
            return
        self._seen_text = True
        block = self._block
        self._content[block] = self._content.get(block, "") + text
        if block == "think":
            events.append(ThoughtDelta(text))
        elif block == "response":
            events.append(ReplyDelta(text))
            self._sentences(events, final=False)

    def _sentences(self, events: list[Event], final: bool) -> None:
        reply = self._content.get("response", "")
        pos = self._reply_from
        for m in _SENTENCE_END.finditer(reply, pos):
            sentence = reply[pos:m.end()].strip()
            pos = m.end()
            if sentence:
                events.append(ReplySentence(sentence))
        if final:
            rest = reply[pos:].strip()
            pos = len(reply)
            if rest:
                events.append(ReplySentence(rest))
        self._reply_from = pos

    def _raise_stray(self, before: Optional[str]) -> None:
        stray = self._stray.strip()
        if not stray:
            return
        # At _MAX_STRAY characters the stream stops at once, however the text was split, so the
        # message shows those characters and "…" whether or not more text followed.
        shown = stray[:_MAX_STRAY] + ("…" if len(stray) >= _MAX_STRAY else "")
        if not self._done:
            where = f"before {before}" if before else "with no tags"
            raise FormatError(f"text outside tags ({where}): {shown!r}; the output must start with <|think_start|>")
        after = f"<|{self._done[-1]}_end|>"
        raise FormatError(f"text outside tags after {after}: {shown!r}")

    def _tag(self, tag: str, name: str, events: list[Event]) -> None:
        kind, _, edge = name.rpartition("_")
        if kind not in _BLOCKS or edge not in ("start", "end"):
            if tag in TAGS:
                raise FormatError(f"{tag} belongs in the prompt, not in the model's output")
            raise FormatError(f"unknown tag {tag}; the output uses <|think_start|>, <|plan_start|>, "
                              "<|response_start|> and their _end tags")
        if self._block is not None:
            if edge == "end" and kind == self._block:
                self._end_block(events)
                return
            if edge == "start":
                raise FormatError(f"unclosed tag: <|{self._block}_start|> is not closed before {tag}")
            raise FormatError(f"mismatched tags: <|{self._block}_start|> closed by {tag}")
        if edge == "end":
            raise FormatError(f"{tag} without <|{kind}_start|>")
        self._raise_stray(tag)
        if kind in self._done:
            if kind == "plan":
                raise FormatError("two plans: at most one command per step")
            raise FormatError(f"two {_BLOCK_NAME[kind]}s: at most one <|{kind}_start|> block per step")
        if kind != "think" and "think" not in self._done:
            raise FormatError(f"missing thought: the output must start with <|think_start|>…<|think_end|> before {tag}")
        order = _BLOCKS.index(kind)
        later = [b for b in self._done if _BLOCKS.index(b) > order]
        if later:
            raise FormatError(f"wrong order: {tag} after <|{later[-1]}_end|>; the order is thought, plan, response")
        if kind == "response" and not self._plan_emitted:
            self._plan_emitted = True
            events.append(PlanDone(None))
        self._block = kind
        self._content[kind] = ""

    def _end_block(self, events: list[Event]) -> None:
        kind = self._block
        text = self._content[kind].strip()
        self._block = None
        self._done.append(kind)
        if kind == "think":
            if not text:
                raise FormatError("empty thought: write the reasoning between <|think_start|> and <|think_end|>")
            self._content[kind] = text
            events.append(ThoughtDone(text))
        elif kind == "plan":
            if not text:
                raise FormatError("empty plan: leave out <|plan_start|><|plan_end|> when there is no command")
            if "\n" in text:
                raise FormatError(f"the plan must be one command on one line, got {text!r}")
            self._content[kind] = text
            self._plan_emitted = True
            events.append(PlanDone(text))
        else:
            if not text:
                raise FormatError("empty response: leave out <|response_start|><|response_end|> when there is "
                                  "nothing to say")
            self._sentences(events, final=True)
            self._content[kind] = text
            events.append(ReplyDone(text))


# --------------------------------------------------------------------------- prompt

#: What stands where an image was, once the memory no longer shows it (never "<image>":
#: processors read that as an image placeholder).
IMAGE_DROPPED = "[view no longer shown]"
#: What a step says when no camera frame was available.
NO_VIEW = "No camera view is available."
VIEWS = "Your current views are"
#: The status line the planner adds when it halted the robot because the user spoke.
HALT_NOTE = "You sent 'stop' at once because the user spoke."
#: ``StepInput.holding`` value for an empty gripper (None means unknown: no line).
EMPTY = ""

_OUTCOME_VERB = {"succeeded": "succeeded", "failed": "failed", "rejected": "was rejected",
                 "preempted": "was preempted"}
_VERB_STATE = {v: k for k, v in _OUTCOME_VERB.items()}


@dataclass(frozen=True)
class Outcome:
    """How a command ended: ``state`` is a terminal :class:`~robix_planner.messages.CommandState` value."""

    command: str
    state: str
    detail: str = ""

    def __post_init__(self):
        if self.state not in _OUTCOME_VERB:
            raise ValueError(f"Outcome.state must be one of {sorted(_OUTCOME_VERB)}, got {self.state!r}")


@dataclass(frozen=True)
class StepInput:
    """What the model is told at one step (rendered as one user turn by :func:`user_turn`).

    ``outcomes``: commands that ended since the previous step, in order. ``running``: the
    command in flight when the step was taken (``phase``: its last reported phase).
    ``halted``: the planner sent ``stop`` because the user spoke. ``holding``: what the
    gripper holds (:data:`EMPTY` for nothing, None if unknown). ``notes``: extra
    system-info lines (e.g. why the last answer could not be used). ``images``: the
    current views. ``utterances``: what the user said since the previous step.
    """

    utterances: tuple[str, ...] = ()
    outcomes: tuple[Outcome, ...] = ()
    running: Optional[str] = None
    phase: str = ""
    halted: bool = False
    holding: Optional[str] = None
    notes: tuple[str, ...] = ()
    images: tuple[ImagePart, ...] = field(default=(), compare=False)

    def with_note(self, note: str) -> "StepInput":
        return replace(self, notes=self.notes + (note,))


@dataclass(frozen=True)
class Step:
    """One step of the history: what the model was told and what it answered."""

    input: StepInput
    output: ModelOutput


def one_line(text: str) -> str:
    """``text`` safe for one status line: whitespace runs to one space, no '<|' (cannot forge a tag)."""
    return re.sub(r"\s+", " ", text.replace("<|", "< |")).strip()


def _utterance(text: str) -> str:
    return text.replace("<|", "< |").strip()


def status_lines(step: StepInput) -> list[str]:
    """The system-info lines of a step, before the views (see the module docstring)."""
    lines = []
    for o in step.outcomes:
        detail = one_line(o.detail).rstrip(".")
        if detail == one_line(o.command).rstrip("."):  # a controller echoing the command says nothing new
            detail = ""
        lines.append(f"Command '{one_line(o.command)}' {_OUTCOME_VERB[o.state]}" + (f": {detail}." if detail else "."))
    if step.running is not None:
        phase = one_line(step.phase)
        lines.append(f"Command '{one_line(step.running)}' is running" + (f" ({phase})." if phase else "."))
    if step.halted:
        lines.append(HALT_NOTE)
    if step.holding is not None:
        lines.append(f"The gripper holds the {one_line(step.holding)}." if step.holding else "The gripper holds nothing.")
    lines += [one_line(n) for n in step.notes]
    return lines


def user_turn(step: StepInput, *, show_images: bool = True) -> ChatMessage:
    """The user turn of a step. With ``show_images=False`` each image becomes :data:`IMAGE_DROPPED`."""
    head = SYSTEM_INFO_START + "".join(line + "\n" for line in status_lines(step))
    parts: list = []
    if step.images:
        text = head + VIEWS
        for img in step.images:
            text += f"\n{one_line(img.camera)}: "
            if show_images:
                parts += [text, img]
                text = ""
            else:
                text += IMAGE_DROPPED
    else:
        text = head + NO_VIEW
    text += SYSTEM_INFO_END
    for u in step.utterances:
        text += f"{HUMAN_START}{_utterance(u)}{HUMAN_END}"
    parts.append(text)
    return ChatMessage("user", tuple(parts))


def assistant_turn(out: ModelOutput) -> ChatMessage:
    return ChatMessage("assistant", (serialize(out),))


def system_prompt(caps: Capabilities) -> str:
    """The system message: role, skills and vocabulary, output format, rules."""
    return "\n".join([
        "You are Robix, the high-level planner of a robot arm that works at a table with people.",
        "At each step you get the robot's status (how its last command ended, what runs, what the gripper holds), "
        "its current camera views and what the user said. You think, then give the robot at most one command, "
        "then say something to the user if needed.",
        "",
        "The robot's low-level controller understands only these commands:",
        skills.describe(caps),
        "",
        "Answer in exactly this format, with nothing outside the tags:",
        f"{THINK_START}a short thought: the scene, whether the last command succeeded and what the gripper holds, "
        f"the user's standing wishes, the next step{THINK_END}",
        f"{PLAN_START}one command, worded exactly as a skill above{PLAN_END}   (leave out when no command is due)",
        f"{RESPONSE_START}what to say to the user{RESPONSE_END}   (leave out when there is nothing to say)",
        "",
        "Rules:",
        "- One command per step, worded exactly as one of the skills and naming only the objects and receptacles "
        "listed. While a command runs, give no new command unless the plan must change.",
        "- 'stop' halts the running command at once: use it when the user asks you to stop or to change course.",
        "- Refuse what is impossible, unsafe, beyond your skills or about an object that is not there: say why "
        "in the reply and give no command.",
        "- When a request fits several objects, ask which one is meant and give no command.",
        "- When the user changes their mind about an item you already hold, place it back on the table first.",
        "- When a command failed, retry it; after repeated failures ask the user for help.",
        "- Keep the user's earlier wishes and constraints for the whole session.",
        "- Answer chat with a reply and no command.",
        "- When the task is done, say so and ask whether anything else is needed.",
    ])


def build_prompt(capabilities: Capabilities, history: Sequence[Step], current: StepInput, *,
                 images_from: int = 0) -> Prompt:
    """The prompt for the step after ``history``.

    Images are shown for steps whose index (0 = the first step of ``history``; the current
    step is ``len(history)``) is ``>= images_from``; earlier steps keep their text with
    :data:`IMAGE_DROPPED` in place of each image.
    """
    prompt: Prompt = [ChatMessage("system", (system_prompt(capabilities),))]
    for i, step in enumerate(history):
        prompt.append(user_turn(step.input, show_images=i >= images_from))
        prompt.append(assistant_turn(step.output))
    prompt.append(user_turn(current, show_images=len(history) >= images_from))
    return prompt


# --------------------------------------------------------------------------- reading prompts back

_IMG = "\x00"
_OUTCOME_LINE = re.compile(r"Command '(.*?)' (succeeded|failed|was rejected|was preempted)(?:: (.*))?\.\Z")
_RUNNING_LINE = re.compile(r"Command '(.*?)' is running(?: \((.*)\))?\.\Z")
_HOLDS_LINE = re.compile(r"The gripper holds (?:the (.+)|(nothing))\.\Z")
_HUMAN = re.compile(re.escape(HUMAN_START) + r"(.*?)" + re.escape(HUMAN_END), re.S)


def read_user_turn(message: ChatMessage) -> StepInput:
    """A user turn read back into a :class:`StepInput` (its images: those still shown).

    The inverse of :func:`user_turn`, for rule-based backends (the simulator's oracle,
    scripted test planners) that answer from the status lines and the utterances.
    """
    if message.role != "user":
        raise ValueError(f"read_user_turn needs a user turn, got a {message.role} message")
    images = [p for p in message.content if isinstance(p, ImagePart)]
    text = "".join(p if isinstance(p, str) else _IMG for p in message.content)
    start, end = text.find(SYSTEM_INFO_START), text.find(SYSTEM_INFO_END)
    if start != 0 or end < 0:
        raise ValueError("not a user turn of this format: it must start with <|system_info_start|>")
    info, rest = text[len(SYSTEM_INFO_START):end], text[end + len(SYSTEM_INFO_END):]
    utterances = tuple(m.group(1) for m in _HUMAN.finditer(rest))
    outcomes, notes = [], []
    running, phase, halted, holding = None, "", False, None
    lines = info.split("\n")
    for line in lines:
        if line == VIEWS or line == NO_VIEW or _IMG in line or line.endswith(f": {IMAGE_DROPPED}"):
            continue
        if m := _OUTCOME_LINE.match(line):
            outcomes.append(Outcome(m.group(1), _VERB_STATE[m.group(2)], m.group(3) or ""))
        elif m := _RUNNING_LINE.match(line):
            running, phase = m.group(1), m.group(2) or ""
        elif line == HALT_NOTE:
            halted = True
        elif m := _HOLDS_LINE.match(line):
            holding = EMPTY if m.group(2) else m.group(1)
        elif line:
            notes.append(line)
    return StepInput(utterances=utterances, outcomes=tuple(outcomes), running=running, phase=phase, halted=halted,
                     holding=holding, notes=tuple(notes), images=tuple(images))


def last_user_turn(prompt: Prompt) -> StepInput:
    """The current step of a prompt (its last message, a user turn), read back."""
    if not prompt or prompt[-1].role != "user":
        raise ValueError("a prompt ends with the current step's user turn")
    return read_user_turn(prompt[-1])


def read_history(prompt: Prompt) -> list[Step]:
    """The completed steps of a prompt (user turn + assistant turn pairs), read back."""
    steps = []
    turns = [m for m in prompt if m.role != "system"]
    for user, assistant in zip(turns[0::2], turns[1::2]):
        if user.role != "user" or assistant.role != "assistant":
            raise ValueError("a prompt alternates user and assistant turns after the system message")
        steps.append(Step(read_user_turn(user), parse(assistant.text)))
    return steps


def count_steps(prompt: Prompt) -> int:
    """How many completed steps (assistant turns) a prompt holds."""
    return sum(m.role == "assistant" for m in prompt)


# --------------------------------------------------------------------------- to transformers

def to_hf_messages(prompt: Prompt) -> tuple[list[dict], list[ImagePart]]:
    """A prompt as transformers chat messages, and its images in order.

    Each message becomes ``{"role": ..., "content": [{"type": "text", "text": ...} |
    {"type": "image"}, ...]}`` (the multimodal chat format of ``apply_chat_template`` and of
    trl's conversational datasets); each :class:`ImagePart` becomes an ``{"type": "image"}``
    placeholder and is returned, in order, in the second list. The ``hf`` backend and the
    training data both go through this function, so a model is trained on exactly what it
    reads at run time.
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    messages: list[dict] = []
    images: list[ImagePart] = []
    for msg in prompt:
        if not isinstance(msg, ChatMessage):
            raise TypeError(f"prompt items must be ChatMessage, got {type(msg).__name__}")
        content = []
        for part in msg.content:
            if isinstance(part, str):
                content.append({"type": "text", "text": part})
            elif isinstance(part, ImagePart):
                content.append({"type": "image"})
                images.append(part)
            else:
                raise TypeError(f"message content must be str or ImagePart, got {type(part).__name__}")
        messages.append({"role": msg.role, "content": content})
    return messages, images
