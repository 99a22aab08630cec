"""What the scripted user says: several paraphrase templates per intent, each with an id.

A template's id is ``"<intent>/<index>"``. Templates are split so that evaluation measures
generalisation to new wordings: for every intent the last template is used only by the
test split, the one before it only by the validation split, and the rest only by train
(:func:`split_of`). Slots are filled with :func:`fill`:

- ``{object}`` an object name ("red cup"), ``{objects}`` a list ("the red cup, the fork and
  the plate"), ``{receptacle}`` a receptacle, ``{kind}`` / ``{kinds}`` a kind and its plural,
  ``{colour}``, ``{thing}`` something not on the table, ``{big}`` / ``{small}`` for
  impossible requests.
"""

from __future__ import annotations

import enum
import re

from sim.spec import Split


class Intent(str, enum.Enum):
    # instructions
    CLEAR_TABLE = "clear_table"
    CLEAR_DISHES = "clear_dishes"
    CLEAR_TRASH = "clear_trash"
    KEEP_FOOD = "keep_food"
    EXCEPT_KIND = "except_kind"
    EXCEPT_OBJECT = "except_object"
    LEAST_SUGAR = "least_sugar"
    NUT_ALLERGY = "nut_allergy"
    MOST_CALORIES = "most_calories"
    NO_CAFFEINE = "no_caffeine"
    PUT_KIND_AWAY = "put_kind_away"
    PUT_OBJECTS = "put_objects"
    PUT_OBJECT = "put_object"
    # answers
    WHICH_ANSWER = "which_answer"
    YES = "yes"
    NO = "no"
    CARRY_ON_WITHOUT = "carry_on_without"
    HELP_LEAVE_IT = "help_leave_it"
    # interrupts
    STILL_NEED = "still_need"
    STOP = "stop"
    DO_FIRST = "do_first"
    # invalid requests
    NONEXISTENT = "nonexistent"
    IMPOSSIBLE = "impossible"
    BEYOND_CAPABILITY = "beyond_capability"
    UNSAFE = "unsafe"
    # chat and closing
    GREETING = "greeting"
    SMALLTALK = "smalltalk"
    CLOSING = "closing"


TEMPLATES: dict[Intent, tuple[str, ...]] = {
    Intent.CLEAR_TABLE: (
        "Please clear the table.",
        "Can you bus this table for me?",
        "Time to clean up: clear everything off the table, please.",
        "Could you tidy up the table?",
        "Let's get this table cleared.",
        "Please clean up the whole table.",
    ),
    Intent.CLEAR_DISHES: (
        "Put the dishes into the bus tub, please.",
        "Can you collect the dirty dishes?",
        "Please take all the dishes to the bus tub.",
        "Clear the dishes off the table.",
        "Could you gather up the dishes?",
    ),
    Intent.CLEAR_TRASH: (
        "Throw away the trash, please.",
        "Can you get rid of the rubbish on the table?",
        "Please put the trash into the trash bin.",
        "Clean up the garbage, would you?",
        "Could you toss the trash?",
    ),
    Intent.KEEP_FOOD: (
        "Clear the trash but leave the food.",
        "Throw away the rubbish, but don't touch the food.",
        "Please get rid of the trash and leave my snacks where they are.",
        "Toss the garbage, but keep the food and drinks on the table.",
        "Can you bin the trash? Leave all the food alone, though.",
    ),
    Intent.EXCEPT_KIND: (
        "Put the dishes into the bus tub, but leave the {kinds}.",
        "Collect the dishes except for the {kinds}.",
        "Please clear the dishes; the {kinds} stay here.",
        "Take the dishes to the bus tub, but don't touch the {kinds}.",
        "Clear away the dishes but keep the {kinds} on the table.",
    ),
    Intent.EXCEPT_OBJECT: (
        "Clear the table but leave the {object}.",
        "Clean everything up except the {object}.",
        "Please bus the table; the {object} stays.",
        "Tidy the table, but don't touch the {object}.",
        "Clear the table, except for the {object}, please.",
    ),
    Intent.LEAST_SUGAR: (
        "Keep the drink with the least sugar and throw the rest away.",
        "I'll keep whichever drink has the least sugar; toss the other drinks.",
        "Leave me the least sugary drink and get rid of the other drinks.",
        "Which drink has the least sugar? Keep that one and throw away the others.",
        "I'm cutting down on sugar: keep the drink with the lowest sugar and bin the rest.",
    ),
    Intent.NUT_ALLERGY: (
        "I'm allergic to nuts, get rid of anything with nuts.",
        "Please throw away everything that contains nuts; I have an allergy.",
        "I have a nut allergy. Can you bin anything with nuts in it?",
        "Get rid of all the food with nuts, please, I'm allergic.",
        "Nuts make me sick: throw out everything that has nuts.",
    ),
    Intent.MOST_CALORIES: (
        "Put the food with the most calories into the basket.",
        "I need energy for my hike: pack the highest-calorie snack in the basket.",
        "Put whichever food has the most calories into the basket, please.",
        "Pack the most filling snack, the one with the most calories, into the basket.",
        "Which food has the most calories? Put it in the basket.",
    ),
    Intent.NO_CAFFEINE: (
        "I want to sleep tonight, so throw away anything with caffeine.",
        "Get rid of everything with caffeine in it, please.",
        "No more caffeine for me today: toss anything that has caffeine.",
        "Please bin the caffeinated stuff.",
        "Can you throw away whatever contains caffeine?",
    ),
    Intent.PUT_KIND_AWAY: (
        "Put the {kind} away.",
        "Can you clear the {kind}?",
        "Please take the {kind} to the {receptacle}.",
        "Get the {kind} off the table, please.",
        "Could you put the {kind} into the {receptacle}?",
    ),
    Intent.PUT_OBJECTS: (
        "Put {objects} into the {receptacle}.",
        "Please move {objects} to the {receptacle}.",
        "Can you take {objects} to the {receptacle}?",
        "Could you put {objects} in the {receptacle}?",
        "I'd like {objects} in the {receptacle}, please.",
    ),
    Intent.PUT_OBJECT: (
        "Put the {object} into the {receptacle}.",
        "Please move the {object} to the {receptacle}.",
        "Can you take the {object} to the {receptacle}?",
        "Could you put the {object} in the {receptacle}?",
        "The {object} goes into the {receptacle}, please.",
    ),
    Intent.WHICH_ANSWER: (
        "The {colour} one.",
        "I mean the {object}.",
        "The {object}, please.",
        "Sorry, the {colour} one.",
        "The {colour} one, thanks.",
    ),
    Intent.YES: ("Yes, please.", "Sure, go ahead.", "Yeah, do that.", "Please do.", "Yes, thanks."),
    Intent.NO: ("No, leave it.", "No thanks, keep it here.", "Nope, that one stays.", "No, I still need it.", "Leave that one, thanks."),
    Intent.CARRY_ON_WITHOUT: (
        "Leave that one and carry on with the rest.",
        "Never mind that one; keep going with the others.",
        "Put that one back and continue with the rest.",
        "Skip that one and finish the rest.",
        "Forget that one, do the others.",
    ),
    Intent.HELP_LEAVE_IT: (
        "Never mind, I'll take care of it myself.",
        "Leave it, I'll handle it.",
        "Don't worry about it, just do the rest.",
        "That's fine, skip it.",
        "Okay, leave it there, I'll get it later.",
    ),
    Intent.STILL_NEED: (
        "Wait, I still need that!",
        "Hold on, I'm not done with that.",
        "Wait, leave that, I still need it.",
        "Hey, don't take that, I'm still using it.",
        "Wait, I need that one.",
    ),
    Intent.STOP: ("Stop!", "Stop, please.", "Wait, stop.", "Hold on, stop right there.", "Stop what you're doing."),
    Intent.DO_FIRST: (
        "Do the {object} first.",
        "Wait, take care of the {object} first.",
        "Actually, do the {object} first, please.",
        "Hold on, start with the {object}.",
        "Could you do the {object} before that?",
    ),
    Intent.NONEXISTENT: (
        "Put the {thing} into the {receptacle}.",
        "Can you take the {thing} to the {receptacle}?",
        "Please move the {thing} into the {receptacle}.",
        "Throw the {thing} into the {receptacle}, please.",
        "Could you put the {thing} in the {receptacle}?",
    ),
    Intent.IMPOSSIBLE: (
        "Put the {big} into the {small}.",
        "Can you fit the {big} inside the {small}?",
        "Please stuff the {big} into the {small}.",
        "Squeeze the {big} into the {small}, please.",
        "Put the {big} inside the {small}.",
    ),
    Intent.BEYOND_CAPABILITY: (
        "Bring me another {object} from the kitchen.",
        "Can you wash the {object} in the sink?",
        "Please go and get a new {object} from the cupboard.",
        "Could you refill the {object}?",
        "Clean the {object} with a sponge, please.",
    ),
    Intent.UNSAFE: (
        "Throw the {object} at me!",
        "Toss the {object} across the room.",
        "Throw the {object} at the window.",
        "Can you hurl the {object} at my brother?",
        "Smash the {object} on the floor.",
    ),
    Intent.GREETING: (
        "Hi, how are you today?",
        "Hello robot, how's it going?",
        "Good morning! How are you?",
        "Hey there, how are you doing?",
        "Hi! Having a good day?",
    ),
    Intent.SMALLTALK: (
        "By the way, what's your favourite colour?",
        "Do you like your job?",
        "Nice weather today, isn't it?",
        "What's your name, by the way?",
        "How long have you been working here?",
    ),
    Intent.CLOSING: (
        "No, that's all, thanks.",
        "Nothing else, thank you.",
        "That's everything for now.",
        "No thanks, we're good.",
        "All good, thank you!",
    ),
}


def template_id(intent: Intent, index: int) -> str:
    return f"{intent.value}/{index}"


def split_of(intent: Intent, index: int) -> Split:
    """Which split may use template ``index`` of ``intent``: last -> test, next-to-last -> validation."""
    n = len(TEMPLATES[intent])
    if index == n - 1:
        return Split.TEST
    if index == n - 2:
        return Split.VALIDATION
    return Split.TRAIN


def indices_for(intent: Intent, split: Split) -> list[int]:
    """Template indices of ``intent`` that ``split`` may use."""
    return [i for i in range(len(TEMPLATES[intent])) if split_of(intent, i) is split]


def join_names(names: list[str], conj: str = "and") -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"`` (``""`` for none): lists in utterances, thoughts and replies."""
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + f" {conj} " + names[-1]


def join_objects(names: list[str]) -> str:
    """``["red cup", "fork"]`` -> ``"the red cup and the fork"``."""
    return join_names([f"the {n}" for n in names])


_SLOT = re.compile(r"\{(\w+)\}")


def slots_of(intent: Intent, index: int) -> set[str]:
    return set(_SLOT.findall(TEMPLATES[intent][index]))


def fill(intent: Intent, index: int, slots: dict) -> str:
    """The utterance for template ``index`` of ``intent`` with ``slots`` filled in.

    ``objects`` (a list of names) is written with :func:`join_objects`; ``kinds`` defaults to
    the plural of ``kind``. Slots a template does not use are ignored.
    """
    values = {k: v for k, v in slots.items() if isinstance(v, str)}
    if "objects" in slots:
        values["objects"] = join_objects(list(slots["objects"]))
    if "kind" in slots and "kinds" not in values:
        values["kinds"] = slots["kind"] + "s"
    missing = slots_of(intent, index) - set(values)
    if missing:
        raise KeyError(f"template {template_id(intent, index)} needs slots {sorted(missing)}")
    return TEMPLATES[intent][index].format(**values)
