"""``python -m server.dev`` (``make run``) and ``python -m server.dev --reset`` (``make reset``):
aliases of ``subsidyctl dev run`` and ``subsidyctl dev reset`` (server/ctl/dev.py), kept under
the name the Makefile calls."""

import sys

from server.ctl import alias

if __name__ == "__main__":
    arguments = sys.argv[1:]
    command = ["reset", *(a for a in arguments if a != "--reset")] if "--reset" in arguments else ["run", *arguments]
    alias("python -m server.dev", "dev", command, json_output=False)
