"""A self-contained bus demo: a synthetic camera, a fake tabletop controller, a scripted commander.

    robix launch launch/demo.yaml

* :class:`CameraNode` publishes a synthetic rgb8 frame (a coloured square moving over a
  gradient) on ``/camera/<camera>`` at ``rate_hz``.
* :class:`DemoController` is a controller written the way a robot developer writes one:
  a :class:`~robix_planner.controller.CommandServer` in blocking style, advertising
  :data:`~robix_planner.skills.TABLETOP_SKILLS` with a small vocabulary, whose
  "execution" takes a few hundred milliseconds.
* :class:`DemoCommander` stands in for the planner: it waits for the controller's
  capabilities, sends a scripted list of commands one after another through a
  :class:`~robix_planner.controller.CommandClient`, logs every status and a summary,
  and shuts down (exit code 0 when every command ended as expected).
"""

from __future__ import annotations

import colorsys
import math
import time
from typing import Optional

from robix_planner import skills, topics
from robix_planner.config import Config, ConfigError
from robix_planner.controller import CAPABILITIES_TOPIC, CommandClient, CommandContext, CommandServer
from robix_planner.messages import Capabilities, Command, CommandState, CommandStatus, Image
from robix_planner.node import Node

# --------------------------------------------------------------------------- camera


def render_frame(index: int, width: int = 160, height: int = 120, period: int = 60):
    """Frame ``index`` of the synthetic video: an ``(height, width, 3)`` uint8 array.

    A square (a quarter of the height) travels a Lissajous path over a vertical
    gradient, its hue cycling once every ``period`` frames. Deterministic in ``index``.
    """
    import numpy as np

    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = np.linspace(40, 90, height, dtype=np.uint8)[:, None, None]  # grey gradient, top to bottom
    side = max(1, height // 4)
    phase = 2 * math.pi * (index % period) / period
    x = int((width - side) * (0.5 + 0.5 * math.sin(phase)))
    y = int((height - side) * (0.5 + 0.5 * math.sin(2 * phase)))
    r, g, b = colorsys.hsv_to_rgb((index % period) / period, 0.9, 1.0)
    frame[y:y + side, x:x + side] = (int(r * 255), int(g * 255), int(b * 255))
    return frame


class CameraNode(Node):
    """Publishes :func:`render_frame` images on ``/camera/<camera>`` (rgb8, latest-only)."""

    default_name = "camera"

    class Params(Config):
        rate_hz: float = 10.0
        width: int = 160
        height: int = 120
        #: The camera's name; the topic is ``/camera/<camera>``.
        camera: str = "head"

    def __init__(self, params: Optional[Params] = None, **kw):
        super().__init__(params=params, **kw)
        p = self.params
        if p.rate_hz <= 0 or p.width < 1 or p.height < 1:
            raise ConfigError(f"camera params need rate_hz > 0 and a positive size, got {p}")
        self.topic = f"/camera/{p.camera}"
        self.pub = self.create_publisher(self.topic, Image)
        self.frames = 0
        self.create_timer(1.0 / p.rate_hz, self._tick)

    def on_start(self) -> None:
        p = self.params
        self.log.info("publishing %dx%d rgb8 on %s at %g Hz", p.width, p.height, self.resolve(self.topic), p.rate_hz)

    def _tick(self) -> None:
        pixels = render_frame(self.frames, self.params.width, self.params.height)  # a new array: sent zero-copy
        self.pub.publish(Image.from_array(self.params.camera, pixels))
        self.frames += 1


# --------------------------------------------------------------------------- controller


class DemoController(Node):
    """A fake tabletop arm: understands :data:`skills.TABLETOP_SKILLS` over a small vocabulary.

    Each command "runs" for ``steps * step_s`` seconds, reporting progress every step;
    ``stop`` preempts it. It tracks what the gripper holds: ``pick up`` fails when the
    gripper is full, ``place ... back`` fails unless it holds that object.
    """

    default_name = "controller"

    class Params(Config):
        robot: str = "demo_arm"
        objects: tuple[str, ...] = ("red cup", "blue bowl", "fork", "napkin")
        receptacles: tuple[str, ...] = ("bus tub", "trash bin")
        #: A command "runs" for steps * step_s seconds, reporting progress after each step.
        steps: int = 4
        step_s: float = 0.15

    def __init__(self, params: Optional[Params] = None, **kw):
        super().__init__(params=params, **kw)
        p = self.params
        if p.steps < 1 or p.step_s < 0:
            raise ConfigError(f"controller params need steps >= 1 and step_s >= 0, got {p}")
        caps = Capabilities(robot=p.robot, skills=list(skills.TABLETOP_SKILLS), objects=list(p.objects),
                            receptacles=list(p.receptacles))
        self.server = CommandServer(self, caps, execute=self._execute)

    def on_start(self) -> None:
        caps = self.server.capabilities
        self.log.info("advertising skills %s; objects: %s; receptacles: %s", ", ".join(s.name for s in caps.skills),
                      ", ".join(caps.objects), ", ".join(caps.receptacles))

    def _execute(self, cmd: Command, ctx: CommandContext) -> None:
        self.log.info("executing %s %s", cmd.skill, cmd.args)
        obj = cmd.args.get("object")
        if cmd.skill == "pick_up" and ctx.holding is not None:
            ctx.fail(f"the gripper already holds the {ctx.holding}")
            return
        if cmd.skill == "place_back" and ctx.holding != obj:
            ctx.fail(f"not holding the {obj}")
            return
        for step in range(self.params.steps):
            if ctx.cancelled.wait(self.params.step_s):
                self.log.info("stopped during %r", cmd.text)
                return
            ctx.running(f"step {step + 1}/{self.params.steps}")
        if cmd.skill == "pick_up":
            ctx.holding = obj
        elif cmd.skill in ("put_into", "place_back"):
            ctx.holding = None


# --------------------------------------------------------------------------- commander


class DemoCommander(Node):
    """Sends a scripted list of commands to the controller, one after another.

    Each entry is sent once the previous one has ended, except ``stop``: it is sent
    ``stop_delay_s`` after the previous command reports ``running`` (an interruption).
    Entries outside the controller's vocabulary are sent anyway, to show the controller
    rejecting them. With ``expect`` (one final state per entry), the exit code is 1 when
    any command ended otherwise.
    """

    default_name = "commander"

    class Params(Config):
        script: tuple[str, ...] = (
            "pick up the red cup",
            "put the red cup into the bus tub",
            "pick up the purple unicorn",  # not in the vocabulary: the controller rejects it
            "pick up the blue bowl",
            "stop",  # sent while the previous command runs: it is preempted
        )
        #: The final state each entry should end in ("" or empty: no check).
        expect: tuple[str, ...] = ("succeeded", "succeeded", "rejected", "preempted", "succeeded")
        #: How long after the interrupted command reports ``running`` the ``stop`` is sent.
        stop_delay_s: float = 0.1
        #: Give up (exit code 1) if no controller shows up in this time.
        capabilities_timeout_s: float = 15.0
        #: A command with no status within this time counts as failed.
        ack_timeout_s: float = 10.0

    def __init__(self, params: Optional[Params] = None, **kw):
        super().__init__(params=params, **kw)
        p = self.params
        if not p.script:
            raise ConfigError("commander params.script is empty; give at least one command")
        if p.expect and len(p.expect) != len(p.script):
            raise ConfigError(f"commander params.expect has {len(p.expect)} entries for {len(p.script)} commands; "
                              "give one final state per command, or none")
        bad = [e for e in p.expect if e not in {s.value for s in CommandState if s.terminal}]
        if bad:
            raise ConfigError(f"commander params.expect: {bad} are not final states "
                              "(succeeded, failed, rejected, preempted)")
        self.caps: Optional[Capabilities] = None
        #: The final status of each script entry, in script order (None until it ends).
        self.results: list[Optional[CommandStatus]] = [None] * len(p.script)
        #: Every status received: (script index, status).
        self.statuses: list[tuple[int, CommandStatus]] = []
        self.frames_seen = 0
        self._sent = 0
        self._index: dict[str, int] = {}
        self._interrupts: set[int] = set()
        self._started_at: Optional[float] = None
        self.client = CommandClient(self, self._on_status, ack_timeout_s=p.ack_timeout_s)
        self.create_subscription(CAPABILITIES_TOPIC, Capabilities, self._on_capabilities)
        self.create_subscription(topics.CAMERA_HEAD, Image, self._on_image)
        self._waiting = self.create_timer(0.05, self._maybe_begin)
        self._deadline = self.create_timer(p.capabilities_timeout_s, self._no_controller, oneshot=True)

    def _on_image(self, _msg: Image) -> None:
        self.frames_seen += 1

    def _on_capabilities(self, caps: Capabilities) -> None:
        if self.caps is None:
            self.log.info("controller %r is up: %d skills, objects: %s", caps.robot, len(caps.skills),
                          ", ".join(caps.objects))
        self.caps = caps
        self._maybe_begin()

    def _maybe_begin(self) -> None:
        # Start once the controller is known and listens to our commands (else the first one waits a re-send).
        if self._started_at is not None or self.caps is None or self.client.pub.subscriber_count < 1:
            return
        self._started_at = time.monotonic()
        self._waiting.cancel()
        self._deadline.cancel()
        self._send_next()

    def _no_controller(self) -> None:
        if self._started_at is None:
            self.log.error("no controller answered on %s within %g s; is it running in this bus domain?",
                           CAPABILITIES_TOPIC, self.params.capabilities_timeout_s)
            self.request_shutdown(1)

    def _send_next(self, expected: Optional[int] = None) -> None:
        i = self._sent
        if i >= len(self.params.script) or (expected is not None and i != expected):
            return
        text = self.params.script[i]
        try:
            parsed = skills.parse(text, self.caps)
            skill, args = parsed.skill, parsed.args
        except skills.GrammarError:
            skill, args = "unknown", {}  # send it anyway: the controller must reject it
        self._sent += 1
        cmd = self.client.send(text, skill, args)
        self._index[cmd.id] = i
        self.log.info("-> %s", text)

    def _on_status(self, status: CommandStatus) -> None:
        i = self._index.get(status.command_id)
        if i is None or self.results[i] is not None:
            return  # a repeat of a final status
        repeat = any(j == i and s.state is status.state for j, s in self.statuses)
        self.statuses.append((i, status))
        text = self.params.script[i]
        detail = f" ({status.detail})" if status.detail else ""
        held = f" [holding {status.holding}]" if status.holding else ""
        (self.log.debug if repeat else self.log.info)("<- %-34s %s%s%s", text, status.state.value, detail, held)
        nxt = i + 1
        if (status.state is CommandState.RUNNING and nxt < len(self.params.script) and nxt not in self._interrupts
                and skills.normalize(self.params.script[nxt]) == "stop" and self._sent == nxt):
            self._interrupts.add(nxt)
            self.create_timer(self.params.stop_delay_s, lambda: self._send_next(expected=nxt), oneshot=True)
        if not status.state.terminal:
            return
        self.results[i] = status
        if any(self.results[j] is None for j in range(self._sent)):
            return  # an interrupted command and its stop both have to end
        if self._sent < len(self.params.script):
            self._send_next()
        else:
            self._finish()

    def summary(self) -> str:
        """The script's outcome as a small table."""
        lines = [f"demo summary: {len(self.results)} commands, {self.frames_seen} camera frames received"]
        for i, (text, st) in enumerate(zip(self.params.script, self.results)):
            state = st.state.value if st else "no status"
            mark = ""
            if self.params.expect:
                mark = "ok " if state == self.params.expect[i] else f"EXPECTED {self.params.expect[i]}: "
            detail = st.detail if st and st.detail else ""
            detail = detail if len(detail) <= 60 else detail[:57] + "..."
            lines.append(f"  {mark}{text:34} {state:10} {detail}".rstrip())
        return "\n".join(lines)

    def _finish(self) -> None:
        self.log.info("%s", self.summary())  # logged, not printed: it stays in order with the status lines
        states = [st.state.value if st is not None else None for st in self.results]
        if self.params.expect and states != list(self.params.expect):
            self.log.error("the controller did not answer as expected: %s, expected %s", states, list(self.params.expect))
            self.request_shutdown(1)
        else:
            self.request_shutdown(0)
