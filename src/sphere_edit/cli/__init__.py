"""The ``sphere-edit`` command line: ``app`` (the Typer application, its error handling
and the options every command shares) and one module per group of commands, each
registering its commands on ``app`` when imported (in this order, the order of the help).
"""

from .app import app

# isort: off
from . import editing  # noqa: F401,E402  demo, edit
from . import benchmark  # noqa: F401,E402  bench, report, sweep
from . import analysis  # noqa: F401,E402  stats, energy, geometry, general, trace, preset

# isort: on

__all__ = ["app"]
