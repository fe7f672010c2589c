"""What every subsidyctl command shares: the operator's connection, the local services, the
output (tables that measure display width, JSON with ``--json``), progress bars and exit statuses.

Output: a table on stdout, or JSON with ``--json`` (before the command, ``subsidyctl --json
ledger lag``, or after it, ``subsidyctl ledger lag --json``). Tables are rich tables, measured in
terminal cells, so a column of Chinese store names lines up. Progress bars go to stderr, only
when stderr is a terminal and the output is not JSON. Exit statuses are server/commands/common.py's,
the same in every command: 0 done, 1 a finding, 2 usage or configuration, 3 a dependency did
not answer.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from subsidy_client import SignedClient, SubsidyError, TlsConfig

from server.commands.common import (
    EXIT_PROBLEM,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    dependency_failure,
    missing_pg_dsn,
    require_services,
    use_recorded_services,
)
from server.config import Config, ConfigError

T = TypeVar("T")
# Written by make run (server/commands/dev.py), beside the data directory rather than in it.
DEFAULT_CREDENTIALS = Path(".keys/credentials.json")

# Headings of ``subsidyctl --help``, in order: each command module names one as its SECTION.
GATEWAY = "Over the gateway (an operator's credential)"
LOCAL = "On PostgreSQL and Redis (SUBSIDY_PG_DSN / SUBSIDY_REDIS_URL, or what make run recorded)"
PROCESSES = "Processes"
DEVELOPMENT = "Development"
SECTIONS = (GATEWAY, LOCAL, PROCESSES, DEVELOPMENT)
__all__ = ["EXIT_PROBLEM", "EXIT_UNAVAILABLE", "EXIT_USAGE"]


@dataclass(frozen=True)
class Settings:
    target: str
    operator_id: str
    secret: str
    json_output: bool


def load_settings(target: str | None, credentials: Path, operator: str | None, json_output: bool) -> Settings:
    """The operator's credential: SUBSIDYCTL_OPERATOR and SUBSIDYCTL_SECRET, else the operators
    in the credentials file written by `make run` / `server.reference load`."""
    operator_id = operator or os.environ.get("SUBSIDYCTL_OPERATOR", "")
    secret = os.environ.get("SUBSIDYCTL_SECRET", "")
    document: dict[str, Any] = {}
    if not secret:
        if not credentials.exists():
            raise click.UsageError(
                f"no credentials: {credentials} does not exist (make run writes {DEFAULT_CREDENTIALS});"
                " set SUBSIDYCTL_OPERATOR and SUBSIDYCTL_SECRET, or pass --credentials"
            )
        document = json.loads(credentials.read_text())
        operators: dict[str, str] = document.get("operators", {})
        if not operators:
            raise click.UsageError(f"{credentials} holds no operator credentials")
        operator_id = operator_id or next(iter(operators))
        if operator_id not in operators:
            raise click.UsageError(f"operator {operator_id} is not in {credentials}")
        secret = operators[operator_id]
    return Settings(
        target=target or os.environ.get("SUBSIDYCTL_TARGET") or document.get("target", "127.0.0.1:50051"),
        operator_id=operator_id,
        secret=secret,
        json_output=json_output,
    )


@dataclass
class Options:
    """The global options; the credential is read only when a command runs (so --help works
    anywhere without one). ``json_output`` is also set by a command's own ``--json``."""

    target: str | None = None
    credentials: Path = DEFAULT_CREDENTIALS
    operator: str | None = None
    json_output: bool = False

    def settings(self) -> Settings:
        return load_settings(self.target, self.credentials, self.operator, self.json_output)


def options() -> Options:
    """The current command's global options (defaults when run without the subsidyctl group,
    as the ``python -m`` aliases do)."""
    return click.get_current_context().ensure_object(Options)


def _set_json(context: click.Context, _parameter: click.Parameter, value: bool) -> None:
    if value:
        context.ensure_object(Options).json_output = True


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--json`` after the command too (``subsidyctl catalog list --json``), not only before it."""
    return click.option(
        "--json",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_json,
        help="print JSON instead of a table",
    )(function)


def pass_settings(function: Callable[..., Any]) -> Callable[..., Any]:
    """Passes the command the loaded Settings (the operator's credential) as its first argument."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return function(options().settings(), *args, **kwargs)

    return functools.update_wrapper(wrapper, function)


def operator_tls() -> TlsConfig | None:
    """subsidyctl's TLS to the gateway, from SUBSIDYCTL_TLS_CA (the CA of the gateway's
    certificate; set: TLS), SUBSIDYCTL_TLS_CERT and SUBSIDYCTL_TLS_KEY (the operator's client
    certificate, for mutual TLS). None: plaintext, for a gateway on loopback."""
    ca, certificate, key = (os.environ.get(f"SUBSIDYCTL_TLS_{name}") for name in ("CA", "CERT", "KEY"))
    if not (ca or certificate):
        return None
    if bool(certificate) != bool(key):
        raise click.UsageError("SUBSIDYCTL_TLS_CERT and SUBSIDYCTL_TLS_KEY go together")
    return TlsConfig(ca_file=ca or None, cert_file=certificate or None, key_file=key or None)


def run(
    settings: Settings, action: Callable[[SignedClient], Awaitable[T]], client_type: type[SignedClient] = SignedClient
) -> T:
    """Runs one async action with a signed client; a failed call exits 1 with its reason."""

    async def go() -> T:
        async with client_type(
            settings.target, settings.operator_id, settings.secret, deadline_s=30.0, tls=operator_tls()
        ) as client:
            return await action(client)

    try:
        return asyncio.run(go())
    except SubsidyError as error:
        raise failure(settings, error) from None


class Unavailable(click.ClickException):
    """A dependency (the gateway, PostgreSQL, Redis) did not answer: one line, exit status 3."""

    exit_code = EXIT_UNAVAILABLE


class ConfigurationError(click.ClickException):
    """A setting or the environment does not allow the command: one line, exit status 2 (a
    click.UsageError would print the usage too)."""

    exit_code = EXIT_USAGE


def failure(settings: Settings, error: SubsidyError) -> click.ClickException:
    """What the operator reads when a call fails: the status once (and the reason only when it
    says more), the gateway's message, and the details it does not already contain."""
    code = error.code.name
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        if error.reason == "DEPENDENCY_UNAVAILABLE":
            return Unavailable(f"{code}: the gateway at {settings.target} answered: {error.message}")
        return Unavailable(
            f"{code}: the gateway at {settings.target} does not answer ({' '.join(error.message.split())});"
            " is it running (make run)? --target, SUBSIDYCTL_TARGET or the credentials file name its address"
        )
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        # The gateway's own words are about callers in general ("terminal"); say it to an operator.
        return click.ClickException(
            f"{code}: the gateway at {settings.target} did not accept operator {settings.operator_id}'s"
            " credential: an unknown operator, a wrong secret, or this machine's clock more than 5 minutes off;"
            " check SUBSIDYCTL_OPERATOR / SUBSIDYCTL_SECRET or --credentials"
        )
    head = code if error.reason in ("", code) else f"{code} ({error.reason})"
    extra = {key: value for key, value in sorted(error.metadata.items()) if value not in error.message}
    detail = " ".join(f"{key}={value}" for key, value in extra.items())
    return click.ClickException(f"{head}: {error.message}" + (f" [{detail}]" if detail else ""))


def new_request_id() -> str:
    return str(uuid.uuid4())


def to_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def emit(settings: Settings, message: Message | dict[str, Any], rows: Sequence[dict[str, Any]] | None = None) -> None:
    """JSON with --json; otherwise a table of ``rows`` (or of the message's top-level fields)."""
    document = message if isinstance(message, dict) else to_dict(message)
    if settings.json_output:
        echo_json(document)
        return
    table = (
        list(rows)
        if rows is not None
        else [{key: value for key, value in document.items() if not isinstance(value, list | dict)}]
    )
    click.echo(format_table(table))


def echo_json(document: Any) -> None:
    click.echo(json.dumps(document, ensure_ascii=False, indent=2))


def emit_document(document: Any, json_output: bool | None = None) -> None:
    """A command's result (nested dicts and lists of plain values) as JSON with --json, else as
    tables: the scalar fields as FIELD / VALUE, then one titled table per list or mapping."""
    if options().json_output if json_output is None else json_output:
        echo_json(document)
        return
    click.echo(format_document(document))


def format_document(document: Any) -> str:
    if isinstance(document, list):
        return _format_list(document)
    if not isinstance(document, Mapping):
        return str(document)
    scalars = [{"field": key, "value": _cell(value)} for key, value in document.items() if not _nested(value)]
    parts = [format_table(scalars, header=False)] if scalars else []
    for key, value in document.items():
        if _nested(value):
            body = format_document(value) if isinstance(value, Mapping) else _format_list(value)
            parts.append(f"{key.upper().replace('_', ' ')}\n{body}")
    return "\n\n".join(parts)


def _nested(value: Any) -> bool:
    return isinstance(value, Mapping) or (isinstance(value, list) and any(isinstance(v, Mapping) for v in value))


def _format_list(items: list[Any]) -> str:
    if all(isinstance(item, Mapping) for item in items):
        return format_table([{key: _cell(value) for key, value in item.items()} for item in items])
    return ", ".join(map(str, items)) or "(none)"


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value


def format_table(rows: Sequence[Mapping[str, Any]], *, header: bool = True) -> str:
    """Rows as columns measured in terminal cells (a CJK character takes two), two spaces
    apart, numbers right-aligned; wrapped to the terminal's width on a terminal, never when
    the output goes to a file or a pipe."""
    if not rows:
        return "(none)"
    columns = list(dict.fromkeys(column for row in rows for column in row))
    table = Table(box=None, pad_edge=False, show_edge=False, show_header=header, header_style="bold")
    for column in columns:
        values = [row.get(column, "") for row in rows]
        numeric = all(isinstance(value, int | float) and not isinstance(value, bool) for value in values)
        table.add_column(Text(column.upper()), justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(Text(str(row.get(column, ""))) for column in columns))
    output = sys.stdout
    terminal = output.isatty()
    console = Console(
        file=output,
        width=None if terminal else 100_000,
        force_terminal=terminal,
        markup=False,
        highlight=False,
        emoji=False,
    )
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines())


# --- progress -------------------------------------------------------------------------------


class CountColumn(ProgressColumn):
    """Records done / in all; nothing for a step that is one indivisible action (total 1)."""

    def render(self, task: Task) -> Text:
        if task.total == 1:
            return Text("")
        done = f"{int(task.completed):,}"
        return Text(done if task.total is None else f"{done}/{int(task.total):,}")


class Steps:
    """Progress bars of one command, on stderr: one bar per step (``add``), advanced by count
    or set to (done, total). Drawn only when stderr is a terminal and the output is not JSON;
    otherwise every call does nothing."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def add(self, description: str, total: float | None = None) -> TaskID:
        return self._progress.add_task(description, total=total)

    def advance(self, task: TaskID, amount: float = 1) -> None:
        self._progress.advance(task, amount)

    def update(self, task: TaskID, done: float, total: float | None = None) -> None:
        self._progress.update(task, completed=done, total=total)

    def finish(self, task: TaskID) -> None:
        """Completes a bar (one of unknown length at the count it reached)."""
        state = next(item for item in self._progress.tasks if item.id == task)
        total = state.total if state.total is not None else (state.completed or 1)
        self._progress.update(task, total=total, completed=total)

    def reporter(self, description: str) -> Callable[[int, int], None]:
        """A (done, total) callback that draws its own bar, for the jobs of server/commands/."""
        task = self.add(description)
        return lambda done, total: self.update(task, done, total)


def progress_enabled(json_output: bool | None = None) -> bool:
    wants_json = options().json_output if json_output is None else json_output
    return not wants_json and sys.stderr.isatty()


@contextmanager
def steps(json_output: bool | None = None) -> Iterator[Steps]:
    console = Console(file=sys.stderr, markup=False, highlight=False, emoji=False)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        CountColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not progress_enabled(json_output),
    )
    with progress:
        yield Steps(progress)


# --- commands on PostgreSQL and Redis ---------------------------------------------------------


def local_config(*, needs_pg: bool = True) -> tuple[Config, dict[str, str]]:
    """The settings of a command that talks to PostgreSQL and Redis itself: SUBSIDY_* variables,
    else what make run recorded in .data/services.json; (config, what came from the record)."""
    recorded = use_recorded_services()
    try:
        config = Config.from_env()
    except ConfigError as error:
        raise ConfigurationError(f"configuration error: {error}") from None
    if needs_pg and not config.pg_dsn:
        raise ConfigurationError(missing_pg_dsn("subsidyctl").partition(": ")[2])
    return config, recorded


def check_services(config: Config, recorded: Mapping[str, str], *, needs_pg: bool = True) -> None:
    """Exit status 3 in one line unless the services the command needs answer."""
    guarded(
        lambda: require_services(
            pg_dsn=config.pg_dsn if needs_pg else None, redis_url=config.redis_url, recorded=recorded
        )
    )


def guarded(body: Callable[[], T]) -> T:
    """Runs ``body``; a dependency that does not answer (or goes away mid-way) becomes one line
    and exit status 3, never a traceback. Anything else is a bug and keeps its traceback."""
    try:
        return body()
    except Exception as exception:
        message = dependency_failure(exception)
        if message is None:
            raise
        raise Unavailable(message) from None


def finding(found: bool) -> None:
    """Exit status 1 when the command ran and found a problem."""
    if found:
        raise click.exceptions.Exit(EXIT_PROBLEM)
