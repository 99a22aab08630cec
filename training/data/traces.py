"""Reasoning traces for SFT: the oracle's thoughts, paraphrased, with every facet present.

The oracle (:mod:`sim.oracle`) writes each thought for the action it knows comes next, as a
few sentences of fixed forms: the scene and what the gripper holds, how the last command
ended, what the user said and the task and constraints, the next step. :func:`rewrite`
keeps that content and its order and varies the wording (each known sentence form has
several paraphrases, drawn from a seeded generator), and adds the facets a thought lacks:

- **scene**: always there ("On the table: ...; the gripper is empty.");
- **task status** (did the last command work, what the gripper holds): "Nothing has been
  done yet." on the first step, "No command ended since my last step." when nothing ended;
- **standing instructions / constraints**: "The task is still to ..." (or "There is no task
  yet.") when the thought names neither the task nor what the user said; "No constraints."
  after a task line that has none;
- **next step**: "Next: <command>." or "I give no command." when the thought does not say.

Sentences of other forms (the open-ended reasoning "Sugar: cola 39 g, ...", refusals with
their reason) are kept word for word. :data:`NO_REASONING` is the thought of the
"SFT without reasoning traces" ablation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

#: The thought of every model step in the ablation without reasoning traces.
NO_REASONING = "Deciding."

SCENE, STATUS, INSTRUCTION, NEXT, OTHER = "scene", "status", "instruction", "next", "other"


@dataclass(frozen=True)
class Facts:
    """What :func:`rewrite` needs besides the thought: is it the first step, did anything end, the task."""

    first: bool
    has_outcome: bool
    task: Optional[str] = None
    plan: Optional[str] = None


def _grip(g: dict, rng: np.random.Generator) -> str:
    if g.get("held"):
        return _pick(rng, ("the gripper holds the {held}", "I am holding the {held}", "the {held} is in my gripper")
                     ).format(held=g["held"])
    return _pick(rng, ("the gripper is empty", "my gripper is empty", "I hold nothing"))


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


_G = r"(?:the gripper holds the (?P<held>.+)|the gripper is empty)"

#: (facet, pattern, paraphrases): the oracle's sentence forms. ``{grip}`` is paraphrased too.
_FORMS_SRC: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (SCENE, r"On the table: (?P<objs>.+); " + _G + r"\.", (
        "On the table: {objs}; {grip}.", "I see {objs} on the table; {grip}.", "The table holds {objs}; {grip}.",
        "Left on the table: {objs}; {grip}.")),
    (SCENE, r"The table is empty; " + _G + r"\.", (
        "The table is empty; {grip}.", "Nothing is left on the table; {grip}.", "The table is clear; {grip}.")),
    (STATUS, r"'(?P<cmd>[^']+)' succeeded\.", (
        "'{cmd}' succeeded.", "The last command, '{cmd}', succeeded.", "'{cmd}' worked.", "Done: '{cmd}'.")),
    (STATUS, r"'(?P<cmd>[^']+)' failed \((?P<detail>.+)\); attempt (?P<n>\d+) of (?P<m>\d+)\.", (
        "'{cmd}' failed ({detail}); attempt {n} of {m}.",
        "The last command, '{cmd}', failed: {detail}; that was attempt {n} of {m}.",
        "'{cmd}' did not work ({detail}); attempt {n} of {m}.")),
    (STATUS, r"'(?P<cmd>[^']+)' was stopped\.", ("'{cmd}' was stopped.", "I stopped '{cmd}'.", "'{cmd}' was halted.")),
    (STATUS, r"'(?P<cmd>[^']+)' was rejected \((?P<detail>.+)\)\.", (
        "'{cmd}' was rejected ({detail}).", "The controller rejected '{cmd}' ({detail}).")),
    (STATUS, r"I should ask for help instead of trying again\.", (
        "I should ask for help instead of trying again.", "Rather than try again, I ask the user for help.",
        "Trying again is pointless now; I ask for help.")),
    (INSTRUCTION, r"The user said (?P<rest>\".+)", (
        "The user said {rest}", "The user says {rest}", "I heard {rest}", "The user told me {rest}")),
    (INSTRUCTION, r"I did not understand (?P<rest>\".+)", (
        "I did not understand {rest}", "I could not make sense of {rest}")),
    (INSTRUCTION, r"Task: (?P<task>.+); (?P<n>\d+) (?P<items>items?) left\.", (
        "Task: {task}; {n} {items} left.", "The task is to {task}; {n} {items} to go.",
        "I am to {task}, with {n} {items} left.", "Goal: {task} ({n} {items} left).")),
    (INSTRUCTION, r"Constraints: (?P<c>.+)\.", (
        "Constraints: {c}.", "Standing wishes: {c}.", "Remember: {c}.", "I must keep to this: {c}.")),
    (NEXT, r"Next: (?P<cmd>.+)\.", (
        "Next: {cmd}.", "Next step: {cmd}.", "So the next command is: {cmd}.", "Now I {cmd}.")),
    (NEXT, r"Retry: (?P<cmd>.+)\.", ("Retry: {cmd}.", "I try again: {cmd}.", "One more try: {cmd}.")),
    (NEXT, r"Waiting for '(?P<cmd>[^']+)' to finish\.", ("Waiting for '{cmd}' to finish.", "I let '{cmd}' finish.")),
    (NEXT, r"Waiting for the user's answer\.", (
        "Waiting for the user's answer.", "I wait for the user to answer.", "Now I wait for the answer.")),
    (NEXT, r"Nothing to do; waiting for the user\.", (
        "Nothing to do; waiting for the user.", "There is nothing to do until the user asks.",
        "No task yet, so I wait for the user.")),
    (NEXT, r"The task is complete; I say so and ask if anything else is needed\.", (
        "The task is complete; I say so and ask if anything else is needed.",
        "Everything is done, so I tell the user and ask whether they need anything else.",
        "Nothing is left to do: I report that and offer more help.")),
    (NEXT, r"The listed items are done, but the (?P<obj>.+) also belongs in the (?P<rec>.+); I offer to do it\.", (
        "The listed items are done, but the {obj} also belongs in the {rec}; I offer to do it.",
        "The user's list is done; the {obj} belongs in the {rec} too, so I offer to take it.")),
)
FORMS: tuple[tuple[str, re.Pattern, tuple[str, ...]], ...] = tuple(
    (facet, re.compile(pat + r"\Z"), alts) for facet, pat, alts in _FORMS_SRC)

#: What the user said, when the rest of that sentence also says what the robot does now.
_DECIDES = re.compile(r"\b(I refuse|I must ask|I stop|I leave|I go on|I just answer|I answer|nothing more to do)\b")

_FIRST = ("Nothing has been done yet.", "No command has run yet.", "This is the start: nothing done so far.")
_NO_OUTCOME = ("No command ended since my last step.", "Nothing new from the controller.",
               "No command finished since then.")
_TASK_STILL = ("The task is still to {task}.", "The task remains: {task}.", "I am still to {task}.")
_NO_TASK = ("There is no task yet.", "No task so far.")
_NO_CONSTRAINTS = ("No constraints.", "Nothing to leave out.", "No special wishes.")
_NEXT_PLAN = ("Next: {plan}.", "Next step: {plan}.")
_NO_PLAN = ("I give no command.", "No command this step.")


def split_sentences(text: str) -> list[str]:
    """Sentences of a thought: cut at whitespace after . ! ? (or after a closing quote), never inside quotes."""
    out, start, quoted = [], 0, False
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif ch.isspace() and not quoted and i > start:
            prev = text[i - 1]
            if prev in ".!?" or (prev == '"' and i >= 2 and text[i - 2] in ".!?"):
                out.append(text[start:i].strip())
                start = i + 1
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


def classify(sentence: str) -> tuple[str, Optional[int], Optional[re.Match]]:
    """(facet, form index, match) of a sentence; unknown forms are ``(OTHER, None, None)``."""
    for i, (facet, pattern, _) in enumerate(FORMS):
        m = pattern.match(sentence)
        if m:
            return facet, i, m
    return OTHER, None, None


def rewrite(thought: str, rng: np.random.Generator, facts: Facts) -> str:
    """``thought`` paraphrased (seeded by ``rng``), with the missing facets added (see the module docstring)."""
    parts: list[tuple[str, str]] = []
    for sentence in split_sentences(thought):
        facet, form, m = classify(sentence)
        if form is None:
            parts.append((OTHER, sentence))
            continue
        alts = FORMS[form][2]
        groups = {k: v for k, v in m.groupdict().items() if v is not None}
        text = _pick(rng, alts).format(grip=_grip(groups, rng) if SCENE == facet else "", **groups)
        if facet == INSTRUCTION and "rest" in groups and _DECIDES.search(groups["rest"]):
            facet = INSTRUCTION + "+" + NEXT
        parts.append((facet, text))
    facets = {f for f, _ in parts}
    has = lambda name: any(name in f.split("+") for f in facets)  # noqa: E731
    if not has(STATUS):
        line = _pick(rng, _FIRST if facts.first else _NO_OUTCOME) if not facts.has_outcome else None
        if line:
            at = next((i + 1 for i, (f, _) in enumerate(parts) if f == SCENE), 0)
            parts.insert(at, (STATUS, line))
    if not has(INSTRUCTION):
        line = _pick(rng, _TASK_STILL).format(task=facts.task) if facts.task else _pick(rng, _NO_TASK)
        at = next((i for i, (f, _) in enumerate(parts) if f == NEXT), len(parts))
        parts.insert(at, (INSTRUCTION, line))
    task_at = next((i for i, (f, t) in enumerate(parts) if f == INSTRUCTION and _is_task_line(t)), None)
    constrained = any(f == INSTRUCTION and _is_constraint_line(t) for f, t in parts)
    if task_at is not None and not constrained:
        parts.insert(task_at + 1, (INSTRUCTION, _pick(rng, _NO_CONSTRAINTS)))
    if not has(NEXT):
        line = _pick(rng, _NEXT_PLAN).format(plan=facts.plan) if facts.plan else _pick(rng, _NO_PLAN)
        parts.append((NEXT, line))
    return " ".join(t for _, t in parts)


_TASK_FORM = FORMS.index(next(f for f in FORMS if f[1].pattern.startswith("Task:")))
_CONSTRAINT_FORM = FORMS.index(next(f for f in FORMS if f[1].pattern.startswith("Constraints:")))
_TASK_LINES = tuple(a.split("{")[0] for a in FORMS[_TASK_FORM][2])
_CONSTRAINT_LINES = tuple(a.split("{")[0] for a in FORMS[_CONSTRAINT_FORM][2])


def _is_task_line(text: str) -> bool:
    return text.startswith(_TASK_LINES)


def _is_constraint_line(text: str) -> bool:
    return text.startswith(_CONSTRAINT_LINES)


# --------------------------------------------------------------------------- reading traces back


def _template_regex(template: str) -> re.Pattern:
    grip = "(?:" + "|".join(re.escape(g).replace(r"\{held\}", ".+?") for g in _GRIPS) + ")"
    out = ""
    for part in re.split(r"(\{\w+\})", template):
        m = re.fullmatch(r"\{(\w+)\}", part)
        if m is None:
            out += re.escape(part)
        elif m.group(1) == "grip":
            out += grip
        else:
            out += f"(?P<{m.group(1)}>.+?)"
    return re.compile(out + r"\Z")


_GRIPS = ("the gripper holds the {held}", "I am holding the {held}", "the {held} is in my gripper",
          "the gripper is empty", "my gripper is empty", "I hold nothing")
#: Every wording :func:`rewrite` writes, with its facet.
WORDINGS: tuple[tuple[str, re.Pattern], ...] = tuple(
    [(facet, _template_regex(t)) for facet, _, alts in FORMS for t in alts]
    + [(STATUS, _template_regex(t)) for t in _FIRST + _NO_OUTCOME]
    + [(INSTRUCTION, _template_regex(t)) for t in _TASK_STILL + _NO_TASK + _NO_CONSTRAINTS]
    + [(NEXT, _template_regex(t)) for t in _NEXT_PLAN + _NO_PLAN])


def sentence_facets(sentence: str) -> set[str]:
    """The facets of one sentence written by :func:`rewrite` (empty for a sentence of no known wording)."""
    for facet, pattern in WORDINGS:
        m = pattern.match(sentence)
        if m:
            rest = m.groupdict().get("rest")
            return {facet, NEXT} if facet == INSTRUCTION and rest and _DECIDES.search(rest) else {facet}
    return set()


def facets_of(thought: str) -> set[str]:
    """The facets a thought written by :func:`rewrite` (or the oracle) covers: scene, status, instruction, next."""
    return set().union(*(sentence_facets(s) for s in split_sentences(thought)))
