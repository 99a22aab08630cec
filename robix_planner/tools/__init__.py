"""Command-line tools on the bus (``robix topic``, ``robix record``, ``robix replay``). No torch here."""
