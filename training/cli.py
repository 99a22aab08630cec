"""``robix train init|cpt|sft|rl|all --config FILE.yaml [key=value ...]``: the training pipelines.

    robix train init --config training/configs/init.yaml          # tokenizer + fresh random robix-tiny
    robix train cpt  --config training/configs/cpt.yaml           # continued pretraining (trl SFTTrainer)
    robix train sft  --config training/configs/sft.yaml train.max_steps=200
    robix train rl   --config training/configs/rl.yaml            # variance filter + GRPO (trl GRPOTrainer)
    robix train all  --config training/configs/all.yaml           # init -> cpt -> sft -> rl, resumable
    robix train sft  --config training/configs/sft.yaml --print-config

Several processes (each stage)::

    accelerate launch --config_file training/accelerate/cpu2.yaml -m robix_planner.cli train sft --config ...

Configs are strict YAML (unknown keys are errors) with dotted overrides after the file;
every key is documented in docs/training.md. A stage writes checkpoints, ``loss.jsonl``,
``model/`` and ``done.json`` into its ``output_dir``; ``resume=true`` (the default)
continues from the last checkpoint there. torch, transformers and trl are imported only
when a stage runs.
"""

from __future__ import annotations

import argparse

STAGE_HELP = {
    "init": "train a tokenizer on the corpus and save a fresh random robix-tiny",
    "cpt": "continued pretraining on embodied-reasoning data (trl SFTTrainer)",
    "sft": "supervised fine-tuning on whole episodes (trl SFTTrainer)",
    "rl": "variance filter, then GRPO with format/action/consistency rewards (trl GRPOTrainer)",
    "all": "init -> cpt -> sft -> rl, each stage's model the next one's input; finished stages are skipped",
}


def register(sub) -> None:
    """Add ``robix train`` (entry point ``robix.commands``: ``train = "training.cli:register"``)."""
    p = sub.add_parser("train", help="train robix-tiny (or a local checkpoint): init, cpt, sft, rl, all",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])
    stages = p.add_subparsers(dest="stage", metavar="STAGE")
    for name, help_text in STAGE_HELP.items():
        s = stages.add_parser(name, help=help_text, description=f"robix train {name}: {help_text}. "
                              "Every config key is documented in docs/training.md.")
        s.add_argument("--config", required=True, metavar="FILE.yaml", help="the stage's YAML config")
        s.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10")
        s.set_defaults(func=_run)


def _run(args) -> int:
    from training import train

    cfg = train.load_config(args.stage, args.config, args.overrides or [])
    if args.print_config:
        print(train.dump_yaml(train.chain(cfg) if args.stage == "all" else cfg), end="")
        return 0
    if args.stage == "all":
        train.run_all(cfg)
    else:
        train.run_stage(args.stage, cfg)
    return 0
