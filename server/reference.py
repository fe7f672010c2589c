"""``python -m server.reference``: an alias of ``subsidyctl --json reference``
(server/ctl/reference.py), kept under the name docker-compose and the tests call."""

import sys

from server.ctl import alias

if __name__ == "__main__":
    alias("python -m server.reference", "reference", sys.argv[1:])
