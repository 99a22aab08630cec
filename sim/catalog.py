"""The object catalog: every kind of thing the simulated table can hold, in one data table.

Each :class:`Kind` names its category (which receptacle it belongs in), the shape the camera
draws for it, the colours it may come in and, for food and drinks, its attributes (nuts,
caffeine, sugar, calories) that open-ended requests reason over ("the drink with the least
sugar"). Food and drinks have one fixed colour and are named by their kind ("cola");
everything else is named "<colour> <kind>" ("red cup"), so two cups differ by colour.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Category(str, enum.Enum):
    DISHWARE = "dishware"
    TRASH = "trash"
    FOOD = "food"
    DRINK = "drink"
    PERSONAL = "personal"


#: The table's receptacles, in drawing order (left to right).
BUS_TUB = "bus tub"
TRASH_BIN = "trash bin"
BASKET = "basket"
RECEPTACLES: tuple[str, ...] = (BUS_TUB, TRASH_BIN, BASKET)

#: Where each category belongs when the table is cleared (personal items stay: None).
HOME_RECEPTACLE: dict[Category, str | None] = {
    Category.DISHWARE: BUS_TUB,
    Category.TRASH: TRASH_BIN,
    Category.FOOD: BASKET,
    Category.DRINK: BASKET,
    Category.PERSONAL: None,
}

#: Object colours by name, as RGB. Each is distinct from the others and from the table.
COLOURS_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 35),
    "blue": (35, 80, 230),
    "green": (40, 170, 60),
    "yellow": (250, 225, 35),
    "white": (250, 250, 250),
    "black": (25, 25, 25),
    "purple": (145, 55, 190),
    "pink": (255, 135, 200),
    "orange": (255, 140, 20),
    "grey": (150, 150, 160),
    "brown": (115, 65, 25),
}

_PLAIN = ("red", "blue", "green", "yellow", "white", "black", "purple", "pink", "orange", "grey")


@dataclass(frozen=True)
class Kind:
    """One kind of object. ``colours``: those it comes in (food and drinks: exactly one)."""

    name: str
    category: Category
    shape: str
    colours: tuple[str, ...]
    nuts: bool = False
    caffeine_mg: float = 0.0
    sugar_g: float = 0.0
    calories_kcal: float = 0.0
    #: Food and drinks are named by kind ("cola"); the rest by colour and kind ("red cup").
    named_by_kind: bool = False

    @property
    def plural(self) -> str:
        return self.name + "s"

    @property
    def edible(self) -> bool:
        return self.category in (Category.FOOD, Category.DRINK)


def _food(name, shape, rgb_name, *, nuts=False, caffeine_mg=0.0, sugar_g=0.0, calories_kcal=0.0, drink=False):
    return Kind(
        name=name,
        category=Category.DRINK if drink else Category.FOOD,
        shape=shape,
        colours=(rgb_name,),
        nuts=nuts,
        caffeine_mg=caffeine_mg,
        sugar_g=sugar_g,
        calories_kcal=calories_kcal,
        named_by_kind=True,
    )


#: Food and drink colours (fixed per kind), RGB. Kept apart from COLOURS_RGB: not user-facing names.
FOOD_RGB: dict[str, tuple[int, int, int]] = {
    "peanut bar": (205, 120, 45),
    "almond cookie": (225, 185, 120),
    "trail mix": (190, 150, 95),
    "apple": (125, 210, 55),
    "banana": (245, 215, 45),
    "sandwich": (240, 215, 160),
    "chocolate": (95, 50, 25),
    "chips": (240, 95, 40),
    "cola": (110, 25, 20),
    "water bottle": (160, 210, 245),
    "orange juice": (255, 165, 30),
    "black coffee": (245, 240, 230),
    "iced tea": (200, 140, 60),
}

#: Every kind, by name. Attribute values are typical per serving (sugar in grams, energy in kcal).
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        # dishware -> bus tub
        Kind("cup", Category.DISHWARE, "cup", _PLAIN),
        Kind("mug", Category.DISHWARE, "mug", _PLAIN),
        Kind("plate", Category.DISHWARE, "plate", _PLAIN),
        Kind("bowl", Category.DISHWARE, "bowl", _PLAIN),
        Kind("fork", Category.DISHWARE, "fork", ("grey", "black", "white", "blue", "red", "green")),
        Kind("spoon", Category.DISHWARE, "spoon", ("grey", "black", "white", "blue", "red", "green")),
        # trash -> trash bin
        Kind("napkin", Category.TRASH, "napkin", ("white", "yellow", "pink", "blue", "green", "red")),
        Kind("can", Category.TRASH, "can", ("red", "blue", "green", "grey", "yellow", "orange", "purple")),
        Kind("wrapper", Category.TRASH, "wrapper", ("red", "blue", "green", "yellow", "orange", "purple", "pink")),
        Kind("banana peel", Category.TRASH, "banana_peel", ("yellow", "brown")),
        # personal items stay on the table
        Kind("phone", Category.PERSONAL, "phone", ("black", "white", "blue", "pink", "red", "grey")),
        Kind("keys", Category.PERSONAL, "keys", ("grey", "yellow", "black")),
        Kind("wallet", Category.PERSONAL, "wallet", ("brown", "black", "red", "blue")),
        # food -> basket
        _food("peanut bar", "bar", "peanut bar", nuts=True, sugar_g=12, calories_kcal=250),
        _food("almond cookie", "cookie", "almond cookie", nuts=True, sugar_g=9, calories_kcal=140),
        _food("trail mix", "trail_mix", "trail mix", nuts=True, sugar_g=14, calories_kcal=290),
        _food("apple", "apple", "apple", sugar_g=19, calories_kcal=95),
        _food("banana", "banana", "banana", sugar_g=14, calories_kcal=105),
        _food("sandwich", "sandwich", "sandwich", sugar_g=5, calories_kcal=350),
        _food("chocolate", "chocolate", "chocolate", caffeine_mg=20, sugar_g=24, calories_kcal=230),
        _food("chips", "chips", "chips", sugar_g=1, calories_kcal=160),
        # drinks -> basket
        _food("cola", "glass", "cola", caffeine_mg=34, sugar_g=39, calories_kcal=140, drink=True),
        _food("water bottle", "bottle", "water bottle", drink=True),
        _food("orange juice", "carton", "orange juice", sugar_g=21, calories_kcal=110, drink=True),
        _food("black coffee", "takeaway_cup", "black coffee", caffeine_mg=95, sugar_g=0, calories_kcal=5, drink=True),
        _food("iced tea", "juice_box", "iced tea", caffeine_mg=25, sugar_g=18, calories_kcal=70, drink=True),
    )
}

#: Things that are never on our table: the "nonexistent object" requests name these.
ABSENT_THINGS: tuple[str, ...] = ("teapot", "wine glass", "laptop", "candle", "newspaper", "knife", "salt shaker")


def kinds_in(*categories: Category) -> list[Kind]:
    """Kinds of the given categories, in catalog order."""
    return [k for k in KINDS.values() if k.category in categories]


def object_name(kind: str, colour: str) -> str:
    """The unique name of an object: "red cup", or the kind alone for food and drinks ("cola")."""
    k = KINDS[kind]
    return k.name if k.named_by_kind else f"{colour} {k.name}"


def object_rgb(kind: str, colour: str) -> tuple[int, int, int]:
    """The colour the camera draws an object in."""
    k = KINDS[kind]
    return FOOD_RGB[k.name] if k.named_by_kind else COLOURS_RGB[colour]


def home_receptacle(kind: str) -> str | None:
    """Where an object of this kind goes when the table is cleared (None: it stays)."""
    return HOME_RECEPTACLE[KINDS[kind].category]
