"""SFT episodes, per-step rows and RL prompt candidates, from the oracle in the simulator.

Each scenario of a split is played by the in-process runner (:mod:`sim.runner`) with the
planner node's input handling (:class:`training.data.adaptor.PlannerAdaptor`) in front of the
oracle behind the model-backend interface (:class:`sim.oracle_backend.OracleBackend`, which
reads the prompt as a model would). So every recorded step is what the run-time planner
would have built — the same :class:`~robix_planner.format.StepInput` fields, the same prompt
(:class:`robix_planner.memory.Memory` with every image kept, :data:`~training.data.adaptor.SYNTH_MEMORY`)
— and what the oracle answered, serialised with :func:`robix_planner.format.serialize`.

- :func:`build_sft` -> one row per episode: the whole conversation (system, user, assistant,
  ...) through :func:`robix_planner.format.to_hf_messages`, its images, and per assistant turn
  the ``acceptable`` plans and the ``kind`` of step. Thoughts are paraphrased per seed
  (:mod:`training.data.traces`), or replaced by :data:`~training.data.traces.NO_REASONING`
  (``reasoning=False``, the ablation without reasoning traces).
- :func:`explode_steps` -> one row per assistant turn in trl's prompt-completion format
  (the prompt is the conversation up to that step's user turn: exactly the run-time prompt).
- :func:`build_rl` -> the step rows of the model's own steps, with what reward functions need.

Step kinds (``kind``), from the reference step: ``act`` (a motion command for the task),
``retry`` (the command on an object whose last command failed), ``put_back`` (place a held
item back), ``stop``, ``refuse`` (no command, a refusal), ``ask`` (no command, a question:
which one, may I also, help), ``done`` (no command, says the task is done and asks for
more), ``chat`` (no command, answers chat or a closing), ``reply`` (no command, another
reply), ``wait`` (nothing to do or say), and ``stop_phrase``: the node's own step for a
stop phrase, taken without the model (kept in the history, never an RL prompt, not scored
offline).

``acceptable`` holds every plan that would also be right at the step, normalised like
:func:`robix_planner.skills.parse` (``""``: giving no command): in a task whose order is
free, the put command of every pending object (not one the user asked to keep or to do
first, nor one whose grasp failed); exactly the reference plan at forced steps (a held item,
"do X first", a retry, a stop); ``[""]`` where giving no command is right.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from robix_planner import format as fmt
from robix_planner import skills
from robix_planner.backends.base import ChatMessage, ImagePart, Prompt
from robix_planner.messages import Capabilities
from training.data import traces
from training.data.adaptor import STOP_PHRASE, SYNTH_MEMORY, PlannerAdaptor

log = logging.getLogger(__name__)

KINDS = ("act", "retry", "put_back", "stop", "refuse", "ask", "done", "chat", "reply", "wait", STOP_PHRASE)
#: Kinds of steps the model takes (all but the node's own stop-phrase steps).
MODEL_KINDS = tuple(k for k in KINDS if k != STOP_PHRASE)


class SynthesisError(RuntimeError):
    """An episode could not be synthesised as specified (the oracle failed, too many steps)."""


# --------------------------------------------------------------------------- features


def features(kind: str):
    """The ``datasets.Features`` of ``"sft"`` (episode) or ``"step"`` rows (see docs/training_data.md)."""
    from datasets import Features, Image, List, Value

    message = {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
    common = {
        "images": List(Image()),
        "scenario_id": Value("string"),
        "category": Value("string"),
        "variant": Value("string"),
        "split": Value("string"),
        "objects": List(Value("string")),
        "receptacles": List(Value("string")),
    }
    if kind == "sft":
        return Features({"messages": List(message), **common, "acceptable": List(List(Value("string"))),
                         "kind": List(Value("string"))})
    if kind == "step":
        return Features({"prompt": List(message), "completion": List(message), **common,
                         "acceptable": List(Value("string")), "kind": Value("string"), "step": Value("int32")})
    raise ValueError(f"features({kind!r}): use 'sft' or 'step'")


# --------------------------------------------------------------------------- playing episodes


@dataclass(frozen=True)
class StepNote:
    """What the synthesis knows about a step besides its input and output."""

    kind: str
    acceptable: tuple[str, ...]
    #: The oracle's task after the step (None when it has none), for the reasoning trace.
    task: Optional[str] = None


@dataclass
class Episode:
    """One scenario played: the recorded steps (the run-time history) and their notes."""

    scenario: Any  # sim.spec.Scenario
    capabilities: Capabilities
    steps: list[fmt.Step]
    notes: list[StepNote]
    success: bool
    failed: list[str]


def _norm(plan: Optional[str], caps: Capabilities) -> str:
    return skills.parse(plan, caps).text if plan else ""


def _annotate(step: fmt.StepInput, out: fmt.ModelOutput, by_model: bool, *, oracle, world, scenario,
              caps: Capabilities) -> StepNote:
    """The kind of a reference step and every plan acceptable there (see the module docstring)."""
    from sim.spec import TABLE, TurnRole, is_question, is_refusal, says_done

    task = oracle.task if (oracle is not None and oracle.task) else None
    plan = _norm(out.plan, caps)
    if not by_model:
        return StepNote(STOP_PHRASE, (plan,), task)
    if plan:
        parsed = skills.parse(plan, caps)
        obj = parsed.args.get("object")
        motion = [o for o in step.outcomes if o.command != "stop"]
        failed_obj = None
        if motion and motion[-1].state == "failed":
            failed_obj = skills.parse(motion[-1].command, caps).args.get("object")
        if parsed.skill == skills.STOP.name:
            return StepNote("stop", (plan,), task)
        if parsed.skill == skills.PLACE_BACK.name:
            return StepNote("put_back", (plan,), task)
        if failed_obj is not None and obj == failed_obj:
            return StepNote("retry", (plan,), task)
        acceptable = (plan,)
        free_order = (parsed.skill == skills.PUT_INTO.name and world.holding is None and not oracle.first
                      and oracle.failures[obj] == 0)
        if free_order:
            pending = [o for o in oracle.goals
                       if o not in oracle.keep and o not in oracle.given_up and world.location(o) == TABLE
                       and oracle.failures[o] == 0]
            alts = [_norm(skills.render(skills.PUT_INTO, object=o, receptacle=oracle.goals[o]), caps) for o in pending]
            if plan in alts:
                acceptable = tuple(alts)
            else:  # pragma: no cover - the oracle picks from its pending goals
                log.warning("%s: the plan %r is not among the pending goals %s", scenario.id, plan, alts)
        return StepNote("act", acceptable, task)
    reply = out.reply or ""
    roles = {t.role for t in scenario.turns if t.text in step.utterances}
    if not reply:
        kind = "wait"
    elif is_refusal(reply):
        kind = "refuse"
    elif says_done(reply) and is_question(reply):
        kind = "done"
    elif roles & {TurnRole.CHAT, TurnRole.CLOSING}:
        kind = "chat"
    elif is_question(reply):
        kind = "ask"
    else:
        kind = "reply"
    return StepNote(kind, ("",), task)


def play(scenario) -> Episode:
    """Play ``scenario`` with the oracle behind the planner node's input handling; record every step."""
    from sim.oracle_backend import OracleBackend
    from sim.runner import EpisodeRunner

    runner = EpisodeRunner(scenario)
    backend = OracleBackend(privileged=runner.privileged)
    adaptor = PlannerAdaptor(backend.answer)

    def on_step(step: fmt.StepInput, out: fmt.ModelOutput, by_model: bool) -> StepNote:
        return _annotate(step, out, by_model, oracle=backend.oracle, world=runner.world, scenario=scenario,
                         caps=adaptor.caps)

    adaptor.on_step = on_step
    result = runner.run(adaptor)
    if result.truncated:
        raise SynthesisError(f"{scenario.id}: the episode hit the runner's limits")
    steps = list(adaptor.memory.steps)
    if len(steps) > SYNTH_MEMORY.max_images:
        raise SynthesisError(f"{scenario.id}: {len(steps)} steps; the synthesis memory shows at most "
                             f"{SYNTH_MEMORY.max_images} images, so prompts would drop images")
    return Episode(scenario=scenario, capabilities=adaptor.caps, steps=steps,
                   notes=[r.note for r in adaptor.records], success=result.score.success,
                   failed=result.score.failed())


def select_scenarios(split: str = "train", n: Optional[int] = None, categories: Optional[Sequence[str]] = None,
                     limit: Optional[int] = None) -> list:
    """The scenarios of ``split``: the stored ones, or (``n``) the first ``n`` of every category.

    Scenario ``i`` of a category comes from its own seed (:func:`sim.scenarios.generate`), so
    ``n`` above the stored count adds new scenarios of the same split (same seed range and
    paraphrase templates); ``limit`` keeps at most that many per category.
    """
    from sim.scenarios import generate, load_scenarios
    from sim.spec import ScenarioCategory, Split

    split_ = Split(split)
    cats = list(ScenarioCategory) if not categories else [ScenarioCategory(c) for c in categories]
    out = []
    for cat in cats:
        found = load_scenarios(split_, cat) if n is None else [generate(cat, split_, i) for i in range(n)]
        out += found[:limit] if limit is not None else found
    return out


# --------------------------------------------------------------------------- rows


def _rng(seed: int, scenario) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(scenario.seed) & 0xFFFFFFFF, len(scenario.id)])


def training_steps(ep: Episode, seed: int, reasoning: bool = True) -> list[fmt.Step]:
    """The episode's steps with the thoughts the model is trained on (paraphrased, or minimal).

    The node's own stop-phrase steps keep their thought: it is what the planner writes into
    the history at run time.
    """
    rng = _rng(seed, ep.scenario)
    out = []
    for i, (step, note) in enumerate(zip(ep.steps, ep.notes)):
        if note.kind != STOP_PHRASE:
            if reasoning:
                facts = traces.Facts(first=i == 0, has_outcome=bool(step.input.outcomes), task=note.task,
                                     plan=step.output.plan)
                thought = traces.rewrite(step.output.thought, rng, facts)
            else:
                thought = traces.NO_REASONING
            step = fmt.Step(step.input, replace(step.output, thought=thought))
        out.append(step)
    return out


def conversation(caps: Capabilities, steps: Sequence[fmt.Step]) -> Prompt:
    """The whole episode as one conversation: the last step's run-time prompt plus its answer."""
    prompt = fmt.build_prompt(caps, list(steps[:-1]), steps[-1].input, images_from=0)
    prompt.append(fmt.assistant_turn(steps[-1].output))
    return prompt


def _hf(messages: list[dict]) -> list[dict]:
    """Messages as stored: every content item has ``type`` and ``text`` (None for an image)."""
    return [{"role": m["role"], "content": [{"type": c["type"], "text": c.get("text")} for c in m["content"]]}
            for m in messages]


def encode_image(pixels) -> dict:
    """An RGB array as the ``datasets`` Image feature stores it (``{"bytes": PNG, "path": None}``).

    Rows hold encoded images rather than PIL ones, so building a large set keeps a tenth of
    the memory; the bytes are the ones ``datasets`` would write for the PIL image.
    """
    from datasets import Image as ImageFeature
    from PIL import Image

    return ImageFeature().encode_example(Image.fromarray(np.asarray(pixels, dtype=np.uint8)))


def episode_row(ep: Episode, seed: int, reasoning: bool = True) -> dict:
    """One SFT row for a played episode (images encoded, see :func:`encode_image`)."""
    steps = training_steps(ep, seed, reasoning)
    messages, parts = fmt.to_hf_messages(conversation(ep.capabilities, steps))
    sc = ep.scenario
    return {
        "messages": _hf(messages),
        "images": [encode_image(p.pixels) for p in parts],
        "scenario_id": sc.id,
        "category": sc.category.value,
        "variant": sc.variant,
        "split": sc.split.value,
        "objects": list(ep.capabilities.objects),
        "receptacles": list(ep.capabilities.receptacles),
        "acceptable": [list(n.acceptable) for n in ep.notes],
        "kind": [n.kind for n in ep.notes],
    }


def _bar(total: int, desc: str, progress: bool):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="episode", file=sys.stderr, disable=None if progress else True,
                leave=False)


def play_all(scenarios: Sequence, progress: bool = True) -> list[Episode]:
    """Play every scenario (tqdm progress); a scenario the oracle fails is an error."""
    eps = []
    with _bar(len(scenarios), "episodes", progress) as bar:
        for sc in scenarios:
            ep = play(sc)
            if not ep.success:
                raise SynthesisError(f"{sc.id}: the oracle did not succeed ({', '.join(ep.failed)}); "
                                     "a reference episode must meet every predicate")
            eps.append(ep)
            bar.update(1)
    return eps


def build_sft(split: str = "train", seed: int = 0, *, n: Optional[int] = None, reasoning: bool = True,
              categories: Optional[Sequence[str]] = None, limit: Optional[int] = None, progress: bool = True):
    """SFT episodes of ``split`` as a ``datasets.Dataset`` (one row per episode; see the module docstring).

    ``seed`` draws the thought paraphrases; ``n`` / ``categories`` / ``limit`` choose the
    scenarios (:func:`select_scenarios`); ``reasoning=False`` gives every model step the
    minimal thought :data:`training.data.traces.NO_REASONING`.
    """
    from datasets import Dataset

    t0 = time.perf_counter()
    eps = play_all(select_scenarios(split, n, categories, limit), progress)
    rows = [episode_row(ep, seed, reasoning) for ep in eps]
    ds = Dataset.from_list(rows, features=features("sft"))
    log.info("built %d SFT episodes (%d steps) of split %s in %.1f s", len(rows), sum(len(r["kind"]) for r in rows),
             split, time.perf_counter() - t0)
    return ds


def explode_steps(episode_rows: Union[Iterable[dict], Any], *, model_steps_only: bool = False, progress: bool = True):
    """Per-step rows of SFT episode rows: trl's prompt-completion conversational format.

    Row ``k`` of an episode: ``prompt`` = the messages up to and including the user turn of
    step ``k`` (the system message, then the earlier turns: the run-time prompt),
    ``completion`` = ``[assistant turn k]``, ``images`` = the images of the prompt, in order,
    with ``acceptable``, ``kind``, ``step`` = k and the episode's other columns.
    ``model_steps_only`` leaves out the node's stop-phrase steps.
    """
    from datasets import Dataset, Image, List

    if isinstance(episode_rows, Dataset):  # pass images through as PNG bytes: no decode/encode
        episode_rows = episode_rows.cast_column("images", List(Image(decode=False)))
    rows = []
    with _bar(len(episode_rows) if hasattr(episode_rows, "__len__") else 0, "steps", progress) as bar:
        for ep in episode_rows:
            messages, images = ep["messages"], list(ep["images"])
            seen_images = 0
            k = 0
            for j, msg in enumerate(messages):
                if msg["role"] != "assistant":
                    seen_images += sum(c["type"] == "image" for c in msg["content"])
                    continue
                if k >= len(ep["kind"]):
                    raise ValueError(f"{ep['scenario_id']}: more assistant turns than kinds")
                kind = ep["kind"][k]
                if not (model_steps_only and kind == STOP_PHRASE):
                    rows.append({
                        "prompt": messages[:j], "completion": [msg], "images": images[:seen_images],
                        "scenario_id": ep["scenario_id"], "category": ep["category"], "variant": ep["variant"],
                        "split": ep["split"], "objects": ep["objects"], "receptacles": ep["receptacles"],
                        "acceptable": list(ep["acceptable"][k]), "kind": kind, "step": k,
                    })
                k += 1
            if k != len(ep["kind"]):
                raise ValueError(f"{ep['scenario_id']}: {k} assistant turns but {len(ep['kind'])} kinds")
            bar.update(1)
    return Dataset.from_list(rows, features=features("step"))


def build_rl(split: str = "train", seed: int = 0, *, n: Optional[int] = None, reasoning: bool = True,
             categories: Optional[Sequence[str]] = None, limit: Optional[int] = None, progress: bool = True):
    """RL prompt candidates: the model's steps of :func:`build_sft` as per-step rows.

    Each row has what the reward functions need: ``acceptable`` (plans, normalised; ``""``
    = no command), ``kind``, the scene's ``objects`` and ``receptacles`` (rebuild the
    grammar with :func:`capabilities_of` to normalise a sampled plan), and the reference
    ``completion``. Robix's variance filter (trl sampling of the SFT model) comes after.
    """
    sft = build_sft(split, seed, n=n, reasoning=reasoning, categories=categories, limit=limit, progress=progress)
    return explode_steps(sft, model_steps_only=True, progress=progress)


# --------------------------------------------------------------------------- reading rows back


def capabilities_of(row: dict) -> Capabilities:
    """The controller grammar of a row's scene (the simulated controller's skills, its objects and receptacles)."""
    return Capabilities(robot="sim_tabletop", skills=list(skills.TABLETOP_SKILLS), objects=list(row["objects"]),
                        receptacles=list(row["receptacles"]))


def to_prompt(messages: Sequence[dict], images: Sequence) -> Prompt:
    """Stored messages and their images (PIL, numpy, or ``{"bytes": ...}``) back into a backend :data:`Prompt`.

    The inverse of :func:`robix_planner.format.to_hf_messages`: ``to_hf_messages(to_prompt(m, i))``
    gives ``m`` (image items without ``text``) and the same pixels.
    """
    import io
    import re

    from PIL import Image

    camera = re.compile(r"\n([^\n]*): \Z")
    it = iter(images)
    prompt: Prompt = []
    for m in messages:
        parts: list = []
        for c in m["content"]:
            if c["type"] == "text":
                parts.append(c["text"] or "")
            elif c["type"] == "image":
                try:
                    img = next(it)
                except StopIteration:
                    raise ValueError("more image placeholders than images") from None
                if isinstance(img, dict):
                    img = Image.open(io.BytesIO(img["bytes"]))
                pixels = np.asarray(img.convert("RGB")) if hasattr(img, "convert") else np.asarray(img)
                prev = parts[-1] if parts and isinstance(parts[-1], str) else ""
                found = camera.search(prev)
                parts.append(ImagePart(pixels, camera=found.group(1) if found else "head"))
            else:
                raise ValueError(f"unknown content type {c['type']!r}")
        prompt.append(ChatMessage(m["role"], tuple(parts)))
    if next(it, None) is not None:
        raise ValueError("more images than image placeholders")
    return prompt
