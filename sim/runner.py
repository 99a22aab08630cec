"""The fast in-process episode runner: world + controller + scripted user + any planner.

A planner is any object with ``decide(observation) -> Decision`` (see :class:`Observation`;
it never sees the world state). It is called at the start, after every command ends
(succeeded, failed, rejected, preempted) and whenever the user speaks; an utterance during a
command reaches it at once (the command keeps running unless the planner sends ``stop``).
Simulated time jumps from event to event (phase ends, due utterances), so an episode costs
microseconds per decision; the head camera is rendered only when the planner has
``needs_images = True`` (the default for planners that do not say).

::

    runner = EpisodeRunner(scenario)
    result = runner.run(OraclePlanner(runner.privileged))   # or run_episode(scenario)
    result.score.progress, result.events
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np

from robix_planner import skills
from robix_planner.messages import Capabilities, Command, CommandStatus
from sim.controller import ControllerConfig, SimController
from sim.oracle import Decision, OraclePlanner, Privileged
from sim.scoring import Event, Score, score_episode
from sim.spec import Scenario
from sim.user import ScriptedUser
from sim.world import World

log = logging.getLogger(__name__)


@dataclass
class Observation:
    """What a planner sees at one decision.

    ``status`` is the terminal status of the command that ended since the last decision (a
    motion command's rather than the ``stop`` that ended it) and ``command`` that command's
    text; ``statuses`` holds every status since the last decision, in order. ``images`` maps
    camera names to RGB frames (empty when rendering is skipped).
    """

    time_s: float
    trigger: str
    capabilities: Capabilities
    images: dict[str, np.ndarray] = field(default_factory=dict)
    utterance: Optional[str] = None
    status: Optional[CommandStatus] = None
    command: Optional[str] = None
    statuses: list[CommandStatus] = field(default_factory=list)


class Planner(Protocol):
    def decide(self, observation: Observation) -> Decision: ...


@dataclass
class RunnerConfig:
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    #: Render the head camera: None asks the planner (``needs_images``, default True).
    render: Optional[bool] = None
    width_px: int = 160
    height_px: int = 120
    #: Simulated thinking time: the world runs on for this long before a decision takes effect.
    planner_latency_s: float = 0.0
    max_decisions: int = 400
    max_sim_time_s: float = 1800.0


@dataclass
class EpisodeResult:
    scenario: Scenario
    events: list[Event]
    score: Score
    decisions: int
    truncated: bool
    frames: int = 0


class EpisodeRunner:
    """One scenario's world, controller and user, ready to run a planner once."""

    def __init__(self, scenario: Scenario, config: Optional[RunnerConfig] = None, renderer=None):
        self.scenario = scenario
        self.config = config or RunnerConfig()
        #: The episode's one random generator (controller slips when failure_prob > 0).
        self.rng = np.random.default_rng(scenario.seed)
        self.world = World(scenario.scene)
        self.controller = SimController(self.world, self.config.controller, rng=self.rng)
        for f in scenario.failures:
            self.controller.inject_failure(f.object, f.times)
        self.user = ScriptedUser(scenario.turns)
        self.privileged = Privileged(world=self.world, controller=self.controller, scenario=scenario)
        self.events: list[Event] = []
        self._renderer = renderer
        self._cmd_text: dict[str, str] = {}
        self._cmd_skill: dict[str, str] = {}
        self._n_cmd = 0
        self._utts: list[str] = []
        self._statuses: list[CommandStatus] = []
        self._ended = False
        self._frames = 0

    @property
    def now_s(self) -> float:
        return self.controller.time_s

    # -- the loop ----------------------------------------------------------------------
    def run(self, planner: Planner) -> EpisodeResult:
        cfg = self.config
        render = cfg.render if cfg.render is not None else getattr(planner, "needs_images", True)
        if render and self._renderer is None:
            from sim.render import Renderer

            self._renderer = Renderer(cfg.width_px, cfg.height_px)
        self.user.start(0.0)
        self._observe_user()
        trigger = "start"
        decisions = 0
        truncated = False
        while True:
            if trigger or self._utts or self._ended:
                if decisions >= cfg.max_decisions:
                    truncated = True
                    log.warning("%s: stopped after %d decisions", self.scenario.id, decisions)
                    break
                obs = self._observation(trigger or ("utterance" if self._utts else "status"), render)
                decision = planner.decide(obs)
                if not isinstance(decision, Decision):
                    raise TypeError(f"planner.decide() must return a sim.oracle.Decision, got {type(decision).__name__}")
                decisions += 1
                trigger = ""
                if cfg.planner_latency_s > 0:
                    self._advance(cfg.planner_latency_s)
                self._apply(decision, obs.trigger)
                continue
            t_ctl = self.controller.time_to_next_event_s()
            t_user = self.user.next_due_s()
            steps = [t for t in (None if t_ctl is None else self.now_s + t_ctl, t_user) if t is not None]
            if not steps:
                break  # nothing will ever happen again
            t_next = min(steps)
            if t_next > cfg.max_sim_time_s:
                truncated = True
                log.warning("%s: stopped at the simulated time limit", self.scenario.id)
                break
            self._advance(max(0.0, t_next - self.now_s))
        score = score_episode(self.scenario, self.events, final_locations=self.world.locations())
        return EpisodeResult(self.scenario, self.events, score, decisions, truncated, self._frames)

    def _observation(self, trigger: str, render: bool) -> Observation:
        status = command = None
        terminal = [s for s in self._statuses if s.state.terminal]
        if terminal:
            motion = [s for s in terminal if self._cmd_skill.get(s.command_id) != "stop"]
            status = (motion or terminal)[-1]
            command = self._cmd_text.get(status.command_id)
        images = {}
        if render:
            images["head"] = self._renderer.render(self.world)
            self._frames += 1
        obs = Observation(
            time_s=self.now_s,
            trigger=trigger,
            capabilities=self.controller.capabilities(),
            images=images,
            utterance=" ".join(self._utts) if self._utts else None,
            status=status,
            command=command,
            statuses=list(self._statuses),
        )
        self._utts, self._statuses, self._ended = [], [], False
        return obs

    def _apply(self, decision: Decision, trigger: str) -> None:
        now = self.now_s
        self.events.append(Event.decision(now, decision.thought, decision.plan, decision.reply, trigger))
        if decision.plan:
            self._n_cmd += 1
            cid = f"c{self._n_cmd}"
            try:
                parsed = skills.parse(decision.plan, self.controller.capabilities())
                skill, args, text = parsed.skill, dict(parsed.args), parsed.text
            except skills.GrammarError:
                skill, args, text = "unknown", {}, decision.plan
            cmd = Command(id=cid, text=text, skill=skill, args=args, stamp_ns=int(round(now * 1e9)))
            self._cmd_text[cid], self._cmd_skill[cid] = text, skill
            self.events.append(Event.command(now, cmd))
            for st in self.controller.submit(cmd):
                self._on_status(st)
        if decision.reply:
            self.events.append(Event.reply_of(now, decision.reply))
            self.user.on_reply(decision.reply, now)
        self._observe_user()

    # -- time --------------------------------------------------------------------------
    def _advance(self, dt_s: float) -> None:
        for st in self.controller.step(dt_s):
            self._on_status(st)
        self._observe_user()

    def _on_status(self, st: CommandStatus) -> None:
        now = self.now_s
        self.events.append(Event.status(now, st))
        self._statuses.append(st)
        self.user.on_status(st, self._cmd_skill.get(st.command_id, ""), now)
        if st.state.terminal:
            self._ended = True

    def _observe_user(self) -> None:
        now = self.now_s
        ctl = self.controller
        self.user.observe(now, ctl.phase, ctl.target, self.world.holding)
        for utt in self.user.poll(now):
            self.events.append(Event.utterance(now, utt.text))
            self._utts.append(utt.text)


def run_episode(scenario: Scenario, planner: Optional[Planner] = None, config: Optional[RunnerConfig] = None) -> EpisodeResult:
    """Run one scenario; ``planner`` None runs the oracle (with its privileged view)."""
    runner = EpisodeRunner(scenario, config)
    return runner.run(planner if planner is not None else OraclePlanner(runner.privileged))


def main(argv=None) -> None:
    """``python -m sim.runner --split test``: run the oracle and print scores per category."""
    import argparse
    from collections import defaultdict

    from sim.scenarios import load_scenarios

    parser = argparse.ArgumentParser(description="run the oracle over stored scenarios and print scores per category")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--category", default=None)
    args = parser.parse_args(argv)
    rows = defaultdict(list)
    for s in load_scenarios(args.split, args.category):
        rows[s.category.value].append(run_episode(s))
    head = ("category", "n", "progress", "success", "checks ok", "decisions", "sim s")
    table = [head]
    for cat, results in rows.items():
        checks = [v for r in results for v in r.score.checks.values() if v is not None]
        table.append((
            cat,
            str(len(results)),
            f"{100 * sum(r.score.progress for r in results) / len(results):.1f}%",
            f"{100 * sum(r.score.success for r in results) / len(results):.1f}%",
            f"{sum(checks)}/{len(checks)}",
            f"{sum(r.decisions for r in results) / len(results):.1f}",
            f"{sum(r.score.sim_time_s for r in results) / len(results):.1f}",
        ))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
