"""The simulated table-bussing world: scene, cameras, controller, scripted user, scenarios.

Modules, each owning one thing:

- :mod:`sim.catalog`   the data table of object kinds, colours, attributes and receptacles
- :mod:`sim.world`     the table state (:class:`~sim.world.World`) and the Gymnasium env
- :mod:`sim.render`    the head camera (OpenCV drawings)
- :mod:`sim.controller` the low-level controller: grammar, phases, failures, stop
- :mod:`sim.spec`      the scenario data types (scene, script turns, success predicates)
- :mod:`sim.templates` the user's paraphrase templates, with their train/validation/test split
- :mod:`sim.user`      the scripted user who plays a scenario's turns on triggers
- :mod:`sim.scenarios` the scenario generator and ``load_scenarios(split)``
- :mod:`sim.scoring`   the episode log and its scorer (task progress and behaviour checks)
- :mod:`sim.oracle`    the privileged oracle planner and the :class:`~sim.oracle.Decision` type
- :mod:`sim.runner`    the fast in-process episode runner
- :mod:`sim.nodes`     the world, the user, the oracle and a whole simulation as bus nodes
- :mod:`sim.eval`      ``robix eval online``: scores per category, over the bus or in process

``sim`` may import :mod:`robix_planner` (messages and skills; the bus, nodes and controller
protocol in :mod:`sim.nodes`); nothing in ``robix_planner`` imports ``sim`` (``robix eval``
comes in through the ``robix.commands`` entry point). Importing this package loads nothing heavy.
"""
