"""The oracle planner: solves every scenario from the privileged world state and the dialogue.

It is the reference behaviour and the source of training traces: each
:class:`Decision` holds a short thought (scene, how the last action went and what the
gripper holds, the standing constraints, the next step), at most one command in the
controller's grammar, and an optional reply.

What it does, in brief: acknowledges a task and works through it one object per command
(priority items first, then reading order); on "stop"/"I still need that"/"do X first"
while acting it sends ``stop`` at once, puts back a held item and replans (never touching
an item the user wants kept); retries a slipped grasp and asks for help after three
failures of the same object; asks which one when a request fits several objects; refuses
impossible, unsafe, unknown or out-of-skill requests with a reason and no motion; chats
without moving; offers to handle an item the user forgot; says when it is done and asks
if anything else is needed.

The oracle understands the user by looking utterances up in the scenario script (intent
and slots), and reads object locations from the world: both privileged, which is why it is
given a :class:`Privileged` view and not only observations.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from robix_planner import skills
from robix_planner.messages import CommandState, CommandStatus
from sim import catalog
from sim.catalog import Category
from sim.spec import TABLE, Scenario, Turn
from sim.templates import Intent, join_names, join_objects

if TYPE_CHECKING:  # pragma: no cover
    from sim.controller import SimController
    from sim.runner import Observation
    from sim.world import World

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Decision:
    """One planner step: a thought (always), at most one command, an optional spoken reply."""

    thought: str
    plan: Optional[str] = None
    reply: Optional[str] = None


@dataclass(frozen=True)
class Privileged:
    """What only the oracle may read: the true world, the controller and the scenario script."""

    world: "World"
    controller: "SimController"
    scenario: Scenario


_SMALLTALK_REPLIES = (
    "I like cyan, the colour of my gripper.",
    "I do! A tidy table is very satisfying.",
    "It looks lovely, though I mostly see this table.",
    "I'm Robix, the robot that clears your table.",
    "Not long, but I'm learning fast.",
)


def _put(obj: str, receptacle: str) -> str:
    return skills.render(skills.PUT_INTO, object=obj, receptacle=receptacle)


def _place_back(obj: str) -> str:
    return skills.render(skills.PLACE_BACK, object=obj)


class OraclePlanner:
    """A scripted planner with privileged access; ``decide(observation) -> Decision``."""

    needs_images = False

    def __init__(self, privileged: Privileged, max_attempts: int = MAX_ATTEMPTS):
        self.world = privileged.world
        self.controller = privileged.controller
        self.scenario = privileged.scenario
        self.max_attempts = max_attempts
        self.goals: dict[str, str] = {}  # object -> receptacle, in working order
        self.keep: set[str] = set()  # never take these
        self.first: list[str] = []  # do these before anything else
        self.notes: list[str] = []  # standing constraints, for thoughts
        self.task = ""
        self.task_active = False
        self.paused = False
        self.awaiting: Optional[tuple[str, object]] = None
        self.failures: Counter[str] = Counter()
        self.given_up: set[str] = set()
        self.listed: Optional[tuple[list[str], str]] = None  # for offers: what the user listed, and where
        self.offered: set[str] = set()
        self.last_obj: Optional[str] = None
        self._said: set[int] = set()

    # -- the step ----------------------------------------------------------------------
    def decide(self, obs: "Observation") -> Decision:
        self._thought: list[str] = [self._scene()]
        self._plan: Optional[str] = None
        self._reply: list[str] = []
        if obs.status is not None and obs.command is not None:
            self._reflect(obs.status, obs.command)
        want_next = True
        if obs.utterance:
            turn = self._turn_for(obs.utterance)
            if turn is None:
                self._thought.append(f'I did not understand "{obs.utterance}".')
                self._reply.append("Sorry, I didn't catch that.")
            else:
                want_next = self._hear(turn)
        if want_next and self._plan is None:
            self._next_step()
        reply = " ".join(self._reply) or None
        return Decision(thought=" ".join(self._thought), plan=self._plan, reply=reply)

    # -- perception (privileged) and reflection ----------------------------------------
    def _scene(self) -> str:
        names = self.world.on_table()
        held = self.world.holding
        grip = f"the gripper holds the {held}" if held else "the gripper is empty"
        if not names:
            return f"The table is empty; {grip}."
        shown = names[:5] + ([f"{len(names) - 5} more"] if len(names) > 5 else [])
        return f"On the table: {join_names(shown)}; {grip}."

    def _reflect(self, st: CommandStatus, cmd: str) -> None:
        if cmd == "stop":
            return
        obj = self.last_obj
        if st.state is CommandState.SUCCEEDED:
            self._thought.append(f"'{cmd}' succeeded.")
        elif st.state is CommandState.FAILED:
            if obj is not None:
                self.failures[obj] += 1
            n = self.failures[obj]
            self._thought.append(f"'{cmd}' failed ({st.detail}); attempt {n} of {self.max_attempts}.")
            if obj is not None and n >= self.max_attempts and obj not in self.given_up:
                self.awaiting = ("help", obj)
                self._reply.append(
                    f"I've tried {n} times, but the {obj} keeps slipping out of my gripper. Could you help me with it?"
                )
                self._thought.append("I should ask for help instead of trying again.")
        elif st.state is CommandState.PREEMPTED:
            self._thought.append(f"'{cmd}' was stopped.")
        elif st.state is CommandState.REJECTED:
            self._thought.append(f"'{cmd}' was rejected ({st.detail}).")
            if obj is not None:
                self.keep.add(obj)

    # -- the dialogue ------------------------------------------------------------------
    def _turn_for(self, text: str) -> Optional[Turn]:
        for i, t in enumerate(self.scenario.turns):
            if t.text == text and i not in self._said:
                self._said.add(i)
                return t
        return None

    def _acting_on(self) -> Optional[str]:
        return self.controller.target or self.world.holding or self.last_obj

    def _stop_if_busy(self) -> None:
        if self.controller.busy:
            self._plan = "stop"

    def _hear(self, turn: Turn) -> bool:
        """Update the task from a turn; returns whether to go on with the next step now."""
        intent = Intent(turn.intent)
        slots = turn.slots
        said = f'The user said "{turn.text}"'
        busy = self.controller.busy
        if intent in _INSTRUCTIONS:
            return self._instruction(intent, slots, said)
        if intent in (Intent.NONEXISTENT, Intent.IMPOSSIBLE, Intent.BEYOND_CAPABILITY, Intent.UNSAFE):
            return self._invalid(intent, slots, said)
        if intent is Intent.STILL_NEED:
            x = self._acting_on()
            if x:
                self.keep.add(x)
                self.first = [f for f in self.first if f != x]
            self._thought.append(f"{said}: they still need the {x}, so I stop and leave it on the table.")
            self._reply.append(f"Sorry! I'll leave the {x} for you.")
            self._stop_if_busy()
            return not busy
        if intent is Intent.DO_FIRST:
            y = str(slots["object"])
            self.first = [y] + [f for f in self.first if f != y]
            self.goals.setdefault(y, catalog.home_receptacle(self.world.objects[y].kind))
            self._thought.append(f"{said}: the {y} comes first, so I stop, put back what I hold and do it now.")
            self._reply.append(f"Sure, I'll do the {y} first.")
            if busy and self.controller.target != y:
                self._plan = "stop"
                return False
            return not busy
        if intent is Intent.STOP:
            x = self._acting_on()
            self.paused = True
            self.awaiting = ("stopped", x)
            held = self.world.holding
            self._thought.append(f"{said}: I stop at once and wait for instructions.")
            self._reply.append(
                f"Okay, I've stopped; I'm holding the {held}. What would you like me to do?" if held
                else "Okay, I've stopped. What would you like me to do?"
            )
            self._stop_if_busy()
            return False
        if intent is Intent.CARRY_ON_WITHOUT:
            x = self.awaiting[1] if self.awaiting and self.awaiting[0] == "stopped" else self._acting_on()
            if x:
                self.keep.add(x)
            self.paused, self.awaiting = False, None
            self._thought.append(f"{said}: I leave the {x} on the table and finish the rest.")
            self._reply.append(f"Okay, I'll leave the {x} and carry on.")
            return True
        if intent is Intent.WHICH_ANSWER:
            obj = str(slots["object"])
            rec = self.awaiting[1][1] if self.awaiting and self.awaiting[0] == "which" else catalog.home_receptacle(self.world.objects[obj].kind)
            self.goals[obj] = rec
            self.awaiting = None
            self.task_active = True
            self.task = self.task or f"put the {obj} into the {rec}"
            self._thought.append(f"{said}: they mean the {obj}.")
            self._reply.append(f"Got it, the {obj}.")
            return True
        if intent in (Intent.YES, Intent.NO):
            if self.awaiting and self.awaiting[0] == "offer":
                obj, rec = self.awaiting[1]
                if intent is Intent.YES:
                    self.goals[obj] = rec
                    self._thought.append(f"{said}: yes, the {obj} goes too.")
                    self._reply.append("Okay!")
                else:
                    self.keep.add(obj)
                    self._thought.append(f"{said}: the {obj} stays.")
                    self._reply.append(f"Okay, I'll leave the {obj}.")
            self.awaiting = None
            return True
        if intent is Intent.HELP_LEAVE_IT:
            x = self.awaiting[1] if self.awaiting and self.awaiting[0] == "help" else self.last_obj
            if x:
                self.given_up.add(x)
                self.keep.add(x)
            self.awaiting = None
            self._thought.append(f"{said}: they will handle the {x}; I go on with the rest.")
            self._reply.append(f"Okay, I'll leave the {x} to you.")
            return True
        if intent is Intent.GREETING:
            self._thought.append(f"{said}: a greeting, so I just answer.")
            self._reply.append("I'm doing well, thanks for asking! What can I do for you?")
            return not busy
        if intent is Intent.SMALLTALK:
            index = int(turn.template.rsplit("/", 1)[1])
            self._thought.append(f"{said}: small talk; I answer and keep working.")
            self._reply.append(_SMALLTALK_REPLIES[index % len(_SMALLTALK_REPLIES)])
            return not busy
        if intent is Intent.CLOSING:
            self.task_active = False
            self._thought.append(f"{said}: nothing more to do.")
            self._reply.append("You're welcome! Just call me if you need anything else.")
            return False
        raise ValueError(f"the oracle has no rule for intent {intent!r}")

    def _on_table(self, pred) -> list[str]:
        return [n for n in self.world.on_table() if pred(catalog.KINDS[self.world.objects[n].kind])]

    def _instruction(self, intent: Intent, slots: dict, said: str) -> bool:
        K = catalog.KINDS
        goals: dict[str, str] = {}
        keep: list[str] = []
        reply = ""
        why = ""
        if intent is Intent.CLEAR_TABLE:
            goals = {n: catalog.home_receptacle(self.world.objects[n].kind) for n in self._on_table(lambda k: k.category is not Category.PERSONAL)}
            keep = self._on_table(lambda k: k.category is Category.PERSONAL)
            self.task, reply = "clear the table", "Sure, I'll clear the table."
            if keep:
                self.notes.append(f"personal items ({join_names(keep)}) stay")
        elif intent is Intent.CLEAR_DISHES:
            goals = {n: catalog.BUS_TUB for n in self._on_table(lambda k: k.category is Category.DISHWARE)}
            self.task, reply = "put the dishes into the bus tub", "Sure, I'll put the dishes into the bus tub."
        elif intent is Intent.CLEAR_TRASH:
            goals = {n: catalog.TRASH_BIN for n in self._on_table(lambda k: k.category is Category.TRASH)}
            self.task, reply = "throw away the trash", "Sure, I'll throw the trash away."
        elif intent is Intent.KEEP_FOOD:
            goals = {n: catalog.TRASH_BIN for n in self._on_table(lambda k: k.category is Category.TRASH)}
            keep = self._on_table(lambda k: k.edible)
            self.task, reply = "throw away the trash", "Sure, I'll throw away the trash and leave the food."
            self.notes.append("leave the food and drinks")
        elif intent is Intent.EXCEPT_KIND:
            kind = str(slots["kind"])
            goals = {n: catalog.BUS_TUB for n in self._on_table(lambda k: k.category is Category.DISHWARE and k.name != kind)}
            keep = self._on_table(lambda k: k.name == kind)
            self.task, reply = "put the dishes into the bus tub", f"Sure, I'll clear the dishes and leave the {kind}s."
            self.notes.append(f"leave the {kind}s")
        elif intent is Intent.EXCEPT_OBJECT:
            kept = str(slots["object"])
            goals = {n: catalog.home_receptacle(self.world.objects[n].kind)
                     for n in self._on_table(lambda k: k.category is not Category.PERSONAL) if n != kept}
            keep = [kept] + self._on_table(lambda k: k.category is Category.PERSONAL)
            self.task, reply = "clear the table", f"Sure, I'll clear the table and leave the {kept}."
            self.notes.append(f"leave the {kept}")
        elif intent is Intent.LEAST_SUGAR:
            drinks = self._on_table(lambda k: k.category is Category.DRINK)
            best = min(drinks, key=lambda n: K[self.world.objects[n].kind].sugar_g)
            why = "Sugar: " + ", ".join(f"{n} {K[self.world.objects[n].kind].sugar_g:g} g" for n in drinks) + f"; the {best} has the least."
            goals = {n: catalog.TRASH_BIN for n in drinks if n != best}
            keep = [best]
            self.task = "keep the least sugary drink, throw the other drinks away"
            reply = f"The {best} has the least sugar, so I'll keep it and throw away the other drinks."
            self.notes.append(f"keep the {best}")
        elif intent is Intent.NUT_ALLERGY:
            nuts = self._on_table(lambda k: k.edible and k.nuts)
            safe = self._on_table(lambda k: k.edible and not k.nuts)
            why = f"Contain nuts: {join_names(nuts)}; no nuts: {join_names(safe) or 'nothing else'}."
            goals = {n: catalog.TRASH_BIN for n in nuts}
            keep = safe
            self.task = "throw away everything with nuts"
            reply = f"Of course. The {join_names(nuts)} {'has' if len(nuts) == 1 else 'have'} nuts, so I'll throw {'it' if len(nuts) == 1 else 'them'} away."
            self.notes.append("only food with nuts goes")
        elif intent is Intent.MOST_CALORIES:
            foods = self._on_table(lambda k: k.category is Category.FOOD)
            best = max(foods, key=lambda n: K[self.world.objects[n].kind].calories_kcal)
            why = "Calories: " + ", ".join(f"{n} {K[self.world.objects[n].kind].calories_kcal:g} kcal" for n in foods) + f"; the {best} has the most."
            goals = {best: catalog.BASKET}
            keep = [f for f in foods if f != best]
            self.task = "pack the highest-calorie food"
            reply = f"The {best} has the most calories, so I'll put it into the basket."
            self.notes.append(f"only the {best} goes")
        elif intent is Intent.NO_CAFFEINE:
            caf = self._on_table(lambda k: k.edible and k.caffeine_mg > 0)
            free = self._on_table(lambda k: k.edible and k.caffeine_mg == 0)
            why = f"Contain caffeine: {join_names(caf)}; caffeine-free: {join_names(free) or 'nothing else'}."
            goals = {n: catalog.TRASH_BIN for n in caf}
            keep = free
            self.task = "throw away everything with caffeine"
            reply = f"Sure. The {join_names(caf)} {'has' if len(caf) == 1 else 'have'} caffeine, so I'll throw {'it' if len(caf) == 1 else 'them'} away."
            self.notes.append("only things with caffeine go")
        elif intent is Intent.PUT_KIND_AWAY:
            kind = str(slots["kind"])
            rec = str(slots.get("receptacle") or catalog.home_receptacle(kind))
            cands = self._on_table(lambda k: k.name == kind)
            if len(cands) > 1:
                self.awaiting = ("which", (cands, rec))
                self._thought.append(f"{said}, but there are {len(cands)} {kind}s ({join_names(cands)}); I must ask which one before moving.")
                self._reply.append(f"There are {len(cands)} {kind}s here. Which {kind} do you mean: {join_names([f'the {c}' for c in cands], 'or')}?")
                return False
            if not cands:
                return self._refuse(said, f"there is no {kind} on the table", f"Sorry, I don't see a {kind} on the table. Is there anything else I can do?")
            goals = {cands[0]: rec}
            self.task, reply = f"put the {cands[0]} into the {rec}", f"Sure, I'll put the {cands[0]} into the {rec}."
        elif intent in (Intent.PUT_OBJECTS, Intent.PUT_OBJECT):
            names = [str(o) for o in slots["objects"]] if intent is Intent.PUT_OBJECTS else [str(slots["object"])]
            rec = str(slots["receptacle"])
            missing = [n for n in names if n not in self.world.objects or self.world.location(n) != TABLE]
            if missing:
                return self._refuse(said, f"{join_names(missing)} not on the table", f"Sorry, I don't see the {join_names(missing)} on the table. Is there anything else I can do?")
            goals = {n: rec for n in names}
            if len(names) > 1:
                self.listed = (names, rec)
            self.task = f"put {join_objects(names)} into the {rec}"
            reply = f"Sure, I'll put the {join_names(names)} into the {rec}." if len(names) <= 2 else f"Sure, I'll put those {len(names)} items into the {rec}."
        else:  # pragma: no cover - _INSTRUCTIONS and this chain must agree
            raise ValueError(f"no instruction rule for {intent!r}")
        self.goals.update(goals)
        self.keep.update(keep)
        self.task_active, self.paused = True, False
        self.awaiting = None
        self._thought.append(said if not self.controller.busy else f"{said}: {self.task}.")
        if why:
            self._thought.append(why)
        self._reply.append(reply)
        return not self.controller.busy

    def _refuse(self, said: str, reason: str, reply: str) -> bool:
        self._thought.append(f"{said}, but {reason}; I refuse and do not move.")
        self._reply.append(reply)
        self.awaiting = ("anything_else", None)
        return False

    def _invalid(self, intent: Intent, slots: dict, said: str) -> bool:
        tail = " Is there anything else I can do?"
        if intent is Intent.NONEXISTENT:
            thing, rec = str(slots["thing"]), str(slots["receptacle"])
            if thing in self.world.objects and self.world.location(thing) == TABLE:  # it is there after all
                return self._instruction(Intent.PUT_OBJECT, {"object": thing, "receptacle": rec}, said)
            return self._refuse(said, f"there is no {thing} here", f"Sorry, I don't see a {thing} on the table.{tail}")
        if intent is Intent.IMPOSSIBLE:
            big, small = str(slots["big"]), str(slots["small"])
            return self._refuse(said, f"the {big} cannot fit into the {small}",
                                f"Sorry, I can't do that: the {big} is far too big to fit into the {small}.{tail}")
        if intent is Intent.BEYOND_CAPABILITY:
            return self._refuse(said, "that is beyond my skills",
                                "Sorry, I can't do that: I can only pick things up, put them into the bus tub, "
                                f"the trash bin or the basket, and place them back on the table.{tail}")
        obj = str(slots["object"])
        return self._refuse(said, "that is unsafe",
                            f"Sorry, I won't do that: it could hurt someone or break the {obj}.{tail}")

    # -- choosing the next command -----------------------------------------------------
    def _standing(self) -> str:
        parts = list(self.notes)
        told = [k for k in sorted(self.keep) if not any(k in n for n in self.notes)]
        if told:
            parts.append(f"do not take the {join_names(told)}")
        return ("Constraints: " + "; ".join(parts) + ".") if parts else ""

    def _pending(self, obj: str) -> bool:
        return (
            obj in self.goals
            and obj not in self.keep
            and obj not in self.given_up
            and self.world.location(obj) == TABLE
        )

    def _next_step(self) -> None:
        if self.controller.busy:
            self._thought.append(f"Waiting for '{self.controller.current.text}' to finish.")
            return
        if self.awaiting is not None or self.paused:
            self._thought.append("Waiting for the user's answer.")
            return
        if self.task_active:
            left = sum(self._pending(o) for o in self.goals) + (self.world.holding in self.goals)
            self._thought.append(f"Task: {self.task}; {left} item{'s' if left != 1 else ''} left.")
        standing = self._standing()
        if standing:
            self._thought.append(standing)
        held = self.world.holding
        self.first = [f for f in self.first if self._pending(f) or self.world.holding == f]
        if held is not None:
            dest = self.goals.get(held)
            if held in self.keep or dest is None or (self.first and self.first[0] != held):
                self._command(_place_back(held), held, f"Next: place the {held} back on the table.")
            else:
                self._command(_put(held, dest), held, f"Next: put the held {held} into the {dest}.")
            return
        nxt = self.first[0] if self.first else next((o for o in self.goals if self._pending(o)), None)
        if nxt is not None:
            retry = self.failures[nxt] > 0
            self._command(_put(nxt, self.goals[nxt]), nxt,
                          f"{'Retry' if retry else 'Next'}: put the {nxt} into the {self.goals[nxt]}.")
            return
        if not self.task_active:
            self._thought.append("Nothing to do; waiting for the user.")
            return
        offer = self._forgotten()
        if offer is not None:
            obj, rec = offer
            self.offered.add(obj)
            self.awaiting = ("offer", (obj, rec))
            self._thought.append(f"The listed items are done, but the {obj} also belongs in the {rec}; I offer to do it.")
            self._reply.append(f"Should I also put the {obj} into the {rec}?")
            return
        self.task_active = False
        left = sorted(self.given_up)
        self._thought.append("The task is complete; I say so and ask if anything else is needed.")
        done = "All done" + (f", except the {join_names(left)}, which I left for you" if left else "") + "."
        self._reply.append(f"{done} Is there anything else I can help with?")

    def _forgotten(self) -> Optional[tuple[str, str]]:
        if self.listed is None:
            return None
        names, rec = self.listed
        for n in self.world.on_table():
            home = catalog.home_receptacle(self.world.objects[n].kind)
            if home == rec and n not in names and n not in self.keep and n not in self.offered and n not in self.goals:
                return n, rec
        return None

    def _command(self, text: str, obj: str, why: str) -> None:
        self._thought.append(why)
        self._plan = text
        self.last_obj = obj


_INSTRUCTIONS = {
    Intent.CLEAR_TABLE, Intent.CLEAR_DISHES, Intent.CLEAR_TRASH, Intent.KEEP_FOOD, Intent.EXCEPT_KIND,
    Intent.EXCEPT_OBJECT, Intent.LEAST_SUGAR, Intent.NUT_ALLERGY, Intent.MOST_CALORIES, Intent.NO_CAFFEINE,
    Intent.PUT_KIND_AWAY, Intent.PUT_OBJECTS, Intent.PUT_OBJECT,
}
