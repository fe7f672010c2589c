"""``python -m server.exchange``: the exchange file commands (server/commands/exchange.py).

An entry point only, under the name the README documents; the code lives in
``server.commands.exchange``.
"""

import sys

from server.commands.exchange import main

if __name__ == "__main__":
    sys.exit(main())
