"""subsidyctl credential: onboard partner apps, other service providers and the bureau's
operator, government and auditor staff without a reference file (CredentialService).

    subsidyctl credential create p-alipay-01 --role partner --name "支付宝 (Alipay)"
    subsidyctl credential rotate p-alipay-01
    subsidyctl credential suspend p-alipay-01 --reason "contract ended"
    subsidyctl credential activate p-alipay-01
    subsidyctl credential list

Everything goes through the gateway signed with the operator's own credential, so each change
is in the operator audit trail like every other operator call (there is no local-database
variant in server/commands/: a credential change must be audited and published by the
gateway). A new or rotated secret is printed once, to stdout, and never again; the warning
about it goes to stderr. --request-id makes a retried create or rotate a replay (which answers
without the secret) instead of a second credential or a second rotation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import click
from subsidy_client import CredentialClient
from subsidy_client.v1 import credentials_pb2

from server.ctl.common import GATEWAY, Settings, emit, json_option, new_request_id, pass_settings, run

T = TypeVar("T")
ROLES: dict[str, credentials_pb2.CredentialRole.ValueType] = {
    "partner": credentials_pb2.CREDENTIAL_ROLE_PARTNER,
    "provider": credentials_pb2.CREDENTIAL_ROLE_PROVIDER,
    "operator": credentials_pb2.CREDENTIAL_ROLE_OPERATOR,
    "government": credentials_pb2.CREDENTIAL_ROLE_GOVERNMENT,
    "auditor": credentials_pb2.CREDENTIAL_ROLE_AUDITOR,
}
SECRET_WARNING = (
    "WARNING: the secret above is shown this once. Give it to the credential's holder over a secure"
    " channel now; it cannot be shown again (`subsidyctl credential rotate` issues a new one)."
)
REPLAY_NOTE = "This request id was used already: nothing changed and no secret is shown again."


def credential_row(credential: credentials_pb2.Credential) -> dict[str, Any]:
    return {
        "credential_id": credential.credential_id,
        "role": credentials_pb2.CredentialRole.Name(credential.role).removeprefix("CREDENTIAL_ROLE_").lower(),
        "name": credential.display_name,
        "status": credentials_pb2.CredentialStatus.Name(credential.status).removeprefix("CREDENTIAL_STATUS_"),
        "managed_by": "api" if credential.managed_by_api else "reference file",
    }


def run_credentials(settings: Settings, action: Callable[[CredentialClient], Awaitable[T]]) -> T:
    """``common.run`` with a CredentialClient (``run`` is typed for the base client)."""
    return run(settings, lambda client: action(cast(CredentialClient, client)), CredentialClient)


def _issued(settings: Settings, response: Any) -> None:
    """A create or rotate answer: the secret on stdout once (in the table or the JSON)."""
    emit(settings, response, [{**credential_row(response.credential), "secret": response.secret}])
    click.echo(SECRET_WARNING if response.secret else REPLAY_NOTE, err=True)


request_id_option = click.option(
    "--request-id", default=None, help="a UUID; reuse it to retry the same call safely (default: a new one)"
)


@click.group()
def credential() -> None:
    """Partner, provider, operator, government and auditor credentials."""


@credential.command(short_help="Create a credential; prints its secret once.")
@click.argument("credential_id")
@click.option("--role", type=click.Choice(sorted(ROLES)), required=True, help="what the credential may call")
@click.option("--name", "display_name", required=True, help="who holds it (shown in lists and the audit trail)")
@request_id_option
@json_option
@pass_settings
def create(settings: Settings, credential_id: str, role: str, display_name: str, request_id: str | None) -> None:
    """Create CREDENTIAL_ID with a role; its secret is printed once, to stdout."""
    response = run_credentials(
        settings,
        lambda client: client.create_credential(
            credential_id, ROLES[role], display_name, request_id=request_id or new_request_id()
        ),
    )
    _issued(settings, response)


@credential.command(short_help="Issue a new secret; prints it once.")
@click.argument("credential_id")
@request_id_option
@json_option
@pass_settings
def rotate(settings: Settings, credential_id: str, request_id: str | None) -> None:
    """Issue a new secret for CREDENTIAL_ID; the old one stops working within about a second on
    every gateway. The new secret is printed once, to stdout."""
    response = run_credentials(
        settings, lambda client: client.rotate_credential(credential_id, request_id=request_id or new_request_id())
    )
    _issued(settings, response)


def _set_status(
    settings: Settings, credential_id: str, status: credentials_pb2.CredentialStatus.ValueType, reason: str
) -> None:
    response = run_credentials(settings, lambda client: client.set_credential_status(credential_id, status, reason))
    emit(settings, response, [{**credential_row(response.credential), "reference_version": response.reference_version}])


@credential.command(short_help="Suspend a credential.")
@click.argument("credential_id")
@click.option("--reason", required=True, help="why (kept in the audit trail)")
@json_option
@pass_settings
def suspend(settings: Settings, credential_id: str, reason: str) -> None:
    """Suspend CREDENTIAL_ID: its calls are refused UNAUTHENTICATED on every gateway within about
    a second. Not your own credential, nor the last active operator."""
    _set_status(settings, credential_id, credentials_pb2.CREDENTIAL_STATUS_SUSPENDED, reason)


@credential.command(short_help="Reinstate a suspended credential.")
@click.argument("credential_id")
@click.option("--reason", default="", help="why (kept in the audit trail)")
@json_option
@pass_settings
def activate(settings: Settings, credential_id: str, reason: str) -> None:
    """Reinstate CREDENTIAL_ID with its current secret."""
    _set_status(settings, credential_id, credentials_pb2.CREDENTIAL_STATUS_ACTIVE, reason)


@credential.command("list")
@json_option
@pass_settings
def list_command(settings: Settings) -> None:
    """Every partner, provider and staff credential with its role and status (never a secret)."""
    found = run_credentials(settings, lambda client: client.list_credentials())
    if settings.json_output:
        emit(settings, {"credentials": [credential_row(item) for item in found]})
        return
    emit(settings, {}, [credential_row(item) for item in found])


SECTION = GATEWAY
COMMANDS = (credential,)
