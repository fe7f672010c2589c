"""``python -m server.dev``: ``make run`` / ``make reset`` (server/commands/dev.py).

An entry point only, under the name the README documents; the code lives in
``server.commands.dev``.
"""

import sys

from server.commands.dev import main

if __name__ == "__main__":
    sys.exit(main())
