"""``ccsr serve`` with the playground router registered, for tests until app.py lists it itself.

Run as a script with ``ccsr serve``'s options. ``register_router_module`` is idempotent, so this stays correct
once ``ccsr.api.playground`` is in ``ccsr.api.app.ROUTER_MODULES``.
"""

from __future__ import annotations

import sys

from ccsr.api import serve
from ccsr.api.app import register_router_module

if __name__ == "__main__":
    register_router_module("ccsr.api.playground")
    sys.exit(serve.main())
