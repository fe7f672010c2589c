"""``python -m server``: the gateway (server/processes/gateway.py).

An entry point only, under the name the README documents; the code lives in
``server.processes.gateway``.
"""

import sys

from server.processes.gateway import main

if __name__ == "__main__":
    sys.exit(main())
