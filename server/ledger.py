"""``python -m server.ledger``: an alias of ``subsidyctl --json ledger`` (server/ctl/ledger.py),
kept under the name make run, docker-compose, CI and the tests call."""

import sys

from server.ctl import alias

if __name__ == "__main__":
    alias("python -m server.ledger", "ledger", sys.argv[1:])
