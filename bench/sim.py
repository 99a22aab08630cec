"""Benchmark of the simulated world: planner decisions per second and camera milliseconds per frame.

    python bench/sim.py               # medians over 5 repeats, pinned to CPU 0
    python bench/sim.py --repeats 9 --cpu -1   # more repeats, no pinning

Rows:
- ``oracle, no images``: the in-process runner with the oracle over the validation and test
  scenarios, no rendering (the fast mode; target >= 2,000 decisions/s on one core);
- ``oracle + head camera``: the same, rendering the head camera at every decision (baseline
  for the ratio of the first row);
- ``render WxH ...``: one frame of a 14-object table; ``gripper moves`` reuses the cached table
  layer (what happens during a command), ``scene changed`` redraws it (the baseline row;
  target <= 1 ms at the default 160x120).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (the median is reported)")
    p.add_argument("--frames", type=int, default=2000, help="frames per render timing")
    p.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not pin)")
    return p


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})

    from sim.oracle import OraclePlanner
    from sim.render import Renderer
    from sim.runner import EpisodeRunner, RunnerConfig
    from sim.scenarios import load_scenarios
    from sim.world import World

    scenarios = load_scenarios("validation") + load_scenarios("test")
    renderer = Renderer()

    def decisions_per_s(render: bool) -> float:
        n, t0 = 0, time.perf_counter()
        for s in scenarios:
            runner = EpisodeRunner(s, RunnerConfig(render=render), renderer=renderer if render else None)
            n += runner.run(OraclePlanner(runner.privileged)).decisions
        return n / (time.perf_counter() - t0)

    scene = max(scenarios, key=lambda s: len(s.scene.objects)).scene

    def ms_per_frame(width: int, height: int, changed: bool) -> float:
        world, r = World(scene), Renderer(width, height)
        frames = args.frames if width <= 320 else max(50, args.frames // 10)
        r.render(world)
        t0 = time.perf_counter()
        for i in range(frames):
            world.gripper_cm = (float(i % 160), 30.0)
            if changed:
                world.version += 1
            r.render(world)
        return (time.perf_counter() - t0) / frames * 1e3

    decisions_per_s(False)  # warm-up (imports, caches)
    rows = []

    def median(fn, *a):
        return statistics.median(fn(*a) for _ in range(args.repeats))

    fast = median(decisions_per_s, False)
    with_images = median(decisions_per_s, True)
    rows.append(("oracle, no images", f"{fast:,.0f} decisions/s", f"{fast / with_images:.2f}x", ">= 2,000", fast >= 2000))
    rows.append(("oracle + head camera 160x120", f"{with_images:,.0f} decisions/s", "1.00x (baseline)", "", None))
    cached = median(ms_per_frame, 160, 120, False)
    full = median(ms_per_frame, 160, 120, True)
    big = median(ms_per_frame, 640, 480, True)
    rows.append(("render 160x120, gripper moves", f"{cached:.3f} ms/frame", f"{cached / full:.2f}x", "<= 1 ms", cached <= 1.0))
    rows.append(("render 160x120, scene changed", f"{full:.3f} ms/frame", "1.00x (baseline)", "<= 1 ms", full <= 1.0))
    rows.append(("render 640x480, scene changed", f"{big:.3f} ms/frame", f"{big / full:.2f}x", "", None))

    head = ("case", f"median of {args.repeats}", "ratio", "target", "met")
    table = [head] + [(a, b, c, d, "" if e is None else ("yes" if e else "NO")) for a, b, c, d, e in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    pinned = f"CPU {args.cpu}" if args.cpu >= 0 else "unpinned"
    print(f"sim benchmark: {len(scenarios)} scenarios (validation + test), {pinned}, python {sys.version.split()[0]}")
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
