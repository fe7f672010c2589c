"""``python -m server.exchange``: an alias of ``subsidyctl --json exchange``
(server/ctl/exchange.py), kept under the name the tests call."""

import sys

from server.ctl import alias

if __name__ == "__main__":
    alias("python -m server.exchange", "exchange", sys.argv[1:])
