"""The simulator's oracle behind the model-backend interface, and a one-process demo graph.

:class:`OracleBackend` is a :class:`~robix_planner.backends.base.Backend`: the planner node
(:class:`robix_planner.planner.PlannerNode`) builds its prompt as for any model, and the
backend answers in the model's tag format, streamed. It reads what a model would read from
the prompt — the utterances, how the last command ended, what runs, what the gripper holds
(:func:`robix_planner.format.read_user_turn`) — and asks :class:`sim.oracle.OraclePlanner`,
which also reads the *true* world state and the scenario script through a
:class:`~sim.oracle.Privileged` view. That privilege is what makes it an oracle, and it is
why the backend is constructed in code, in the process of the simulated world, with a
reference to that state (``privileged=world_node.privileged``); it can never be chosen with
``model.backend`` in a config file. It lets the whole loop — prompt, streaming, validation,
interruption, memory — run end to end before a model is trained.

The oracle is stateful (task, constraints, what the user asked to keep), while the planner
may discard an answer (superseded by a new utterance or status) or take a step without the
model (a stop phrase). The backend keeps the oracle in step with the prompt's history:
before each answer it snapshots the oracle; if the next prompt shows that the answer was
not kept, it restores the snapshot, and steps the planner took without it are replayed
(their answers thrown away), so the oracle has heard everything the history holds.

:class:`OraclePlannerSim` puts a simulated world, the scripted user and a ``PlannerNode``
with this backend on one bus in one process (a :class:`sim.nodes.SimulationNode` whose
planner is the real planner node): ``robix launch launch/planner_sim.yaml``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from typing import Callable, Optional, Union

import msgspec

from robix_planner import format as fmt
from robix_planner import skills
from robix_planner.backends.base import BackendError, ModelConfig, Prompt
from robix_planner.backends.scripted import ScriptedBackend
from robix_planner.config import Config
from robix_planner.messages import Command, CommandState, CommandStatus
from robix_planner.planner import PlannerConfig, PlannerNode
from sim.nodes import SimulationNode
from sim.oracle import Decision, OraclePlanner, Privileged

log = logging.getLogger(__name__)


class _PromptController:
    """The controller as the prompt describes it: busy while the planner reports a command in flight.

    The oracle must act on what the planner knows (a command it sent may not have reached
    the world yet, a halted one may still be reported running), so busy/target/current come
    from the step's status lines; the real controller fills in when the prompt says nothing.
    """

    def __init__(self, controller, step: fmt.StepInput):
        self._controller = controller
        self._cmd: Optional[Command] = None
        if step.running is not None:
            try:
                parsed = skills.parse(step.running, controller.capabilities())
                self._cmd = Command(id="prompt", text=parsed.text, skill=parsed.skill, args=dict(parsed.args))
            except skills.GrammarError:
                self._cmd = Command(id="prompt", text=step.running, skill="unknown")

    @property
    def busy(self) -> bool:
        return self._cmd is not None and self._cmd.skill != "stop"

    @property
    def target(self) -> Optional[str]:
        if self._cmd is not None:
            return self._cmd.args.get("object")
        return self._controller.target

    @property
    def current(self) -> Optional[Command]:
        return self._cmd if self._cmd is not None else self._controller.current

    def capabilities(self):
        return self._controller.capabilities()


class OracleBackend(ScriptedBackend):
    """Answers prompts with the oracle's decisions, streamed in the Robix tag format.

    A :class:`~robix_planner.backends.scripted.ScriptedBackend` whose ``respond`` asks the
    oracle, so streaming and cancellation are the scripted backend's: ``config.chunk_delay_s``
    between token-sized pieces, stopping within one piece on cancel.
    ``privileged``: the privileged state, or a function returning it (e.g.
    ``world_node.privileged``, so a new scenario gets a fresh oracle). ``lock``: held while
    the oracle reads the world (the world node's lock).
    """

    def __init__(self, config: Optional[ModelConfig] = None, *,
                 privileged: Union[Privileged, Callable[[], Privileged]],
                 lock: Optional[threading.RLock] = None):
        super().__init__(config or ModelConfig(backend="sim.oracle_backend:OracleBackend"), respond=self._ask_oracle)
        self._privileged = privileged if callable(privileged) else (lambda: privileged)
        self._world_lock = lock if lock is not None else contextlib.nullcontext()
        self.oracle: Optional[OraclePlanner] = None
        self._world = None
        self._answered: Optional[int] = None  # completed steps of the prompt we last answered
        self._snapshot: Optional[OraclePlanner] = None
        self._produced: Optional[tuple[str, Optional[str]]] = None
        self.replayed = 0

    def _ask_oracle(self, prompt: Prompt) -> str:
        try:
            with self._world_lock:
                return self.answer(prompt)
        except (ValueError, KeyError, fmt.FormatError) as exc:
            raise BackendError(f"the oracle cannot answer this prompt: {exc}") from exc

    # -- answering -----------------------------------------------------------------------
    def answer(self, prompt: Prompt) -> str:
        """The oracle's answer to ``prompt`` (raw model output); keeps the oracle in step with the history."""
        priv = self._privileged()
        history = fmt.read_history(prompt)
        current = fmt.last_user_turn(prompt)
        n = len(history)
        if self.oracle is None or priv.world is not self._world or self._answered is None or n < self._answered:
            self.oracle, self._world = OraclePlanner(priv), priv.world
            replay_from = 0
        elif n == self._answered:  # our last answer was not kept
            self._restore()
            replay_from = n
        else:
            kept = history[self._answered].output
            if (kept.thought, kept.plan) == self._produced:
                replay_from = self._answered + 1
            else:  # the planner kept something else at that step (e.g. a stop phrase)
                self._restore()
                replay_from = self._answered
        for step in history[replay_from:]:
            self._decide(step.input, priv)
            self.replayed += 1
        self._snapshot = self._snap()
        self._answered = n
        d = self._decide(current, priv)
        out = fmt.ModelOutput(thought=d.thought, plan=d.plan, reply=d.reply)
        self._produced = (fmt.parse(fmt.serialize(out)).thought, out.plan)
        return fmt.serialize(out)

    def _decide(self, step: fmt.StepInput, priv: Privileged) -> Decision:
        from sim.runner import Observation

        o = self.oracle
        o.controller = _PromptController(priv.controller, step)
        status = command = None
        if step.outcomes:
            motion = [x for x in step.outcomes if x.command != "stop"]
            last = (motion or list(step.outcomes))[-1]
            holding = step.holding or None
            status = CommandStatus(command_id="prompt", state=CommandState(last.state), detail=last.detail,
                                   holding=holding)
            command = last.command
        caps = priv.controller.capabilities()
        utterances = list(step.utterances) or [None]
        decisions = []
        for i, utt in enumerate(utterances):  # one oracle step per utterance: it matches whole script turns
            obs = Observation(time_s=0.0, trigger="utterance" if utt else "status", capabilities=caps,
                              utterance=utt, status=status if i == 0 else None, command=command if i == 0 else None)
            decisions.append(o.decide(obs))
        if len(decisions) == 1:
            return decisions[0]
        plan = next((d.plan for d in reversed(decisions) if d.plan), None)
        reply = " ".join(d.reply for d in decisions if d.reply) or None
        return Decision(thought=" ".join(d.thought for d in decisions), plan=plan, reply=reply)

    def _snap(self) -> OraclePlanner:
        o = self.oracle
        memo = {id(x): x for x in (o.world, o.controller, o.scenario)}
        return copy.deepcopy(o, memo)

    def _restore(self) -> None:
        if self._snapshot is not None:
            self.oracle, self._snapshot = self._snapshot, None


# --------------------------------------------------------------------------- the demo graph


class OraclePlannerSim(SimulationNode):
    """World, scripted user and the planner node (with :class:`OracleBackend`) on one bus, one process.

    A :class:`sim.nodes.SimulationNode` (episodes, ``SessionStart``, scoring from the bus)
    whose planner is :class:`robix_planner.planner.PlannerNode` rather than the sim's own
    oracle node: every decision goes through the planner's prompt, streaming parser,
    validation, interruption handling and memory, and only the model is the oracle. The
    nodes talk only over ZeroMQ sockets; the backend alone reads the world (privileged).

        robix run sim.oracle_backend:OraclePlannerSim params.sim.scenario=interrupted-test-005
    """

    class Params(Config):
        #: The simulation (``oracle`` is ignored: the planner below is the planner).
        sim: SimulationNode.Params = SimulationNode.Params()
        #: The planner node's config; ``model`` only sets the oracle's streaming (chunk_delay_s).
        planner: PlannerConfig = PlannerConfig()

    def __init__(self, params: Optional["OraclePlannerSim.Params"] = None, **kw):
        params = params if params is not None else self.Params()
        super().__init__(msgspec.structs.replace(params.sim, oracle=False), **kw)
        self.planner_params = params.planner
        world = self.world_node
        self.backend = OracleBackend(params.planner.model, privileged=world.privileged, lock=world.lock)
        self.planner_node = PlannerNode(params.planner, backend=self.backend, bus=self.bus, remap=self.remap,
                                        node_config=self.node_config)
        self.children.append(self.planner_node)

    def ready(self) -> bool:
        """Every link of an episode is connected: world, user, session and the planner's publishers."""
        pl = self.planner_node
        pubs = (self.user_node.pub, self.world_node.server.status_pub, self.world_node.server.caps_pub,
                self.session_pub, pl.client.pub, pl.speech_pub, pl.step_pub)
        return all(p.subscriber_count >= 1 for p in pubs)


def main(argv=None) -> int:
    """``python -m sim.oracle_backend``: score the planner node (oracle behind it) per category, over the bus."""
    import argparse
    import os
    import tempfile
    import uuid

    from robix_planner.bus import BusConfig
    from robix_planner.config import convert
    from sim.eval import format_table, record_of, select, summarize

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--category", action="append", metavar="C", help="only this category (repeatable)")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N scenarios per category")
    parser.add_argument("--time-scale", type=float, default=20.0)
    parser.add_argument("--halt-delay-ms", type=float, default=0.0, help="planner.halt_delay_ms (default 0: at once)")
    parser.add_argument("--chunk-delay-s", type=float, default=0.0, help="model.chunk_delay_s: the oracle's decoding pace")
    parser.add_argument("--show-failures", action="store_true", help="print the bus log of every episode that failed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    params = convert(OraclePlannerSim.Params, {
        "sim": {"time_scale": args.time_scale, "autostart": False, "exit_when_done": False, "transcript": False},
        "planner": {"model": {"chunk_delay_s": args.chunk_delay_s},
                    "planner": {"start_delay_s": 0.3, "halt_delay_ms": args.halt_delay_ms}}})
    graph = tempfile.TemporaryDirectory(prefix="robix-oracle-")
    bus = BusConfig(graph_dir=graph.name, domain=f"o{os.getpid()}-{uuid.uuid4().hex[:6]}", discovery_period_s=0.02)
    sim = OraclePlannerSim(params, bus_config=bus, name="eval")
    records = []
    t0 = time.monotonic()
    try:
        sim.start()
        sim.wait_ready(30.0)
        for scenario in select(args.split, args.category, args.limit):
            ep = sim.run_episode(scenario)
            records.append(record_of(scenario, ep.score, ep.truncated, ep.wall_s))
            if not ep.score.success:
                log.warning("%s (%s): not met: %s", scenario.id, scenario.variant, ", ".join(ep.score.failed()))
                if args.show_failures:
                    for e in ep.events:
                        state = f" {e.state.value}" if e.state else ""
                        print(f"    {e.t_s:7.2f} {e.kind.value:9} {e.text}{state} {e.detail}"
                              f"{f' plan={e.plan!r}' if e.plan else ''}{f' reply={e.reply!r}' if e.reply else ''}")
    finally:
        sim.shutdown()
        graph.cleanup()
    print(f"planner node + OracleBackend over the bus: split {args.split}, {len(records)} episodes, time scale "
          f"{args.time_scale:g}, halt_delay_ms {args.halt_delay_ms:g}, {time.monotonic() - t0:.1f} s wall")
    print(format_table(summarize(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
