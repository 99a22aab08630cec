"""Training data synthesised from the simulator, saved as Hugging Face ``datasets``.

- :mod:`training.data.adaptor`   the planner node's input handling on the in-process runner
  (observations -> the exact :class:`~robix_planner.format.StepInput` the node would build)
- :mod:`training.data.traces`    reasoning traces: the oracle's thoughts, paraphrased (seeded),
  covering scene, task status, standing instructions and the next step
- :mod:`training.data.episodes`  SFT episodes (one row per episode), :func:`explode_steps`
  (one row per step: RL prompts and the offline evaluation), RL prompt candidates
- :mod:`training.data.cpt`       the CPT corpus: rendered scenes with grounding, spatial,
  counting, affordance, task-status and next-action questions, plus text-only rows
- :mod:`training.data.cli`       ``robix data cpt|sft|rl --out DIR``

Every builder takes a seed and returns a ``datasets.Dataset`` (images as a list-of-Image
feature), equal for equal seeds. Importing this package loads nothing heavy; ``datasets``
and Pillow are imported by the builders. See docs/training_data.md for every column.
"""
