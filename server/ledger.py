"""``python -m server.ledger``: the ledger commands (server/commands/ledger.py).

An entry point only, under the name the README documents; the code lives in
``server.commands.ledger``.
"""

import sys

from server.commands.ledger import main

if __name__ == "__main__":
    sys.exit(main())
