"""``python -m server.reference``: the reference data commands (server/commands/reference.py).

An entry point only, under the name the README documents; the code lives in
``server.commands.reference``.
"""

import sys

from server.commands.reference import main

if __name__ == "__main__":
    sys.exit(main())
