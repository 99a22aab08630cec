"""The simulated low-level controller: the skill grammar, executed in timed phases.

:class:`SimController` understands exactly the grammar it advertises
(:data:`robix_planner.skills.TABLETOP_SKILLS` over the scene's object and receptacle names);
every command text goes through :func:`robix_planner.skills.parse`, so a word the grammar
does not know is rejected here just as the planner's validator would reject it.

A command runs as phases in simulated time::

    put the X into the Y     approach -> grasp -> carry -> release   (carry -> release if X is held)
    pick up the X            approach -> grasp
    place the X back on ...  carry -> release
    stop                     at once: the running command ends PREEMPTED

The object is in the gripper from the end of ``grasp`` until the end of ``release``; a stop
before the grasp completes leaves it on the table, a stop after leaves it held. A grasp
slips (FAILED, object stays on the table) with probability ``failure_prob`` or when a
failure was injected with :meth:`SimController.inject_failure`.

There is no hidden loop and no clock: :meth:`~SimController.submit` and
:meth:`~SimController.step` return the :class:`~robix_planner.messages.CommandStatus`
messages they produce, so a bus node can drive it from a timer and a subscription.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from robix_planner import skills
from robix_planner.messages import Capabilities, Command, CommandState, CommandStatus
from sim.spec import TABLE
from sim.world import RECEPTACLE_XY_CM, World

log = logging.getLogger(__name__)

_EPS_S = 1e-9


class Phase(str, enum.Enum):
    IDLE = "idle"
    APPROACH = "approach"
    GRASP = "grasp"
    CARRY = "carry"
    RELEASE = "release"


@dataclass
class ControllerConfig:
    """Phase durations (simulated seconds) and the chance that a grasp slips."""

    robot: str = "sim_tabletop"
    approach_s: float = 1.0
    grasp_s: float = 0.5
    carry_s: float = 1.5
    release_s: float = 0.5
    failure_prob: float = 0.0

    def __post_init__(self):
        for name in ("approach_s", "grasp_s", "carry_s", "release_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ControllerConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.failure_prob <= 1.0:
            raise ValueError(f"ControllerConfig.failure_prob must be in [0, 1], got {self.failure_prob}")

    def duration_s(self, phase: Phase) -> float:
        return getattr(self, f"{phase.value}_s")


@dataclass
class _Running:
    command: Command
    skill: str
    obj: str
    receptacle: Optional[str]
    phases: list[Phase]
    phase_left_s: float = 0.0
    start_cm: tuple[float, float] = (0.0, 0.0)


class SimController:
    """Executes one command at a time on a :class:`~sim.world.World`.

    ``rng`` is the episode's one generator; it is drawn from only when ``failure_prob > 0``.
    """

    def __init__(self, world: World, config: Optional[ControllerConfig] = None, rng: Optional[np.random.Generator] = None):
        self.world = world
        self.config = config or ControllerConfig()
        if self.config.failure_prob > 0 and rng is None:
            raise ValueError("ControllerConfig.failure_prob > 0 needs rng=np.random.default_rng(seed)")
        self.rng = rng
        self.time_s = 0.0
        self._running: Optional[_Running] = None
        self._injected: dict[Optional[str], int] = {}
        self._auto_id = 0
        self._caps = Capabilities(
            robot=self.config.robot,
            skills=list(skills.TABLETOP_SKILLS),
            objects=list(world.objects),
            receptacles=list(world.receptacles),
            stamp_ns=0,
        )

    # -- state the scripted user and the renderer read ---------------------------------
    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def phase(self) -> Phase:
        return self._running.phases[0] if self._running else Phase.IDLE

    @property
    def target(self) -> Optional[str]:
        """The object the running command acts on (None when idle)."""
        return self._running.obj if self._running else None

    @property
    def current(self) -> Optional[Command]:
        return self._running.command if self._running else None

    @property
    def holding(self) -> Optional[str]:
        return self.world.holding

    def capabilities(self) -> Capabilities:
        """The grammar and vocabulary this controller understands (every object of the scene)."""
        return self._caps

    def time_to_next_event_s(self) -> Optional[float]:
        """Simulated seconds until the current phase ends; None when idle."""
        return self._running.phase_left_s if self._running else None

    def inject_failure(self, object_name: Optional[str] = None, times: int = 1) -> None:
        """Make the next ``times`` grasps of ``object_name`` (None: of any object) slip."""
        if object_name is not None and object_name not in self.world.objects:
            raise ValueError(f"cannot inject a failure on {object_name!r}: not in the scene")
        self._injected[object_name] = self._injected.get(object_name, 0) + times

    # -- commands ---------------------------------------------------------------------
    def submit(self, command: Union[Command, str], command_id: Optional[str] = None) -> list[CommandStatus]:
        """Accept or reject a command; returns the statuses it produced at once."""
        if isinstance(command, Command):
            text, cid = command.text, command.id
        else:
            text = command
            if command_id is None:
                self._auto_id += 1
                command_id = f"sim-{self._auto_id}"
            cid = command_id
        try:
            parsed = skills.parse(text, self._caps)
        except skills.GrammarError as e:
            return [self._status(cid, CommandState.REJECTED, str(e))]
        if parsed.skill == skills.STOP.name:
            return self._stop(cid)
        if self._running is not None:
            run = self._running
            detail = (
                f"busy: command {run.command.id} ({run.command.text!r}) is still running "
                f"(phase {self.phase.value}); send 'stop' first or wait for it to end"
            )
            return [self._status(cid, CommandState.REJECTED, detail)]
        obj = parsed.args["object"]
        receptacle = parsed.args.get("receptacle")
        problem, phases = self._plan(parsed.skill, obj)
        if problem:
            return [self._status(cid, CommandState.REJECTED, problem)]
        cmd = command if isinstance(command, Command) else Command(
            id=cid, text=parsed.text, skill=parsed.skill, args=dict(parsed.args), stamp_ns=self._stamp_ns()
        )
        self._running = _Running(cmd, parsed.skill, obj, receptacle, phases)
        out = [self._status(cid, CommandState.ACCEPTED, parsed.text)]
        out.append(self._begin_phase())
        log.debug("t=%.2f accepted %s %r", self.time_s, cid, parsed.text)
        return out

    def _plan(self, skill: str, obj: str) -> tuple[str, list[Phase]]:
        where = self.world.location(obj)
        held = self.world.holding
        if skill == skills.PUT_INTO.name:
            if held == obj:
                return "", [Phase.CARRY, Phase.RELEASE]
            if where != TABLE:
                return f"the {obj} is not on the table (it is in the {where})", []
            if held is not None:
                return f"the gripper already holds the {held}; put it somewhere first", []
            return "", [Phase.APPROACH, Phase.GRASP, Phase.CARRY, Phase.RELEASE]
        if skill == skills.PICK_UP.name:
            if held == obj:
                return f"the gripper already holds the {obj}", []
            if held is not None:
                return f"pick up needs an empty gripper; it holds the {held}", []
            if where != TABLE:
                return f"the {obj} is not on the table (it is in the {where})", []
            return "", [Phase.APPROACH, Phase.GRASP]
        if skill == skills.PLACE_BACK.name:
            if held != obj:
                holds = f"it holds the {held}" if held else "it is empty"
                return f"the gripper does not hold the {obj} ({holds})", []
            return "", [Phase.CARRY, Phase.RELEASE]
        return f"skill {skill!r} is not supported by this controller", []

    def _stop(self, cid: str) -> list[CommandStatus]:
        out = []
        run = self._running
        if run is not None:
            phase = self.phase
            self._running = None
            held = f"; holding the {self.world.holding}" if self.world.holding else ""
            out.append(self._status(run.command.id, CommandState.PREEMPTED, f"stopped during {phase.value}{held}"))
            out.append(self._status(cid, CommandState.SUCCEEDED, f"stopped {run.command.id}"))
        else:
            out.append(self._status(cid, CommandState.SUCCEEDED, "nothing was running"))
        return out

    # -- time -------------------------------------------------------------------------
    def step(self, dt_s: float) -> list[CommandStatus]:
        """Advance simulated time by ``dt_s``; returns the statuses emitted on the way."""
        if dt_s < 0:
            raise ValueError(f"dt_s must be >= 0, got {dt_s}")
        out: list[CommandStatus] = []
        left = dt_s
        while self._running is not None and left > _EPS_S:
            run = self._running
            if left + _EPS_S >= run.phase_left_s:
                self.time_s += run.phase_left_s
                left -= run.phase_left_s
                run.phase_left_s = 0.0
                self._move_gripper(1.0)
                out += self._end_phase()
            else:
                run.phase_left_s -= left
                self.time_s += left
                left = 0.0
                done = 1.0 - run.phase_left_s / self.config.duration_s(run.phases[0])
                self._move_gripper(done)
        if left > 0:
            self.time_s += left
        return out

    def _phase_goal_cm(self, run: _Running, phase: Phase) -> tuple[float, float]:
        if phase in (Phase.APPROACH, Phase.GRASP):
            return self.world.objects[run.obj].home_cm
        if run.skill == skills.PLACE_BACK.name:
            return self.world.objects[run.obj].home_cm
        return RECEPTACLE_XY_CM[run.receptacle]

    def _move_gripper(self, fraction: float) -> None:
        run = self._running
        if run is None:
            return
        x0, y0 = run.start_cm
        x1, y1 = self._phase_goal_cm(run, run.phases[0])
        self.world.gripper_cm = (x0 + (x1 - x0) * fraction, y0 + (y1 - y0) * fraction)

    def _begin_phase(self) -> CommandStatus:
        run = self._running
        phase = run.phases[0]
        run.phase_left_s = self.config.duration_s(phase)
        run.start_cm = self.world.gripper_cm
        return self._status(run.command.id, CommandState.RUNNING, phase.value)

    def _end_phase(self) -> list[CommandStatus]:
        run = self._running
        phase = run.phases.pop(0)
        world = self.world
        if phase is Phase.GRASP:
            if self._slips(run.obj):
                self._running = None
                return [self._status(run.command.id, CommandState.FAILED, f"the {run.obj} slipped from the gripper; it is still on the table")]
            world.grasp(run.obj)
        elif phase is Phase.RELEASE:
            if run.skill == skills.PLACE_BACK.name:
                world.place_back(run.obj)
            else:
                world.release_into(run.obj, run.receptacle)
        if run.phases:
            return [self._begin_phase()]
        self._running = None
        return [self._status(run.command.id, CommandState.SUCCEEDED, run.command.text)]

    def _slips(self, obj: str) -> bool:
        for key in (obj, None):
            if self._injected.get(key, 0) > 0:
                self._injected[key] -= 1
                return True
        return self.config.failure_prob > 0 and self.rng.random() < self.config.failure_prob

    def _stamp_ns(self) -> int:
        return int(round(self.time_s * 1e9))

    def _status(self, cid: str, state: CommandState, detail: str) -> CommandStatus:
        return CommandStatus(command_id=cid, state=state, detail=detail, holding=self.world.holding, stamp_ns=self._stamp_ns())
