"""The head camera: size, determinism, a distinct drawing per kind and per colour, the held object."""

import itertools

import numpy as np
import pytest

from sim import catalog
from sim.render import SHAPES, Renderer
from sim.spec import Scene, SceneObject
from sim.world import World


def world_of(*objs):
    return World(Scene(objects=[SceneObject(name=catalog.object_name(k, c), kind=k, colour=c, x_cm=x, y_cm=y)
                                for k, c, x, y in objs], receptacles=list(catalog.RECEPTACLES)))


def test_default_and_configured_sizes_are_rgb_uint8():
    w = world_of(("cup", "red", 16, 13))
    assert Renderer().render(w).shape == (120, 160, 3)
    img = Renderer(640, 480).render(w)
    assert img.shape == (480, 640, 3) and img.dtype == np.uint8
    with pytest.raises(ValueError, match="too small"):
        Renderer(8, 6)


def test_rendering_is_deterministic_and_frames_are_not_shared():
    w = world_of(("cup", "red", 16, 13), ("plate", "blue", 80, 38), ("cola", "cola", 112, 63))
    r = Renderer()
    a, b = r.render(w), r.render(w)
    assert np.array_equal(a, b) and a is not b and not np.shares_memory(a, b)
    assert np.array_equal(a, Renderer().render(w))


def test_every_kind_has_its_own_drawing():
    r = Renderer()
    patches = {}
    for shape, draw in SHAPES.items():
        img = np.zeros((40, 40, 3), np.uint8)
        draw(r._pen(img, 20, 20), (200, 60, 60))  # one colour for all: only the shape differs
        patches[shape] = img
    assert {k.shape for k in catalog.KINDS.values()} == set(SHAPES)
    assert len({k.shape for k in catalog.KINDS.values()}) == len(catalog.KINDS)
    for (a, pa), (b, pb) in itertools.combinations(patches.items(), 2):
        differing = np.any(pa != pb, axis=2).sum()
        assert differing >= 10, (a, b, differing)


def test_every_colour_name_is_drawn_in_its_own_colour():
    r = Renderer()
    seen = set()
    for colour, rgb in catalog.COLOURS_RGB.items():
        img = r.render(world_of(("plate", colour, 48, 38)))
        x, y = (int(round(v)) for v in r.to_px(48 + 7, 38))  # on the plate's rim
        assert tuple(img[y, x]) == rgb, colour
        seen.add(rgb)
    assert len(seen) == len(catalog.COLOURS_RGB)


def test_held_object_is_drawn_in_the_gripper_and_leaves_its_spot():
    r = Renderer()
    w = world_of(("mug", "blue", 48, 38))
    home = tuple(int(round(v)) for v in r.to_px(48, 38))
    before = r.render(w)
    assert tuple(before[home[1], home[0]]) == catalog.COLOURS_RGB["blue"]
    w.grasp("blue mug")
    w.gripper_cm = (120.0, 60.0)
    held = r.render(w)
    gx, gy = (int(round(v)) for v in r.to_px(120.0, 60.0))
    assert tuple(held[gy, gx]) == catalog.COLOURS_RGB["blue"]
    assert tuple(held[home[1], home[0]]) != catalog.COLOURS_RGB["blue"]


def test_objects_in_a_receptacle_are_shown_there():
    r = Renderer()
    w = world_of(("can", "red", 48, 38))
    empty = r.render(w)
    w.grasp("red can")
    w.release_into("red can", "trash bin")
    full = r.render(w)
    bx0, by0 = (int(v) for v in r.to_px(55, 78))
    bx1, by1 = (int(v) for v in r.to_px(105, 107))
    region = np.s_[by0:by1, bx0:bx1]
    assert not np.array_equal(empty[region], full[region])
    assert (full[region] == catalog.COLOURS_RGB["red"]).all(axis=2).any()
