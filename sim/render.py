"""The head camera: a top view of the table drawn with OpenCV, small and fast by default.

Every kind has its own shape (a cup is a disc with a handle, a plate a large ring, a fork a
thin line with tines, a can a small upright rectangle, ...) and every colour name its own
fill (:data:`sim.catalog.COLOURS_RGB`), so a small vision model can tell "the red cup" from
"the blue mug". Receptacles are labelled boxes along the far edge showing what they hold;
the gripper (cyan) is drawn where it is, with the held object between its fingers.

Images are RGB ``uint8`` arrays of shape ``(height_px, width_px, 3)``. The default
160x120 is the size planners see; 640x480 is for people. Drawing coordinates are those of a
160x120 base canvas, scaled. The table, receptacles and resting objects are cached per
world ``version``; a frame only redraws the arm, gripper and held object on a copy.

``python -m sim.render --out docs/img`` writes example frames.
"""

from __future__ import annotations

import argparse
import logging
from typing import Callable, Optional

import numpy as np

from sim import catalog
from sim.spec import TABLE
from sim.world import RECEPTACLE_XY_CM, World

log = logging.getLogger(__name__)

BASE_W = 160
BASE_H = 120
_TABLE_TOP = 11  # base-canvas y of the table's near edge (table y_cm 0)
_TABLE_BOTTOM = 87
_STRIP_TOP = 89  # receptacles

FLOOR_RGB = (55, 58, 64)
ROBOT_STRIP_RGB = (85, 92, 104)
TABLE_RGB = (176, 132, 88)
TABLE_EDGE_RGB = (120, 86, 52)
OUTLINE_RGB = (35, 30, 30)
GRIPPER_RGB = (0, 215, 235)
ARM_RGB = (40, 120, 135)
RECEPTACLE_STYLE: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    # fill, label colour
    catalog.BUS_TUB: ((112, 128, 150), (255, 255, 255)),
    catalog.TRASH_BIN: ((30, 62, 42), (255, 255, 255)),
    catalog.BASKET: ((196, 150, 70), (20, 20, 20)),
}
_RECEPTACLE_HALF_W = 25.0
_RECEPTACLE_HALF_H = 14.5


def _shade(rgb, f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(c * f)))) for c in rgb)


class _Pen:
    """Draws in base-canvas units around a centre, at scale ``s`` pixels per unit."""

    def __init__(self, cv2, img, cx: float, cy: float, s: float, line_type: int):
        self.cv2, self.img, self.cx, self.cy, self.s, self.lt = cv2, img, cx, cy, s, line_type

    def p(self, dx, dy):
        return (int(round(self.cx + dx * self.s)), int(round(self.cy + dy * self.s)))

    def r(self, v):
        return max(1, int(round(v * self.s)))

    def t(self, v):
        return max(1, int(round(v * self.s)))

    def disc(self, dx, dy, radius, rgb, outline=True):
        r = self.r(radius)
        if outline and r >= 2:  # a dark disc under a one pixel smaller fill: a clean rim
            self.cv2.circle(self.img, self.p(dx, dy), r, OUTLINE_RGB, -1, self.lt)
            r -= 1
        self.cv2.circle(self.img, self.p(dx, dy), r, rgb, -1, self.lt)

    def ring(self, dx, dy, radius, rgb, width):
        self.cv2.circle(self.img, self.p(dx, dy), self.r(radius), rgb, self.t(width), self.lt)

    def rect(self, x0, y0, x1, y1, rgb, outline=True):
        self.cv2.rectangle(self.img, self.p(x0, y0), self.p(x1, y1), rgb, -1, self.lt)
        if outline:
            self.cv2.rectangle(self.img, self.p(x0, y0), self.p(x1, y1), OUTLINE_RGB, 1, self.lt)

    def poly(self, pts, rgb, outline=True):
        arr = np.array([self.p(x, y) for x, y in pts], dtype=np.int32)
        self.cv2.fillPoly(self.img, [arr], rgb, self.lt)
        if outline:
            self.cv2.polylines(self.img, [arr], True, OUTLINE_RGB, 1, self.lt)

    def line(self, x0, y0, x1, y1, rgb, width, outline=True):
        w = self.t(width)
        if outline:
            self.cv2.line(self.img, self.p(x0, y0), self.p(x1, y1), OUTLINE_RGB, w + 2, self.lt)
        self.cv2.line(self.img, self.p(x0, y0), self.p(x1, y1), rgb, w, self.lt)

    def ellipse(self, dx, dy, ax, ay, rgb, outline=True):
        axes = (self.r(ax), self.r(ay))
        self.cv2.ellipse(self.img, self.p(dx, dy), axes, 0, 0, 360, rgb, -1, self.lt)
        if outline:
            self.cv2.ellipse(self.img, self.p(dx, dy), axes, 0, 0, 360, OUTLINE_RGB, 1, self.lt)

    def arc(self, dx, dy, radius, start_deg, end_deg, rgb, width):
        axes = (self.r(radius), self.r(radius))
        w = self.t(width)
        self.cv2.ellipse(self.img, self.p(dx, dy), axes, 0, start_deg, end_deg, OUTLINE_RGB, w + 2, self.lt)
        self.cv2.ellipse(self.img, self.p(dx, dy), axes, 0, start_deg, end_deg, rgb, w, self.lt)


# One drawing per shape, in base units (an object spans about 18 units).
def _cup(p: _Pen, c):
    p.line(4, 0, 8.5, 0, c, 2.6)
    p.disc(0, 0, 5.5, c)


def _mug(p, c):
    p.cv2.rectangle(p.img, p.p(4, -3.5), p.p(8.5, 3.5), OUTLINE_RGB, p.t(1.6), p.lt)
    p.rect(-5, -5, 5, 5, c)


def _plate(p, c):
    p.disc(0, 0, 9, c)
    p.ring(0, 0, 5.5, OUTLINE_RGB, 1)


def _bowl(p, c):
    p.disc(0, 0, 7, c)
    p.disc(0, 0, 4.2, _shade(c, 0.55), outline=False)


def _fork(p, c):
    p.line(-9, 0, 2, 0, c, 1.5)
    for y in (-3, 0, 3):
        p.line(2, y, 9, y, c, 1, outline=False)
    p.line(2, -3, 2, 3, c, 1, outline=False)


def _spoon(p, c):
    p.line(-9, 0, 2, 0, c, 1.5)
    p.ellipse(5, 0, 4, 2.6, c)


def _napkin(p, c):
    p.poly([(0, -8), (8, 0), (0, 8), (-8, 0)], c)
    p.line(-4, -4, 4, 4, _shade(c, 0.7), 1, outline=False)


def _can(p, c):
    p.rect(-3, -5.5, 3, 5.5, c)
    p.rect(-3, -5.5, 3, -3.5, (205, 205, 210))


def _wrapper(p, c):
    p.poly([(-8, -4.5), (-8, 4.5), (-1, 0)], c)
    p.poly([(8, -4.5), (8, 4.5), (1, 0)], c)
    p.rect(-3, -2.2, 3, 2.2, c)


def _banana_peel(p, c):
    for x, y in ((0, -7), (-6.5, 5), (6.5, 5)):
        p.line(0, 0, x, y, c, 2.4)
    p.disc(0, 0, 2.6, c, outline=False)


def _phone(p, c):
    p.rect(-3.8, -7, 3.8, 7, c)
    p.rect(-2.4, -5.2, 2.4, 4.2, (70, 90, 120), outline=False)


def _keys(p, c):
    p.ring(-4.5, 0, 3.2, OUTLINE_RGB, 2.4)
    p.ring(-4.5, 0, 3.2, c, 1.2)
    p.line(-1.3, 0, 8, 0, c, 1.6)
    p.line(4.5, 0, 4.5, 3, c, 1.2, outline=False)
    p.line(7, 0, 7, 3, c, 1.2, outline=False)


def _wallet(p, c):
    p.rect(-7.5, -5, 7.5, 5, c)
    p.line(-7.5, -1, 7.5, -1, OUTLINE_RGB, 1, outline=False)
    p.disc(4.5, 1.8, 1.3, (235, 200, 60), outline=False)


def _bar(p, c):
    p.rect(-8.5, -3, 8.5, 3, c)
    p.line(-5.5, -3, -5.5, 3, _shade(c, 0.6), 1, outline=False)
    p.line(5.5, -3, 5.5, 3, _shade(c, 0.6), 1, outline=False)


def _cookie(p, c):
    p.disc(0, 0, 6, c)
    for dx, dy in ((-2.5, -2), (2, 1), (-1, 3), (2.5, -3)):
        p.disc(dx, dy, 1, (90, 50, 25), outline=False)


def _trail_mix(p, c):
    p.disc(0, 0, 6.5, c)
    for (dx, dy), rgb in zip(((-2.5, -1.5), (2, 2), (1, -3), (-2, 3), (3.5, -0.5)),
                             ((200, 40, 40), (60, 150, 50), (80, 45, 20), (245, 240, 220), (230, 190, 60))):
        p.disc(dx, dy, 1.2, rgb, outline=False)


def _apple(p, c):
    p.line(0, -5, 1.5, -9, (95, 60, 30), 1, outline=False)
    p.ellipse(3.5, -8, 2.5, 1.3, (30, 120, 40), outline=False)
    p.disc(0, 0, 6, c)


def _banana(p, c):
    p.arc(0, -5, 8, 25, 155, c, 3.2)


def _sandwich(p, c):
    p.poly([(-8, 6), (8, 6), (0, -7)], c)
    p.line(-5.5, 3.2, 5.5, 3.2, (60, 175, 60), 1.2, outline=False)


def _chocolate(p, c):
    p.rect(-6.5, -4.5, 6.5, 4.5, c)
    light = _shade(c, 1.6)
    for x in (-2.2, 2.2):
        p.line(x, -4.5, x, 4.5, light, 1, outline=False)
    p.line(-6.5, 0, 6.5, 0, light, 1, outline=False)


def _chips(p, c):
    p.poly([(-5, -7), (5, -7), (6, 0), (5, 7), (-5, 7), (-6, 0)], c)
    p.line(-5, -5.3, 5, -5.3, _shade(c, 0.6), 1, outline=False)
    p.line(-5, 5.3, 5, 5.3, _shade(c, 0.6), 1, outline=False)


def _glass(p, c):
    p.poly([(-5, -7), (5, -7), (3.5, 7), (-3.5, 7)], c)
    p.line(2, -6, 5.5, -10.5, (250, 250, 250), 1.2)


def _bottle(p, c):
    p.rect(-3, -3, 3, 8.5, c)
    p.rect(-1.4, -7, 1.4, -3, c)
    p.rect(-1.9, -9.5, 1.9, -7, (30, 80, 200))


def _carton(p, c):
    p.rect(-4, -3, 4, 8, c)
    p.poly([(-4, -3), (4, -3), (0, -8)], _shade(c, 1.25))


def _takeaway_cup(p, c):
    p.poly([(-5, -5), (5, -5), (3.5, 8), (-3.5, 8)], c)
    p.rect(-4.5, -1, 4.5, 2.5, (150, 100, 60), outline=False)
    p.rect(-5.8, -7.5, 5.8, -5, (70, 40, 20))


def _juice_box(p, c):
    p.rect(-4.5, -6, 4.5, 7, c)
    p.disc(0, 1, 2.2, (250, 230, 120), outline=False)
    p.line(2, -6, 4, -10.5, (250, 250, 250), 1.2)


SHAPES: dict[str, Callable[[_Pen, tuple], None]] = {
    "cup": _cup, "mug": _mug, "plate": _plate, "bowl": _bowl, "fork": _fork, "spoon": _spoon,
    "napkin": _napkin, "can": _can, "wrapper": _wrapper, "banana_peel": _banana_peel,
    "phone": _phone, "keys": _keys, "wallet": _wallet,
    "bar": _bar, "cookie": _cookie, "trail_mix": _trail_mix, "apple": _apple, "banana": _banana,
    "sandwich": _sandwich, "chocolate": _chocolate, "chips": _chips,
    "glass": _glass, "bottle": _bottle, "carton": _carton, "takeaway_cup": _takeaway_cup, "juice_box": _juice_box,
}


class Renderer:
    """Draws a :class:`~sim.world.World` from the head camera. Deterministic: same world, same pixels.

    ``antialias`` (default: only from 2x the base size up) smooths edges for people; the
    small default keeps exact palette colours.
    """

    def __init__(self, width_px: int = 160, height_px: int = 120, antialias: Optional[bool] = None):
        import cv2

        if width_px < 32 or height_px < 24:
            raise ValueError(f"camera size {width_px}x{height_px} is too small; use at least 32x24 (default 160x120)")
        cv2.setNumThreads(1)
        self._cv2 = cv2
        self.width_px, self.height_px = int(width_px), int(height_px)
        self.sx, self.sy = self.width_px / BASE_W, self.height_px / BASE_H
        self.s = min(self.sx, self.sy)
        if antialias is None:
            antialias = self.s >= 2
        self._lt = cv2.LINE_AA if antialias else cv2.LINE_8
        self._background = self._draw_background()
        self._layer: Optional[np.ndarray] = None
        self._layer_key: Optional[tuple] = None
        self._layer_world: Optional[World] = None

    # -- coordinates --------------------------------------------------------------------
    def to_px(self, x_cm: float, y_cm: float) -> tuple[float, float]:
        """Image position (pixels, float) of a point in the table frame."""
        return x_cm * self.sx, (_TABLE_TOP + y_cm) * self.sy

    def _pen(self, img, cx, cy, scale=1.0) -> _Pen:
        return _Pen(self._cv2, img, cx, cy, self.s * scale, self._lt)

    # -- layers -------------------------------------------------------------------------
    def _draw_background(self) -> np.ndarray:
        cv2 = self._cv2
        img = np.empty((self.height_px, self.width_px, 3), np.uint8)
        img[:] = FLOOR_RGB
        pen = self._pen(img, 0, 0)
        pen.rect(0, 0, BASE_W, _TABLE_TOP - 1, ROBOT_STRIP_RGB, outline=False)
        pen.rect(0, _TABLE_TOP, BASE_W - 1, _TABLE_BOTTOM, TABLE_RGB, outline=False)
        cv2.rectangle(img, self._ipx(0, _TABLE_TOP), self._ipx(BASE_W - 1, _TABLE_BOTTOM), TABLE_EDGE_RGB, max(1, round(self.s)), self._lt)
        for name in catalog.RECEPTACLES:
            fill, ink = RECEPTACLE_STYLE[name]
            cx, cy = self._base_xy(*RECEPTACLE_XY_CM[name])
            x0, y0 = cx - _RECEPTACLE_HALF_W, cy - _RECEPTACLE_HALF_H
            x1, y1 = cx + _RECEPTACLE_HALF_W, cy + _RECEPTACLE_HALF_H
            pen.rect(x0, y0, x1, y1, fill)
            if name == catalog.BASKET:  # wicker hatching
                for i in range(1, 6):
                    pen.line(x0 + i * 8.3, y0 + 9, x0 + i * 8.3, y1, _shade(fill, 0.75), 0.6, outline=False)
            elif name == catalog.TRASH_BIN:
                pen.line(x0 + 2, y0 + 9, x1 - 2, y0 + 9, _shade(fill, 1.8), 0.6, outline=False)
            self._label(img, name, x0, y0, x1, ink)
        return img

    def _label(self, img, text, x0, y0, x1, ink):
        cv2 = self._cv2
        if self.s < 2:  # small frames: the crisp pixel font, no anti-aliasing
            font, line_type, target_h = cv2.FONT_HERSHEY_PLAIN, cv2.LINE_8, 8.0 * self.s
        else:
            font, line_type, target_h = cv2.FONT_HERSHEY_SIMPLEX, cv2.LINE_AA, 6.5 * self.s
        (w1, h1), _ = cv2.getTextSize(text, font, 1.0, 1)
        scale = min(target_h / h1, (x1 - x0 - 3) * self.s / w1)
        thick = max(1, int(round(self.s * 0.6)))
        (w, h), _ = cv2.getTextSize(text, font, scale, thick)
        cx = (x0 + x1) / 2 * self.sx
        org = (int(round(cx - w / 2)), int(round((y0 + 1.5) * self.sy + h)))
        cv2.putText(img, text, org, font, scale, ink, thick, line_type)

    def _base_xy(self, x_cm, y_cm):
        return x_cm, _TABLE_TOP + y_cm

    def _ipx(self, bx, by):
        return int(round(bx * self.sx)), int(round(by * self.sy))

    def _draw_object(self, img, name: str, world: World, cx: float, cy: float, scale: float = 1.0):
        obj = world.objects[name]
        kind = catalog.KINDS[obj.kind]
        SHAPES[kind.shape](self._pen(img, cx, cy, scale), catalog.object_rgb(obj.kind, obj.colour))

    def _draw_layer(self, world: World) -> np.ndarray:
        img = self._background.copy()
        for name, obj in world.objects.items():
            if obj.location == TABLE:
                self._draw_object(img, name, world, *self.to_px(*obj.home_cm))
        for rec in world.receptacles:
            inside = world.contents(rec)
            if not inside:
                continue
            bx, by = self._base_xy(*RECEPTACLE_XY_CM[rec])
            n_show = 6 if len(inside) <= 6 else 5
            for i, name in enumerate(inside[:n_show]):
                x = bx - _RECEPTACLE_HALF_W + 5 + i * 8
                self._draw_object(img, name, world, x * self.sx, (by + 6.5) * self.sy, scale=0.45)
            if len(inside) > n_show:
                cv2 = self._cv2
                org = self._ipx(bx - _RECEPTACLE_HALF_W + 5 + n_show * 8 - 3, by + 9)
                cv2.putText(img, f"+{len(inside) - n_show}", org, cv2.FONT_HERSHEY_PLAIN, 0.55 * self.s,
                            RECEPTACLE_STYLE[rec][1], 1, cv2.LINE_AA)
        return img

    def render(self, world: World) -> np.ndarray:
        """A new ``(height_px, width_px, 3)`` RGB frame of ``world`` (never shared with a later call)."""
        key = (id(world), world.version)
        if key != self._layer_key or self._layer_world is not world:
            self._layer = self._draw_layer(world)
            self._layer_key = key
            self._layer_world = world
        img = self._layer.copy()
        self._draw_gripper(img, world)
        return img

    def _draw_gripper(self, img, world: World) -> None:
        cv2 = self._cv2
        gx, gy = self.to_px(*world.gripper_cm)
        base = self._ipx(BASE_W / 2, 0)
        palm_y = gy - 8 * self.s
        cv2.line(img, base, (int(round(gx)), int(round(palm_y))), ARM_RGB, max(1, round(2 * self.s)), self._lt)
        if world.holding is not None:
            self._draw_object(img, world.holding, world, gx, gy, scale=1.1)
            half = 7.0
        else:
            half = 8.0
        pen = self._pen(img, gx, gy)
        pen.line(-half, -8, half, -8, GRIPPER_RGB, 1.6)
        pen.line(-half, -8, -half, -1, GRIPPER_RGB, 1.6)
        pen.line(half, -8, half, -1, GRIPPER_RGB, 1.6)


def save_examples(out_dir: str = "docs/img", upscale: int = 4) -> list[str]:
    """Render a few example frames (default size scaled up for people, and one 640x480); returns paths."""
    import cv2

    from sim.controller import SimController
    from sim.scenarios import load_scenarios

    out = []
    scenario = next(s for s in load_scenarios("test") if s.category.value == "multi_stage")
    world = World(scenario.scene)
    ctl = SimController(world)
    small, large = Renderer(), Renderer(640, 480)

    def save(name, img):
        path = f"{out_dir}/{name}.png"
        cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        out.append(path)

    def up(img):
        return cv2.resize(img, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_NEAREST)

    save("head_160x120_start_x4", up(small.render(world)))
    save("head_640x480_start", large.render(world))
    names = list(world.objects)
    # Clear three objects, then catch the fourth mid-carry.
    for name in names[:3]:
        rec = catalog.home_receptacle(world.objects[name].kind)
        if rec:
            ctl.submit(f"put the {name} into the {rec}")
            while ctl.busy:
                ctl.step(ctl.time_to_next_event_s())
    target = next(n for n in names[3:] if catalog.home_receptacle(world.objects[n].kind))
    ctl.submit(f"put the {target} into the {catalog.home_receptacle(world.objects[target].kind)}")
    ctl.step(ctl.config.approach_s + ctl.config.grasp_s + ctl.config.carry_s / 2)
    save("head_160x120_carry_x4", up(small.render(world)))
    save("head_640x480_carry", large.render(world))
    # A contact sheet of every kind, large, so people can check the shapes.
    save("kinds_640x480", render_kinds_sheet(640, 480))
    save("kinds_160x120_x4", up(render_kinds_sheet(160, 120)))
    return out


def render_kinds_sheet(width_px: int = 640, height_px: int = 480) -> np.ndarray:
    """Every kind of object once, in its first colour, on the table (for documentation)."""
    from sim.spec import Scene, SceneObject

    kinds = list(catalog.KINDS.values())
    objs = []
    cols = 7
    for i, k in enumerate(kinds):
        r, c = divmod(i, cols)
        objs.append(SceneObject(name=catalog.object_name(k.name, k.colours[0]), kind=k.name, colour=k.colours[0],
                                x_cm=12 + c * 22.5, y_cm=8 + r * 19.5))
    world = World(Scene(objects=objs, receptacles=list(catalog.RECEPTACLES)))
    return Renderer(width_px, height_px).render(world)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="write example head-camera frames")
    parser.add_argument("--out", default="docs/img")
    args = parser.parse_args(argv)
    for path in save_examples(args.out):
        print(path)


if __name__ == "__main__":
    main()
