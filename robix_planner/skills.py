"""The atomic-command grammar: one source of truth for controller, validator and prompt.

A controller advertises its skills as templates in :class:`~robix_planner.messages.Capabilities`
("put the {object} into the {receptacle}"), together with its vocabulary. :func:`parse`
turns a command text into a skill and arguments *only* if every word is understood,
exactly as a real low-level policy fails on a word it was never trained on. The
simulated controller, the planner's validator and the prompt shown to the model all call
into this module, so they cannot disagree.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from robix_planner.messages import Capabilities, SkillSpec

#: Argument kinds and the vocabulary list of Capabilities each draws from.
ARG_KINDS = {"object": "objects", "receptacle": "receptacles"}

STOP = SkillSpec(name="stop", template="stop", description="halt the current action at once")
PICK_UP = SkillSpec(name="pick_up", template="pick up the {object}", description="grasp an object and lift it")
PUT_INTO = SkillSpec(
    name="put_into",
    template="put the {object} into the {receptacle}",
    description="grasp the object if needed, carry it to the receptacle and release it there",
)
PLACE_BACK = SkillSpec(
    name="place_back",
    template="place the {object} back on the table",
    description="put the held object down on the table where it was",
)
NAVIGATE = SkillSpec(name="navigate", template="navigate to the {receptacle}", description="drive to a place")
OPEN = SkillSpec(name="open", template="open the {receptacle}", description="open a container")
CLOSE = SkillSpec(name="close", template="close the {receptacle}", description="close a container")

#: The skills of a tabletop manipulation controller (what the simulated one advertises).
TABLETOP_SKILLS: tuple[SkillSpec, ...] = (PUT_INTO, PICK_UP, PLACE_BACK, STOP)
#: Every skill this module knows, for controllers that advertise more.
ALL_SKILLS: tuple[SkillSpec, ...] = (PUT_INTO, PICK_UP, PLACE_BACK, NAVIGATE, OPEN, CLOSE, STOP)


class GrammarError(ValueError):
    """A command text the controller would not understand; the message says why."""


@dataclass(frozen=True)
class ParsedCommand:
    skill: str
    args: dict[str, str] = field(default_factory=dict)
    text: str = ""


def normalize(text: str) -> str:
    """Lower-case, single spaces, no trailing punctuation: the canonical command text."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!?").strip()


_FIELD = re.compile(r"\{(\w+)\}")


@lru_cache(maxsize=256)
def compile_template(template: str) -> tuple[re.Pattern, tuple[str, ...]]:
    """A template's regular expression (one named group per argument) and its argument names, in order.

    The pattern matches normalised text (:func:`normalize`) and checks no vocabulary: any words fill
    an argument.
    """
    names = tuple(_FIELD.findall(template))
    for name in names:
        if name not in ARG_KINDS:
            raise GrammarError(f"template {template!r} uses {{{name}}}; argument kinds are {sorted(ARG_KINDS)}")
    pattern = ""
    for part in re.split(r"(\{\w+\})", normalize(template)):
        m = _FIELD.fullmatch(part)
        pattern += f"(?P<{m.group(1)}>.+?)" if m else re.escape(part)
    return re.compile(pattern + r"\Z"), names


def template_args(template: str) -> tuple[str, ...]:
    """The argument names of a template, in order."""
    return compile_template(template)[1]


def render(spec: SkillSpec, **args: str) -> str:
    """The command text for a skill and its arguments: ``render(PUT_INTO, object="red cup", receptacle="bus tub")``."""
    missing = set(template_args(spec.template)) - set(args)
    if missing:
        raise GrammarError(f"skill {spec.name!r} needs {sorted(missing)}")
    return normalize(spec.template.format(**args))


def parse(text: str, caps: Capabilities) -> ParsedCommand:
    """Parse ``text`` in the grammar and vocabulary of ``caps``; raise :class:`GrammarError` if not understood."""
    norm = normalize(text)
    if not norm:
        raise GrammarError("empty command")
    vocab = {kind: {normalize(w) for w in getattr(caps, attr)} for kind, attr in ARG_KINDS.items()}
    near: list[str] = []
    for spec in caps.skills:
        pattern, names = compile_template(spec.template)
        m = pattern.match(norm)
        if not m:
            continue
        args = {name: m.group(name) for name in names}
        unknown = [f"{kind} {value!r}" for kind, value in args.items() if value not in vocab[kind]]
        if not unknown:
            return ParsedCommand(skill=spec.name, args=args, text=norm)
        near.append(f"{spec.name}: unknown {', '.join(unknown)}")
    if near:
        known = "; ".join(f"{kind}s: {', '.join(sorted(v)) or '(none)'}" for kind, v in vocab.items())
        raise GrammarError(f"{text!r} names words outside the vocabulary ({'; '.join(near)}). Known {known}")
    forms = "; ".join(repr(s.template) for s in caps.skills)
    raise GrammarError(f"{text!r} matches no skill. The controller understands: {forms}")


#: :func:`commands` gives up (returns None) past this many command texts.
MAX_COMMANDS = 50_000


def commands(caps: Capabilities, limit: int = MAX_COMMANDS) -> Optional[list[str]]:
    """Every command text that :func:`parse` accepts for ``caps``, in canonical form (each skill with
    every combination of its arguments from the vocabulary); None when there are more than ``limit``.

    What a backend can constrain a plan to (``model.constrain_plans``).
    """
    vocab = {kind: list(dict.fromkeys(normalize(w) for w in getattr(caps, attr))) for kind, attr in ARG_KINDS.items()}
    out: list[str] = []
    for spec in caps.skills:
        names = template_args(spec.template)
        count = 1
        for name in names:
            count *= len(vocab[name])
        if len(out) + count > limit:
            return None
        for values in itertools.product(*(vocab[name] for name in names)):
            out.append(render(spec, **dict(zip(names, values))))
    return list(dict.fromkeys(out))


def describe(caps: Capabilities) -> str:
    """The grammar and vocabulary as plain text, for prompts and documentation."""
    lines = ["Skills (one per step, worded exactly so):"]
    lines += [f"- {s.template}" + (f"  ({s.description})" if s.description else "") for s in caps.skills]
    lines.append("Objects: " + (", ".join(caps.objects) or "(none)"))
    lines.append("Receptacles: " + (", ".join(caps.receptacles) or "(none)"))
    return "\n".join(lines)
