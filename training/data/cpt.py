"""The CPT corpus: embodied reasoning over rendered scenes, plus text that teaches the vocabulary.

Every row is drawn from its own generator (``seed``, row index), on a scene made fresh for
it (random kinds, colours and spots from :mod:`sim.catalog`, never a stored scenario) and
rendered by the head camera the planner sees (:class:`sim.render.Renderer`, 160x120). Tasks
take turns, so every task has the same number of rows (``n // len(TASKS)``, the first
``n % len(TASKS)`` one more):

==================  ===========================================================================
task                a question and its answer
==================  ===========================================================================
ground_point        "Where is the red cup?" -> ``<point>(x, y)</point>``
ground_box          "Give the bounding box of the red cup." -> ``<box>(x0, y0), (x1, y1)</box>``
refer               "What is at <point>(x, y)</point>?" -> "the red cup"
spatial             left of / right of, closer to the robot, leftmost, closest to a receptacle
count               objects of a kind, of a category, on the table, in a receptacle
affordance          "Which of these go into the bus tub?", where an object goes, what stays
attribute           least sugar, most calories, nuts, caffeine (the open-ended facts)
status              "Is the red cup in the bus tub?", what the gripper holds, is a task complete
before_after        two views around a command: did it succeed (slips and stops included)
next_action         a task and a view (maybe mid-task, maybe holding something) -> the next command
text_skills         the command for an action, worded exactly as the skill grammar
text_vocab          where a kind belongs, its category, colours, food and drink facts
text_paraphrase     a user request (train-split templates only) -> what it asks for
text_system         the planner's system prompt, then a question about it
text_quote          "The user said: "..." Quote their words." -> the words (copying from the context)
text_left           a list of objects on the table and what was put away -> what is left
text_next           objects, a task and what is done -> the next command, worded as the skill
==================  ===========================================================================

The last three are short, text-only and made of what the planner's thoughts do most: copy an
utterance or an object name from the prompt, and keep track of what is left. A model trained
from scratch must learn to copy from its context (induction) before it can plan; on the
planner's long episodes alone robix-tiny had not learned it after 2.6M tokens.

Coordinates are normalised to 0..1000 over the image width and height (Robix's
convention), integers; a box is the object's drawn pixels (found by rendering it alone),
a point the box centre. Paraphrase rows use only templates of the train split
(:func:`sim.templates.split_of`), so the test wording stays unseen.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from robix_planner import format as fmt
from robix_planner import skills
from robix_planner.messages import Capabilities

log = logging.getLogger(__name__)

TASKS = ("ground_point", "ground_box", "refer", "spatial", "count", "affordance", "attribute", "status",
         "before_after", "next_action", "text_skills", "text_vocab", "text_paraphrase", "text_system",
         "text_quote", "text_left", "text_next")

WIDTH_PX, HEIGHT_PX = 160, 120


def features():
    """The ``datasets.Features`` of CPT rows: messages, images, task."""
    from datasets import Features, Image, List, Value

    message = {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
    return Features({"messages": List(message), "images": List(Image()), "task": Value("string")})


# --------------------------------------------------------------------------- scenes


def _names(names: list[str]) -> str:
    from sim.templates import join_objects

    return join_objects(names) or "none"


class _Row:
    """One row's draws and its scene helpers."""

    def __init__(self, rng: np.random.Generator, renderer):
        self.rng = rng
        self.renderer = renderer

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def chance(self, p: float = 0.5) -> bool:
        return bool(self.rng.random() < p)

    def scene(self, n_min: int = 1, n_max: int = 12, kinds: Optional[list[str]] = None, must: tuple[str, ...] = ()):
        """A fresh scene: ``must`` kinds plus random ones (names unique), on distinct spots, jittered."""
        from sim import catalog
        from sim.spec import Scene, SceneObject
        from sim.world import SLOTS_CM

        pool = kinds or list(catalog.KINDS)
        n = max(len(must), int(self.rng.integers(n_min, n_max + 1)))
        slots = [SLOTS_CM[int(i)] for i in self.rng.permutation(len(SLOTS_CM))[:n]]
        objs, taken = [], set()
        wanted = list(must) + [self.pick(pool) for _ in range(n - len(must))]
        for kind, (x, y) in zip(wanted, slots):
            k = catalog.KINDS[kind]
            colours = [c for c in k.colours if catalog.object_name(kind, c) not in taken]
            if not colours:
                continue
            colour = self.pick(colours)
            name = catalog.object_name(kind, colour)
            taken.add(name)
            objs.append(SceneObject(name=name, kind=kind, colour=colour, x_cm=round(x + self.rng.uniform(-3, 3), 1),
                                    y_cm=round(y + self.rng.uniform(-2, 2), 1)))
        return Scene(objects=objs, receptacles=list(catalog.RECEPTACLES))

    def world(self, scene, moved: float = 0.0, hold: bool = False):
        """A world of ``scene`` with about ``moved`` of the movable objects already in their receptacles."""
        from sim import catalog
        from sim.world import World

        w = World(scene)
        for name, obj in w.objects.items():
            home = catalog.home_receptacle(obj.kind)
            if home is not None and self.chance(moved):
                w.grasp(name)
                w.release_into(name, home)
        on_table = w.on_table()
        if hold and on_table:
            name = self.pick(on_table)
            x, y = w.objects[name].home_cm
            w.grasp(name)
            w.gripper_cm = (x, y)
        return w

    def render(self, world) -> dict:
        from training.data.episodes import encode_image

        return encode_image(self.renderer.render(world))

    def box(self, world, name: str) -> tuple[int, int, int, int]:
        """The object's drawn box, normalised 0..1000: (x0, y0, x1, y1)."""
        from sim.spec import Scene
        from sim.world import World

        obj = world.objects[name]
        empty = World(Scene(objects=[], receptacles=list(world.receptacles)))
        alone = World(Scene(objects=[_scene_object(obj)], receptacles=list(world.receptacles)))
        diff = np.any(self.renderer.render(alone) != self.renderer.render(empty), axis=2)
        ys, xs = np.nonzero(diff)
        h, w = diff.shape
        return (round(1000 * xs.min() / w), round(1000 * ys.min() / h), round(1000 * (xs.max() + 1) / w),
                round(1000 * (ys.max() + 1) / h))


def _scene_object(obj):
    from sim.spec import SceneObject

    return SceneObject(name=obj.name, kind=obj.kind, colour=obj.colour, x_cm=obj.home_cm[0], y_cm=obj.home_cm[1])


def _point(box) -> str:
    x0, y0, x1, y1 = box
    return f"<point>({round((x0 + x1) / 2)}, {round((y0 + y1) / 2)})</point>"


def _box(box) -> str:
    x0, y0, x1, y1 = box
    return f"<box>({x0}, {y0}), ({x1}, {y1})</box>"


def _yes(flag: bool, why: str = "") -> str:
    return ("Yes" if flag else "No") + (f": {why}." if why else ".")


def _vqa(row: _Row, images: list, question: str, answer: str) -> dict:
    content = [{"type": "image", "text": None} for _ in images] + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}], "images": images}


def _text(question: str, answer: str, system: Optional[str] = None) -> dict:
    msgs = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    msgs += [{"role": "user", "content": [{"type": "text", "text": question}]},
             {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return {"messages": msgs, "images": []}


# --------------------------------------------------------------------------- tasks


def _ground_point(r: _Row) -> dict:
    w = r.world(r.scene(1, 12))
    name = r.pick(w.on_table())
    q = r.pick(("Where is the {o}? Answer with a point.", "Point to the {o}.",
                "Give the position of the {o} as a point."))
    return _vqa(r, [r.render(w)], q.format(o=name), _point(r.box(w, name)))


def _ground_box(r: _Row) -> dict:
    w = r.world(r.scene(1, 12))
    name = r.pick(w.on_table())
    q = r.pick(("Give the bounding box of the {o}.", "Draw a box around the {o}.",
                "Where is the {o}? Answer with a box."))
    return _vqa(r, [r.render(w)], q.format(o=name), _box(r.box(w, name)))


def _refer(r: _Row) -> dict:
    w = r.world(r.scene(2, 12))
    name = r.pick(w.on_table())
    box = r.box(w, name)
    if r.chance():
        q = r.pick(("What is at {p}?", "Which object is at {p}?", "Name the object at {p}.")).format(p=_point(box))
    else:
        q = r.pick(("What is in {b}?", "Which object is inside {b}?")).format(b=_box(box))
    return _vqa(r, [r.render(w)], q, f"the {name}")


def _spatial(r: _Row) -> dict:
    from sim.world import RECEPTACLE_XY_CM

    w = r.world(r.scene(2, 12))
    names = w.on_table()
    pos = {n: w.objects[n].home_cm for n in names}
    kind = r.pick(("left", "closer", "extreme", "near_receptacle"))
    img = [r.render(w)]
    pairs = [(a, b) for a in names for b in names if a != b]
    if kind == "left":
        pairs = [(a, b) for a, b in pairs if abs(pos[a][0] - pos[b][0]) >= 8]
        if pairs:
            a, b = r.pick(pairs)
            side = r.pick(("left", "right"))
            truth = pos[a][0] < pos[b][0] if side == "left" else pos[a][0] > pos[b][0]
            return _vqa(r, img, f"Is the {a} to the {side} of the {b}?", _yes(truth))
    if kind == "closer":
        pairs = [(a, b) for a, b in pairs if abs(pos[a][1] - pos[b][1]) >= 8]
        if pairs:
            a, b = r.pick(pairs)
            near = a if pos[a][1] < pos[b][1] else b
            q = f"Which is closer to the robot (the top edge of the view), the {a} or the {b}?"
            return _vqa(r, img, q, f"the {near}")
    if kind == "near_receptacle":
        rec = r.pick(list(RECEPTACLE_XY_CM))
        rx, ry = RECEPTACLE_XY_CM[rec]
        dist = sorted((np.hypot(pos[n][0] - rx, pos[n][1] - ry), n) for n in names)
        if len(dist) == 1 or dist[1][0] - dist[0][0] >= 5:
            return _vqa(r, img, f"Which object on the table is closest to the {rec}?", f"the {dist[0][1]}")
    side = r.pick(("leftmost", "rightmost"))
    xs = sorted((pos[n][0], n) for n in names)
    if len(xs) > 1 and xs[1][0] - xs[0][0] < 5 and side == "leftmost":
        side = "rightmost"
    best = xs[0][1] if side == "leftmost" else xs[-1][1]
    if len(xs) > 1 and side == "rightmost" and xs[-1][0] - xs[-2][0] < 5:
        return _vqa(r, img, "How many objects are on the table?", str(len(names)))
    return _vqa(r, img, f"What is the {side} object on the table?", f"the {best}")


def _count(r: _Row) -> dict:
    from sim import catalog

    what = r.pick(("kind", "category", "all", "receptacle"))
    if what == "kind":
        kind = r.pick([k.name for k in catalog.KINDS.values() if not k.named_by_kind])
        w = r.world(r.scene(1, 12, must=(kind,) * int(r.rng.integers(0, 4))))
        n = sum(o.kind == kind for o in w.objects.values())
        return _vqa(r, [r.render(w)], f"How many {catalog.KINDS[kind].plural} are on the table?", str(n))
    if what == "category":
        cat, label = r.pick(((catalog.Category.DISHWARE, "dishes"), (catalog.Category.TRASH, "pieces of trash"),
                             (catalog.Category.FOOD, "food items"), (catalog.Category.DRINK, "drinks"),
                             (catalog.Category.PERSONAL, "personal items")))
        w = r.world(r.scene(1, 12))
        n = sum(o.category is cat for o in w.objects.values())
        return _vqa(r, [r.render(w)], f"How many {label} are on the table?", str(n))
    if what == "all":
        w = r.world(r.scene(0, 15))
        return _vqa(r, [r.render(w)], "How many objects are on the table?", str(len(w.on_table())))
    w = r.world(r.scene(2, 12), moved=0.5)
    rec = r.pick(list(catalog.RECEPTACLES))
    return _vqa(r, [r.render(w)], f"How many things are in the {rec}?", str(len(w.contents(rec))))


def _affordance(r: _Row) -> dict:
    from sim import catalog

    w = r.world(r.scene(2, 12))
    names = w.on_table()
    home = {n: catalog.home_receptacle(w.objects[n].kind) for n in names}
    what = r.pick(("which", "where", "stay"))
    img = [r.render(w)]
    if what == "which":
        rec = r.pick(list(catalog.RECEPTACLES))
        q = r.pick(("Which of these go into the {r}?", "Which objects on the table belong in the {r}?",
                    "What should go into the {r}?")).format(r=rec)
        return _vqa(r, img, q, _names([n for n in names if home[n] == rec]))
    if what == "where":
        name = r.pick(names)
        rec = home[name]
        ans = f"into the {rec}" if rec else "nowhere: it stays on the table"
        return _vqa(r, img, f"Where does the {name} go when the table is cleared?", ans)
    return _vqa(r, img, "Which objects should stay on the table when it is cleared?",
                _names([n for n in names if home[n] is None]))


def _attribute(r: _Row) -> dict:
    from sim import catalog

    K = catalog.KINDS
    edible = [k.name for k in K.values() if k.edible]
    drinks = [k.name for k in K.values() if k.category is catalog.Category.DRINK]
    foods = [k.name for k in K.values() if k.category is catalog.Category.FOOD]
    what = r.pick(("sugar", "calories", "nuts", "caffeine"))
    if what == "sugar":
        while True:
            chosen = list(r.rng.choice(drinks, size=int(r.rng.integers(2, 5)), replace=False))
            vals = sorted(K[d].sugar_g for d in chosen)
            if vals[0] < vals[1]:
                break
        w = r.world(r.scene(len(chosen), 10, kinds=[k.name for k in K.values() if not k.edible], must=tuple(chosen)))
        best = min(chosen, key=lambda d: K[d].sugar_g)
        return _vqa(r, [r.render(w)], "Which drink on the table has the least sugar?", f"the {best}")
    if what == "calories":
        while True:
            chosen = list(r.rng.choice(foods, size=int(r.rng.integers(2, 5)), replace=False))
            vals = sorted((K[f].calories_kcal for f in chosen), reverse=True)
            if vals[0] > vals[1]:
                break
        w = r.world(r.scene(len(chosen), 10, kinds=[k.name for k in K.values() if not k.edible], must=tuple(chosen)))
        best = max(chosen, key=lambda f: K[f].calories_kcal)
        return _vqa(r, [r.render(w)], "Which food on the table has the most calories?", f"the {best}")
    chosen = tuple(r.rng.choice(edible, size=int(r.rng.integers(1, 5)), replace=False))
    w = r.world(r.scene(len(chosen), 10, kinds=[k.name for k in K.values() if not k.edible], must=chosen))
    names = [n for n in w.on_table() if K[w.objects[n].kind].edible]
    if what == "nuts":
        hits = [n for n in names if K[w.objects[n].kind].nuts]
        return _vqa(r, [r.render(w)], "Which things on the table contain nuts?", _names(hits))
    hits = [n for n in names if K[w.objects[n].kind].caffeine_mg > 0]
    return _vqa(r, [r.render(w)], "Which things on the table contain caffeine?", _names(hits))


_CATEGORY_TASKS = (("put the dishes into the bus tub", "dishware", "bus tub"),
                   ("throw away the trash", "trash", "trash bin"))


def _status(r: _Row) -> dict:
    from sim import catalog
    from sim.spec import TABLE

    w = r.world(r.scene(2, 12), moved=r.rng.uniform(0.0, 0.9), hold=r.chance(0.3))
    img = [r.render(w)]
    what = r.pick(("in", "holding", "on_table", "complete"))
    if what == "in":
        name = r.pick(list(w.objects))
        rec = catalog.home_receptacle(w.objects[name].kind) or r.pick(list(catalog.RECEPTACLES))
        if r.chance(0.25):
            rec = r.pick(list(catalog.RECEPTACLES))
        return _vqa(r, img, f"Is the {name} in the {rec}?", _yes(w.location(name) == rec))
    if what == "holding":
        return _vqa(r, img, "What is the gripper holding?", f"the {w.holding}" if w.holding else "nothing")
    if what == "on_table":
        name = r.pick(list(w.objects))
        return _vqa(r, img, f"Is the {name} still on the table?", _yes(w.location(name) == TABLE))
    task, cat, rec = r.pick(_CATEGORY_TASKS)
    left = [n for n, o in w.objects.items() if o.category.value == cat and o.location != rec]
    why = "" if not left else f"the {left[0]} is not in the {rec} yet"
    return _vqa(r, img, f"Is the task '{task}' complete?", _yes(not left, why))


def _before_after(r: _Row) -> dict:
    from sim import catalog
    from sim.controller import SimController

    w = r.world(r.scene(2, 10), moved=r.rng.uniform(0.0, 0.6))
    candidates = [n for n in w.on_table() if catalog.home_receptacle(w.objects[n].kind)]
    if not candidates:
        return _status(r)
    name = r.pick(candidates)
    rec = catalog.home_receptacle(w.objects[name].kind)
    ctl = SimController(w)
    before = r.render(w)
    outcome = r.pick(("success", "success", "slip", "stopped"))
    if outcome == "slip":
        ctl.inject_failure(name, 1)
    command = skills.render(skills.PUT_INTO, object=name, receptacle=rec)
    ctl.submit(command)
    if outcome == "stopped":
        ctl.step(ctl.config.approach_s + ctl.config.grasp_s + ctl.config.carry_s * r.rng.uniform(0.2, 0.8))
        ctl.submit("stop")
    while ctl.busy:
        ctl.step(ctl.time_to_next_event_s())
    after = r.render(w)
    if w.location(name) == rec:
        answer = f"Yes: the {name} is in the {rec} now."
    elif w.holding == name:
        answer = f"No: the gripper still holds the {name}."
    else:
        answer = f"No: the {name} is still on the table."
    q = f"The robot was told to '{command}'. Did it succeed?"
    content = [{"type": "text", "text": "Before:"}, {"type": "image", "text": None},
               {"type": "text", "text": "After:"}, {"type": "image", "text": None}, {"type": "text", "text": q}]
    return {"messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": [before, after]}


def _next_action(r: _Row) -> dict:
    from sim import catalog

    w = r.world(r.scene(1, 12), moved=r.rng.uniform(0.0, 0.8), hold=r.chance(0.25))
    what = r.pick(("clear", "dishes", "trash"))
    if what == "clear":
        task = "clear the table"
        goal = {n: catalog.home_receptacle(o.kind) for n, o in w.objects.items() if catalog.home_receptacle(o.kind)}
    else:
        task, cat, rec = _CATEGORY_TASKS[0 if what == "dishes" else 1]
        goal = {n: rec for n, o in w.objects.items() if o.category.value == cat}
    keep = None
    pending = [n for n in w.on_table() if n in goal]
    if pending and r.chance(0.3):
        keep = r.pick(pending)
        task += f", but leave the {keep}"
        goal.pop(keep)
        pending.remove(keep)
    held = w.holding
    if held is not None:
        dest = goal.get(held)
        ans = (skills.render(skills.PUT_INTO, object=held, receptacle=dest) if dest
               else skills.render(skills.PLACE_BACK, object=held))
    elif pending:
        ans = skills.render(skills.PUT_INTO, object=pending[0], receptacle=goal[pending[0]])
    else:
        ans = "none: the task is done"
    q = r.pick(("Task: {t}. What is the next command?", "The user asked me to {t}. Which command comes next?"))
    return _vqa(r, [r.render(w)], q.format(t=task), ans)


def _caps(r: _Row) -> Capabilities:
    from sim import catalog

    scene = r.scene(1, 12)
    return Capabilities(robot="sim_tabletop", skills=list(skills.TABLETOP_SKILLS),
                        objects=[o.name for o in scene.objects],
                        receptacles=list(catalog.RECEPTACLES))


def _text_skills(r: _Row) -> dict:
    caps = _caps(r)
    name = r.pick(caps.objects)
    what = r.pick(("put", "pick", "place", "stop"))
    if what == "put":
        rec = r.pick(caps.receptacles)
        q = r.pick(("Write the command that puts the {o} into the {r}.",
                    "How do I tell the robot to move the {o} to the {r}?"))
        return _text(q.format(o=name, r=rec), skills.render(skills.PUT_INTO, object=name, receptacle=rec))
    if what == "pick":
        return _text(f"Write the command that picks up the {name}.", skills.render(skills.PICK_UP, object=name))
    if what == "place":
        return _text(f"The robot holds the {name}. Write the command that puts it back on the table.",
                     skills.render(skills.PLACE_BACK, object=name))
    return _text("Which command halts the robot at once?", skills.render(skills.STOP))


def _text_vocab(r: _Row) -> dict:
    from sim import catalog

    K = catalog.KINDS
    kind = r.pick(list(K))
    k = K[kind]
    article = "" if k.named_by_kind else "a "
    what = r.pick(("home", "category", "colours", "facts"))
    if what == "home":
        home = catalog.home_receptacle(kind)
        return _text(f"Where does {article}{kind} go when a table is cleared?",
                     f"into the {home}" if home else "nowhere: it stays on the table")
    if what == "category":
        return _text(f"Is {article}{kind} dishware, trash, food, a drink or a personal item?", k.category.value)
    if what == "colours" and not k.named_by_kind:
        return _text(f"Which colours can a {kind} have here?", ", ".join(k.colours))
    edible = [e for e in K.values() if e.edible]
    e = r.pick(edible)
    fact = r.pick(("sugar", "calories", "nuts", "caffeine"))
    if fact == "sugar":
        return _text(f"How much sugar does the {e.name} have?", f"{e.sugar_g:g} g")
    if fact == "calories":
        return _text(f"How many calories does the {e.name} have?", f"{e.calories_kcal:g} kcal")
    if fact == "nuts":
        return _text(f"Does the {e.name} contain nuts?", _yes(e.nuts))
    return _text(f"Does the {e.name} contain caffeine?", _yes(e.caffeine_mg > 0))


#: What each instruction intent asks for, written out (slots as in sim.templates).
MEANINGS = {
    "clear_table": "to clear the table", "clear_dishes": "to put the dishes into the bus tub",
    "clear_trash": "to throw away the trash", "keep_food": "to throw away the trash but leave the food",
    "except_kind": "to put the dishes into the bus tub but leave the {kinds}",
    "except_object": "to clear the table but leave the {object}",
    "least_sugar": "to keep the drink with the least sugar and throw away the other drinks",
    "nut_allergy": "to throw away everything with nuts",
    "most_calories": "to put the food with the most calories into the basket",
    "no_caffeine": "to throw away everything with caffeine", "put_kind_away": "to put the {kind} into the {receptacle}",
    "put_objects": "to put {objects} into the {receptacle}", "put_object": "to put the {object} into the {receptacle}",
    "still_need": "to stop and leave that item: they still need it", "stop": "to stop at once",
    "do_first": "to do the {object} first", "greeting": "nothing: it is a greeting, so I answer it",
    "smalltalk": "nothing: it is small talk, so I answer it", "closing": "nothing more",
    "beyond_capability": "something beyond my skills, so I refuse",
    "unsafe": "something unsafe, so I refuse", "impossible": "something physically impossible, so I refuse",
}


def _text_paraphrase(r: _Row) -> dict:
    from sim import catalog
    from sim.spec import Split
    from sim.templates import Intent, fill, indices_for

    intent = Intent(r.pick(sorted(MEANINGS)))
    caps = _caps(r)
    objs = caps.objects
    kind = r.pick([k.name for k in catalog.KINDS.values() if not k.named_by_kind])
    slots = {"object": r.pick(objs), "objects": list(r.rng.choice(objs, size=min(len(objs), 2), replace=False)),
             "receptacle": r.pick(list(catalog.RECEPTACLES)), "kind": kind, "big": r.pick(list(catalog.RECEPTACLES)),
             "small": r.pick(objs)}
    text = fill(intent, r.pick(indices_for(intent, Split.TRAIN)), slots)
    values = {k: v for k, v in slots.items() if isinstance(v, str)}
    values["objects"] = _names(list(slots["objects"]))
    values["kinds"] = kind + "s"
    q = r.pick(('What does the user ask for? "{u}"', 'The user says: "{u}" What do they want?'))
    return _text(q.format(u=text), MEANINGS[intent.value].format(**values))


def _text_system(r: _Row) -> dict:
    caps = _caps(r)
    what = r.pick(("objects", "receptacles", "skills", "format"))
    system = fmt.system_prompt(caps)
    if what == "objects":
        return _text("Which objects can a command name?", ", ".join(caps.objects), system)
    if what == "receptacles":
        return _text("Which receptacles are there?", ", ".join(caps.receptacles), system)
    if what == "skills":
        return _text("Which commands does the controller understand?",
                     "\n".join(s.template for s in caps.skills), system)
    return _text("In which order do you write your answer?", "a thought, then at most one command, then an optional "
                 f"reply: {fmt.THINK_START}…{fmt.THINK_END}{fmt.PLAN_START}…{fmt.PLAN_END}"
                 f"{fmt.RESPONSE_START}…{fmt.RESPONSE_END}", system)


def _utterance(r: _Row, objs: list[str]) -> str:
    """A user request in a train-split wording, about ``objs``."""
    from sim import catalog
    from sim.spec import Split
    from sim.templates import Intent, fill, indices_for

    intent = Intent(r.pick(sorted(MEANINGS)))
    kind = r.pick([k.name for k in catalog.KINDS.values() if not k.named_by_kind])
    slots = {"object": r.pick(objs), "objects": list(r.rng.choice(objs, size=min(len(objs), 2), replace=False)),
             "receptacle": r.pick(list(catalog.RECEPTACLES)), "kind": kind, "big": r.pick(list(catalog.RECEPTACLES)),
             "small": r.pick(objs)}
    return fill(intent, r.pick(indices_for(intent, Split.TRAIN)), slots)


def _listing(names: list[str]) -> str:
    """Names as the planner's thoughts list them: "a, b and c"."""
    from sim.templates import join_names

    return join_names(names) or "nothing"


def _text_quote(r: _Row) -> dict:
    said = _utterance(r, _caps(r).objects)
    q = r.pick(('The user said: "{u}" Quote their words.', 'I heard "{u}" What exactly did the user say?'))
    return _text(q.format(u=said), said)


def _text_left(r: _Row) -> dict:
    objs = list(_caps(r).objects)
    done = [n for n in objs if r.chance(0.4)]
    left = [n for n in objs if n not in done]
    moves = " ".join(f"The robot put the {n} away." for n in done) or "Nothing was moved."
    q = r.pick(("On the table: {o}. {m} What is on the table now?", "The table held {o}. {m} What is left?"))
    return _text(q.format(o=_listing(objs), m=moves), _listing(left))


def _text_next(r: _Row) -> dict:
    from sim import catalog

    scene = r.scene(1, 8)
    what = r.pick(("clear", "dishes", "trash"))
    if what == "clear":
        task = "clear the table"
        goal = {o.name: catalog.home_receptacle(o.kind) for o in scene.objects if catalog.home_receptacle(o.kind)}
    else:
        task, cat, rec = _CATEGORY_TASKS[0 if what == "dishes" else 1]
        goal = {o.name: rec for o in scene.objects if catalog.KINDS[o.kind].category.value == cat}
    names = [o.name for o in scene.objects]
    done = [n for n in names if n in goal and r.chance(0.4)]
    pending = [n for n in names if n in goal and n not in done]
    ans = skills.render(skills.PUT_INTO, object=pending[0], receptacle=goal[pending[0]]) if pending else \
        "none: the task is done"
    q = (f"Objects: {_listing(names)}. Task: {task}. Already put away: {_listing(done)}. "
         "What is the next command?")
    return _text(q, ans)


BUILDERS: dict[str, Callable[[_Row], dict]] = {
    "ground_point": _ground_point, "ground_box": _ground_box, "refer": _refer, "spatial": _spatial,
    "count": _count, "affordance": _affordance, "attribute": _attribute, "status": _status,
    "before_after": _before_after, "next_action": _next_action, "text_skills": _text_skills,
    "text_vocab": _text_vocab, "text_paraphrase": _text_paraphrase, "text_system": _text_system,
    "text_quote": _text_quote, "text_left": _text_left, "text_next": _text_next,
}
assert tuple(BUILDERS) == TASKS


def make_row(seed: int, index: int, task: Optional[str] = None, renderer=None) -> dict:
    """CPT row ``index`` for ``seed`` (default task: ``TASKS[index % len(TASKS)]``), images PNG-encoded."""
    if renderer is None:
        from sim.render import Renderer

        renderer = Renderer(WIDTH_PX, HEIGHT_PX)
    task = task or TASKS[index % len(TASKS)]
    row = BUILDERS[task](_Row(np.random.default_rng([int(seed), int(index), TASKS.index(task)]), renderer))
    row["task"] = task
    return row


def build_cpt(seed: int = 0, n: int = 14000, *, tasks: Optional[Sequence[str]] = None, progress: bool = True):
    """The CPT corpus: ``n`` rows, the tasks (default :data:`TASKS`) in turn, row ``i`` drawn from (``seed``, ``i``)."""
    from datasets import Dataset
    from tqdm import tqdm

    from sim.render import Renderer

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tasks = tuple(tasks or TASKS)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown CPT tasks {unknown}; known: {', '.join(TASKS)}")
    t0 = time.perf_counter()
    renderer = Renderer(WIDTH_PX, HEIGHT_PX)
    rows = [make_row(seed, i, tasks[i % len(tasks)], renderer)
            for i in tqdm(range(n), desc="cpt rows", unit="row", file=sys.stderr, disable=None if progress else True,
                          leave=False)]
    ds = Dataset.from_list(rows, features=features())
    log.info("built %d CPT rows in %.1f s", len(rows), time.perf_counter() - t0)
    return ds
