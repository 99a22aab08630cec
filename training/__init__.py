"""Training robix-tiny (or any local VLM checkpoint): data synthesis (:mod:`training.data`) and the
CPT -> SFT -> RL pipelines (:mod:`training.train`, :mod:`training.rl`, :mod:`training.rewards`),
driven by ``robix train`` (:mod:`training.cli`). See docs/training.md.
"""
