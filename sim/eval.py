"""``robix eval online``: run a planner through stored scenarios and score it, per category.

    robix eval online --planner oracle --split test                      # over the bus (default mode)
    robix eval online --planner oracle --split test --mode inprocess     # sim.runner, no sockets
    robix eval online --planner external --split test                    # a planner already on the bus
    robix eval online --planner oracle --category interrupted --limit 2 --time-scale 30 --json out.json

**bus** mode runs a world and a scripted user in this process (a
:class:`sim.nodes.SimulationNode`) and talks to the planner only over ZeroMQ sockets; each
episode begins with ``SessionStart`` on ``/robix/session``. ``--planner oracle`` runs the
oracle node in this process, on a private bus domain unless ``--domain`` is given;
``--planner external`` uses whatever planner is running in the bus domain (``--domain``,
else ``$ROBIX_DOMAIN``), e.g. one started by ``robix launch``: it must subscribe to
``/robix/session`` and ``/user/utterance``, send commands on ``/controller/command`` and
should publish a ``PlannerStep`` per decision (the end of an episode waits for it).
**inprocess** mode runs :func:`sim.runner.run_episode` (oracle only).

The table has one row per category: scenarios, mean task progress, success rate, the
behaviour checks (passed/applicable: interrupt honoured, asked when ambiguous, refused when
invalid), mean pointless repeats, decisions and simulated seconds per episode. ``--json``
writes the table and every episode's record, for later comparison. Simulated time runs
``--time-scale`` times faster than the wall clock in bus mode.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional, Sequence

import msgspec

log = logging.getLogger(__name__)

CHECKS = ("interrupt_honoured", "asked_when_ambiguous", "refused_when_invalid")
PLANNERS = ("oracle", "external")
MODES = ("bus", "inprocess")


class EpisodeRecord(msgspec.Struct, kw_only=True):
    """One episode's outcome, the same in both modes (JSON-ready)."""

    id: str
    category: str
    variant: str
    progress: float
    success: bool
    checks: dict[str, Optional[bool]]
    repeats: int
    commands: int
    decisions: int
    sim_time_s: float
    truncated: bool
    failed: list[str] = []
    wall_s: float = 0.0


class CategorySummary(msgspec.Struct, kw_only=True):
    n: int
    progress: float
    success: float
    #: Per check: [passed, applicable].
    checks: dict[str, list[int]]
    repeats: float
    decisions: float
    sim_time_s: float
    truncated: int


def record_of(scenario, score, truncated: bool, wall_s: float) -> EpisodeRecord:
    return EpisodeRecord(
        id=scenario.id, category=scenario.category.value, variant=scenario.variant, progress=score.progress,
        success=score.success, checks=dict(score.checks), repeats=score.repeats, commands=score.commands,
        decisions=score.decisions, sim_time_s=round(score.sim_time_s, 3), truncated=truncated,
        failed=score.failed(), wall_s=round(wall_s, 3),
    )


def select(split: str, categories: Optional[Sequence[str]] = None, limit: Optional[int] = None) -> list:
    """The stored scenarios of ``split``, of ``categories`` (all if None), at most ``limit`` per category."""
    from sim.scenarios import load_scenarios
    from sim.spec import ScenarioCategory

    cats = list(ScenarioCategory) if not categories else [ScenarioCategory(c) for c in categories]
    out = []
    for cat in cats:
        found = load_scenarios(split, cat)
        out += found[:limit] if limit is not None else found
    return out


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="episode", file=sys.stderr, disable=None, leave=False)


def run_inprocess(scenarios: list) -> list[EpisodeRecord]:
    """The oracle through :func:`sim.runner.run_episode` (no sockets)."""
    from sim.runner import run_episode

    records = []
    with _progress_bar(len(scenarios), "in process") as bar:
        for s in scenarios:
            t0 = time.monotonic()
            result = run_episode(s)
            records.append(record_of(s, result.score, result.truncated, time.monotonic() - t0))
            bar.update(1)
    return records


def run_bus(scenarios: list, *, planner: str = "oracle", time_scale: float = 20.0, bus_config=None,
            ready_timeout_s: float = 30.0, sim_params: Optional[dict] = None) -> list[EpisodeRecord]:
    """Run ``scenarios`` over the bus: a world and a user in this process, the planner on the bus.

    ``planner="oracle"`` runs the oracle node in this process (it still talks only over
    sockets); ``"external"`` needs a planner already running on the bus of ``bus_config``.
    ``sim_params``: more :class:`sim.nodes.SimulationNode` params (e.g. ``{"quiet_wall_s": 0.2}``).
    """
    from robix_planner.config import convert
    from sim.nodes import SimulationNode

    if planner not in PLANNERS:
        raise ValueError(f"planner {planner!r}; choose one of {PLANNERS}")
    params = convert(SimulationNode.Params, {
        "time_scale": time_scale, "oracle": planner == "oracle", "autostart": False, "exit_when_done": False,
        "transcript": False, **(sim_params or {})}, source="sim params")
    sim = SimulationNode(params, bus_config=bus_config, name="eval")
    records = []
    try:
        sim.start()
        sim.wait_ready(ready_timeout_s)
        with _progress_bar(len(scenarios), f"over the bus x{time_scale:g}") as bar:
            for s in scenarios:
                ep = sim.run_episode(s)
                records.append(record_of(s, ep.score, ep.truncated, ep.wall_s))
                bar.update(1)
    finally:
        sim.shutdown()
    return records


def summarize(records: list[EpisodeRecord]) -> dict[str, CategorySummary]:
    """Per category (in the scenarios' order), plus "all"."""
    groups: dict[str, list[EpisodeRecord]] = {}
    for r in records:
        groups.setdefault(r.category, []).append(r)
    if records:
        groups["all"] = list(records)
    out = {}
    for cat, rs in groups.items():
        n = len(rs)
        checks = {}
        for c in CHECKS:
            vals = [r.checks.get(c) for r in rs if r.checks.get(c) is not None]
            checks[c] = [sum(bool(v) for v in vals), len(vals)]
        out[cat] = CategorySummary(
            n=n, progress=sum(r.progress for r in rs) / n, success=sum(r.success for r in rs) / n, checks=checks,
            repeats=sum(r.repeats for r in rs) / n, decisions=sum(r.decisions for r in rs) / n,
            sim_time_s=sum(r.sim_time_s for r in rs) / n, truncated=sum(r.truncated for r in rs),
        )
    return out


def format_table(summary: dict[str, CategorySummary]) -> str:
    head = ("category", "n", "progress", "success", "interrupt honoured", "asked when ambiguous",
            "refused when invalid", "repeats", "decisions", "sim s")
    rows = [head]
    for cat, s in summary.items():
        def check(name):
            ok, n = s.checks[name]
            return f"{ok}/{n}" if n else "-"

        rows.append((cat, str(s.n), f"{100 * s.progress:.1f}%", f"{100 * s.success:.1f}%",
                     *(check(c) for c in CHECKS), f"{s.repeats:.2f}", f"{s.decisions:.1f}", f"{s.sim_time_s:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    rule = "  ".join("-" * w for w in widths)
    lines = []
    for i, r in enumerate(rows):
        if r[0] == "all":
            lines.append(rule)
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append(rule)
    return "\n".join(lines)


def _online(args: argparse.Namespace) -> int:
    from robix_planner.bus import BusConfig
    from robix_planner.config import ConfigError

    if args.planner == "external" and args.mode == "inprocess":
        raise ConfigError("--planner external talks to a planner on the bus; use --mode bus")
    if not args.time_scale > 0:
        raise ConfigError(f"--time-scale must be > 0, got {args.time_scale}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    try:
        scenarios = select(args.split, args.category, args.limit)
    except ValueError as exc:
        raise ConfigError(f"{exc}; categories: see docs/sim.md") from None
    if not scenarios:
        raise ConfigError(f"no stored scenarios for split {args.split!r} and categories {args.category}")
    t0 = time.monotonic()
    if args.mode == "inprocess":
        records = run_inprocess(scenarios)
    else:
        domain = args.domain
        if domain is None and args.planner == "oracle":
            import os
            import uuid

            domain = f"eval-{os.getpid()}-{uuid.uuid4().hex[:6]}"  # private: no other graph can interfere
        try:
            records = run_bus(scenarios, planner=args.planner, time_scale=args.time_scale,
                              bus_config=BusConfig(domain=domain), ready_timeout_s=args.ready_timeout_s)
        except TimeoutError as exc:
            print(f"robix eval online: {exc}", file=sys.stderr)
            return 1
    wall_s = time.monotonic() - t0
    summary = summarize(records)
    where = "in process" if args.mode == "inprocess" else f"over the bus, time scale {args.time_scale:g}"
    print(f"robix eval online: planner {args.planner}, split {args.split}, {len(records)} episodes {where}, "
          f"{wall_s:.1f} s wall")
    print(format_table(summary))
    truncated = sum(r.truncated for r in records)
    if truncated:
        print(f"{truncated} episode(s) hit the simulated time limit")
    if args.json:
        out = {
            "meta": {"planner": args.planner, "mode": args.mode, "split": args.split, "categories": args.category,
                     "limit": args.limit, "time_scale": args.time_scale if args.mode == "bus" else None,
                     "episodes": len(records), "wall_s": round(wall_s, 3)},
            "summary": summary,
            "episodes": records,
        }
        with open(args.json, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(out), indent=2) + b"\n")
        print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    """Add ``robix eval`` (entry point ``robix.commands``: ``eval = "sim.eval:register"``)."""
    p = sub.add_parser("eval", help="score a planner on the simulated scenarios", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])
    ev = p.add_subparsers(dest="eval_command", metavar="KIND")
    o = ev.add_parser("online", help="run scenarios closed-loop (world, user, planner) and print a table per category",
                      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_argument("--planner", choices=PLANNERS, default="oracle",
                   help="oracle: the privileged oracle node; external: a planner already on the bus (default oracle)")
    o.add_argument("--split", choices=("train", "validation", "test"), default="test")
    o.add_argument("--mode", choices=MODES, default="bus", help="bus: over ZeroMQ sockets; inprocess: sim.runner")
    o.add_argument("--category", action="append", metavar="C", help="only this category (repeatable)")
    o.add_argument("--limit", type=int, metavar="N", help="at most N scenarios per category")
    o.add_argument("--time-scale", type=float, default=20.0, metavar="X",
                   help="simulated seconds per wall second in bus mode (default 20)")
    o.add_argument("--domain", help="bus domain (default: private for --planner oracle, else $ROBIX_DOMAIN)")
    o.add_argument("--ready-timeout-s", type=float, default=30.0, metavar="S",
                   help="how long to wait for the planner to join the bus (default 30)")
    o.add_argument("--json", metavar="OUT.json", help="write the summary and every episode's record")
    o.set_defaults(func=_online)
