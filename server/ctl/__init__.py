"""subsidyctl: every task an operator runs, one command line.

    subsidyctl [--target HOST:PORT] [--credentials FILE] [--operator ID] [--json] COMMAND ...

``subsidyctl --help`` lists every task, grouped by what it talks to. Each group of tasks lives in
its own module of this package, which says what it adds in ``COMMANDS`` (click commands or
groups) and under which heading of the help in ``SECTION``; a new group of tasks is a new
module and one more name in ``COMMAND_MODULES`` below (``main.add_command`` works too: such a
command is listed under its module's SECTION, or "Other commands").

The ``python -m server.ledger``, ``server.reference``, ``server.exchange`` and ``server.dev``
entry points are aliases of ``subsidyctl --json ledger``, ``reference``, ``exchange`` and
``dev run`` / ``dev reset`` (``alias`` below), kept because make, docker-compose, CI and tests
call them; ``python -m server`` is the gateway (``subsidyctl serve``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import click

from server.ctl.common import DEFAULT_CREDENTIALS, SECTIONS, Options

OTHER_SECTION = "Other commands"

EXIT_STATUSES = """\b
Exit statuses, the same for every command:
  0  done
  1  the command ran and found a problem (a chain break, a reconcile
     difference, a call the gateway refused, rejected rows or files)
  2  a usage or configuration error
  3  a dependency did not answer: PostgreSQL, Redis or the gateway
  4  dev run / dev reset while make run already runs in this checkout"""


class TaskGroup(click.Group):
    """A group whose help lists every task: the commands of each group as well, with their
    full names (``ledger verify``), under the section their module gives."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sections: dict[str, str] = {}

    def add_section_command(self, command: click.Command, section: str) -> None:
        self.add_command(command)
        assert command.name is not None
        self.sections[command.name] = section

    def format_commands(self, context: click.Context, formatter: click.HelpFormatter) -> None:
        by_section: dict[str, list[tuple[str, str]]] = {}
        for name in self.list_commands(context):
            command = self.get_command(context, name)
            if command is None or command.hidden:
                continue
            section = self.sections.get(name) or _declared_section(command)
            by_section.setdefault(section, []).extend(_tasks(context, name, command))
        for section in (*SECTIONS, OTHER_SECTION):
            if by_section.get(section):
                with formatter.section(section):
                    formatter.write_dl(sorted(by_section[section]))


def _declared_section(command: click.Command) -> str:
    """The SECTION of the module that defines a command added with plain ``add_command``."""
    module = sys.modules.get(getattr(command.callback, "__module__", "") or "")
    section = getattr(module, "SECTION", None)
    return section if section in SECTIONS else OTHER_SECTION


def _tasks(context: click.Context, path: str, command: click.Command) -> Iterator[tuple[str, str]]:
    if isinstance(command, click.Group):
        for name in command.list_commands(context):
            sub = command.get_command(context, name)
            if sub is not None and not sub.hidden:
                yield from _tasks(context, f"{path} {name}", sub)
        return
    yield path, command.get_short_help_str(limit=80)


@click.group(
    cls=TaskGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    epilog=EXIT_STATUSES,
)
@click.option("--target", help="gateway host:port (default: from the credentials file, or 127.0.0.1:50051)")
@click.option(
    "--credentials",
    type=click.Path(path_type=Path),
    default=DEFAULT_CREDENTIALS,
    show_default=True,
    help="credentials file with an 'operators' section (written by make run)",
)
@click.option("--operator", help="operator id (default: SUBSIDYCTL_OPERATOR, or the file's first operator)")
@click.option("--json", "json_output", is_flag=True, help="print JSON instead of tables (every command)")
@click.pass_context
def main(
    context: click.Context, target: str | None, credentials: Path, operator: str | None, json_output: bool
) -> None:
    """Operate the subsidy gateway: campaigns, the catalog, merchants and budgets over the
    gateway; the ledger, reference data and exchange files on PostgreSQL and Redis; the
    gateway and ledger writer processes; a development environment.

    Tables on stdout (or JSON with --json, before or after the command); progress bars on
    stderr when it is a terminal. `subsidyctl COMMAND --help` for each task.
    """
    context.obj = Options(target, credentials, operator, json_output)


# Command modules, one per group of tasks (imported after ``main`` exists): each exposes
# COMMANDS and SECTION.
COMMAND_MODULES = (
    "campaign", "catalog", "merchant", "credential", "report", "supervise", "recon", "reporting", "ledger",
    "reference", "exchange", "serve", "dev", "certs", "risk",
)  # fmt: skip

for _name in COMMAND_MODULES:
    _module = importlib.import_module(f"server.ctl.{_name}")
    for _command in _module.COMMANDS:
        main.add_section_command(_command, _module.SECTION)


def alias(prog: str, group: str, argv: Sequence[str], *, json_output: bool = True) -> None:
    """Runs ``subsidyctl GROUP ARGV...`` under the name ``prog`` (a ``python -m`` alias): JSON
    on stdout as the alias always printed, the exit status as subsidyctl's."""
    command = main.commands[group]
    command.main(args=list(argv), prog_name=prog, obj=Options(json_output=json_output))


# The audit archive (server/ctl/audit.py).
from server.ctl import audit  # noqa: E402

main.add_command(audit.audit)

# The complaints desk (server/ctl/ticket.py).
from server.ctl import ticket as ticket_commands  # noqa: E402

main.add_command(ticket_commands.ticket)
