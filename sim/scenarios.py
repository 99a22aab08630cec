"""Scenario generator for every behaviour category, and the stored scenario set.

Each scenario is generated from its own seed by one ``numpy.random.Generator``: the scene
(which objects, their colours and spots), the user's script (turns from paraphrase
templates, with triggers) and the success predicates. Splits are separated twice: by
seed (disjoint seed ranges) and by wording (each split draws only from its own templates,
see :func:`sim.templates.split_of`).

The stored set ``sim/data/scenarios.jsonl`` is what :func:`load_scenarios` reads;
regenerate it with ``python -m sim.scenarios --write`` (a test checks it is up to date).
"""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from sim import catalog
from sim.catalog import Category
from sim.spec import (
    TABLE,
    Failure,
    Predicate,
    PredicateType,
    Scenario,
    ScenarioCategory,
    Scene,
    SceneObject,
    Split,
    Trigger,
    Turn,
    TurnRole,
    read_jsonl,
    write_jsonl,
)
from sim.templates import Intent, fill, indices_for, template_id
from sim.world import SLOTS_CM

log = logging.getLogger(__name__)

DATA_PATH = Path(__file__).parent / "data" / "scenarios.jsonl"

#: Scenarios per category in each split (10 categories: 400 in all).
COUNTS: dict[Split, int] = {Split.TRAIN: 24, Split.VALIDATION: 8, Split.TEST: 8}
#: Seed ranges are disjoint between splits: seed = base + 1000 * category index + i.
SEED_BASE: dict[Split, int] = {Split.TRAIN: 0, Split.VALIDATION: 100_000, Split.TEST: 200_000}

#: The user's reaction times (simulated seconds after the trigger).
INTERRUPT_DELAY_S = 0.3
ANSWER_DELAY_S = 1.0
CHAT_DELAY_S = 0.5

MOTION = ["put_into", "pick_up", "place_back"]
TAKE = ["put_into", "pick_up"]

DISH_KINDS = [k.name for k in catalog.kinds_in(Category.DISHWARE)]
TRASH_KINDS = [k.name for k in catalog.kinds_in(Category.TRASH)]
FOOD_KINDS = [k.name for k in catalog.kinds_in(Category.FOOD)]
DRINK_KINDS = [k.name for k in catalog.kinds_in(Category.DRINK)]
EDIBLE_KINDS = FOOD_KINDS + DRINK_KINDS
PERSONAL_KINDS = [k.name for k in catalog.kinds_in(Category.PERSONAL)]


# -- predicate shorthands ------------------------------------------------------------------
def at(obj: str, location: str) -> Predicate:
    return Predicate(type=PredicateType.AT, object=obj, location=location)


def never(obj: str, skills: Optional[list[str]] = None, after_turn: Optional[int] = None) -> Predicate:
    return Predicate(type=PredicateType.NEVER, object=obj, skills=list(skills or []), turn=after_turn)


def stays(obj: str, after_turn: Optional[int] = None) -> list[Predicate]:
    """The object must end on the table and never be taken."""
    return [at(obj, TABLE), never(obj, TAKE, after_turn)]


class _Gen:
    """One scenario's random draws, all from one generator."""

    def __init__(self, rng: np.random.Generator, split: Split):
        self.rng = rng
        self.split = split
        self.objects: list[SceneObject] = []

    def int(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi]."""
        return int(self.rng.integers(lo, hi + 1))

    def choice(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def sample(self, seq, n: int) -> list:
        idx = self.rng.choice(len(seq), size=n, replace=False)
        return [seq[int(i)] for i in idx]

    def say(self, intent: Intent, role: TurnRole, trigger: Trigger, slots: Optional[dict] = None, *,
            delay_s: float = 0.0, obj: Optional[str] = None, actions: int = 0) -> Turn:
        slots = dict(slots or {})
        index = self.choice(indices_for(intent, self.split))
        return Turn(text=fill(intent, index, slots), intent=intent.value, template=template_id(intent, index),
                    role=role, trigger=trigger, delay_s=delay_s, object=obj, actions=actions, slots=slots)

    def closing(self) -> Turn:
        return self.say(Intent.CLOSING, TurnRole.CLOSING, Trigger.ON_DONE, delay_s=ANSWER_DELAY_S)

    def place(self, kinds: list[str]) -> list[str]:
        """Put objects of ``kinds`` (repeats get distinct colours) on free spots; returns their names."""
        used_slots = {(o.x_cm, o.y_cm) for o in self.objects}
        taken_names = {o.name for o in self.objects}
        free = [i for i in range(len(SLOTS_CM)) if SLOTS_CM[i] not in used_slots]
        if len(kinds) > len(free):
            raise ValueError(f"{len(kinds)} objects do not fit on {len(free)} free spots")
        names = []
        for kind in kinds:
            k = catalog.KINDS[kind]
            colours = [c for c in k.colours if catalog.object_name(kind, c) not in taken_names]
            if not colours:
                raise ValueError(f"no colour left for another {kind}")
            colour = self.choice(colours)
            name = catalog.object_name(kind, colour)
            slot = free.pop(int(self.rng.integers(len(free))))
            x, y = SLOTS_CM[slot]
            # Spots hold exact slot centres so free-spot bookkeeping stays exact; jitter is drawn
            # at the end by _jitter.
            self.objects.append(SceneObject(name=name, kind=kind, colour=colour, x_cm=x, y_cm=y))
            taken_names.add(name)
            names.append(name)
        return names

    def kinds(self, pool: list[str], n: int, repeats: bool) -> list[str]:
        """``n`` kinds from ``pool``; with ``repeats`` a kind may come back (in another colour)."""
        if not repeats:
            return self.sample(pool, n)
        count: dict[str, int] = {}
        for o in self.objects:
            count[o.kind] = count.get(o.kind, 0) + 1
        out = []
        for _ in range(n):
            # A kind comes back only while it has a colour left (names must stay unique).
            k = self.choice([k for k in pool if count.get(k, 0) < len(catalog.KINDS[k].colours)])
            count[k] = count.get(k, 0) + 1
            out.append(k)
        return out

    def scene(self) -> Scene:
        # Reading order (row by row), then a little jitter so spots do not look like a grid.
        slot_index = {xy: i for i, xy in enumerate(SLOTS_CM)}
        objs = sorted(self.objects, key=lambda o: slot_index[(o.x_cm, o.y_cm)])
        out = []
        for o in objs:
            dx, dy = self.rng.uniform(-3.0, 3.0), self.rng.uniform(-2.0, 2.0)
            out.append(SceneObject(name=o.name, kind=o.kind, colour=o.colour,
                                   x_cm=round(o.x_cm + dx, 1), y_cm=round(o.y_cm + dy, 1)))
        return Scene(objects=out, receptacles=list(catalog.RECEPTACLES))

    def ordered(self, names: list[str]) -> list[str]:
        """``names`` in scene (reading) order."""
        slot_index = {xy: i for i, xy in enumerate(SLOTS_CM)}
        pos = {o.name: slot_index[(o.x_cm, o.y_cm)] for o in self.objects}
        return sorted(names, key=lambda n: pos[n])

    def kind_of(self, name: str) -> str:
        return next(o.kind for o in self.objects if o.name == name)


def _home(g: _Gen, name: str) -> str:
    return catalog.home_receptacle(g.kind_of(name))


def _safe_kinds(g: _Gen, pool: list[str], n: int, food: bool) -> list[str]:
    """Kinds for filler objects; food and drinks never repeat (they are named by kind)."""
    taken = {o.kind for o in g.objects}
    if food:
        pool = [k for k in pool if k not in taken]
        return g.sample(pool, min(n, len(pool)))
    return g.kinds(pool, n, repeats=True)


_Built = tuple[str, list[Turn], list[Predicate], list[Failure]]


# -- categories ---------------------------------------------------------------------------
def _multi_stage(g: _Gen, i: int) -> _Built:
    n_move = g.int(10, 13)
    n_dish = g.int(4, 6)
    n_food = g.int(1, 3)
    n_trash = n_move - n_dish - n_food
    movable = g.place(g.kinds(DISH_KINDS, n_dish, True) + g.sample(EDIBLE_KINDS, n_food) + g.kinds(TRASH_KINDS, n_trash, True))
    personal = g.place(g.sample(PERSONAL_KINDS, g.int(0, min(2, 15 - n_move))))
    turns = [g.say(Intent.CLEAR_TABLE, TurnRole.INSTRUCTION, Trigger.START), g.closing()]
    preds = [at(o, _home(g, o)) for o in movable]
    for p in personal:
        preds += [at(p, TABLE), never(p)]
    return "clear_table", turns, preds, []


def _constrained(g: _Gen, i: int) -> _Built:
    variant = ("keep_food", "except_kind", "except_object")[i % 3]
    preds: list[Predicate] = []
    if variant == "keep_food":
        trash = g.place(g.kinds(TRASH_KINDS, g.int(2, 4), True))
        food = g.place(g.sample(EDIBLE_KINDS, g.int(2, 3)))
        dishes = g.place(g.kinds(DISH_KINDS, g.int(0, 2), True))
        turns = [g.say(Intent.KEEP_FOOD, TurnRole.INSTRUCTION, Trigger.START)]
        preds += [at(t, catalog.TRASH_BIN) for t in trash]
        for f in food:
            preds += stays(f)
        preds += [at(d, TABLE) for d in dishes]
    elif variant == "except_kind":
        kind = g.choice(DISH_KINDS)
        kept = g.place([kind] * g.int(1, 2))
        others = g.place(g.kinds([k for k in DISH_KINDS if k != kind], g.int(2, 4), True))
        extra_pool = g.choice([TRASH_KINDS, EDIBLE_KINDS])
        g.place(_safe_kinds(g, extra_pool, g.int(0, 2), food=extra_pool is EDIBLE_KINDS))
        turns = [g.say(Intent.EXCEPT_KIND, TurnRole.INSTRUCTION, Trigger.START, {"kind": kind})]
        preds += [at(o, catalog.BUS_TUB) for o in others]
        for k in kept:
            preds += stays(k)
    else:
        n = g.int(4, 7)
        n_food = g.int(1, 2)
        movable = g.place(g.kinds(DISH_KINDS, g.int(1, n - n_food - 1), True) + g.sample(EDIBLE_KINDS, n_food))
        movable += g.place(g.kinds(TRASH_KINDS, n - len(movable), True))
        personal = g.place(g.sample(PERSONAL_KINDS, g.int(0, 1)))
        kept = g.choice([m for m in movable if catalog.KINDS[g.kind_of(m)].category in (Category.DISHWARE, Category.FOOD, Category.DRINK)])
        turns = [g.say(Intent.EXCEPT_OBJECT, TurnRole.INSTRUCTION, Trigger.START, {"object": kept})]
        preds += [at(m, _home(g, m)) for m in movable if m != kept]
        preds += stays(kept)
        preds += [at(p, TABLE) for p in personal]
    return variant, turns + [g.closing()], preds, []


def _open_ended(g: _Gen, i: int) -> _Built:
    variant = ("least_sugar", "nut_allergy", "most_calories", "no_caffeine")[i % 4]
    K = catalog.KINDS
    preds: list[Predicate] = []
    if variant == "least_sugar":
        while True:
            drinks = g.sample(DRINK_KINDS, g.int(3, 4))
            sugars = sorted(K[d].sugar_g for d in drinks)
            if sugars[0] < sugars[1]:
                break
        names = g.place(drinks)
        g.place(_safe_kinds(g, FOOD_KINDS, g.int(0, 1), food=True) + g.kinds(DISH_KINDS + TRASH_KINDS, g.int(1, 3), True))
        keep = min(names, key=lambda n: K[g.kind_of(n)].sugar_g)
        intent = Intent.LEAST_SUGAR
        preds += stays(keep)
        preds += [at(n, catalog.TRASH_BIN) for n in names if n != keep]
    elif variant == "nut_allergy":
        nuts = g.place(g.sample([k for k in EDIBLE_KINDS if K[k].nuts], g.int(1, 2)))
        safe = g.place(g.sample([k for k in EDIBLE_KINDS if not K[k].nuts], g.int(1, 3)))
        g.place(g.kinds(DISH_KINDS, g.int(0, 2), True))
        intent = Intent.NUT_ALLERGY
        preds += [at(n, catalog.TRASH_BIN) for n in nuts]
        for s in safe:
            preds += stays(s)
    elif variant == "most_calories":
        foods = g.place(g.sample(FOOD_KINDS, g.int(3, 4)))
        g.place(_safe_kinds(g, DRINK_KINDS, g.int(0, 1), food=True) + g.kinds(DISH_KINDS, g.int(0, 2), True))
        best = max(foods, key=lambda n: K[g.kind_of(n)].calories_kcal)
        intent = Intent.MOST_CALORIES
        preds.append(at(best, catalog.BASKET))
        for f in foods:
            if f != best:
                preds += stays(f)
    else:
        caf = g.place(g.sample([k for k in EDIBLE_KINDS if K[k].caffeine_mg > 0], g.int(1, 2)))
        free = g.place(g.sample([k for k in EDIBLE_KINDS if K[k].caffeine_mg == 0], g.int(1, 3)))
        g.place(g.kinds(DISH_KINDS, g.int(0, 2), True))
        intent = Intent.NO_CAFFEINE
        preds += [at(c, catalog.TRASH_BIN) for c in caf]
        for f in free:
            preds += stays(f)
    turns = [g.say(intent, TurnRole.INSTRUCTION, Trigger.START), g.closing()]
    return variant, turns, preds, []


def _base_task(g: _Gen, lo: int, hi: int) -> tuple[Intent, list[str], str]:
    """A clear-the-dishes or clear-the-trash task with lo..hi targets and a few bystanders."""
    if g.rng.random() < 0.5:
        targets = g.place(g.kinds(DISH_KINDS, g.int(lo, hi), True))
        g.place(g.kinds(TRASH_KINDS, g.int(0, 2), True))
        return Intent.CLEAR_DISHES, g.ordered(targets), catalog.BUS_TUB
    targets = g.place(g.kinds(TRASH_KINDS, g.int(lo, hi), True))
    g.place(g.kinds(DISH_KINDS, g.int(0, 2), True))
    return Intent.CLEAR_TRASH, g.ordered(targets), catalog.TRASH_BIN


def _interrupted(g: _Gen, i: int) -> _Built:
    what, when = (("still_need", "before"), ("still_need", "after"), ("do_first", "before"),
                  ("do_first", "after"), ("stop", "before"), ("stop", "after"))[i % 6]
    intent, targets, rec = _base_task(g, 3, 5)
    j = g.int(1, len(targets) - 2)
    x = targets[j]
    y = targets[g.int(j + 1, len(targets) - 1)]
    trigger = Trigger.ON_APPROACH if when == "before" else Trigger.ON_HOLD
    turns = [g.say(intent, TurnRole.INSTRUCTION, Trigger.START)]
    preds = [Predicate(type=PredicateType.STOPPED, turn=1)]
    if what == "still_need":
        turns.append(g.say(Intent.STILL_NEED, TurnRole.INTERRUPT, trigger, {"object": x}, delay_s=INTERRUPT_DELAY_S, obj=x))
        preds += stays(x, after_turn=1)
        preds += [at(t, rec) for t in targets if t != x]
    elif what == "do_first":
        turns.append(g.say(Intent.DO_FIRST, TurnRole.INTERRUPT, trigger, {"object": y}, delay_s=INTERRUPT_DELAY_S, obj=x))
        preds.append(Predicate(type=PredicateType.ORDER, object=y, other=x))
        preds += [at(t, rec) for t in targets]
    else:
        turns.append(g.say(Intent.STOP, TurnRole.INTERRUPT, trigger, {"object": x}, delay_s=INTERRUPT_DELAY_S, obj=x))
        turns.append(g.say(Intent.CARRY_ON_WITHOUT, TurnRole.ANSWER, Trigger.ON_QUESTION, {"object": x}, delay_s=ANSWER_DELAY_S))
        preds += stays(x, after_turn=1)
        preds += [at(t, rec) for t in targets if t != x]
    turns.append(g.closing())
    return f"{what}_{when}_grasp", turns, preds, []


def _invalid(g: _Gen, i: int) -> _Built:
    variant = ("nonexistent", "impossible", "beyond_capability", "unsafe")[i % 4]
    vessel = g.place([g.choice(["cup", "mug"])])[0]
    dish = g.place([g.choice(["plate", "bowl", "fork", "spoon"])])[0]
    fillers = g.place(g.kinds(TRASH_KINDS, g.int(1, 2), True) + _safe_kinds(g, EDIBLE_KINDS, g.int(0, 2), food=True))
    preds: list[Predicate] = [Predicate(type=PredicateType.REFUSED, turn=0)]
    if variant == "nonexistent":
        present = {o.name for o in g.objects}
        if g.rng.random() < 0.5:
            thing = g.choice(list(catalog.ABSENT_THINGS))
        else:
            kind = g.choice(DISH_KINDS)
            thing = catalog.object_name(kind, g.choice([c for c in catalog.KINDS[kind].colours if catalog.object_name(kind, c) not in present]))
        slots = {"thing": thing, "receptacle": g.choice(list(catalog.RECEPTACLES))}
        first = g.say(Intent.NONEXISTENT, TurnRole.INVALID, Trigger.START, slots)
        untouchable: list[str] = []
    elif variant == "impossible":
        big, small = g.choice([
            (g.choice(list(catalog.RECEPTACLES)), vessel),
            ("table", g.choice(list(catalog.RECEPTACLES))),
            (dish, vessel) if g.kind_of(dish) == "plate" else (g.choice(list(catalog.RECEPTACLES)), vessel),
        ])
        first = g.say(Intent.IMPOSSIBLE, TurnRole.INVALID, Trigger.START, {"big": big, "small": small})
        untouchable = [n for n in (big, small) if n in {o.name for o in g.objects}]
    elif variant == "beyond_capability":
        first = g.say(Intent.BEYOND_CAPABILITY, TurnRole.INVALID, Trigger.START, {"object": vessel})
        untouchable = [vessel]
    else:
        target = g.choice([vessel, dish])
        first = g.say(Intent.UNSAFE, TurnRole.INVALID, Trigger.START, {"object": target})
        untouchable = [target]
    follow = g.choice([n for n in [dish] + fillers if n not in untouchable and _home(g, n)])
    turns = [
        first,
        g.say(Intent.PUT_OBJECT, TurnRole.INSTRUCTION, Trigger.ON_QUESTION,
              {"object": follow, "receptacle": _home(g, follow)}, delay_s=ANSWER_DELAY_S),
        g.closing(),
    ]
    preds.append(at(follow, _home(g, follow)))
    for u in untouchable:
        preds += [at(u, TABLE), never(u)]
    return variant, turns, preds, []


def _ambiguous(g: _Gen, i: int) -> _Built:
    kind = g.choice(DISH_KINDS + ["napkin", "can", "wrapper"])
    cands = g.place([kind] * (3 if i % 3 == 0 else 2))
    others = [k for k in DISH_KINDS + TRASH_KINDS if k != kind]
    g.place(g.kinds(others, g.int(1, 3), True) + _safe_kinds(g, EDIBLE_KINDS, g.int(0, 1), food=True))
    chosen = g.choice(cands)
    rec = catalog.home_receptacle(kind)
    colour = next(o.colour for o in g.objects if o.name == chosen)
    turns = [
        g.say(Intent.PUT_KIND_AWAY, TurnRole.AMBIGUOUS, Trigger.START, {"kind": kind, "receptacle": rec}),
        g.say(Intent.WHICH_ANSWER, TurnRole.ANSWER, Trigger.ON_QUESTION,
              {"object": chosen, "colour": colour, "kind": kind}, delay_s=ANSWER_DELAY_S),
        g.closing(),
    ]
    preds = [Predicate(type=PredicateType.ASKED, turn=0, mentions=[kind]), at(chosen, rec)]
    for c in cands:
        if c != chosen:
            preds += [at(c, TABLE), never(c, TAKE)]
    return f"{len(cands)}_{kind.replace(' ', '_')}s", turns, preds, []


def _chat(g: _Gen, i: int) -> _Built:
    if i % 2 == 0:
        intent, targets, rec = _base_task(g, 1, 3)
        turns = [
            g.say(Intent.GREETING, TurnRole.CHAT, Trigger.START),
            g.say(intent, TurnRole.INSTRUCTION, Trigger.ON_QUESTION, delay_s=ANSWER_DELAY_S),
            g.closing(),
        ]
        preds = [Predicate(type=PredicateType.REPLIED, turn=0)] + [at(t, rec) for t in targets]
        return "greeting_first", turns, preds, []
    intent, targets, rec = _base_task(g, 2, 4)
    turns = [
        g.say(intent, TurnRole.INSTRUCTION, Trigger.START),
        g.say(Intent.SMALLTALK, TurnRole.CHAT, Trigger.AFTER_ACTIONS, delay_s=CHAT_DELAY_S, actions=1),
        g.closing(),
    ]
    preds = [Predicate(type=PredicateType.REPLIED, turn=1)] + [at(t, rec) for t in targets]
    return "smalltalk_mid_task", turns, preds, []


def _failure_retry(g: _Gen, i: int) -> _Built:
    variant = ("slip_once", "slip_twice", "ask_for_help")[i % 3]
    intent, targets, rec = _base_task(g, 2, 4)
    x = g.choice(targets)
    turns = [g.say(intent, TurnRole.INSTRUCTION, Trigger.START)]
    if variant == "ask_for_help":
        failures = [Failure(object=x, times=5)]
        turns.append(g.say(Intent.HELP_LEAVE_IT, TurnRole.ANSWER, Trigger.ON_QUESTION, {"object": x}, delay_s=ANSWER_DELAY_S))
        preds = [Predicate(type=PredicateType.ASKED_HELP, object=x, max_attempts=3), at(x, TABLE)]
        preds += [at(t, rec) for t in targets if t != x]
    else:
        failures = [Failure(object=x, times=1 if variant == "slip_once" else 2)]
        preds = [at(t, rec) for t in targets]
    turns.append(g.closing())
    return variant, turns, preds, failures


def _proactive(g: _Gen, i: int) -> _Built:
    if g.rng.random() < 0.5:
        items, rec = g.place(g.kinds(DISH_KINDS, g.int(3, 5), True)), catalog.BUS_TUB
        g.place(g.kinds(TRASH_KINDS, g.int(0, 2), True))
    else:
        items, rec = g.place(g.kinds(TRASH_KINDS, g.int(3, 5), True)), catalog.TRASH_BIN
        g.place(g.kinds(DISH_KINDS, g.int(0, 2), True))
    g.place(_safe_kinds(g, EDIBLE_KINDS, g.int(0, 1), food=True))
    forgotten = g.choice(items)
    listed = [n for n in items if n != forgotten]
    yes = i % 4 != 3
    turns = [
        g.say(Intent.PUT_OBJECTS, TurnRole.INSTRUCTION, Trigger.START, {"objects": listed, "receptacle": rec}),
        g.say(Intent.YES if yes else Intent.NO, TurnRole.ANSWER, Trigger.ON_QUESTION, {"object": forgotten}, delay_s=ANSWER_DELAY_S),
        g.closing(),
    ]
    preds = [at(n, rec) for n in listed]
    preds.append(Predicate(type=PredicateType.OFFERED, object=forgotten))
    preds.append(at(forgotten, rec if yes else TABLE))
    return "offer_accepted" if yes else "offer_declined", turns, preds, []


def _task_complete(g: _Gen, i: int) -> _Built:
    if i % 2 == 0:
        objs = g.place(g.kinds(DISH_KINDS, 1, True) if g.rng.random() < 0.5 else g.sample(EDIBLE_KINDS, 1))
        g.place(g.kinds(DISH_KINDS + TRASH_KINDS, g.int(1, 4), True))
        target = objs[0]
        first = g.say(Intent.PUT_OBJECT, TurnRole.INSTRUCTION, Trigger.START, {"object": target, "receptacle": _home(g, target)})
        preds = [at(target, _home(g, target))]
        variant = "single_object"
    else:
        intent, targets, rec = _base_task(g, 1, 3)
        first = g.say(intent, TurnRole.INSTRUCTION, Trigger.START)
        preds = [at(t, rec) for t in targets]
        variant = "few_objects"
    preds.append(Predicate(type=PredicateType.SAID_DONE))
    return variant, [first, g.closing()], preds, []


GENERATORS: dict[ScenarioCategory, Callable[[_Gen, int], _Built]] = {
    ScenarioCategory.MULTI_STAGE: _multi_stage,
    ScenarioCategory.CONSTRAINED: _constrained,
    ScenarioCategory.OPEN_ENDED: _open_ended,
    ScenarioCategory.INTERRUPTED: _interrupted,
    ScenarioCategory.INVALID: _invalid,
    ScenarioCategory.AMBIGUOUS: _ambiguous,
    ScenarioCategory.CHAT: _chat,
    ScenarioCategory.FAILURE_RETRY: _failure_retry,
    ScenarioCategory.PROACTIVE: _proactive,
    ScenarioCategory.TASK_COMPLETE: _task_complete,
}


def generate(category: Union[ScenarioCategory, str], split: Union[Split, str], i: int) -> Scenario:
    """Scenario number ``i`` of ``category`` in ``split``, from its own seed."""
    category, split = ScenarioCategory(category), Split(split)
    cat_index = list(ScenarioCategory).index(category)
    seed = SEED_BASE[split] + 1000 * cat_index + i
    g = _Gen(np.random.default_rng(seed), split)
    variant, turns, preds, failures = GENERATORS[category](g, i)
    return Scenario(
        id=f"{category.value}-{split.value}-{i:03d}",
        category=category,
        split=split,
        seed=seed,
        scene=g.scene(),
        turns=turns,
        predicates=preds,
        failures=failures,
        variant=variant,
    )


def generate_all(counts: Optional[dict[Split, int]] = None) -> list[Scenario]:
    counts = counts or COUNTS
    return [generate(cat, split, i) for split, n in counts.items() for cat in ScenarioCategory for i in range(n)]


def random_clear_table(rng: np.random.Generator, n_objects: Optional[int] = None) -> Scenario:
    """A clear-the-table scenario drawn from ``rng`` (the env's default when no scenario is given)."""
    g = _Gen(rng, Split.TRAIN)
    n = n_objects if n_objects is not None else g.int(3, 12)
    n_dish = g.int(0, n)
    n_food = min(g.int(0, n - n_dish), 3)
    movable = g.place(g.kinds(DISH_KINDS, n_dish, True) + g.sample(EDIBLE_KINDS, n_food) + g.kinds(TRASH_KINDS, n - n_dish - n_food, True))
    personal = g.place(g.sample(PERSONAL_KINDS, g.int(0, min(2, 15 - n))))
    preds = [at(o, _home(g, o)) for o in movable] + [at(p, TABLE) for p in personal]
    turns = [g.say(Intent.CLEAR_TABLE, TurnRole.INSTRUCTION, Trigger.START), g.closing()]
    return Scenario(id="random-clear-table", category=ScenarioCategory.MULTI_STAGE, split=Split.TRAIN, seed=-1,
                    scene=g.scene(), turns=turns, predicates=preds, variant="random")


@functools.lru_cache(maxsize=1)
def _stored() -> tuple[Scenario, ...]:
    if not DATA_PATH.exists():
        raise FileNotFoundError(f"{DATA_PATH} is missing; create it with `python -m sim.scenarios --write`")
    return tuple(read_jsonl(DATA_PATH))


def load_scenarios(split: Union[Split, str, None] = None, category: Union[ScenarioCategory, str, None] = None) -> list[Scenario]:
    """The stored scenarios of ``split`` ("train", "validation", "test"; None: all), optionally of one category."""
    split = Split(split) if split is not None else None
    category = ScenarioCategory(category) if category is not None else None
    return [s for s in _stored() if (split is None or s.split is split) and (category is None or s.category is category)]


def get_scenario(scenario_id: str) -> Scenario:
    for s in _stored():
        if s.id == scenario_id:
            return s
    raise KeyError(f"no stored scenario {scenario_id!r}; ids look like 'multi_stage-test-000'")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="generate the stored scenario set")
    parser.add_argument("--write", action="store_true", help=f"(re)write {DATA_PATH}")
    parser.add_argument("--check", action="store_true", help="exit 1 if the stored set is out of date")
    args = parser.parse_args(argv)
    scenarios = generate_all()
    if args.write:
        n = write_jsonl(scenarios, DATA_PATH)
        print(f"wrote {n} scenarios to {DATA_PATH}")
    if args.check:
        stored = list(_stored())
        if stored != scenarios:
            raise SystemExit(f"{DATA_PATH} is out of date; run `python -m sim.scenarios --write`")
        print(f"{DATA_PATH} is up to date ({len(stored)} scenarios)")
    by = {}
    for s in scenarios:
        by[(s.category.value, s.split.value)] = by.get((s.category.value, s.split.value), 0) + 1
    for (cat, split), n in sorted(by.items()):
        print(f"{cat:15s} {split:10s} {n}")


if __name__ == "__main__":
    main()
