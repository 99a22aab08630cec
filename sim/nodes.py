"""The simulated world on the bus: to a planner it looks like a robot.

A planner sees only what it would see of a real robot: camera frames, the user's
utterances, the controller's capabilities and command statuses, and a
:class:`~robix_planner.messages.SessionStart` when an evaluation episode begins. The
world state never goes on the bus.

==============  =======================================================  ====================================
node            subscribes                                               publishes
==============  =======================================================  ====================================
WorldNode       /controller/command                                      /controller/status,
                                                                         /controller/capabilities (latched),
                                                                         /camera/head (rgb8)
UserNode        /controller/command, /controller/status, /tts/speech     /user/utterance
OracleNode      /robix/session, /user/utterance, /controller/status,     /controller/command, /tts/speech,
                /controller/capabilities                                 /planner/step
SimulationNode  /user/utterance, /controller/command, /controller/status, /robix/session
                /tts/speech, /planner/step  (the episode log)
==============  =======================================================  ====================================

**Time.** Simulated seconds run at ``time_scale`` times wall-clock speed (1.0 live, 20-50
for evaluation) on a :class:`SimClock`, shared by the nodes of one process. The world
catches up with the clock on a ``tick_hz`` timer, at every phase end (a one-shot timer)
and before it handles a command, so phases end on time whatever the tick rate. Camera
frames go out at ``camera_rate_hz`` wall-clock frames per second, and only while someone
subscribes.

**One process.** :class:`SimulationNode` (``robix run sim.nodes:SimulationNode``) puts a
world, a user and (``params.oracle``) the oracle on one shared bus: they still talk only
through ZeroMQ sockets. It announces each episode with ``SessionStart`` on
``/robix/session``, starts the clock ``session_gap_s`` later (so the planner has reset
before the user speaks), detects the end of the episode and scores it from the messages
it observed on the bus alone (:func:`sim.scoring.score_episode`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import msgspec

from robix_planner import skills, topics
from robix_planner.bus import read_graph
from robix_planner.config import Config, ConfigError
from robix_planner.controller import CAPABILITIES_TOPIC, COMMAND_TOPIC, STATUS_TOPIC, CommandClient, CommandServer
from robix_planner.messages import (
    Capabilities,
    Command,
    CommandState,
    CommandStatus,
    Image,
    PlannerStep,
    SessionStart,
    Speech,
    Utterance,
    now_ns,
)
from robix_planner.node import Node, Timer, new_id
from sim.spec import Scenario

if TYPE_CHECKING:  # pragma: no cover
    from sim.scoring import Event, Score

log = logging.getLogger(__name__)

CAMERA = "head"
CAMERA_TOPIC = topics.camera(CAMERA)
#: SimulationNode.Params.exit_code values (see there).
EXIT_CODES = ("success", "finished")

#: Wall seconds added to one-shot wake-ups so that the clock has surely reached the due time.
_WAKE_SLACK_S = 1e-4


class SimClock:
    """Simulated seconds, running at ``time_scale`` x wall-clock speed while started. Thread-safe.

    Starts paused at 0. :meth:`reset` pauses it and sets the time; :meth:`start` lets it run.
    """

    def __init__(self, time_scale: float = 1.0):
        if not time_scale > 0:
            raise ConfigError(f"time_scale must be > 0 (simulated seconds per wall second), got {time_scale}")
        self.time_scale = float(time_scale)
        self._lock = threading.Lock()
        self._base_s = 0.0
        self._wall0: Optional[float] = None

    @property
    def running(self) -> bool:
        return self._wall0 is not None

    def now_s(self) -> float:
        with self._lock:
            if self._wall0 is None:
                return self._base_s
            return self._base_s + (time.monotonic() - self._wall0) * self.time_scale

    def start(self) -> None:
        with self._lock:
            if self._wall0 is None:
                self._wall0 = time.monotonic()

    def pause(self) -> None:
        with self._lock:
            if self._wall0 is not None:
                self._base_s += (time.monotonic() - self._wall0) * self.time_scale
                self._wall0 = None

    def reset(self, t_s: float = 0.0) -> None:
        with self._lock:
            self._base_s, self._wall0 = float(t_s), None

    def wall_delay_s(self, until_s: float) -> float:
        """Wall seconds until the clock reads ``until_s`` (0 if it already does)."""
        return max(0.0, (until_s - self.now_s()) / self.time_scale)


def _load_stored(scenario_id: str) -> Scenario:
    from sim.scenarios import get_scenario

    try:
        return get_scenario(scenario_id)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None


# --------------------------------------------------------------------------- world


class WorldNode(Node):
    """The table, the simulated controller and the head camera, behind the controller protocol.

    A :class:`~robix_planner.controller.CommandServer` in event style receives commands
    (rejecting words outside the advertised grammar and vocabulary) and reports the
    :class:`~sim.controller.SimController`'s statuses; RUNNING statuses carry the phase
    (``approach``, ``grasp``, ``carry``, ``release``) and every status what the gripper holds.
    :meth:`load_scenario` replaces the world and the controller and announces the new
    vocabulary. ``params.scenario`` loads a stored scenario at construction (then the node's
    own clock starts with the node): ``robix run sim.nodes:WorldNode params.scenario=chat-test-000``.
    """

    default_name = "world"

    class Params(Config):
        #: A stored scenario id to load at construction ("" = none until load_scenario()).
        scenario: str = ""
        #: Simulated seconds per wall second (ignored when a shared clock is given).
        time_scale: float = 1.0
        #: How often (wall Hz) the world catches up with the clock besides phase ends (gripper motion).
        tick_hz: float = 50.0
        #: Head camera frames per wall second (0: no camera).
        camera_rate_hz: float = 10.0
        width: int = 160
        height: int = 120
        robot: str = "sim_tabletop"
        #: Phase durations (simulated seconds) and the chance that a grasp slips.
        approach_s: float = 1.0
        grasp_s: float = 0.5
        carry_s: float = 1.5
        release_s: float = 0.5
        failure_prob: float = 0.0

    def __init__(self, params: Optional[Params] = None, *, clock: Optional[SimClock] = None, **kw):
        super().__init__(params=params, **kw)
        from sim.controller import ControllerConfig
        from sim.render import Renderer

        p = self.params
        if not p.tick_hz > 0 or p.camera_rate_hz < 0:
            raise ConfigError(f"world params need tick_hz > 0 and camera_rate_hz >= 0, got {p}")
        try:
            self.controller_config = ControllerConfig(
                robot=p.robot, approach_s=p.approach_s, grasp_s=p.grasp_s, carry_s=p.carry_s,
                release_s=p.release_s, failure_prob=p.failure_prob)
            self.renderer = Renderer(p.width, p.height)
        except ValueError as exc:
            raise ConfigError(f"world params: {exc}") from None
        self._own_clock = clock is None
        self.clock = clock if clock is not None else SimClock(p.time_scale)
        #: Held while the world changes; the oracle holds it while it reads the world.
        self.lock = threading.RLock()
        self.scenario: Optional[Scenario] = None
        self.world = None
        self.controller = None
        self._wake: Optional[Timer] = None
        self._wake_at_s: Optional[float] = None
        empty = Capabilities(robot=p.robot, skills=list(skills.TABLETOP_SKILLS), objects=[], receptacles=[])
        self.server = CommandServer(self, empty, on_command=self._on_command)
        self.camera_pub = self.create_publisher(CAMERA_TOPIC, Image)
        self.create_timer(1.0 / p.tick_hz, self.advance)
        if p.camera_rate_hz > 0:
            self.create_timer(1.0 / p.camera_rate_hz, self._publish_frame)
        if p.scenario:
            self.load_scenario(_load_stored(p.scenario))

    def on_start(self) -> None:
        if self._own_clock and self.scenario is not None:
            self.clock.start()
            self._schedule_wake()
        # Inside a SimulationNode (a shared clock), the simulation node tells the story.
        self.log.log(logging.INFO if self._own_clock else logging.DEBUG,
                     "simulated world up: scenario %s, time scale %g, camera %dx%d at %g Hz",
                     self.scenario.id if self.scenario else "(none yet)", self.clock.time_scale,
                     self.params.width, self.params.height, self.params.camera_rate_hz)

    # -- scenario ------------------------------------------------------------------------
    def load_scenario(self, scenario: Scenario) -> None:
        """Reset the world and the controller to ``scenario``'s start and announce its vocabulary.

        With its own clock the world restarts at t = 0; a shared clock is its owner's to reset.
        """
        import numpy as np

        from sim.controller import SimController
        from sim.world import World

        with self.lock:
            if self._own_clock:
                running = self.clock.running
                self.clock.reset(0.0)
                if running:
                    self.clock.start()
            world = World(scenario.scene)
            controller = SimController(world, self.controller_config, rng=np.random.default_rng(scenario.seed))
            for f in scenario.failures:
                controller.inject_failure(f.object, f.times)
            controller.time_s = self.clock.now_s()
            self.scenario, self.world, self.controller = scenario, world, controller
            self.server.holding = None
            caps = msgspec.structs.replace(controller.capabilities(), stamp_ns=now_ns())
            self.server.set_capabilities(caps)
        self._schedule_wake()
        self.log.debug("loaded scenario %s (%d objects)", scenario.id, len(scenario.scene.objects))

    @property
    def busy(self) -> bool:
        """A command is running."""
        with self.lock:
            return self.controller is not None and self.controller.busy

    def locations(self) -> dict[str, str]:
        with self.lock:
            return self.world.locations() if self.world is not None else {}

    def privileged(self):
        """The true world, controller and script (for the oracle only: never on the bus)."""
        from sim.oracle import Privileged

        with self.lock:
            if self.scenario is None:
                raise RuntimeError("no scenario is loaded in the simulated world")
            return Privileged(world=self.world, controller=self.controller, scenario=self.scenario)

    # -- commands and time ---------------------------------------------------------------
    def _on_command(self, cmd: Command) -> None:
        with self.lock:
            if self.controller is None:
                out = [CommandStatus(command_id=cmd.id, state=CommandState.REJECTED,
                                     detail="no scenario is loaded in the simulated world")]
            else:
                out = self._catch_up()
                # The server already sent ACCEPTED for this command.
                out += [s for s in self.controller.submit(cmd)
                        if not (s.command_id == cmd.id and s.state is CommandState.ACCEPTED)]
            self._report(out)
        self._schedule_wake()

    def advance(self) -> None:
        """Bring the world up to the clock's time, reporting the statuses on the way."""
        with self.lock:
            if self.controller is None or not self.clock.running:
                return
            self._report(self._catch_up())
        self._schedule_wake()

    def _catch_up(self) -> list[CommandStatus]:
        dt = self.clock.now_s() - self.controller.time_s
        return self.controller.step(dt) if dt > 0 else []

    def _report(self, statuses: list[CommandStatus]) -> None:
        for st in statuses:
            self.server.report(st.command_id, st.state, st.detail, holding=st.holding)

    def _schedule_wake(self) -> None:
        """A one-shot wake-up at the end of the running phase, so it ends on time."""
        with self.lock:
            ctl = self.controller
            left = ctl.time_to_next_event_s() if ctl is not None else None
            at_s = None if left is None or not self.clock.running else ctl.time_s + left
            if at_s == self._wake_at_s and (at_s is None or self._wake is not None):
                return
            if self._wake is not None:
                self._wake.cancel()
                self._wake = None
            self._wake_at_s = at_s
            if at_s is not None:
                self._wake = self.create_timer(self.clock.wall_delay_s(at_s) + _WAKE_SLACK_S, self._on_wake,
                                               oneshot=True)

    def _on_wake(self) -> None:
        with self.lock:
            self._wake, self._wake_at_s = None, None
        self.advance()

    def _publish_frame(self) -> None:
        if self.camera_pub.subscriber_count == 0:
            return  # nobody looks: do not render
        self.advance()
        with self.lock:
            if self.world is None:
                return
            pixels = self.renderer.render(self.world)
        self.camera_pub.publish(Image.from_array(CAMERA, pixels))


# --------------------------------------------------------------------------- user


class UserNode(Node):
    """The scripted user, driven only by what it hears and sees on the bus.

    From ``/controller/command`` it learns each command's skill and object, from
    ``/controller/status`` the phase (the RUNNING detail), the object acted on and what
    the gripper holds, from ``/tts/speech`` what the robot says; it says the script's
    turns on ``/user/utterance`` when their triggers fire. Its clock is the world's when
    both run in one process (``clock=``); alone (``params.scenario``) it has its own and
    starts the script once someone listens on ``/user/utterance``.
    """

    default_name = "user"

    class Params(Config):
        #: Alone: a stored scenario id whose script to play ("" = none until load()).
        scenario: str = ""
        #: Simulated seconds per wall second (ignored when a shared clock is given).
        time_scale: float = 1.0
        speaker: str = "user"

    def __init__(self, params: Optional[Params] = None, *, clock: Optional[SimClock] = None, **kw):
        super().__init__(params=params, **kw)
        self._own_clock = clock is None
        self.clock = clock if clock is not None else SimClock(self.params.time_scale)
        self._lock = threading.RLock()
        self.scenario: Optional[Scenario] = None
        self.user = None
        self._started = False
        self._commands: collections.OrderedDict[str, tuple[str, Optional[str]]] = collections.OrderedDict()
        #: Statuses that came before their command (another socket): replayed when it comes.
        self._early: collections.OrderedDict[str, list[tuple[CommandStatus, float]]] = collections.OrderedDict()
        self._timer: Optional[Timer] = None
        self._timer_at_s: Optional[float] = None
        self.pub = self.create_publisher(topics.UTTERANCE, Utterance)
        self.create_subscription(COMMAND_TOPIC, Command, self._on_command)
        self.create_subscription(STATUS_TOPIC, CommandStatus, self._on_status)
        self.create_subscription(topics.SPEECH, Speech, self._on_speech)
        if self.params.scenario:
            self.load(_load_stored(self.params.scenario))
            self._waiting = self.create_timer(0.05, self._start_when_heard)

    def _start_when_heard(self) -> None:
        if not self._started and self.pub.subscriber_count > 0:
            self._waiting.cancel()
            self.clock.start()
            self.start_script()

    # -- episode -------------------------------------------------------------------------
    def load(self, scenario: Scenario) -> None:
        """Take ``scenario``'s script; nothing is said before :meth:`start_script`."""
        from sim.user import ScriptedUser

        with self._lock:
            self.scenario = scenario
            self.user = ScriptedUser(scenario.turns, speaker=self.params.speaker)
            self._started = False
            self._commands.clear()
            self._early.clear()
            self._cancel_timer()

    def start_script(self) -> None:
        """The script starts now (its start turns are said at once)."""
        with self._lock:
            if self.user is None:
                raise RuntimeError("UserNode.start_script() before load()")
            self._started = True
            self.user.start(self.clock.now_s())
            self._poll_locked()

    def due_s(self) -> Optional[float]:
        """When the next utterance is due (simulated seconds), None if none is scheduled."""
        with self._lock:
            return self.user.next_due_s() if self._started else None

    @property
    def finished(self) -> bool:
        with self._lock:
            return self.user is not None and self.user.finished

    # -- inputs --------------------------------------------------------------------------
    def _on_command(self, cmd: Command) -> None:
        with self._lock:
            self._commands[cmd.id] = (cmd.skill, cmd.args.get("object"))
            while len(self._commands) > 4096:
                self._commands.popitem(last=False)
            early = self._early.pop(cmd.id, [])
            if self._started and early:
                for st, t_s in early:
                    self.user.on_status(st, cmd.skill, t_s, obj=cmd.args.get("object"))
                self._poll_locked()

    def _on_status(self, st: CommandStatus) -> None:
        with self._lock:
            if not self._started:
                return
            now = self.clock.now_s()
            if st.command_id not in self._commands:
                # Commands and statuses travel on different sockets: hold it until its command comes.
                self._early.setdefault(st.command_id, []).append((st, now))
                while len(self._early) > 64:
                    self._early.popitem(last=False)
                return
            skill, obj = self._commands[st.command_id]
            self.user.on_status(st, skill, now, obj=obj)
            self._poll_locked()

    def _on_speech(self, speech: Speech) -> None:
        with self._lock:
            if not self._started:
                return
            self.user.on_reply(speech.text, self.clock.now_s())
            self._poll_locked()

    # -- output --------------------------------------------------------------------------
    def _on_timer(self) -> None:
        with self._lock:
            self._timer, self._timer_at_s = None, None
            if self._started:
                self._poll_locked()

    def _poll_locked(self) -> None:
        for utt in self.user.poll(self.clock.now_s()):
            self.pub.publish(utt)  # under the lock: utterances go out in script order
        due = self.user.next_due_s()
        if due is None or not self.clock.running:
            self._cancel_timer()
        elif due != self._timer_at_s:
            self._cancel_timer()
            self._timer_at_s = due
            self._timer = self.create_timer(self.clock.wall_delay_s(due) + _WAKE_SLACK_S, self._on_timer, oneshot=True)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at_s = None, None


# --------------------------------------------------------------------------- oracle


class _InFlightController:
    """The controller as the oracle must assume it: a motion command it sent counts as
    running until its final status comes back (over the bus a command takes a moment to
    arrive, and the oracle must not send a second one meanwhile)."""

    def __init__(self, controller, pending: dict[str, Command]):
        self._controller = controller
        self._pending = pending

    def _motion(self) -> Optional[Command]:
        return next((c for c in self._pending.values() if c.skill != "stop"), None)

    @property
    def busy(self) -> bool:
        return self._controller.busy or self._motion() is not None

    @property
    def target(self) -> Optional[str]:
        if self._controller.target is not None:
            return self._controller.target
        cmd = self._motion()
        return cmd.args.get("object") if cmd is not None else None

    @property
    def current(self) -> Optional[Command]:
        return self._controller.current or self._motion()

    def capabilities(self) -> Capabilities:
        return self._controller.capabilities()


class OracleNode(Node):
    """The oracle planner (:class:`sim.oracle.OraclePlanner`) behind the bus.

    It acts like any planner on the bus: it learns of sessions (``/robix/session``), the
    user's words (``/user/utterance``), the grammar (``/controller/capabilities``) and its
    commands' statuses (``/controller/status``); it sends commands through a
    :class:`~robix_planner.controller.CommandClient`, says its replies on ``/tts/speech`` and
    publishes every decision as a :class:`~robix_planner.messages.PlannerStep` on
    ``/planner/step``. It decides at session start (with the user's opening words, waiting up
    to ``start_wait_s`` for them, as the in-process runner's first decision sees them), on
    every utterance (at once: an utterance while a command runs is an interrupt), and when
    its commands have all ended (a stopped command and its ``stop`` count as one event).

    **Privileged**: it reads the true world state (object locations, what the gripper
    holds, the running command) and the scenario script through a Python reference to the
    :class:`WorldNode` of the same process (``world=``), under the world's lock. That
    privilege is what makes it an oracle; it is never a way for a real planner to see the
    world.
    """

    default_name = "planner"

    class Params(Config):
        #: Wall seconds the start decision waits for the user's opening words.
        start_wait_s: float = 0.5
        #: A command with no status within this many wall seconds counts as failed.
        ack_timeout_s: float = 10.0

    def __init__(self, params: Optional[Params] = None, *, world: Optional[WorldNode] = None,
                 clock: Optional[SimClock] = None, **kw):
        if world is None:
            raise ConfigError("OracleNode reads the simulated world's state, so it runs in the world's process: "
                              "run sim.nodes:SimulationNode with params.oracle=true, or pass world=WorldNode(...)")
        super().__init__(params=params, **kw)
        self.world_node = world
        self.clock = clock if clock is not None else world.clock
        self.session: Optional[str] = None
        self.planner = None
        self.caps: Optional[Capabilities] = None
        self.steps = 0
        self._pending: dict[str, Command] = {}
        self._cmd_text: dict[str, str] = {}
        self._cmd_skill: dict[str, str] = {}
        self._utts: list[str] = []
        self._statuses: list[CommandStatus] = []
        self._awaiting_start = False
        self._start_timer: Optional[Timer] = None
        self.client = CommandClient(self, self._on_status, ack_timeout_s=self.params.ack_timeout_s)
        self.speech_pub = self.create_publisher(topics.SPEECH, Speech)
        self.step_pub = self.create_publisher(topics.PLANNER_STEP, PlannerStep)
        self.create_subscription(topics.SESSION, SessionStart, self._on_session)
        self.create_subscription(topics.UTTERANCE, Utterance, self._on_utterance)
        self.create_subscription(CAPABILITIES_TOPIC, Capabilities, self._on_capabilities)

    # -- inputs --------------------------------------------------------------------------
    def _on_capabilities(self, caps: Capabilities) -> None:
        self.caps = caps

    def _on_session(self, msg: SessionStart) -> None:
        from sim.oracle import OraclePlanner, Privileged

        priv = self.world_node.privileged()
        if priv.scenario.id != msg.session:
            self.log.warning("session %r started but the world holds scenario %r", msg.session, priv.scenario.id)
        self.session = msg.session
        self._pending = {}
        self._cmd_text, self._cmd_skill = {}, {}
        self._utts, self._statuses = [], []
        view = _InFlightController(priv.controller, self._pending)
        self.planner = OraclePlanner(Privileged(world=priv.world, controller=view, scenario=priv.scenario))
        self._awaiting_start = True
        if self._start_timer is not None:
            self._start_timer.cancel()
        self._start_timer = self.create_timer(self.params.start_wait_s, self._start_timeout, oneshot=True)

    def _start_timeout(self) -> None:
        if self._awaiting_start:
            self._decide("start")

    def _on_utterance(self, msg: Utterance) -> None:
        if self.planner is None:
            self.log.debug("no session yet; ignoring %r", msg.text)
            return
        self._utts.append(msg.text)
        self._decide("start" if self._awaiting_start else "utterance")

    def _on_status(self, st: CommandStatus) -> None:
        if st.command_id not in self._cmd_skill:
            return  # a command of an earlier session
        self._statuses.append(st)
        if st.state.terminal:
            self._pending.pop(st.command_id, None)
            if not self._pending and not self._awaiting_start:
                self._decide("status")

    # -- the decision --------------------------------------------------------------------
    def _decide(self, trigger: str) -> None:
        from sim.runner import Observation

        self._awaiting_start = False
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        status = command = None
        terminal = [s for s in self._statuses if s.state.terminal]
        if terminal:
            motion = [s for s in terminal if self._cmd_skill.get(s.command_id) != "stop"]
            status = (motion or terminal)[-1]
            command = self._cmd_text.get(status.command_id)
        caps = self.caps
        if caps is None:
            self.log.warning("no capabilities on %s yet; using the world's", CAPABILITIES_TOPIC)
            caps = self.world_node.server.capabilities
        obs = Observation(time_s=self.clock.now_s(), trigger=trigger, capabilities=caps,
                          utterance=" ".join(self._utts) if self._utts else None, status=status, command=command,
                          statuses=list(self._statuses))
        self._utts, self._statuses = [], []
        t0 = time.perf_counter()
        with self.world_node.lock:
            decision = self.planner.decide(obs)
        decide_ms = 1000 * (time.perf_counter() - t0)
        self.steps += 1
        self.step_pub.publish(PlannerStep(step=self.steps, trigger=trigger, thought=decision.thought,
                                          plan=decision.plan, reply=decision.reply,
                                          timings_ms={"decide": decide_ms}))
        if decision.plan:
            self._send(decision.plan, caps)
        if decision.reply:
            self.speech_pub.publish(Speech(id=new_id(), text=decision.reply))

    def _send(self, plan: str, caps: Capabilities) -> None:
        """Send one command (subclasses in tests override this to misbehave)."""
        try:
            parsed = skills.parse(plan, caps)
            text, skill, args = parsed.text, parsed.skill, dict(parsed.args)
        except skills.GrammarError:
            text, skill, args = plan, "unknown", {}  # sent anyway: the controller rejects it
        cmd = self.client.send(text, skill, args)
        self._cmd_text[cmd.id], self._cmd_skill[cmd.id] = text, skill
        self._pending[cmd.id] = cmd


# --------------------------------------------------------------------------- simulation


@dataclass
class BusEpisode:
    """One episode run over the bus, scored from the messages observed on it."""

    scenario: Scenario
    events: list[Event]
    score: Score
    truncated: bool
    wall_s: float
    #: Where the world says every object is at the end (a cross-check of the replayed log).
    world_locations: dict[str, str] = field(default_factory=dict)


@dataclass
class _Episode:
    scenario: Scenario
    wall0: float
    events: list[Event] = field(default_factory=list)
    #: Logging (from SessionStart until the end); started: the clock runs and the end is watched.
    live: bool = True
    started: bool = False
    cmds: set[str] = field(default_factory=set)
    open_cmds: set[str] = field(default_factory=set)
    #: Per command id: the last (state, detail, holding) logged, to drop the server's repeats.
    last_status: dict[str, tuple] = field(default_factory=dict)
    last_event_sim: float = 0.0
    last_event_wall: float = 0.0
    steps_seen: bool = False
    seq: int = 0
    last_trigger_seq: int = 0
    last_trigger_wall: float = 0.0
    last_step_seq: int = 0


class SimulationNode(Node):
    """World, user and (``params.oracle``) oracle on one shared bus in one process; runs episodes.

    ``robix run sim.nodes:SimulationNode params.scenario=interrupted-test-001 params.time_scale=10``

    With ``autostart`` it runs ``scenario`` (or scenario ``index`` of ``split``) once the bus
    is connected; :meth:`run_episode` runs any scenario from another thread (the evaluator).
    An episode begins with ``SessionStart`` on ``/robix/session``; the clock and the user
    start ``session_gap_s`` wall seconds later. It ends when nothing more will happen: no
    command runs, no utterance is due, no decision is pending (a planner that publishes
    ``PlannerStep`` has answered the last utterance or final status, or
    ``decision_timeout_s`` passed) and the bus has been quiet for ``quiet_s`` simulated and
    ``quiet_wall_s`` wall seconds; or when the simulated time passes ``max_sim_time_s``
    (truncated). The score comes from the episode log built only from the bus messages
    observed (utterances, commands, statuses, speech, planner steps), stamped with the
    simulated time at which they arrived. With ``exit_when_done`` the process then exits:
    with ``exit_code: success`` 0 if the episode succeeded and 1 if not; with ``exit_code:
    finished`` 0 whenever it ran to its end (not truncated), whatever the score (a demo of a
    model that does not always succeed).
    """

    default_name = "sim"

    class Params(Config):
        #: A stored scenario id; "" = scenario ``index`` of ``split``.
        scenario: str = ""
        split: str = "test"
        index: int = 0
        #: Simulated seconds per wall second, for the world, the user and the oracle.
        time_scale: float = 1.0
        max_sim_time_s: float = 600.0
        #: Run the oracle planner in this process (else a planner elsewhere on the bus).
        oracle: bool = True
        #: Run the scenario as soon as the bus is connected.
        autostart: bool = True
        #: After the scenario, exit (see ``exit_code``).
        exit_when_done: bool = True
        #: "success": exit 0 only if the episode succeeded; "finished": exit 0 whenever it ran
        #: to its end, not truncated, whatever the score (the score line says how it went).
        exit_code: str = "success"
        #: Log the dialogue, commands and outcomes at INFO (else DEBUG).
        transcript: bool = True
        #: Wall seconds between SessionStart and the start of the clock and the user's script.
        session_gap_s: float = 0.05
        #: The end of an episode needs this much quiet on the bus (simulated and wall seconds).
        quiet_s: float = 0.5
        quiet_wall_s: float = 0.1
        #: Wait this long (wall) for a PlannerStep after an utterance or final status.
        decision_timeout_s: float = 10.0
        #: The planner publishes a PlannerStep per decision (the Robix planner node and the
        #: oracle do), so the end of an episode waits for the step that answers each trigger
        #: from the start. False: wait only once a first step was seen (planners that publish none).
        planner_publishes_steps: bool = True
        #: Give up (exit 1) if the bus is not connected within this time (wall).
        ready_timeout_s: float = 30.0
        world: WorldNode.Params = WorldNode.Params()
        user: UserNode.Params = UserNode.Params()
        planner: OracleNode.Params = OracleNode.Params()

    def __init__(self, params: Optional[Params] = None, **kw):
        super().__init__(params=params, **kw)
        p = self.params
        if p.world.scenario or p.user.scenario:
            raise ConfigError("sim params: set the scenario with params.scenario, not world.scenario/user.scenario")
        if p.max_sim_time_s <= 0 or p.session_gap_s < 0 or p.quiet_s < 0 or p.quiet_wall_s < 0:
            raise ConfigError(f"sim params need max_sim_time_s > 0 and non-negative waits, got {p}")
        if p.exit_code not in EXIT_CODES:
            raise ConfigError(f"sim params: exit_code must be one of {', '.join(EXIT_CODES)}, got {p.exit_code!r}")
        self.clock = SimClock(p.time_scale)
        child = dict(bus=self.bus, remap=self.remap, node_config=self.node_config)
        world_params = msgspec.structs.replace(p.world, time_scale=p.time_scale)
        self.world_node = WorldNode(world_params, clock=self.clock, **child)
        self.user_node = UserNode(msgspec.structs.replace(p.user, time_scale=p.time_scale), clock=self.clock, **child)
        self.oracle_node = OracleNode(p.planner, world=self.world_node, clock=self.clock, **child) if p.oracle else None
        self.children: list[Node] = [n for n in (self.world_node, self.user_node, self.oracle_node) if n is not None]
        self.session_pub = self.create_publisher(topics.SESSION, SessionStart)
        self.create_subscription(topics.UTTERANCE, Utterance, self._on_utterance)
        self.create_subscription(COMMAND_TOPIC, Command, self._on_command)
        self.create_subscription(STATUS_TOPIC, CommandStatus, self._on_status)
        self.create_subscription(topics.SPEECH, Speech, self._on_speech)
        self.create_subscription(topics.PLANNER_STEP, PlannerStep, self._on_step)
        self._episode: Optional[_Episode] = None
        self._done = threading.Event()
        self._result: Optional[BusEpisode] = None
        self._external_seen_at: Optional[float] = None
        self.create_timer(0.02, self._check_end)
        self._first: Optional[Scenario] = None
        if p.autostart:
            self._first = _load_stored(p.scenario) if p.scenario else self._indexed(p.split, p.index)

    @staticmethod
    def _indexed(split: str, index: int) -> Scenario:
        from sim.scenarios import load_scenarios

        try:
            scenarios = load_scenarios(split)
        except ValueError:
            raise ConfigError(f"sim params.split={split!r}; use train, validation or test") from None
        if not 0 <= index < len(scenarios):
            raise ConfigError(f"sim params.index={index}: the {split} split has {len(scenarios)} scenarios")
        return scenarios[index]

    # -- lifecycle -----------------------------------------------------------------------
    def on_start(self) -> None:
        for node in self.children:
            node.start()
        if self._first is not None:
            self._ready_since = time.monotonic()
            self._ready_timer = self.create_timer(0.01, self._autostart)

    def on_shutdown(self) -> None:
        for node in reversed(self.children):
            node.shutdown()

    def _autostart(self) -> None:
        if self.ready():
            self._ready_timer.cancel()
            self.begin(self._first)
        elif time.monotonic() - self._ready_since > self.params.ready_timeout_s:
            self._ready_timer.cancel()
            what = "the planner" if self.oracle_node is None else "the bus"
            self.log.error("%s did not connect within %g s (is a planner running in this bus domain?)",
                           what, self.params.ready_timeout_s)
            self.request_shutdown(1)

    def ready(self) -> bool:
        """Every link an episode needs is connected (non-blocking)."""
        external = self.oracle_node is None
        need = 2 if external else 1  # this process's SUB socket (+ the external planner's)
        pubs = [(self.user_node.pub, need), (self.world_node.server.status_pub, need), (self.session_pub, 1)]
        if not external:
            o = self.oracle_node
            pubs += [(self.world_node.server.caps_pub, 1), (o.client.pub, 1), (o.speech_pub, 1), (o.step_pub, 1)]
        if any(pub.subscriber_count < n for pub, n in pubs):
            return False
        if not external:
            return True
        # The planner's own publishers: seen in the graph, then a few discovery periods to connect.
        if self._external_seen_at is None:
            if any(e.bus != self.bus.id and any(pe.topic == self.resolve(COMMAND_TOPIC) for pe in e.publishers)
                   for e in read_graph(self.bus.root)):
                self._external_seen_at = time.monotonic()
            return False
        return time.monotonic() - self._external_seen_at >= 3 * self.bus.config.discovery_period_s

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until :meth:`ready`; raise TimeoutError naming what is missing."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                what = "a planner on /robix/session and /controller/command" if self.oracle_node is None else "the bus"
                raise TimeoutError(f"{what} did not connect within {timeout_s:g} s "
                                   "(is the planner running, in the same bus domain?)")
            time.sleep(0.005)

    # -- episodes ------------------------------------------------------------------------
    def run_episode(self, scenario: Scenario, timeout_s: Optional[float] = None) -> BusEpisode:
        """Run one scenario and wait for its end (call from any thread but this node's executor)."""
        p = self.params
        if timeout_s is None:
            timeout_s = p.max_sim_time_s / p.time_scale + p.session_gap_s + p.decision_timeout_s + 10.0
        self._done.clear()
        self._result = None
        self.call_soon(lambda: self.begin(scenario))
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"episode {scenario.id} did not end within {timeout_s:g} s (wall)")
        return self._result

    def begin(self, scenario: Scenario) -> None:
        """Start an episode (on this node's executor): load it, announce the session, start the clock soon."""
        self.clock.reset(0.0)
        self.world_node.load_scenario(scenario)
        self.user_node.load(scenario)
        self._episode = _Episode(scenario, wall0=time.monotonic(), steps_seen=self.params.planner_publishes_steps)
        self._say("episode %s (%s, %s): session start", scenario.id, scenario.category.value, scenario.variant)
        self.session_pub.publish(SessionStart(session=scenario.id))
        self.create_timer(self.params.session_gap_s, lambda: self._go(self._episode), oneshot=True)

    def _go(self, ep: _Episode) -> None:
        if ep is not self._episode or not ep.live:
            return
        ep.started = True
        ep.last_event_wall = time.monotonic()
        self.clock.start()
        self.world_node.advance()
        self.user_node.start_script()

    def _check_end(self) -> None:
        ep = self._episode
        if ep is None or not ep.live or not ep.started:
            return
        p = self.params
        now_s, now_wall = self.clock.now_s(), time.monotonic()
        if now_s > p.max_sim_time_s:
            self._finish(ep, truncated=True)
            return
        pending = (ep.steps_seen and ep.last_trigger_seq > ep.last_step_seq
                   and now_wall - ep.last_trigger_wall < p.decision_timeout_s)
        if (pending or ep.open_cmds or self.world_node.busy or self.user_node.due_s() is not None
                or now_s - ep.last_event_sim < p.quiet_s or now_wall - ep.last_event_wall < p.quiet_wall_s):
            return
        self._finish(ep, truncated=False)

    def _finish(self, ep: _Episode, truncated: bool) -> None:
        from sim.scoring import score_episode

        ep.live = False
        self.clock.pause()
        score = score_episode(ep.scenario, ep.events)
        world_locs = self.world_node.locations()
        if not truncated and score.locations != world_locs:
            diff = {k: (v, world_locs.get(k)) for k, v in score.locations.items() if world_locs.get(k) != v}
            self.log.warning("%s: the bus log and the world disagree on where objects are (log, world): %s",
                             ep.scenario.id, diff)
        result = BusEpisode(ep.scenario, list(ep.events), score, truncated, time.monotonic() - ep.wall0, world_locs)
        failed = score.failed()
        self._say("score %s: progress %.0f%% (%d/%d predicates)%s, %s; checks: %s; %d decisions, %d commands, "
                  "%.1f s simulated in %.1f s%s", ep.scenario.id, 100 * score.progress,
                  sum(r.met for r in score.predicates), len(score.predicates),
                  " TRUNCATED" if truncated else "", "success" if score.success else "FAILED",
                  ", ".join(f"{k}={'-' if v is None else ('ok' if v else 'NO')}" for k, v in score.checks.items()),
                  score.decisions, score.commands, score.sim_time_s, result.wall_s,
                  f"; not met: {', '.join(failed)}" if failed else "")
        self._result = result
        self._done.set()
        if self.params.exit_when_done:
            ok = not truncated and (score.success or self.params.exit_code == "finished")
            self.request_shutdown(0 if ok else 1)

    # -- the episode log (bus messages only) ---------------------------------------------
    def _say(self, fmt: str, *args) -> None:
        self.log.log(logging.INFO if self.params.transcript else logging.DEBUG, fmt, *args)

    def _log(self, event: Event, trigger: bool = False, step: bool = False) -> Optional[_Episode]:
        ep = self._episode
        if ep is None or not ep.live:
            return None
        ep.events.append(event)
        ep.seq += 1
        ep.last_event_sim, ep.last_event_wall = event.t_s, time.monotonic()
        if trigger:
            ep.last_trigger_seq, ep.last_trigger_wall = ep.seq, ep.last_event_wall
        if step:
            ep.last_step_seq, ep.steps_seen = ep.seq, True
        return ep

    def _on_utterance(self, msg: Utterance) -> None:
        from sim.scoring import Event

        t = self.clock.now_s()
        if self._log(Event.utterance(t, msg.text), trigger=True):
            self._say("%7.2f s  user:    %s", t, msg.text)

    def _on_speech(self, msg: Speech) -> None:
        from sim.scoring import Event

        t = self.clock.now_s()
        if not msg.text.strip():  # a bare barge-in flush: the robot fell silent, it said nothing
            if msg.flush:
                self._say("%7.2f s  robot:   (stops talking)", t)
            return
        if self._log(Event.reply_of(t, msg.text)):
            self._say("%7.2f s  robot:   %s", t, msg.text)

    def _on_step(self, msg: PlannerStep) -> None:
        from sim.scoring import Event

        t = self.clock.now_s()
        if self._log(Event.decision(t, msg.thought, msg.plan, msg.reply, msg.trigger), step=True):
            self.log.debug("%7.2f s  thought: %s", t, msg.thought)

    def _on_command(self, cmd: Command) -> None:
        from sim.scoring import Event

        ep = self._episode
        if ep is None or not ep.live or cmd.id in ep.cmds:
            return  # a re-send
        t = self.clock.now_s()
        ep.cmds.add(cmd.id)
        ep.open_cmds.add(cmd.id)
        self._log(Event.command(t, cmd))
        self._say("%7.2f s  command: %s", t, cmd.text)

    def _on_status(self, st: CommandStatus) -> None:
        from sim.scoring import Event

        ep = self._episode
        # The world shares this process's /controller/command socket, so a command always
        # reaches this log before any of its statuses can.
        if ep is None or not ep.live or st.command_id not in ep.cmds:
            return
        key = (st.state, st.detail, st.holding)
        if ep.last_status.get(st.command_id) == key:
            return  # the server's answer to a re-sent command
        ep.last_status[st.command_id] = key
        t = self.clock.now_s()
        terminal = st.state.terminal
        if terminal:
            ep.open_cmds.discard(st.command_id)
        self._log(Event.status(t, st), trigger=terminal)
        if terminal:
            detail = f" ({st.detail})" if st.detail and st.state is not CommandState.SUCCEEDED else ""
            held = f" [holding the {st.holding}]" if st.holding and st.holding not in detail else ""
            self._say("%7.2f s  status:  %s%s%s", t, st.state.value, detail, held)
