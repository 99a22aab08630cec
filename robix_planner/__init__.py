"""Robix Planner: an interruptible high-level planner for robots.

Nothing heavy is imported here: ``import robix_planner`` must stay cheap so that
``robix --help`` and the bus tools start fast and never load torch.
"""

__version__ = "0.1.0"
