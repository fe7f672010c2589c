"""What every subsidyctl command shares: the operator's connection and the output format."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from subsidy_client import SignedClient, SubsidyError

from server.ctl.certs import operator_tls

T = TypeVar("T")
# Written by make run (server/commands/dev.py), beside the data directory rather than in it.
DEFAULT_CREDENTIALS = Path(".keys/credentials.json")
# Exit status when the gateway does not answer (server/commands/common.py: the same in every command).
EXIT_UNAVAILABLE = 3


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


@dataclass(frozen=True)
class Options:
    """The global options; the credential is read only when a command runs (so --help works
    anywhere without one)."""

    target: str | None
    credentials: Path
    operator: str | None
    json_output: bool

    def settings(self) -> Settings:
        return load_settings(self.target, self.credentials, self.operator, self.json_output)


def pass_settings(function: Callable[..., Any]) -> Callable[..., Any]:
    """Passes the command the loaded Settings as its first argument."""

    @click.pass_obj
    def wrapper(options: Options, *args: Any, **kwargs: Any) -> Any:
        return function(options.settings(), *args, **kwargs)

    return functools.update_wrapper(wrapper, function)


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


class GatewayUnavailable(click.ClickException):
    """The gateway (or a dependency behind it) did not answer: exit status 3, not 1."""

    exit_code = EXIT_UNAVAILABLE


def failure(settings: Settings, error: SubsidyError) -> click.ClickException:
    """What the operator reads when a call fails: the status once (and the reason only when it
    says more), the gateway's message, and the details it does not already contain."""
    code = error.code.name
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        if error.reason == "DEPENDENCY_UNAVAILABLE":
            return GatewayUnavailable(f"{code}: the gateway at {settings.target} answered: {error.message}")
        return GatewayUnavailable(
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
        click.echo(json.dumps(document, ensure_ascii=False, indent=2))
        return
    table = (
        list(rows)
        if rows is not None
        else [{key: value for key, value in document.items() if not isinstance(value, list | dict)}]
    )
    click.echo(format_table(table))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    columns = list(rows[0])
    widths = {column: max(len(column), *(len(str(row.get(column, ""))) for row in rows)) for column in columns}
    lines = ["  ".join(column.upper().ljust(widths[column]) for column in columns)]
    lines += ["  ".join(str(row.get(column, "")).ljust(widths[column]) for column in columns) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
