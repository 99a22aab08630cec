"""``robix data``: synthesise the training sets and write them with ``Dataset.save_to_disk``.

    robix data sft --out data/sft --split train --seed 0            # one row per episode
    robix data sft --out data/sft_noreason --no-reasoning            # ablation: minimal thoughts
    robix data rl  --out data/rl  --split train --seed 0            # per-step RL prompt candidates
    robix data cpt --out data/cpt --seed 0 --n 14000                 # rendered-scene Q&A + text rows

``sft`` and ``rl`` play every scenario of ``--split`` (the stored set, or ``--n`` per
category generated from the split's seeds) with the oracle behind the planner's input
handling; ``cpt`` renders fresh random scenes. Each prints rows, build time and size on
disk. Columns: docs/training_data.md. Entry point (``robix.commands``):
``data = "training.data.cli:register"``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def disk_size_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _check_out(out: str, overwrite: bool) -> None:
    from robix_planner.config import ConfigError

    p = Path(out)
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")


def _main(args: argparse.Namespace) -> int:
    from robix_planner.config import ConfigError

    _check_out(args.out, args.overwrite)
    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    t0 = time.perf_counter()
    if args.data_command == "cpt":
        from training.data.cpt import build_cpt

        try:
            ds = build_cpt(args.seed, args.n or 14000, tasks=args.task)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        what = f"{len(ds)} CPT rows"
    else:
        from training.data.episodes import build_rl, build_sft

        build = build_sft if args.data_command == "sft" else build_rl
        try:
            ds = build(args.split, args.seed, n=args.n, reasoning=not args.no_reasoning, categories=args.category,
                       limit=args.limit)
        except ValueError as exc:
            raise ConfigError(f"{exc}; categories: see docs/sim.md") from None
        what = (f"{len(ds)} episodes ({sum(len(k) for k in ds['kind'])} steps)" if args.data_command == "sft"
                else f"{len(ds)} step rows")
    built_s = time.perf_counter() - t0
    ds.save_to_disk(args.out)
    size = disk_size_bytes(args.out)
    print(f"robix data {args.data_command}: {what}, seed {args.seed}"
          + (f", split {args.split}" if args.data_command != "cpt" else "")
          + f"; built in {built_s:.1f} s, {size / 1e6:.1f} MB on disk; wrote {args.out}")
    return 0


def register(sub) -> None:
    """Add ``robix data`` (entry point ``robix.commands``: ``data = "training.data.cli:register"``)."""
    p = sub.add_parser("data", help="synthesise training data (CPT corpus, SFT episodes, RL prompts) in the sim",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])
    kinds = p.add_subparsers(dest="data_command", metavar="KIND")
    helps = {"cpt": "rendered scenes with grounding, spatial, counting, affordance, status, next-action Q&A; text rows",
             "sft": "the oracle's episodes in the run-time prompt format, one row per episode",
             "rl": "per-step prompts with their acceptable plans (candidates for the variance filter)"}
    for kind, text in helps.items():
        k = kinds.add_parser(kind, help=text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        k.add_argument("--out", required=True, metavar="DIR", help="directory for Dataset.save_to_disk")
        k.add_argument("--seed", type=int, default=0, help="seed (default 0); equal seeds give equal datasets")
        k.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
        if kind == "cpt":
            k.add_argument("--n", type=int, default=None, metavar="N", help="rows (default 14000)")
            k.add_argument("--task", action="append", metavar="T", help="only this task (repeatable); see docs")
        else:
            k.add_argument("--split", choices=("train", "validation", "test"), default="train")
            k.add_argument("--n", type=int, default=None, metavar="N",
                           help="scenarios per category, generated from the split's seeds (default: the stored set)")
            k.add_argument("--category", action="append", metavar="C", help="only this category (repeatable)")
            k.add_argument("--limit", type=int, default=None, metavar="N", help="at most N scenarios per category")
            k.add_argument("--no-reasoning", action="store_true",
                           help="minimal thoughts (the ablation 'SFT without reasoning traces')")
        k.set_defaults(func=_main)
