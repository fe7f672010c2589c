"""``python -m server``: the gateway (server/processes/gateway.py), as ``subsidyctl serve``.

An alias kept for the server image's command, the benchmarks and the tests; the code lives in
``server.processes.gateway``.
"""

import sys

from server.processes.gateway import main

if __name__ == "__main__":
    sys.exit(main())
