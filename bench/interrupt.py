"""Interruption benchmark: utterance -> halt, utterance -> generation stopped, decision latency vs history.

    python bench/interrupt.py            # about 3 minutes on 2 cores
    python bench/interrupt.py --quick    # a smoke run (about 20 s)

Three tables, each with its baseline measured in the same run.

**1. Utterance -> halt.** Three processes (multiprocessing, spawn; one thread per numeric
library) on one bus over loopback TCP: the *user* (this process: publishes ``/user/utterance``
and ``/robix/session``, listens to ``/controller/status`` and ``/planner/step``), a fake
*controller* (a real :class:`~robix_planner.controller.CommandServer`, blocking style; the
command ``put the red cup into the bus tub`` approaches and grasps for 20 ms each, then
carries for up to a minute, until a ``stop`` arrives; a 160x120 head camera at 10 Hz) and
the *planner* (the real :class:`~robix_planner.planner.PlannerNode`; a fresh process per
scenario). A trial: the user asks for the cup; once the arm carries it (and, depending on the
scenario, once the model is idle or generating), the user speaks after a random 0-40 ms
jitter; the latency runs from just before the utterance is published to the moment the
controller's command callback receives the ``stop`` (both stamped with CLOCK_MONOTONIC, which
all processes share). Utterances alternate between a change of mind ("Actually, leave the red
cup on the table.", which goes to the model after the halt) and a stop phrase ("Wait, stop!",
no model call). Scenarios: the model idle; the model generating (a ScriptedBackend streaming a
long thought with ``--chunk-delay-ms`` between tokens; and the tiny Qwen2.5-VL of table 3
through the real ``hf`` backend, thinking for up to 256 tokens). The model is a stand-in that
answers the user's request and change of mind at once (scripted, as a trained model would),
and is *busy* on every other decision (the planner's periodic check every 50 ms while the
robot acts); the hf model's random text is shown to the planner as a thought (inside
``<|think_start|>`` with ``<`` escaped) so that the planner lets it run, as it would a trained
model's. Baseline, ``bus floor``: a relay node in the planner's place that turns each utterance
into a ``stop`` at once (the same two hops, no planner). The memory is reset
(``SessionStart``) every 10 trials, so the history stays at a realistic 0-20 steps; the
planner's ``memory.max_images`` is ``--max-images`` (default 64, as robix-tiny runs).

**2. Utterance -> generation stopped.** In the scenarios where the model generates, the time from
the utterance to the moment the backend's ``generate()`` stream has ended (the planner cancels
the generation; the stream is closed), against one decoding step of that backend measured in
the same run (scripted: its chunk delay; hf: decode ms / token of the same generations, as the
planner drives them). hf trials wait at random for the first decoded token or only for the
generation to start, so some utterances land before the first token (preprocessing and
prefill): those are reported on their own. Each latency is also split in two: the utterance
until the planner sets the generation's cancel event (the delivery over the bus and the
planner's own handling; ``threading.Event.set`` is stamped in the planner process for this),
and from there until the stream has ended (the backend's reaction).

**3. Decision latency vs history.** One process, the ``hf`` backend on a tiny Qwen2.5-VL built
from config (``tests/helpers_tiny_vlm.py``; by default robix-tiny's width: 256 wide, 4 layers,
4 attention heads and 2 key/value heads, with a BPE tokenizer trained on the planner's own text
so that it needs ~3.7 characters per token like a real one, and 54 image tokens per 160x120
frame; ``--test-model`` uses the tests' 64-wide model, tokenizer and images of at most 9 tokens
unchanged; ``--model`` measures a checkpoint instead, e.g. ``--model robix-tiny``, the shipped
model, in tables 1-3). The table states the model's size. A bench episode (clearing a 15-object table:
each step a new 160x120 frame, the last command's outcome, a ~60-token thought, one command) is
fed through the real :class:`~robix_planner.memory.Memory` with ``max_images`` =
``--max-images`` (default 64: no image is ever dropped, the prompt only grows, as with
robix-tiny) and :func:`robix_planner.format.build_prompt`. The decision at history length h (h
past steps in the memory) is timed as ``Memory.prompt`` + ``generate()`` decoding
``--new-tokens`` tokens (end-of-sequence ignored so every step decodes the same number), with
``prefix_cache`` true (right after the decision at h-1 on the same backend, as in a session)
and false; the median of ``--repeats`` interleaved rounds. Every attention call of the model is
timed too (the hf backend's CPU attention function is wrapped), to show what grows with the
context.
"""

from __future__ import annotations

import os

# One thread per library in this process and (inherited) in the spawned children, set before
# numpy / torch are imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

from robix_planner import format as fmt  # noqa: E402
from robix_planner import skills, topics  # noqa: E402
from robix_planner.backends.base import Backend, ModelConfig  # noqa: E402
from robix_planner.messages import Capabilities  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = "bench"
WAIT_S = 15.0

TASK = "Please put the red cup into the bus tub."
PUT_CUP = "put the red cup into the bus tub"
CHANGE = "Actually, leave the red cup on the table."
STOP_PHRASE = "Wait, stop!"
LEAVE_REPLY = "Okay, I'll leave it on the table."
TARGET_HALT_MS = 20.0
SESSION_EVERY = 10
CHECK_PERIOD_S = 0.05
HF_THINK_TOKENS = 256
CAMERA_HZ = 10.0

# The bench episode of table 3: a 15-object table, dishes into the bus tub, trash into the bin.
OBJECTS = ["red cup", "blue plate", "fork", "knife", "spoon", "napkin", "banana peel", "soda can", "paper cup",
           "bowl", "glass", "chopsticks", "tea bag", "sauce bottle", "bread basket"]
TRASH = {"napkin", "banana peel", "soda can", "paper cup", "tea bag"}
RECEPTACLES = ["bus tub", "trash bin"]
#: Camera frames of table 3 are resized to at most this many pixels (54 image tokens for 160x120).
IMAGE_MAX_PIXELS = 128 * 128


def capabilities() -> Capabilities:
    return Capabilities(robot="bench", skills=list(skills.TABLETOP_SKILLS), objects=list(OBJECTS),
                        receptacles=list(RECEPTACLES))


def _now() -> int:
    return time.monotonic_ns()


def _ms(ns: float) -> float:
    return ns / 1e6


# --------------------------------------------------------------------------- the controller process


def _controller_proc(conn, graph_dir: str) -> None:
    """A fake arm behind a real CommandServer that stamps each command as its callback receives it."""
    import numpy as np

    from robix_planner.bus import BusConfig
    from robix_planner.controller import CommandServer
    from robix_planner.messages import Image
    from robix_planner.node import Node

    class StampingServer(CommandServer):
        def __init__(self, *args, **kw):
            self.arrivals: list[tuple[int, str, str]] = []  # (monotonic ns, skill, id)
            super().__init__(*args, **kw)

        def _on_message(self, cmd) -> None:  # the subscription's callback: stamp first, then handle
            self.arrivals.append((_now(), cmd.skill, cmd.id))
            super()._on_message(cmd)

    contexts = []

    def execute(cmd, ctx) -> None:
        contexts.append(ctx)
        obj = cmd.args.get("object")
        for phase, duration_s in (("approach", 0.02), ("grasp", 0.02), ("carry", 60.0), ("release", 0.02)):
            ctx.running(phase)
            if ctx.cancelled.wait(duration_s):
                return
            if phase == "grasp":
                ctx.holding = obj
            elif phase == "release":
                ctx.holding = None

    node = Node("controller", bus_config=BusConfig(graph_dir=graph_dir, domain=DOMAIN))
    server = StampingServer(node, capabilities(), execute=execute)
    camera = node.create_publisher(topics.CAMERA_HEAD, Image)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(8)]
    tick = iter(range(1 << 62))
    node.create_timer(1.0 / CAMERA_HZ, lambda: camera.publish(Image.from_array("head", frames[next(tick) % 8])))
    node.start()
    conn.send("ready")
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg[0] == "arrivals":
                conn.send(list(server.arrivals))
            elif msg[0] == "close":
                break
    finally:
        for ctx in contexts:
            ctx.cancelled.set()
        time.sleep(0.05)  # let the command threads report
        node.shutdown()


# --------------------------------------------------------------------------- the model stand-in


LONG_THOUGHT = fmt.THINK_START + " ".join(
    ["The arm carries the red cup towards the bus tub and nothing else on the table has changed;"
     " the user has not said anything new, so I let the command run and keep watching the views."] * 8
) + fmt.THINK_END


class BenchModel(Backend):
    """The model behind the planner in table 1: answers the request and the change of mind at once,
    and is busy (or idle) on every other decision, recording when each generation ran."""

    def __init__(self, busy: str, *, chunk_delay_s: float = 0.03, model_path: Optional[str] = None,
                 prefill_chunk: Optional[int] = None, kv_cache_dtype: str = "model"):
        super().__init__(ModelConfig())
        from robix_planner.backends.scripted import ScriptedBackend

        self.busy_kind = busy
        self.fast = ScriptedBackend(ModelConfig(), respond=self._answer)
        self.slow = self.hf = None
        if busy == "scripted":
            self.slow = ScriptedBackend(ModelConfig(chunk_delay_s=chunk_delay_s), respond=lambda prompt: LONG_THOUGHT)
        elif busy == "hf":
            from robix_planner.backends import load_backend

            chunk = {"prefill_chunk_tokens": prefill_chunk} if prefill_chunk else {}
            self.hf = load_backend(ModelConfig(backend="hf", path=model_path, max_new_tokens=HF_THINK_TOKENS,
                                               kv_cache_dtype=kv_cache_dtype, **chunk))
            _decode_to_length(self.hf)
        self.records: list[dict] = []
        self._cv = threading.Condition()

    @staticmethod
    def _route(prompt) -> str:
        said = fmt.last_user_turn(prompt).utterances
        if any(u == TASK for u in said):
            return "task"
        return "reply" if said else "other"

    @staticmethod
    def _answer(prompt) -> str:
        route = BenchModel._route(prompt)
        if route == "task":
            out = fmt.ModelOutput("The red cup is on the table; the user wants it in the bus tub.", PUT_CUP, "Sure.")
        elif route == "reply":
            out = fmt.ModelOutput("The user changed their mind: I stopped and leave the cup.", None, LEAVE_REPLY)
        else:
            out = fmt.ModelOutput("Nothing new: I wait.")
        return fmt.serialize(out)

    def _think(self, prompt, cancel):
        """The hf model's tokens as a thought (random text must not end the generation early)."""
        stream = self.hf.generate(prompt, cancel=cancel)
        first = True
        try:
            for delta in stream:
                if first:
                    first = False
                    yield fmt.THINK_START
                yield delta.replace("<", "(")
            if not cancel.is_set():
                yield (fmt.THINK_START + "(nothing)" if first else "") + fmt.THINK_END
        finally:
            stream.close()

    def generate(self, prompt, *, cancel):
        route = self._route(prompt)
        busy = route == "other" and self.busy_kind != "idle"
        inner = self.fast if not busy else (self.slow or self.hf)
        rec = {"busy": busy, "start": _now(), "first": None, "end": None, "yields": 0}
        with self._cv:
            self.records.append(rec)
            self._cv.notify_all()
        stream = self._think(prompt, cancel) if busy and self.hf is not None else inner.generate(prompt, cancel=cancel)
        try:
            for delta in stream:
                if rec["first"] is None:
                    rec["first"] = _now()
                rec["yields"] += 1
                if rec["yields"] <= 2:
                    with self._cv:
                        self._cv.notify_all()
                yield delta
        finally:
            stream.close()
            rec["end"] = _now()
            stats = inner.last_stats
            self.last_stats = stats
            rec.update(cancelled=cancel.is_set(), cancel_set=getattr(cancel, "_bench_set_ns", None),
                       new_tokens=stats.new_tokens, decode_ms=stats.decode_ms,
                       prefill_ms=stats.prefill_ms, stop=stats.extra.get("stop"))
            with self._cv:
                self._cv.notify_all()

    def wait_busy(self, after_ns: int, decoding: bool, timeout_s: float) -> bool:
        """Block until a busy generation that started after ``after_ns`` runs (and has decoded a token)."""
        def running() -> bool:
            return any(r["busy"] and r["start"] >= after_ns and r["end"] is None
                       and (not decoding or r["first"] is not None) for r in self.records[-4:])

        with self._cv:
            return self._cv.wait_for(running, timeout_s)

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no generation runs (after a stop phrase the planner starts none)."""
        with self._cv:
            return self._cv.wait_for(lambda: all(r["end"] is not None for r in self.records[-4:]), timeout_s)

    def close(self) -> None:
        if self.hf is not None:
            self.hf.close()


def _decode_to_length(hf_backend) -> None:
    """Make an hf backend ignore end-of-sequence tokens: every generation decodes max_new_tokens."""
    if not isinstance(getattr(hf_backend, "_stop_ids", None), set):
        raise RuntimeError("the hf backend no longer keeps its stop tokens in _stop_ids; update bench/interrupt.py")
    hf_backend._stop_ids = set()


# --------------------------------------------------------------------------- the planner process


def _planner_proc(conn, graph_dir: str, scenario: dict) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(processName)s %(name)s: %(message)s")
    from robix_planner.bus import BusConfig
    from robix_planner.messages import Command, Utterance
    from robix_planner.node import Node, new_id

    bus_config = BusConfig(graph_dir=graph_dir, domain=DOMAIN)
    _stamp_event_set()
    if scenario.get("switch_interval_ms"):
        sys.setswitchinterval(scenario["switch_interval_ms"] / 1000.0)
    backend = None
    if scenario["busy"] == "relay":
        node = Node("relay", bus_config=bus_config)
        pub = node.create_publisher(topics.COMMAND, Command)
        node.create_subscription(topics.UTTERANCE, Utterance,
                                 lambda u: pub.publish(Command(id=new_id(), text="stop", skill="stop")))
    else:
        if scenario["busy"] == "hf":
            import torch

            torch.set_num_threads(1)
            _quiet_transformers()
        from robix_planner.memory import MemoryConfig
        from robix_planner.planner import PlannerConfig, PlannerNode, PlannerSettings

        backend = BenchModel(scenario["busy"], chunk_delay_s=scenario["chunk_delay_s"],
                             model_path=scenario.get("model_path"), prefill_chunk=scenario.get("prefill_chunk"),
                             kv_cache_dtype=scenario.get("kv_cache_dtype", "model"))
        check = CHECK_PERIOD_S if scenario["busy"] != "idle" else 0.0
        params = PlannerConfig(memory=MemoryConfig(max_images=scenario["max_images"]),
                               planner=PlannerSettings(start_delay_s=0.05, check_period_s=check))
        node = PlannerNode(params, backend=backend, bus_config=bus_config)
    node.start()
    conn.send("ready")
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg[0] == "wait_busy":
                conn.send(backend.wait_busy(*msg[1:]))
            elif msg[0] == "wait_idle":
                conn.send(backend.wait_idle(*msg[1:]))
            elif msg[0] == "records":
                conn.send([dict(r) for r in backend.records] if backend is not None else [])
            elif msg[0] == "close":
                break
    finally:
        node.shutdown()


def _stamp_event_set() -> None:
    """Stamp (monotonic ns) the first ``set()`` of every ``threading.Event`` in this process.

    Instrumentation for table 2 only: it tells when the planner set a generation's cancel event,
    which splits "utterance -> generation stopped" into the delivery to the planner and the
    backend's reaction.
    """
    original = threading.Event.set

    def set_and_stamp(self):
        if getattr(self, "_bench_set_ns", None) is None:
            self._bench_set_ns = _now()
        original(self)

    threading.Event.set = set_and_stamp


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# --------------------------------------------------------------------------- the user (this process)


class Inbox:
    """Messages with their arrival time (monotonic ns) and bounded waits."""

    def __init__(self):
        self.items: list[tuple[int, object]] = []
        self._cv = threading.Condition()

    def put(self, msg) -> None:
        with self._cv:
            self.items.append((_now(), msg))
            self._cv.notify_all()

    def clear(self) -> None:
        with self._cv:
            self.items.clear()

    def wait_for(self, pred: Callable, *, after_ns: int, what: str, timeout_s: float = WAIT_S):
        def match():
            return next((m for t, m in self.items if t >= after_ns and pred(m)), None)

        with self._cv:
            found = self._cv.wait_for(match, timeout_s)
        if found is None:
            raise TimeoutError(f"no {what} within {timeout_s:g} s")
        return found


class User:
    def __init__(self, graph_dir: str):
        from robix_planner.bus import BusConfig
        from robix_planner.messages import CommandStatus, PlannerStep, SessionStart, Utterance
        from robix_planner.node import Node, NodeConfig

        self._utterance, self._session_start = Utterance, SessionStart
        self.node = Node("user", bus_config=BusConfig(graph_dir=graph_dir, domain=DOMAIN),
                         node_config=NodeConfig(heartbeat_period_s=0))
        self.utterances = self.sessions = None
        self.statuses, self.steps = Inbox(), Inbox()
        self.node.create_subscription(topics.STATUS, CommandStatus, self.statuses.put)
        self.node.create_subscription(topics.PLANNER_STEP, PlannerStep, self.steps.put)
        self.node.start()

    def connect(self, planner_subscribes_sessions: bool) -> None:
        """Fresh publishers (a closed process may still count as a subscriber of old ones); wait for the new one."""
        for pub in (self.utterances, self.sessions):
            if pub is not None:
                pub.close()
        self.utterances = self.node.create_publisher(topics.UTTERANCE, self._utterance)
        self.sessions = self.node.create_publisher(topics.SESSION, self._session_start)
        pubs = [self.utterances] + ([self.sessions] if planner_subscribes_sessions else [])
        for pub in pubs:
            if not pub.wait_for_subscribers(1, timeout_s=WAIT_S):
                raise TimeoutError(f"the planner never subscribed to {pub.topic}")

    def say(self, text: str) -> int:
        t = _now()
        self.utterances.publish(self._utterance(text=text))
        return t

    def new_session(self, name: str) -> int:
        t = _now()
        self.sessions.publish(self._session_start(session=name))
        return t


def _spawn(target, *args) -> tuple[mp.Process, object]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    return proc, parent


def _expect(conn, timeout_s: float, what: str):
    if not conn.poll(timeout_s):
        raise TimeoutError(f"{what}: no answer within {timeout_s:g} s")
    return conn.recv()


def _stop(proc: mp.Process, conn) -> None:
    try:
        conn.send(("close",))
    except (BrokenPipeError, OSError):
        pass
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _trial(user: User, conn, scenario: dict, path: str, rng: random.Random) -> dict:
    from robix_planner.messages import CommandState

    busy = scenario["busy"]
    user.statuses.clear()
    user.steps.clear()
    t1 = user.say(TASK)
    st = user.statuses.wait_for(lambda s: s.state is CommandState.RUNNING and s.detail == "carry", after_ns=t1,
                                what="the arm carrying the cup")
    decoding = True
    if busy == "idle":
        user.steps.wait_for(lambda s: s.plan == PUT_CUP, after_ns=t1, what="the decision to put the cup away")
    else:
        decoding = busy != "hf" or rng.random() < 0.7
        conn.send(("wait_busy", t1, decoding, WAIT_S))
        if not _expect(conn, WAIT_S + 5, "wait_busy"):
            raise TimeoutError("the model never started generating while the arm carried the cup")
    time.sleep(rng.uniform(0.0, 0.04))
    t0 = user.say(CHANGE if path == "utterance" else STOP_PHRASE)
    user.statuses.wait_for(lambda s: s.command_id == st.command_id and s.state.terminal, after_ns=t0,
                           what="the end of the halted command")
    if path == "utterance":
        step = user.steps.wait_for(lambda s: s.reply == LEAVE_REPLY, after_ns=t0, what="the decision after the halt")
    else:
        step = user.steps.wait_for(lambda s: s.trigger == "stop_phrase", after_ns=t0, what="the stop-phrase step")
        # The planner records the stop phrase when the cancelled generation has ended, and then drops every
        # utterance pending at that moment (a planner bug): let it end before the next request.
        conn.send(("wait_idle", WAIT_S))
        if not _expect(conn, WAIT_S + 5, "wait_idle"):
            raise TimeoutError("the cancelled generation never ended")
        time.sleep(0.01)  # the planner's executor records the stop phrase just after the stream ended
    return {"path": path, "t0": t0, "planner_halt_ms": step.timings_ms.get("halt")}


def run_scenario(user: User, controller_conn, graph_dir: str, scenario: dict, trials: int, seed: int) -> dict:
    """Run one scenario's trials; return per-trial halt latencies and (busy scenarios) generation stops."""
    rng = random.Random(seed)
    proc, conn = _spawn(_planner_proc, graph_dir, scenario)
    results: list[dict] = []
    records: list[dict] = []
    try:
        if _expect(conn, 90, f"planner process ({scenario['name']})") != "ready":
            raise RuntimeError("planner process failed to start")
        user.connect(planner_subscribes_sessions=scenario["busy"] != "relay")
        t_start = _now()
        if scenario["busy"] == "relay":
            for i in range(trials + 3):
                time.sleep(rng.uniform(0.01, 0.03))
                results.append({"path": "relay", "t0": user.say(CHANGE), "planner_halt_ms": None, "warm": i < 3})
            time.sleep(0.2)
        else:
            if scenario["busy"] == "idle":
                user.steps.wait_for(lambda s: s.trigger == "start", after_ns=0, what="the start decision",
                                    timeout_s=WAIT_S)
            paths = ["utterance", "stop"] * (trials + 1)  # the first pair is a warm-up
            for i, path in enumerate(paths):
                if i and i % SESSION_EVERY == 0:
                    t = user.new_session(f"bench-{i}")
                    if scenario["busy"] == "idle":
                        user.steps.wait_for(lambda s: s.trigger == "start", after_ns=t, what="the start decision")
                    else:
                        time.sleep(0.1)
                row = _trial(user, conn, scenario, path, rng)
                row["warm"] = i < 2
                results.append(row)
            conn.send(("records",))
            records = _expect(conn, WAIT_S, "generation records")
        elapsed_s = (_now() - t_start) / 1e9
    finally:
        _stop(proc, conn)
    controller_conn.send(("arrivals",))
    stops = sorted(t for t, skill, _ in _expect(controller_conn, WAIT_S, "controller arrivals") if skill == "stop")
    rows = [r for r in results if not r["warm"]]
    for i, r in enumerate(rows):
        limit = rows[i + 1]["t0"] if i + 1 < len(rows) else r["t0"] + int(5e9)
        t_stop = next((t for t in stops if r["t0"] <= t < limit), None)
        r["halt_ms"] = _ms(t_stop - r["t0"]) if t_stop is not None else None
        gen = next((g for g in records if g["busy"] and g["end"] is not None and g["start"] <= r["t0"] <= g["end"]),
                   None)
        if gen is not None:
            r["gen_stop_ms"] = _ms(gen["end"] - r["t0"])
            r["phase"] = "decode" if gen["first"] is not None and gen["first"] <= r["t0"] else "prefill"
            r["gen_cancelled"] = gen["cancelled"]
            if gen.get("cancel_set") is not None and gen["cancel_set"] >= r["t0"]:
                r["set_ms"] = _ms(gen["cancel_set"] - r["t0"])  # utterance -> the planner set cancel
                r["react_ms"] = _ms(gen["end"] - gen["cancel_set"])  # cancel set -> the stream ended
            if scenario["busy"] == "scripted":
                r["own_step_ms"] = scenario["chunk_delay_s"] * 1e3
            elif gen.get("new_tokens", 0) >= 3:
                r["own_step_ms"] = gen["decode_ms"] / gen["new_tokens"]
    # One decoding step: the scripted model's chunk delay; the hf model's decode ms / token over the generations
    # of this run that decoded at least 8 tokens (those that ran while the robot was idle between trials), or,
    # when none did (a larger model is cancelled sooner), at least 3.
    steps = [g["decode_ms"] / g["new_tokens"] for g in records if g["busy"] and g.get("new_tokens", 0) >= 8] or \
        [g["decode_ms"] / g["new_tokens"] for g in records if g["busy"] and g.get("new_tokens", 0) >= 3]
    if scenario["busy"] == "scripted":
        steps = [scenario["chunk_delay_s"] * 1e3]
    prefills = [g["prefill_ms"] for g in records if g["busy"] and g.get("new_tokens", 0) >= 1]
    return {"rows": rows, "decode_step_ms": statistics.median(steps) if steps else float("nan"),
            "prefill_ms": statistics.median(prefills) if prefills else float("nan"), "elapsed_s": elapsed_s}


# --------------------------------------------------------------------------- table 3: decisions vs history


def episode(n: int):
    """``n`` steps of clearing the table: (StepInput, ModelOutput) pairs, a new 160x120 frame each step."""
    import numpy as np

    from robix_planner.backends.base import ImagePart

    steps = []
    for i in range(n):
        obj, prev = OBJECTS[i % len(OBJECTS)], OBJECTS[(i - 1) % len(OBJECTS)]
        where = "trash bin" if obj in TRASH else "bus tub"
        prev_where = "trash bin" if prev in TRASH else "bus tub"
        frame = np.random.default_rng(1000 + i).integers(0, 256, (120, 160, 3), dtype=np.uint8)
        step = fmt.StepInput(
            utterances=("Please clear the table: dishes into the bus tub, trash into the trash bin. Leave the "
                        "glass, I'm still drinking.",) if i == 0 else (),
            outcomes=(fmt.Outcome(f"put the {prev} into the {prev_where}", "succeeded"),) if i else (),
            holding=fmt.EMPTY, images=(ImagePart(frame),))
        seen = (f"The {prev} is in the {prev_where} now and the gripper is empty, so the last command succeeded. "
                if i else "The user wants the table cleared, except the glass. ")
        kind = "trash" if where == "trash bin" else "a dish"
        thought = (f"{seen}The {obj} is still on the table near the edge; it is {kind}, so it goes into the {where}. "
                   "The user asked me to leave the glass where it is.")
        if obj == "glass":
            out = fmt.ModelOutput(seen + "The glass stays: the user is still drinking. I skip it.", None, None)
        else:
            reply = "Sure, I'll clear the table and leave your glass." if i == 0 else None
            out = fmt.ModelOutput(thought, f"put the {obj} into the {where}", reply)
        steps.append((step, out))
    return steps


def planner_tokenizer():
    """A byte-level BPE trained on the planner's own text, with the test tokenizer's special tokens.

    The tests' tokenizer (300 tokens, trained on 7 sentences) needs ~1.5 characters per token of
    the planner's prompt, which inflates the context 2.6x over a real model's; this one needs
    ~3.7 (Qwen2.5's tokenizer: ~4 on English).
    """
    import helpers_tiny_vlm as tiny
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(tiny._CORPUS) + fmt.system_prompt(capabilities()).split("\n")
    for step, out in episode(len(OBJECTS)):
        corpus += [fmt.serialize(out), fmt.user_turn(step, show_images=False).text]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=tiny.SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in tiny.ROBIX_TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=tiny.CHAT_TEMPLATE)


def build_model(path: Path, *, hidden: int, layers: int, heads: Optional[int], test_model: bool,
                kv_heads: Optional[int] = None) -> Path:
    """The tiny Qwen2.5-VL of table 3, through the tests' builder (see the module docstring)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import helpers_tiny_vlm as tiny

    if test_model:
        return tiny.build_tiny_qwen_vl(path)
    saved = tiny.build_tokenizer, tiny.MAX_PIXELS
    tiny.build_tokenizer, tiny.MAX_PIXELS = planner_tokenizer, IMAGE_MAX_PIXELS
    try:
        return tiny.build_tiny_qwen_vl(path, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                       num_kv_heads=kv_heads)
    finally:
        tiny.build_tokenizer, tiny.MAX_PIXELS = saved


def _encode_parts(backend, prompt) -> dict:
    """Time the three parts of the backend's per-step preprocessing with the processor's public API."""
    from PIL import Image as PILImage

    from robix_planner import format as fmt

    messages, parts = fmt.to_hf_messages(prompt)
    pil = [PILImage.fromarray(p.pixels) for p in parts]
    proc = backend.processor
    t0 = time.perf_counter()
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    t1 = time.perf_counter()
    proc.tokenizer([text], return_tensors="pt")
    t2 = time.perf_counter()
    if pil:
        proc.image_processor(images=pil, return_tensors="pt")
    t3 = time.perf_counter()
    return {"template": (t1 - t0) * 1e3, "tokenize": (t2 - t1) * 1e3, "images": (t3 - t2) * 1e3, "n_images": len(pil),
            "chars": len(text)}


def _decisions_proc(conn, model_dir: str, spec: dict) -> None:
    """Build the model, then time decisions at the history lengths of ``spec`` (see the module docstring)."""
    import torch

    torch.set_num_threads(1)
    _quiet_transformers()
    from robix_planner.backends import load_backend
    from robix_planner.memory import Memory, MemoryConfig

    t_build = time.perf_counter()
    if spec.get("model"):
        path = spec["model"]  # the hf backend resolves it as model.path (robix-tiny: the shipped checkpoint)
    else:
        path = build_model(Path(model_dir), hidden=spec["hidden"], layers=spec["layers"], heads=spec["heads"],
                           test_model=spec["test_model"], kv_heads=spec["kv_heads"])
    build_s = time.perf_counter() - t_build
    conn.send(("built", str(path), build_s))
    if not spec["lengths"]:
        return
    caps = capabilities()
    memory = Memory(MemoryConfig(max_images=spec["max_images"]))
    prompts, build_ms, horizon = [], [], []
    for step, out in episode(max(spec["lengths"]) + 1):
        t = time.perf_counter()
        prompts.append(memory.prompt(caps, step))
        build_ms.append((time.perf_counter() - t) * 1e3)
        horizon.append(memory.image_horizon)
        memory.append(step, out)
    backends = {}
    for reuse in (True, False):
        # nice=0: the measuring thread keeps its priority, so a stray process of another user slows all
        # rounds alike (the default nice=10 changes nothing on an idle machine; table 1 runs with it).
        backends[reuse] = load_backend(ModelConfig(backend="hf", path=str(path), max_new_tokens=spec["new_tokens"],
                                                   prefix_cache=reuse, nice=0,
                                                   kv_cache_dtype=spec["kv_cache_dtype"]))
        _decode_to_length(backends[reuse])
    attention = _time_attention()
    model = backends[True].model
    size = {"params": sum(p.numel() for p in model.parameters()),
            "text_params": sum(p.numel() for p in model.model.language_model.parameters()),
            "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    never = threading.Event()

    def decide(reuse: bool, h: int) -> dict:
        b = backends[reuse]
        attention["ms"] = 0.0
        t = time.perf_counter()
        for _ in b.generate(prompts[h], cancel=never):
            pass
        s = b.last_stats
        return {"ms": (time.perf_counter() - t) * 1e3 + build_ms[h], "build": build_ms[h],
                "process": s.extra.get("process_ms", 0.0), "prefill": s.prefill_ms, "decode": s.decode_ms,
                "new_tokens": s.new_tokens, "prompt_tokens": s.prompt_tokens, "cached": s.cached_tokens,
                "attention": attention["ms"], "encoding": s.extra.get("encoding")}

    decide(True, 0)  # warm-up: first calls of the processor and the model
    decide(False, 0)
    rows: dict = {}
    parts: dict = {}
    # Rounds: every round times every history length once, so a slow phase of a shared machine hits all alike.
    for r in range(spec["repeats"]):
        for h in spec["lengths"]:
            decide(True, h - 1)  # the cache holds the previous step and its answer, as in a session
            rows.setdefault((True, h), []).append(decide(True, h))
            rows.setdefault((False, h), []).append(decide(False, h))
            parts.setdefault(h, []).append(_encode_parts(backends[True], prompts[h]))
        print(f"  decisions: round {r + 1}/{spec['repeats']} done", file=sys.stderr, flush=True)
    parts = {h: {k: statistics.median(x[k] for x in ps) for k in ps[0]} for h, ps in parts.items()}
    moved = {h: h > 0 and horizon[h] != horizon[h - 1] for h in spec["lengths"]}
    conn.send(("decisions", rows, parts, moved, size))


def _time_attention() -> dict:
    """Time every attention call of the hf backend's CPU attention (prefill and decode; vision included)."""
    from transformers import AttentionInterface

    from robix_planner.backends import hf

    if not hasattr(hf, "_cpu_attention") or not hasattr(hf, "_CPU_ATTENTION"):
        raise RuntimeError("the hf backend no longer has _cpu_attention; update bench/interrupt.py")
    acc = {"ms": 0.0}
    inner = hf._cpu_attention

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            acc["ms"] += (time.perf_counter() - t) * 1e3

    AttentionInterface.register(hf._CPU_ATTENTION, timed)
    return acc


# --------------------------------------------------------------------------- tables


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def _f(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:,.{digits}f}"


def print_halt_table(results: dict[str, dict]) -> None:
    floor = [r["halt_ms"] for r in results["floor"]["rows"] if r["halt_ms"] is not None]
    floor_p50 = _pct(floor, 50)
    print("| robot | model | utterance | trials | halted | p50 ms | p99 ms | max ms | in planner p50 / p99 ms "
          "| p99 vs 20 ms target | p50 vs bus floor |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, res in results.items():
        sc = res["scenario"]
        for path in ("relay", "utterance", "stop"):
            rows = [r for r in res["rows"] if r["path"] == path]
            if not rows:
                continue
            halts = [r["halt_ms"] for r in rows if r["halt_ms"] is not None]
            inside = [r["planner_halt_ms"] for r in rows if r["planner_halt_ms"] is not None]
            p50, p99 = _pct(halts, 50), _pct(halts, 99)
            label = {"relay": "any (relay)", "utterance": "change of mind", "stop": "stop phrase"}[path]
            in_planner = f"{_f(_pct(inside, 50), 2)} / {_f(_pct(inside, 99), 2)}" if inside else "-"
            verdict = ("met" if p99 <= TARGET_HALT_MS else "missed") if key != "floor" else "-"
            print(f"| {sc['robot']} | {sc['label']} | {label} | {len(rows)} | {len(halts)} | {_f(p50, 2)} | "
                  f"{_f(p99, 2)} | {_f(max(halts) if halts else None, 2)} | {in_planner} | "
                  f"{p99 / TARGET_HALT_MS:.2f}x ({verdict}) | {p50 / floor_p50:.1f}x |")


def print_cancel_table(results: dict[str, dict]) -> None:
    print("| model | utterance landed in | cancelled generations | p50 ms | p99 ms | one decoding step ms "
          "| p50 in steps | p99 in steps | target <= 1 step | utterance -> planner sets cancel: p50 / p99 ms "
          "| cancel set -> stream ended: p50 / p99 ms | the same in steps: p50 / p99 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for key, res in results.items():
        if res["scenario"]["busy"] not in ("scripted", "hf"):
            continue
        median_step = res["decode_step_ms"]
        for phase in ("decode", "prefill"):
            rows = [r for r in res["rows"] if r.get("phase") == phase]
            if not rows:
                continue
            vals = [r["gen_stop_ms"] for r in rows]
            # In decoding, each latency is counted in steps of the generation it stopped (a step grows with
            # the context); in the prefill, in the run's median decoding step.
            steps = [r.get("own_step_ms", median_step) if phase == "decode" else median_step for r in rows]
            ratios = [v / st for v, st in zip(vals, steps)]
            r50, r99 = _pct(ratios, 50), _pct(ratios, 99)
            split = [(r["set_ms"], r["react_ms"], st) for r, st in zip(rows, steps) if "set_ms" in r]
            sets, reacts = [x[0] for x in split], [x[1] for x in split]
            react_steps = [x[1] / x[2] for x in split]
            where = ("decoding" if phase == "decode"
                     else f"before the first token (prefill median {_f(res['prefill_ms'], 0)} ms)")
            verdict = "met" if r99 <= 1 else ("met at p50" if r50 <= 1 else "missed")
            print(f"| {res['scenario']['label']} | {where} | {len(rows)} | {_f(_pct(vals, 50), 2)} | "
                  f"{_f(_pct(vals, 99), 2)} | {_f(statistics.median(steps), 2)} | {r50:.2f} | {r99:.2f} | {verdict} | "
                  f"{_f(_pct(sets, 50), 2)} / {_f(_pct(sets, 99), 2)} | {_f(_pct(reacts, 50), 2)} / "
                  f"{_f(_pct(reacts, 99), 2)} | {_f(_pct(react_steps, 50), 2)} / {_f(_pct(react_steps, 99), 2)} |")


def print_decision_tables(rows: dict, parts: dict, moved: dict, lengths: list[int], base: int) -> None:
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    print("| history (steps) | prompt tokens | images dropped this step | with reuse: ms/step | tokens prefilled "
          "| decode ms/token | without reuse: ms/step | reuse speed-up | with reuse vs step 1 | without vs step 1 |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    b_reuse, b_full = med(rows[True, base], "ms"), med(rows[False, base], "ms")
    for h in lengths:
        r, f = rows[True, h], rows[False, h]
        reuse_ms, full_ms = med(r, "ms"), med(f, "ms")
        prefilled = med(r, "prompt_tokens") - med(r, "cached")
        per_token = statistics.median(x["decode"] / max(1, x["new_tokens"]) for x in r)
        print(f"| {h} | {med(r, 'prompt_tokens'):,.0f} | {'yes' if moved[h] else 'no'} | {reuse_ms:,.1f} | "
              f"{prefilled:,.0f} | {per_token:.2f} | {full_ms:,.1f} | {full_ms / reuse_ms:.1f}x | "
              f"{reuse_ms / b_reuse:.2f}x | {full_ms / b_full:.2f}x |")
    print()
    print("Where the time of a decision with reuse goes (median ms):")
    print()
    grown = [h for h in lengths[-1:] if h != base]
    print("| part | " + " | ".join(f"history {h}" for h in lengths) + " | "
          + " | ".join(f"growth {h} vs {base}" for h in grown) + " |")
    print("|---|" + "---:|" * (len(lengths) + len(grown)))
    attn = lambda h: med(rows[True, h], "attention")  # noqa: E731
    lines = [
        ("Memory.prompt (build_prompt)", lambda h: med(rows[True, h], "build")),
        ("backend preprocessing: chat template + processor on the new pieces (process_ms)",
         lambda h: med(rows[True, h], "process")),
        ("prefill of the uncached suffix", lambda h: med(rows[True, h], "prefill")),
        ("decode", lambda h: med(rows[True, h], "decode")),
        ("decision", lambda h: med(rows[True, h], "ms")),
        ("of which attention (all calls, prefill and decode)", attn),
        ("of which everything but attention", lambda h: med(rows[True, h], "ms") - attn(h)),
        ("for reference: a full re-encode (template + tokenise + image-process the whole prompt)",
         lambda h: parts[h]["template"] + parts[h]["tokenize"] + parts[h]["images"]),
    ]
    for name, fn in lines:
        print(f"| {name} | " + " | ".join(f"{fn(h):,.1f}" for h in lengths) + " | "
              + " | ".join(f"{fn(h) - fn(base):+,.1f}" for h in grown) + " |")
    print("| images shown / prompt characters | " + " | ".join(
        f"{parts[h]['n_images']:.0f} / {parts[h]['chars']:,.0f}" for h in lengths) + " |" + " |" * len(grown))
    modes = sorted({x["encoding"] for (reuse, _), xs in rows.items() if reuse for x in xs})
    print()
    print(f"Prompt encoding of the timed decisions: {', '.join(modes)} (the hf backend's `extra['encoding']`).")


# --------------------------------------------------------------------------- main


SCENARIOS = ("idle", "scripted", "hf")


#: --shape presets: hidden, layers, heads, key/value heads. Qwen2.5-VL-3B (2048 wide, 36 layers, 16 heads of
#: 128, 2 key/value heads) reads 512 cached values per layer and token for 77M weights per layer: 6.6e-6 of a
#: layer's weights per token of history. "qwen3b" (1024 wide, 4 layers, 16 heads of 64, 2 key/value heads, MLP
#: 2048) reads 256 for 8.6M: 3.0e-5 (4.5x Qwen's); "tiny" (robix-tiny's shape, the default) 256 for 0.59M: 4.3e-4.
SHAPES = {"tiny": (256, 4, 4, 2), "qwen3b": (1024, 4, 16, 2)}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 5 trials per utterance kind, a 64-wide model, 16 tokens, 1 repeat (about 20 s)")
    p.add_argument("--trials", type=int, default=50, help="trials per utterance kind and scenario (tables 1, 2)")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS,
                   help="model states of tables 1 and 2 (the bus floor always runs: it is the baseline)")
    p.add_argument("--chunk-delay-ms", type=float, default=30.0, help="the scripted model's time per token")
    p.add_argument("--hidden", type=int, default=256, help="model width (robix-tiny's: 256)")
    p.add_argument("--layers", type=int, default=4, help="model depth (robix-tiny's: 4)")
    p.add_argument("--heads", type=int, default=4,
                   help="attention heads, half as many key/value heads (robix-tiny's: 4 and 2)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: half the heads)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="a preset for --hidden/--layers/--heads/--kv-heads: 'qwen3b' comes within 4.5x of Qwen2.5-VL-3B's "
                        "ratio of cached key/value bytes per token to weight bytes (robix-tiny's shape: 65x), so "
                        "that attention over the history weighs on a step more nearly as in a 3B model")
    p.add_argument("--max-images", type=int, default=64,
                   help="memory.max_images of the planner in the hf scenario and of table 3 (default 64, as "
                        "robix-tiny runs: no image is dropped in a 64-step episode, the prompt only grows)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="measure this checkpoint (a directory, or robix-tiny: the shipped model) instead of a "
                        "tiny Qwen2.5-VL built from config; the shape options are then ignored")
    p.add_argument("--test-model", action="store_true",
                   help="use the tests' tiny model unchanged (64 wide, 2 layers, its 300-token tokenizer, "
                        "9-token images)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per decision (table 3)")
    p.add_argument("--repeats", type=int, default=7, help="timed decisions per history length and mode (table 3)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 10, 30],
                   help="history lengths of table 3 (the smallest is the baseline)")
    p.add_argument("--no-decisions", action="store_true", help="skip table 3 (the model is still built)")
    p.add_argument("--no-bus", action="store_true", help="only table 3")
    # Experiments (defaults: the product's settings).
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="sys.setswitchinterval in the planner process (an experiment; default: Python's 5 ms)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="model.prefill_chunk_tokens in the hf scenario (an experiment; default: ModelConfig's)")
    p.add_argument("--kv-cache-dtype", default="model",
                   help="model.kv_cache_dtype of every hf backend here: model (default), bfloat16, auto")
    return p


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.repeats, args.new_tokens = 5, 1, 16
        args.hidden, args.layers, args.heads, args.lengths = 64, 2, None, [1, 10, 30]
    if min(args.lengths) < 1:
        parser.error("--lengths must be >= 1 (the step before is run first)")
    if args.test_model:
        args.hidden, args.layers, args.heads = 64, 2, None
    if args.shape:
        args.hidden, args.layers, args.heads, args.kv_heads = SHAPES[args.shape]
    heads = args.heads or args.hidden // 16
    kv_heads = args.kv_heads or max(1, heads // 2)
    model_name = f"{args.hidden} wide, {args.layers} layers, {heads} heads, {kv_heads} key/value heads" + (
        ", tests' tokenizer" if args.test_model else "")
    hf_label = f"tiny Qwen2.5-VL ({model_name})"
    if args.model:
        model_name = hf_label = f"checkpoint {args.model}"
    lengths = sorted(set(args.lengths))
    t_start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="robix-bench-interrupt-"))
    graph_dir = str(workdir / "graph")
    print(f"# interruption benchmark: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"{args.trials} trials per utterance kind and scenario", flush=True)
    controller = ctrl_conn = user = None
    try:
        # Table 3 first (and the model for the hf scenario): one heavy process, nothing else running.
        spec = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                "test_model": args.test_model, "kv_cache_dtype": args.kv_cache_dtype, "model": args.model,
                "max_images": args.max_images,
                "new_tokens": args.new_tokens, "repeats": args.repeats, "lengths": [] if args.no_decisions else lengths}
        proc, conn = _spawn(_decisions_proc, str(workdir / "model"), spec)
        _, model_path, build_s = _expect(conn, 120, "model build")
        print(f"  model {model_name} {'found' if args.model else 'built'} in {build_s:.1f} s", file=sys.stderr,
              flush=True)
        decisions = _expect(conn, 900, "decision timings") if spec["lengths"] else None
        proc.join(30)

        results = {}
        if not args.no_bus:
            controller, ctrl_conn = _spawn(_controller_proc, graph_dir)
            if _expect(ctrl_conn, 60, "controller process") != "ready":
                raise RuntimeError("controller process failed to start")
            user = User(graph_dir)
            scenarios = [{"name": "floor", "busy": "relay", "robot": "-", "label": "bus floor: relay, no planner"}]
            labels = {"idle": "idle", "scripted": f"generating: scripted, {args.chunk_delay_ms:g} ms/token",
                      "hf": f"generating: hf {hf_label}"}
            scenarios += [{"name": n, "busy": n, "robot": "acting", "label": labels[n]}
                          for n in SCENARIOS if n in args.scenarios]
            for n, sc in enumerate(scenarios):
                sc.update(chunk_delay_s=args.chunk_delay_ms / 1000.0, model_path=model_path, max_images=args.max_images,
                          switch_interval_ms=args.switch_interval_ms, prefill_chunk=args.prefill_chunk,
                          kv_cache_dtype=args.kv_cache_dtype)
                res = run_scenario(user, ctrl_conn, graph_dir, sc, args.trials, seed=n)
                res["scenario"] = sc
                results[sc["name"]] = res
                halts = [r["halt_ms"] for r in res["rows"] if r["halt_ms"] is not None]
                print(f"  {sc['name']:8}: {len(res['rows'])} trials in {res['elapsed_s']:.0f} s, halt p50 "
                      f"{_pct(halts, 50):.2f} ms p99 {_pct(halts, 99):.2f} ms", file=sys.stderr, flush=True)

        if results:
            experiments = [f"{k} {v}" for k, v in (("switch interval ms", args.switch_interval_ms),
                                                   ("prefill chunk tokens", args.prefill_chunk),
                                                   ("kv_cache_dtype", args.kv_cache_dtype != "model"
                                                    and args.kv_cache_dtype)) if v]
            print()
            print("Utterance -> halt (the controller's command callback receives `stop`), over loopback TCP, "
                  "3 processes" + (f" ({', '.join(experiments)})" if experiments else "")
                  + f"; planner memory.max_images={args.max_images}:")
            print()
            print_halt_table(results)
            if any(r["scenario"]["busy"] in ("scripted", "hf") for r in results.values()):
                print()
                print("Utterance -> generation stopped (the backend's stream has ended), in decoding steps of the same "
                      "backend measured in the same run:")
                print()
                print_cancel_table(results)
        if decisions is not None:
            _, rows, parts, moved, size = decisions
            if args.model:
                model = model_name
            elif args.test_model:
                model = "the tests' tiny Qwen2.5-VL: 64 wide, 2 layers, 300-token tokenizer, 9-token images"
            else:
                model = f"tiny Qwen2.5-VL {model_name}, planner-trained tokenizer, 54-token images"
            model += (f"; {size['params'] / 1e6:.2f}M parameters ({size['text_params'] / 1e6:.2f}M in the decoder), "
                      f"{size['bytes'] / 2**20:.1f} MiB in float32")
            print()
            print(f"Decision latency vs history (hf backend, {model}; memory.max_images={args.max_images}, so no "
                  f"image is dropped and the prompt only grows; Memory.prompt + generate of {args.new_tokens} tokens; "
                  f"model thread at nice 0; keys and values cached in {args.kv_cache_dtype}"
                  f"{' (the model dtype)' if args.kv_cache_dtype == 'model' else ''}; median of {args.repeats}):")
            print()
            print_decision_tables(rows, parts, moved, lengths, lengths[0])
        print()
        print("p50/p99: numpy percentiles (linear) over the trials; halt and stop latencies run from just before "
              f"`publish(Utterance)`; total {time.monotonic() - t_start:.0f} s")
    finally:
        if user is not None:
            user.node.shutdown()
        if controller is not None:
            _stop(controller, ctrl_conn)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
