"""Rewards for the RL stage (GRPO), Robix's three signals plus an optional model judge.

Every reward is a plain function ``f(prompts, completions, **columns) -> list[float]``, one
value per completion (trl's reward-function contract; ``columns`` are the dataset's other
columns, one value per completion). A completion is either a string or trl's conversational
form ``[{"role": "assistant", "content": text}]``.

- :func:`format_reward`: 1 when :func:`robix_planner.format.parse` reads the completion, else 0.
- :func:`action_reward`: 1 when the completion's plan is in the row's ``acceptable`` list, else
  0. Plans are compared after :func:`robix_planner.skills.normalize` (case, spaces, trailing
  punctuation); ``""`` in ``acceptable`` means giving no command is right. A completion that
  does not parse gets 0.
- :func:`consistency_reward`: a rule-based judge of whether the thought agrees with the plan
  and the reply, on Robix's scale: +1 consistent, 0 cannot judge, -1 inconsistent. The rules,
  in order (words are compared lower-case; a plural ``s``/``es`` counts as the same word):

  With a plan:

  1. The plan is not a command of any known skill (:data:`robix_planner.skills.ALL_SKILLS`):
     0 (the action reward judges the wording).
  2. The thought must name the plan's arguments: every word of the object and of the
     receptacle; for ``stop``, a word of halting (stop, halt, pause, cancel, abort, wait).
     Else -1.
  3. The thought must not say the robot will not act (refuse, won't, will not, do not move,
     don't move, must ask, ask which, nothing (more) to do). Else -1.
  4. When the thought states an action ("Next: put ...", "Retry: put ...", "Next step: pick
     ...", "So the next command is: place ...", "Now I put ...", "I'll pick ...", "I stop"),
     the last one stated (earlier ones narrate what happened) must be the plan's skill.
     Else -1.
  5. Otherwise +1.

  Without a plan:

  6. The thought states an action it will take now (as in rule 4): -1 (it said it would act
     and gave no command).
  7. The thought asks (ask, clarify, offer, which one): the reply must hold a question mark.
     Else -1; if so +1.
  8. The thought refuses (refuse, won't, will not, do not move, don't move), or answers chat
     (answer, reply, greeting, small talk): there must be a reply. Else -1; if so +1.
  9. The thought waits (waiting, wait for, nothing (more) to do): +1.
  10. Otherwise 0.

  Quoted speech in the thought ("the user said \"I'll do it\"") is not read as the robot's
  own statement. A completion that does not parse gets 0 (the format reward already punishes it).
- :class:`ModelJudge`: the same question asked to a model through the planner's backend
  interface (:func:`robix_planner.backends.load_backend`), answering +1, 0 or -1. Off by
  default (weight 0): it costs a model call per completion.

:class:`RewardSet` holds the enabled rewards with their weights; its :meth:`RewardSet.score`
is the weighted sum, the one number the variance filter compares.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from robix_planner import format as fmt
from robix_planner import skills

log = logging.getLogger(__name__)

RewardFunc = Callable[..., list]


# --------------------------------------------------------------------------- completions


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or trl's ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        texts = []
        for message in completion:
            content = message.get("content") if isinstance(message, dict) else message
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, (list, tuple)):
                texts += [p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "".join(texts)
    raise TypeError(f"a completion is a string or a list of messages, got {type(completion).__name__}")


def _parse(completion: Any) -> Optional[fmt.ModelOutput]:
    try:
        return fmt.parse(completion_text(completion))
    except fmt.FormatError:
        return None


# --------------------------------------------------------------------------- format, action


def format_reward(prompts: Sequence, completions: Sequence, **columns) -> list[float]:
    """1.0 when the completion is a well-formed model output (:func:`robix_planner.format.parse`), else 0.0."""
    return [0.0 if _parse(c) is None else 1.0 for c in completions]


def is_acceptable(plan: Optional[str], acceptable: Sequence[str]) -> bool:
    """Whether ``plan`` (None: no command) is one of ``acceptable`` ("" = no command is acceptable)."""
    if isinstance(acceptable, str) or not all(isinstance(a, str) for a in acceptable):
        raise ValueError(
            f"acceptable must be a list of command strings for one step, got {acceptable!r}; the RL prompts are "
            "per-step rows (training.data.episodes.explode_steps), not whole episodes"
        )
    wanted = {skills.normalize(a) for a in acceptable}
    return (skills.normalize(plan) if plan else "") in wanted


def action_reward(prompts: Sequence, completions: Sequence, acceptable: Optional[Sequence] = None,
                  **columns) -> list[float]:
    """1.0 when the completion's plan is in the row's ``acceptable`` list (normalised), else 0.0."""
    if acceptable is None:
        raise ValueError("action_reward needs the dataset column 'acceptable' (a list of acceptable commands per row)")
    if len(acceptable) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(acceptable)} 'acceptable' values")
    out = []
    for c, ok in zip(completions, acceptable):
        parsed = _parse(c)
        out.append(1.0 if parsed is not None and is_acceptable(parsed.plan, ok) else 0.0)
    return out


# --------------------------------------------------------------------------- consistency (rules)

_VERB_SKILL = {"put": "put_into", "pick": "pick_up", "place": "place_back", "stop": "stop",
               "navigate": "navigate", "open": "open", "close": "close"}
_VERBS = "|".join(_VERB_SKILL)
# "Next: put", "Retry: put", "Next step: put", "So the next command is: put", "Now I put", "I'll pick", "so I stop".
_ACT = re.compile(
    rf"\b(?:(?:next|retry|now|then)(?: (?:step|command|action))?(?: is)?\s*:\s*"
    rf"|i(?:'ll|\u2019ll| will| am going to| now)?\s+)({_VERBS})\b"
)
_REFUSE = re.compile(r"\b(?:refuse|refuses|refusing|won't|won\u2019t|will not|do not move|don't move)\b")
_ASK = re.compile(r"\b(?:ask|asks|asking|clarify|offer|offers|which one)\b")
#: The thought says no command is due (rule 3).
_NO_ACT = re.compile(_REFUSE.pattern + r"|\b(?:must ask|ask which|nothing (?:more |else )?to do)\b")
_CHAT = re.compile(r"\b(?:answer|reply|greeting|small talk)\b")
_WAIT = re.compile(r"\b(?:waiting|wait for|nothing (?:more |else )?to do)\b")
_QUOTED = re.compile(r'"[^"]*"|\u201c[^\u201d]*\u201d')
_HALT_WORDS = {"stop", "stops", "stopping", "halt", "pause", "cancel", "abort", "wait"}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _names(thought_words: set[str], name: str) -> bool:
    """Every word of ``name`` is in the thought (a plural counts)."""
    return all(w in thought_words or w + "s" in thought_words or w + "es" in thought_words
               for w in re.findall(r"[a-z0-9]+", name.lower()))


def plan_skill(plan: str) -> Optional[tuple[str, dict[str, str]]]:
    """``(skill name, arguments)`` of a command in any known skill's wording, or None."""
    norm = skills.normalize(plan)
    for spec in skills.ALL_SKILLS:
        pattern, names = skills.compile_template(spec.template)  # the grammar's own templates, no vocabulary check
        m = pattern.match(norm)
        if m:
            return spec.name, {n: m.group(n) for n in names}
    return None


def judge_consistency(out: fmt.ModelOutput) -> int:
    """The rule-based judge (module docstring, rules 1-10): +1 consistent, 0 cannot judge, -1 inconsistent."""
    words = _words(out.thought)
    # Quoted speech ("the user said \"I'll pick it up\"") is not the robot's own statement.
    thought = _QUOTED.sub(" ", out.thought.lower())
    stated = list(_ACT.finditer(thought))
    act = stated[-1] if stated else None  # the last stated action is the next one (earlier ones narrate)
    if out.plan is not None:
        parsed = plan_skill(out.plan)
        if parsed is None:
            return 0
        skill, args = parsed
        if skill == "stop":
            if not words & _HALT_WORDS:
                return -1
        elif not all(_names(words, value) for value in args.values()):
            return -1
        if _NO_ACT.search(thought):
            return -1
        if act is not None and _VERB_SKILL[act.group(1)] != skill:
            return -1
        return 1
    if act is not None:
        return -1
    if _ASK.search(thought):
        return 1 if out.reply is not None and "?" in out.reply else -1
    if _REFUSE.search(thought):
        return 1 if out.reply is not None else -1
    if _CHAT.search(thought):
        return 1 if out.reply is not None else -1
    if _WAIT.search(thought):
        return 1
    return 0


def consistency_reward(prompts: Sequence, completions: Sequence, **columns) -> list[float]:
    """The rule-based thought-action consistency judge: +1, 0 or -1 per completion (0 if it does not parse)."""
    out = []
    for c in completions:
        parsed = _parse(c)
        out.append(0.0 if parsed is None else float(judge_consistency(parsed)))
    return out


# --------------------------------------------------------------------------- model judge

JUDGE_SYSTEM = (
    "You check a robot planner's answers. The planner wrote a thought, then at most one command for the robot, "
    "then an optional reply to the user. Decide whether the command and the reply agree with the thought: the "
    "thought names the object and the intent of the command; a refusal or a question comes with a reply and no "
    "command; a thought that says it will act comes with a command. Answer with exactly one of: +1 (consistent), "
    "0 (cannot judge), -1 (inconsistent)."
)
_SCORE = re.compile(r"(?<![\d.])([+-]?1|0)(?!\d|\.\d)")


def _last_user_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt[-2000:]
    for message in reversed(list(prompt or [])):
        if isinstance(message, dict) and message.get("role") == "user":
            return completion_text([message])[-2000:]
    return ""


class ModelJudge:
    """Thought-action consistency judged by a model behind the planner's backend interface.

    ``model``: a :class:`robix_planner.backends.ModelConfig` (any backend: ``hf``, ``openai``,
    ``scripted``). The backend is created on first use. Its answer's first ``+1``, ``0`` or
    ``-1`` is the score; anything else, and a completion that does not parse, scores 0.
    """

    __name__ = "model_judge"  # trl names each reward function's logged mean after this

    def __init__(self, model: Any):
        self.model = model
        self._backend = None

    def _get_backend(self):
        if self._backend is None:
            from robix_planner.backends import load_backend

            self._backend = load_backend(self.model)
        return self._backend

    def judge(self, prompt: Any, out: fmt.ModelOutput) -> float:
        from robix_planner.backends.base import ChatMessage

        question = (
            f"The robot was told:\n{_last_user_text(prompt)}\n\n"
            f"Thought: {out.thought}\nCommand: {out.plan or '(none)'}\nReply: {out.reply or '(none)'}\n\n"
            "Consistent? Answer +1, 0 or -1."
        )
        messages = [ChatMessage("system", (JUDGE_SYSTEM,)), ChatMessage("user", (question,))]
        answer = "".join(self._get_backend().generate(messages, cancel=threading.Event()))
        m = _SCORE.search(answer)
        if m is None:
            log.debug("model judge answered %r: scored 0", answer[:80])
            return 0.0
        return float(int(m.group(1)))

    def __call__(self, prompts: Sequence, completions: Sequence, **columns) -> list[float]:
        out = []
        for p, c in zip(prompts, completions):
            parsed = _parse(c)
            out.append(0.0 if parsed is None else self.judge(p, parsed))
        return out

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


# --------------------------------------------------------------------------- weighted set

REWARDS: dict[str, RewardFunc] = {
    "format": format_reward,
    "action": action_reward,
    "consistency": consistency_reward,
}


@dataclass
class RewardSet:
    """The enabled rewards (weight != 0) in a fixed order, with their weights."""

    funcs: list[RewardFunc]
    weights: list[float]

    @classmethod
    def build(cls, weights: dict[str, float], judge_model: Any = None) -> "RewardSet":
        """From ``{"format": w, "action": w, "consistency": w, "judge": w}``; ``judge`` needs ``judge_model``."""
        funcs, ws = [], []
        for name, w in weights.items():
            if w == 0:
                continue
            if name == "judge":
                if judge_model is None:
                    raise ValueError("rewards.judge has a weight but rewards.judge_model is not set")
                funcs.append(ModelJudge(judge_model))
            elif name in REWARDS:
                funcs.append(REWARDS[name])
            else:
                raise ValueError(f"unknown reward {name!r}; the rewards are {sorted(REWARDS) + ['judge']}")
            ws.append(float(w))
        if not funcs:
            raise ValueError("every reward weight is 0: enable at least one of format, action, consistency, judge")
        return cls(funcs, ws)

    @property
    def names(self) -> list[str]:
        return [f.__name__ for f in self.funcs]

    def score(self, prompts: Sequence, completions: Sequence, **columns) -> list[float]:
        """The weighted sum of the rewards, per completion."""
        total = [0.0] * len(completions)
        for f, w in zip(self.funcs, self.weights):
            for i, r in enumerate(f(prompts, completions, **columns)):
                total[i] += w * r
        return total
