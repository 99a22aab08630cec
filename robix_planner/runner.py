"""``robix run MODULE:CLASS [overrides]``: run one node in this process (like ``ros2 run``).

The node's config tree has three sections, all from one YAML file (``--config``) plus
dotted overrides: ``params`` (the node class's own ``Params``), ``bus``
(:class:`~robix_planner.bus.BusConfig`) and ``node`` (:class:`~robix_planner.node.NodeConfig`).

    robix run robix_planner.demo:CameraNode params.rate_hz=5 bus.domain=lab
"""

from __future__ import annotations

import argparse
import importlib
from typing import Optional

from robix_planner.config import ConfigError, Config, apply_overrides, convert, read_yaml


class RunConfig(Config):
    params: dict = {}
    bus: dict = {}
    node: dict = {}


def load_node_class(target: str):
    """Import ``package.module:ClassName`` and check it is a Node subclass."""
    from robix_planner.node import Node

    if ":" not in target:
        raise ConfigError(f"node {target!r} must look like package.module:ClassName")
    mod_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"cannot import {mod_name!r} for node {target!r}: {exc}") from None
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Node)):
        raise ConfigError(f"{target!r} is not a robix_planner.node.Node subclass")
    return cls


def parse_remap(items) -> dict[str, str]:
    out = {}
    for item in items or ():
        if ":=" not in item:
            raise ConfigError(f"remap {item!r} must look like /from:=/to")
        a, b = item.split(":=", 1)
        out[a] = b
    return out


def build_node(target: str, *, config: Optional[str] = None, overrides=(), name: Optional[str] = None,
               remap: Optional[dict[str, str]] = None):
    """Construct the node ``target`` from a config file and overrides (does not start it)."""
    from robix_planner.bus import BusConfig
    from robix_planner.node import NodeConfig

    cls = load_node_class(target)
    tree = read_yaml(config) if config else {}
    apply_overrides(tree, overrides)
    run = convert(RunConfig, tree, source=config or "overrides")
    if cls.Params is None and run.params:
        raise ConfigError(f"{target} takes no params, got {sorted(run.params)}")
    params = convert(cls.Params, run.params, source=f"{target} params") if cls.Params else None
    kwargs = dict(bus_config=convert(BusConfig, run.bus, source="bus"),
                  node_config=convert(NodeConfig, run.node, source="node"), remap=remap or {})
    if name:
        kwargs["name"] = name
    return cls(params=params, **kwargs)


def _main(args: argparse.Namespace) -> int:
    from robix_planner.node import spin

    node = build_node(args.target, config=args.config, overrides=args.overrides, name=args.name,
                      remap=parse_remap(args.remap))
    return spin(node)


def register(sub) -> None:
    p = sub.add_parser("run", help="run one node in this process", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="MODULE:CLASS", help="the node class, e.g. robix_planner.demo:CameraNode")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides: params.x=1 bus.domain=lab")
    p.add_argument("--config", help="YAML file with params/bus/node sections")
    p.add_argument("--name", help="node name (default: the class's default_name)")
    p.add_argument("--remap", action="append", metavar="FROM:=TO", help="rename a topic (repeatable)")
    p.set_defaults(func=_main)
