"""The table-bussing world: where every object is, and the Gymnasium env around it.

:class:`World` is the plain state (objects, receptacles, gripper) with the few physical
operations the controller performs on it; it owns no randomness and no clock.
:class:`TableBussingEnv` wraps a world, its controller and its camera in the Gymnasium
``reset`` / ``step`` contract, with every random draw taken from the env's one seeded
``np_random`` generator.

Table frame: ``x_cm`` from the left edge (0..160), ``y_cm`` from the robot's side (0..76);
the receptacles stand in a row just past the far edge.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import gymnasium
import numpy as np
from gymnasium import spaces

from sim import catalog
from sim.spec import GRIPPER, TABLE, PredicateType, Scenario, Scene

if TYPE_CHECKING:  # pragma: no cover
    from sim.controller import ControllerConfig

log = logging.getLogger(__name__)

TABLE_W_CM = 160.0
TABLE_D_CM = 76.0
#: Where the gripper waits when idle (above the robot's edge of the table).
GRIPPER_HOME_CM = (80.0, -1.5)
#: Receptacle centres, in :data:`catalog.RECEPTACLES` order.
RECEPTACLE_XY_CM: dict[str, tuple[float, float]] = {
    catalog.BUS_TUB: (27.0, 92.0),
    catalog.TRASH_BIN: (80.0, 92.0),
    catalog.BASKET: (133.0, 92.0),
}
#: The table's object spots: 5 columns x 3 rows, reading order. Scenes put one object per spot.
SLOTS_CM: tuple[tuple[float, float], ...] = tuple((16.0 + 32.0 * c, 13.0 + 25.0 * r) for r in range(3) for c in range(5))


class WorldError(RuntimeError):
    """An operation the world cannot perform in its current state (the message says why)."""


@dataclass
class ObjectState:
    name: str
    kind: str
    colour: str
    home_cm: tuple[float, float]
    location: str = TABLE

    @property
    def category(self) -> catalog.Category:
        return catalog.KINDS[self.kind].category


class World:
    """Objects on a table, three receptacles and a gripper that holds at most one object.

    ``version`` grows by one on every change of an object's location (cameras cache on it).
    """

    def __init__(self, scene: Scene):
        names = [o.name for o in scene.objects]
        if len(set(names)) != len(names):
            raise WorldError(f"object names in a scene must be unique, got {names}")
        unknown = [r for r in scene.receptacles if r not in RECEPTACLE_XY_CM]
        if unknown:
            raise WorldError(f"unknown receptacles {unknown}; known: {list(RECEPTACLE_XY_CM)}")
        self.objects: dict[str, ObjectState] = {
            o.name: ObjectState(o.name, o.kind, o.colour, (o.x_cm, o.y_cm)) for o in scene.objects
        }
        self.receptacles: list[str] = list(scene.receptacles)
        self.holding: Optional[str] = None
        self.gripper_cm: tuple[float, float] = GRIPPER_HOME_CM
        self.version = 0

    # -- queries -----------------------------------------------------------------------
    def location(self, name: str) -> str:
        return self._get(name).location

    def locations(self) -> dict[str, str]:
        return {n: o.location for n, o in self.objects.items()}

    def on_table(self) -> list[str]:
        return [n for n, o in self.objects.items() if o.location == TABLE]

    def contents(self, receptacle: str) -> list[str]:
        return [n for n, o in self.objects.items() if o.location == receptacle]

    def position_cm(self, name: str) -> tuple[float, float]:
        """Where an object is: its spot on the table, its receptacle, or the gripper."""
        obj = self._get(name)
        if obj.location == TABLE:
            return obj.home_cm
        if obj.location == GRIPPER:
            return self.gripper_cm
        return RECEPTACLE_XY_CM[obj.location]

    def _get(self, name: str) -> ObjectState:
        try:
            return self.objects[name]
        except KeyError:
            raise WorldError(f"there is no {name!r} in this scene") from None

    # -- physical operations (the controller calls these) ------------------------------
    def grasp(self, name: str) -> None:
        obj = self._get(name)
        if self.holding is not None:
            raise WorldError(f"the gripper already holds the {self.holding}")
        if obj.location != TABLE:
            raise WorldError(f"the {name} is not on the table (it is in the {obj.location})")
        obj.location = GRIPPER
        self.holding = name
        self.version += 1

    def release_into(self, name: str, receptacle: str) -> None:
        if receptacle not in self.receptacles:
            raise WorldError(f"there is no {receptacle!r} here")
        self._release(name, receptacle)

    def place_back(self, name: str) -> None:
        self._release(name, TABLE)

    def _release(self, name: str, location: str) -> None:
        if self.holding != name:
            raise WorldError(f"the gripper does not hold the {name}")
        self.objects[name].location = location
        self.holding = None
        self.version += 1


def world_progress(scenario: Scenario, world: World) -> float:
    """Share of the scenario's ``at`` predicates the world meets now (1.0 when it has none)."""
    preds = [p for p in scenario.predicates if p.type is PredicateType.AT]
    if not preds:
        return 1.0
    return sum(world.location(p.object) == p.location for p in preds) / len(preds)


_ACTION_CHARSET = string.ascii_letters + string.digits + " '-,.!?"


class TableBussingEnv(gymnasium.Env):
    """Gymnasium env: clear a table by sending one atomic command per step.

    - **Action space**: ``spaces.Text(max_length=200)``, one command in the controller's
      grammar (:data:`robix_planner.skills.TABLETOP_SKILLS`), e.g. ``"put the red cup into the
      bus tub"``. A command the grammar or the world's state rejects changes nothing.
    - **Observation space**: ``Dict({"head": Box(0, 255, (height_px, width_px, 3), uint8)})``,
      the head camera's top view (RGB).
    - **Step**: the command runs to completion in simulated time (approach, grasp, carry,
      release); ``info`` holds its final ``status`` (a ``CommandState`` value), ``detail``,
      ``holding``, ``progress`` and ``sim_time_s``.
    - **Reward**: the change in task progress, the share of the scenario's ``at`` predicates
      met ("the red cup is in the bus tub"); the episode's rewards sum to its final progress.
    - **Episode end**: ``terminated`` when every ``at`` predicate is met; ``truncated`` after
      ``max_steps`` steps.
    - **Reset**: ``options={"scenario": s}`` with a :class:`~sim.spec.Scenario` or a scenario id
      (see :func:`sim.scenarios.load_scenarios`); without one, a random clear-the-table scene is
      drawn from ``np_random``. Forced failures of the scenario are injected; random slips
      follow ``controller_config.failure_prob`` and draw from ``np_random`` as well.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        render_mode: Optional[str] = None,
        width_px: int = 160,
        height_px: int = 120,
        max_steps: int = 64,
        controller_config: Optional["ControllerConfig"] = None,
    ):
        from sim.controller import ControllerConfig
        from sim.render import Renderer

        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}; supported: {self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.max_steps = max_steps
        self.controller_config = controller_config or ControllerConfig()
        self.renderer = Renderer(width_px, height_px)
        self.observation_space = spaces.Dict(
            {"head": spaces.Box(0, 255, shape=(height_px, width_px, 3), dtype=np.uint8)}
        )
        self.action_space = spaces.Text(max_length=200, min_length=1, charset=_ACTION_CHARSET)
        self.scenario: Optional[Scenario] = None
        self.world: Optional[World] = None
        self.controller = None
        self._steps = 0
        self._progress = 0.0

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        from sim.controller import SimController
        from sim.scenarios import get_scenario, random_clear_table

        super().reset(seed=seed)
        chosen = (options or {}).get("scenario")
        if chosen is None:
            scenario = random_clear_table(self.np_random)
        elif isinstance(chosen, Scenario):
            scenario = chosen
        else:
            scenario = get_scenario(str(chosen))
        self.scenario = scenario
        self.world = World(scenario.scene)
        self.controller = SimController(self.world, self.controller_config, rng=self.np_random)
        for f in scenario.failures:
            self.controller.inject_failure(f.object, f.times)
        self._steps = 0
        self._progress = world_progress(scenario, self.world)
        return self._obs(), {"progress": self._progress, "scenario": scenario.id}

    def step(self, action: str):
        if self.world is None:
            raise RuntimeError("call reset() before step()")
        ctl = self.controller
        statuses = ctl.submit(action)
        # Run the command to completion in simulated time, phase by phase.
        while ctl.busy:
            statuses += ctl.step(ctl.time_to_next_event_s())
        final = statuses[-1]
        self._steps += 1
        progress = world_progress(self.scenario, self.world)
        reward = progress - self._progress
        self._progress = progress
        terminated = progress >= 1.0
        truncated = not terminated and self._steps >= self.max_steps
        info = {
            "status": final.state.value,
            "detail": final.detail,
            "holding": final.holding,
            "progress": progress,
            "sim_time_s": ctl.time_s,
        }
        return self._obs(), float(reward), terminated, truncated, info

    def render(self):
        if self.world is None:
            return None
        return self.renderer.render(self.world)

    def _obs(self) -> dict[str, np.ndarray]:
        # render() returns a fresh array each call, so observations never share memory.
        return {"head": self.renderer.render(self.world)}


ENV_ID = "RobixTableBussing-v0"


def register_env() -> str:
    """Register :class:`TableBussingEnv` with Gymnasium as ``RobixTableBussing-v0`` (idempotent); returns the id."""
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="sim.world:TableBussingEnv")
    return ENV_ID
