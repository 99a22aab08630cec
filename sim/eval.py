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
invalid), mean pointless repeats, commands the controller rejected (in all), decisions and
simulated seconds per episode. ``--json``
writes the table and every episode's record, for later comparison. Simulated time runs
``--time-scale`` times faster than the wall clock in bus mode.

``robix eval offline``: Robix's offline protocol, teacher-forced (see :func:`run_offline`)::

    robix eval offline model.backend=hf model.path=checkpoints/robix-tiny      # the test split
    robix eval offline --config launch/planner.yaml --category interrupted --limit 2 --json off.json
    robix eval offline --reference                                             # the oracle's own answers
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
    #: Commands the controller rejected, each "command: the controller's reason" (sim.scoring.Score.rejections).
    rejections: list[str] = []


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
    #: Commands the controller rejected, summed over the episodes.
    rejected: int = 0


def record_of(scenario, score, truncated: bool, wall_s: float) -> EpisodeRecord:
    return EpisodeRecord(
        id=scenario.id, category=scenario.category.value, variant=scenario.variant, progress=score.progress,
        success=score.success, checks=dict(score.checks), repeats=score.repeats, commands=score.commands,
        decisions=score.decisions, sim_time_s=round(score.sim_time_s, 3), truncated=truncated,
        failed=score.failed(), wall_s=round(wall_s, 3), rejections=list(score.rejections),
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
            rejected=sum(len(r.rejections) for r in rs),
        )
    return out


def format_table(summary: dict[str, CategorySummary]) -> str:
    head = ("category", "n", "progress", "success", "interrupt honoured", "asked when ambiguous",
            "refused when invalid", "repeats", "rejected", "decisions", "sim s")
    rows = [head]
    for cat, s in summary.items():
        def check(name):
            ok, n = s.checks[name]
            return f"{ok}/{n}" if n else "-"

        rows.append((cat, str(s.n), f"{100 * s.progress:.1f}%", f"{100 * s.success:.1f}%",
                     *(check(c) for c in CHECKS), f"{s.repeats:.2f}", str(s.rejected),
                     f"{s.decisions:.1f}", f"{s.sim_time_s:.1f}"))
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


# --------------------------------------------------------------------------- offline

#: Robix-32B-RL's published offline numbers (docs/training_data.md, ROBIX_FACTS), by the
#: category of ours each maps to: (the paper's column, value in %).
ROBIX_32B_RL = {"multi_stage": ("multi-stage", 96.6), "constrained": ("constrained", 96.0),
                "interrupted": ("interrupt", 92.5), "open_ended": ("open-ended", 93.3)}
ROBIX_32B_RL_F1 = {"refusal": ("invalid F1", 100.0), "replan": ("replan F1", 96.2)}
#: Our categories the paper scores by F1 rather than accuracy.
_F1_CATEGORIES = ("invalid", "failure_retry")
#: Stored in a StepScore's output (characters): enough to see what went wrong.
_MAX_OUTPUT_CHARS = 2000


class StepScore(msgspec.Struct, kw_only=True):
    """One teacher-forced step: what the model wrote and how it scored (JSON-ready).

    ``plan``: the model's plan normalised through the scene's grammar ("" = no command; None
    when the output did not parse or the plan is outside the grammar). ``refusal``: [gold,
    predicted]; ``replan``: [gold, predicted] on steps that follow a command that succeeded
    or failed, else None (see docs/training_data.md for the F1 definitions).
    """

    scenario_id: str
    category: str
    kind: str
    step: int
    acceptable: list[str]
    output: str
    plan: Optional[str] = None
    correct: bool = False
    parse_error: Optional[str] = None
    invalid_plan: Optional[str] = None
    backend_error: Optional[str] = None
    refusal: list[bool] = []
    replan: Optional[list[bool]] = None
    replan_ok: bool = False


class OfflineSummary(msgspec.Struct, kw_only=True):
    steps: int
    correct: int
    accuracy: float
    parse_failures: int
    parse_failure_rate: float
    invalid_plans: int
    backend_errors: int


class BinaryF1(msgspec.Struct, kw_only=True):
    tp: int
    fp: int
    fn: int
    #: None when there is nothing to score (no gold and no predicted positives).
    f1: Optional[float]


def score_output(text: str, *, acceptable: Sequence[str], kind: str, capabilities, step_input,
                 scenario_id: str = "", category: str = "", step: int = 0) -> StepScore:
    """Score one model output for a step (its acceptable plans, kind, grammar and input)."""
    from robix_planner import format as fmt
    from robix_planner import skills
    from sim.spec import is_question, is_refusal

    sc = StepScore(scenario_id=scenario_id, category=category, kind=kind, step=step, acceptable=list(acceptable),
                   output=text[:_MAX_OUTPUT_CHARS])
    out = None
    try:
        out = fmt.parse(text)
    except fmt.FormatError as exc:
        sc.parse_error = str(exc)
    parsed = None
    if out is not None:
        if out.plan is None:
            sc.plan = ""
        else:
            try:
                parsed = skills.parse(out.plan, capabilities)
                sc.plan = parsed.text
            except skills.GrammarError as exc:
                sc.invalid_plan = str(exc)
    sc.correct = sc.plan is not None and sc.plan in acceptable
    reply = (out.reply or "") if out is not None else ""
    sc.refusal = [kind == "refuse", sc.plan == "" and bool(reply) and is_refusal(reply)]
    motion = [o for o in step_input.outcomes if o.command != "stop"]
    if motion and motion[-1].state in ("succeeded", "failed"):
        try:
            obj = skills.parse(motion[-1].command, capabilities).args.get("object")
        except skills.GrammarError:
            obj = None
        again = (parsed is not None and parsed.skill in (skills.PUT_INTO.name, skills.PICK_UP.name)
                 and parsed.args.get("object") == obj)
        asks = sc.plan == "" and bool(obj) and is_question(reply) and obj in reply
        sc.replan = [motion[-1].state == "failed", bool(obj) and (again or asks)]
        sc.replan_ok = sc.replan[1] and sc.correct
    return sc


def _f1(tp: int, fp: int, fn: int) -> BinaryF1:
    return BinaryF1(tp=tp, fp=fp, fn=fn, f1=None if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))


def summarize_offline(scores: list[StepScore]) -> dict:
    """Per category (and "all"), per kind, and the refusal and replan F1 (see docs/training_data.md)."""
    def summary(group: list[StepScore]) -> OfflineSummary:
        n = len(group)
        parse = sum(s.parse_error is not None for s in group)
        correct = sum(s.correct for s in group)
        return OfflineSummary(steps=n, correct=correct, accuracy=correct / n if n else 0.0, parse_failures=parse,
                              parse_failure_rate=parse / n if n else 0.0,
                              invalid_plans=sum(s.invalid_plan is not None for s in group),
                              backend_errors=sum(s.backend_error is not None for s in group))

    cats: dict[str, list[StepScore]] = {}
    kinds: dict[str, list[StepScore]] = {}
    for s in scores:
        cats.setdefault(s.category, []).append(s)
        kinds.setdefault(s.kind, []).append(s)
    if scores:
        cats["all"] = list(scores)
    ref = [s.refusal for s in scores]
    rep = [(s.replan, s.replan_ok) for s in scores if s.replan is not None]
    return {
        "categories": {c: summary(g) for c, g in cats.items()},
        "kinds": {k: summary(g) for k, g in kinds.items()},
        "refusal": _f1(sum(g and p for g, p in ref), sum(p and not g for g, p in ref),
                       sum(g and not p for g, p in ref)),
        "replan": _f1(sum(r[0] and ok for r, ok in rep), sum(r[1] and not r[0] for r, _ in rep),
                      sum(r[0] and not ok for r, ok in rep)),
    }


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_offline(summary: dict) -> str:
    """The offline table per category beside Robix-32B-RL, the F1 lines and the per-kind accuracy."""
    head = ("category", "steps", "accuracy %", "parse fail %", "invalid plan", "Robix-32B-RL %")
    rows = [head]
    for cat, s in summary["categories"].items():
        paper = ROBIX_32B_RL.get(cat)
        rows.append((cat, str(s.steps), _pct(s.accuracy), _pct(s.parse_failure_rate), str(s.invalid_plans),
                     f"{paper[1]:.1f} ({paper[0]})" if paper else "-"))
    for key, label in (("refusal", "invalid-instruction refusal F1"), ("replan", "failure replan F1")):
        f = summary[key]
        paper = ROBIX_32B_RL_F1[key]
        rows.append((label, f"{f.tp}/{f.fp}/{f.fn}", _pct(f.f1), "", "", f"{paper[1]:.1f} ({paper[0]})"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    rule = "  ".join("-" * w for w in widths)
    lines = []
    for i, r in enumerate(rows):
        if r[0] in ("all", "invalid-instruction refusal F1"):
            lines.append(rule)
        lines.append("  ".join(c.ljust(w) if j in (0, 5) else c.rjust(w)
                               for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            lines.append(rule)
    others = [c for c in summary["categories"] if c not in ROBIX_32B_RL and c not in ("all", *_F1_CATEGORIES)]
    lines.append("F1 rows: the steps column is TP/FP/FN. The paper scores invalid and failure_retry by these F1; "
                 f"no counterpart in its table: {', '.join(others) or '-'}.")
    kinds = "  ".join(f"{k} {_pct(s.accuracy)}% ({s.steps})" for k, s in summary["kinds"].items())
    lines.append(f"accuracy per step kind: {kinds}")
    return "\n".join(lines)


def offline_steps(split: str = "test", categories: Optional[Sequence[str]] = None, limit: Optional[int] = None,
                  data: Optional[str] = None, seed: int = 0, progress: bool = True):
    """The steps to score: per-step rows of the model's steps (``training.data.episodes``).

    Synthesised from ``split`` (the oracle's episodes: the same as ``robix data sft``), or read
    from ``data`` (a directory written by ``robix data sft`` or ``robix data rl``); ``categories``
    and ``limit`` (episodes per category) select.
    """
    from training.data.episodes import build_sft, explode_steps

    if data is None:
        sft = build_sft(split, seed, categories=categories, limit=limit, progress=progress)
        return explode_steps(sft, model_steps_only=True, progress=progress)
    from datasets import load_from_disk

    ds = load_from_disk(data)
    keep_ids: dict[str, list[str]] = {}
    for sid, cat in zip(ds["scenario_id"], ds["category"]):
        ids = keep_ids.setdefault(cat, [])
        if sid not in ids and (not categories or cat in categories) and (limit is None or len(ids) < limit):
            ids.append(sid)
    wanted = {i for ids in keep_ids.values() for i in ids}
    ds = ds.filter(lambda sid: sid in wanted, input_columns="scenario_id")
    if "messages" in ds.column_names:
        return explode_steps(ds, model_steps_only=True, progress=progress)
    return ds.filter(lambda k: k != "stop_phrase", input_columns="kind")


def run_offline(steps, backend, progress: bool = True) -> list[StepScore]:
    """Teacher-forced offline evaluation (Robix's protocol) of ``backend`` on per-step rows.

    For each step the prompt is the recorded history up to that step, exactly the run-time
    prompt (:func:`training.data.episodes.to_prompt` of the row); the backend's whole output
    is parsed with :func:`robix_planner.format.parse`; the step counts if its plan,
    normalised in the scene's grammar, is in the step's ``acceptable`` list.
    """
    import threading

    from tqdm import tqdm

    from robix_planner import format as fmt
    from robix_planner import skills
    from robix_planner.backends.base import BackendError, stream
    from training.data.episodes import capabilities_of, to_prompt

    scores = []
    for row in tqdm(steps, desc="offline steps", unit="step", file=sys.stderr, disable=None if progress else True,
                    leave=False):
        if row["kind"] == "stop_phrase":
            continue
        prompt = to_prompt(row["prompt"], row["images"])
        caps = capabilities_of(row)
        error = None
        try:  # plans decoded as the planner has them decoded (model.constrain_plans)
            text = "".join(stream(backend, prompt, cancel=threading.Event(), plan_choices=skills.commands(caps)))
        except BackendError as exc:
            text, error = "", str(exc) or type(exc).__name__
        sc = score_output(text, acceptable=row["acceptable"], kind=row["kind"], capabilities=caps,
                          step_input=fmt.last_user_turn(prompt), scenario_id=row["scenario_id"],
                          category=row["category"], step=row["step"])
        sc.backend_error = error
        scores.append(sc)
    return scores


def _offline(args: argparse.Namespace) -> int:
    from robix_planner.backends import load_backend
    from robix_planner.config import ConfigError
    from robix_planner.planner import load_config

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    try:
        steps = offline_steps(args.split, args.category, args.limit, args.data, args.seed)
    except ValueError as exc:
        raise ConfigError(f"{exc}; categories: see docs/sim.md") from None
    except FileNotFoundError as exc:
        raise ConfigError(f"--data {args.data}: {exc}") from None
    if len(steps) == 0:
        raise ConfigError(f"no steps to score for split {args.split!r} and categories {args.category}")
    if args.reference:
        if args.overrides or args.config:
            raise ConfigError("--reference answers with the recorded outputs; leave out --config and overrides")
        from robix_planner.backends.base import ModelConfig

        outputs = tuple(r["completion"][0]["content"][0]["text"] for r in steps if r["kind"] != "stop_phrase")
        model = ModelConfig(backend="scripted", outputs=outputs)
        what = "the reference (the oracle's recorded answers)"
    else:
        model = load_config(args.config, args.overrides)[0].model
        what = f"backend {model.backend}" + (f" ({model.path})" if model.path else "")
    backend = load_backend(model)
    t0 = time.monotonic()
    try:
        scores = run_offline(steps, backend)
    finally:
        backend.close()
    wall_s = time.monotonic() - t0
    summary = summarize_offline(scores)
    episodes = len({s.scenario_id for s in scores})
    print(f"robix eval offline: {what}, split {args.split}, {episodes} episodes, {len(scores)} steps "
          f"teacher-forced, {wall_s:.1f} s")
    print(format_offline(summary))
    if args.json:
        out = {"meta": {"model": msgspec.to_builtins(model) if not args.reference else "reference",
                        "split": args.split, "data": args.data, "categories": args.category, "limit": args.limit,
                        "seed": args.seed, "episodes": episodes, "steps": len(scores), "wall_s": round(wall_s, 3),
                        "robix_32b_rl": {**{k: list(v) for k, v in ROBIX_32B_RL.items()},
                                         **{k: list(v) for k, v in ROBIX_32B_RL_F1.items()}}},
               "summary": summary, "steps": scores}
        with open(args.json, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(out), indent=2) + b"\n")
        print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    """Add ``robix eval online|offline`` (entry point ``robix.commands``: ``eval = "sim.eval:register"``)."""
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
    f = ev.add_parser("offline", help="teacher-forced steps of the test split through a model backend (Robix's "
                      "offline protocol): accuracy per category, refusal and replan F1, parse failures",
                      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="model config overrides, as for robix plan: model.backend=hf model.path=DIR")
    f.add_argument("--config", help="planner YAML (its model section is used), as for robix plan")
    f.add_argument("--reference", action="store_true",
                   help="answer with the oracle's recorded outputs (a check of the pipeline: scores 100%%)")
    f.add_argument("--split", choices=("train", "validation", "test"), default="test")
    f.add_argument("--data", metavar="DIR", help="score a dataset written by robix data sft|rl instead of synthesising")
    f.add_argument("--category", action="append", metavar="C", help="only this category (repeatable)")
    f.add_argument("--limit", type=int, metavar="N", help="at most N episodes per category")
    f.add_argument("--seed", type=int, default=0, help="paraphrase seed of the synthesised history (default 0)")
    f.add_argument("--json", metavar="OUT.json", help="write the summary and every step's score")
    f.set_defaults(func=_offline)
