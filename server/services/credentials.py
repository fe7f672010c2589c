"""CredentialService: partner apps, other service providers and the bureau's operator,
government and auditor credentials, onboarded through the API instead of a reference file.

Operator credentials only. Follows MerchantService's terminal credentials exactly: every
mutating call is one PostgreSQL transaction that makes the change and records it
(``storage.postgres.actions.record``: the append-only audit row, idempotency on the operator's
request_id); after the commit the credential is published to the Redis credential hash and the
reference version bumped, so every gateway's cache reloads it within its refresh interval
(``SUBSIDY_CREDENTIALS_REFRESH_MS``). A replay (same request_id and payload) changes nothing,
publishes the current state again (which completes a publication cut short) and answers with
an empty ``secret``: a secret leaves the server once.
"""

from __future__ import annotations

import logging

import grpc
from subsidy_client.v1 import common_pb2, credentials_pb2, credentials_pb2_grpc

from server.domain import merchants as text_rules
from server.domain.credentials import ROLES, refuse_status_change
from server.rpc.auth import OPERATOR, caller
from server.rpc.errors import ApiError, invalid_field
from server.services.operations import OperatorDeps, begin_action
from storage.postgres import credentials as credentials_db
from storage.postgres.actions import Action, Scope, record
from storage.postgres.pool import Pool

pb = credentials_pb2
log = logging.getLogger("subsidy.credentials")

ROLE_NAMES: dict[credentials_pb2.CredentialRole.ValueType, str] = {
    pb.CREDENTIAL_ROLE_PARTNER: "partner",
    pb.CREDENTIAL_ROLE_PROVIDER: "provider",
    pb.CREDENTIAL_ROLE_OPERATOR: "operator",
    pb.CREDENTIAL_ROLE_GOVERNMENT: "government",
    pb.CREDENTIAL_ROLE_AUDITOR: "auditor",
}
ROLE_VALUES = {name: value for value, name in ROLE_NAMES.items()}
assert sorted(ROLE_VALUES) == sorted(ROLES), "every role has its enum value"
STATUS_NAMES: dict[credentials_pb2.CredentialStatus.ValueType, str] = {
    pb.CREDENTIAL_STATUS_ACTIVE: "ACTIVE",
    pb.CREDENTIAL_STATUS_SUSPENDED: "SUSPENDED",
}
STATUS_VALUES = {name: value for value, name in STATUS_NAMES.items()}
# An empty scope: the change touches no campaign, merchant or product, so record() audits it
# without marking reference objects unpublished; the credential is published by this service.
NO_SCOPE = Scope()


def credential_message(row: credentials_db.CredentialRow) -> credentials_pb2.Credential:
    return pb.Credential(
        credential_id=row.credential_id,
        role=ROLE_VALUES[row.role],
        display_name=row.name,
        status=STATUS_VALUES[row.status],
        managed_by_api=row.managed_by_api,
    )


def check_role(role: credentials_pb2.CredentialRole.ValueType) -> str:
    if role not in ROLE_NAMES:
        raise invalid_field("role", "must be PARTNER, PROVIDER, OPERATOR, GOVERNMENT or AUDITOR")
    return ROLE_NAMES[role]


def check_status(status: credentials_pb2.CredentialStatus.ValueType, reason: str) -> str:
    if status not in STATUS_NAMES:
        raise invalid_field("status", "must be CREDENTIAL_STATUS_ACTIVE or CREDENTIAL_STATUS_SUSPENDED")
    # A suspension cuts a caller off: the audit trail must say why.
    text_rules.check_text(
        reason, "reason", text_rules.REASON_LENGTH_MAX, required=status == pb.CREDENTIAL_STATUS_SUSPENDED
    )
    return STATUS_NAMES[status]


class CredentialService(credentials_pb2_grpc.CredentialServiceServicer):
    def __init__(self, deps: OperatorDeps) -> None:
        self._deps = deps

    async def _publish(self, pool: Pool, credential_id: str) -> int:
        """The credential's committed state to Redis; returns the Redis reference version, which
        a gateway's cache has reached once it honours the change."""
        return await credentials_db.publish_credential(
            pool, self._deps.store.redis, self._deps.store.keys, credential_id
        )

    @staticmethod
    def _log(action: Action, version: int | None) -> None:
        # Never the secret: ids, the action and the request only.
        log.info(
            "credential action",
            extra={
                "action": action.action,
                "target": f"{action.target_kind}:{action.target_id}",
                "operator": action.operator_id,
                "request_id": action.request_id,
                "replayed": version is None,
            },
        )

    async def CreateCredential(
        self, request: credentials_pb2.CreateCredentialRequest, context: grpc.aio.ServicerContext
    ) -> credentials_pb2.CreateCredentialResponse:
        action = begin_action("CreateCredential", request, "credential", request.credential_id)
        text_rules.check_identifier(request.credential_id, "credential_id")
        role = check_role(request.role)
        text_rules.check_text(request.display_name, "display_name", text_rules.NAME_LENGTH_MAX)
        details = {"role": role, "display_name": request.display_name}
        pool = await self._deps.pool.get()
        secret = ""
        async with pool.acquire() as connection, connection.transaction():
            version = await record(connection, action, details, NO_SCOPE)
            if version is not None:
                secret = await credentials_db.insert_credential(
                    connection, request.credential_id, role, request.display_name
                )
            row = await credentials_db.fetch_credential(connection, request.credential_id)
        self._log(action, version)
        reference_version = await self._publish(pool, request.credential_id)
        return pb.CreateCredentialResponse(
            credential=credential_message(row), secret=secret, reference_version=reference_version
        )

    async def RotateCredential(
        self, request: credentials_pb2.RotateCredentialRequest, context: grpc.aio.ServicerContext
    ) -> credentials_pb2.RotateCredentialResponse:
        action = begin_action("RotateCredential", request, "credential", request.credential_id)
        text_rules.check_identifier(request.credential_id, "credential_id")
        pool = await self._deps.pool.get()
        secret = ""
        async with pool.acquire() as connection, connection.transaction():
            row = await credentials_db.fetch_credential(connection, request.credential_id, lock=True)
            version = await record(connection, action, {"role": row.role}, NO_SCOPE)
            if version is not None:
                secret = await credentials_db.rotate_secret(connection, row)
            row = await credentials_db.fetch_credential(connection, request.credential_id)
        self._log(action, version)
        reference_version = await self._publish(pool, request.credential_id)
        return pb.RotateCredentialResponse(
            credential=credential_message(row), secret=secret, reference_version=reference_version
        )

    async def SetCredentialStatus(
        self, request: credentials_pb2.SetCredentialStatusRequest, context: grpc.aio.ServicerContext
    ) -> credentials_pb2.SetCredentialStatusResponse:
        action = begin_action("SetCredentialStatus", request, "credential", request.credential_id)
        text_rules.check_identifier(request.credential_id, "credential_id")
        status = check_status(request.status, request.reason)
        pool = await self._deps.pool.get()
        async with pool.acquire() as connection, connection.transaction():
            # Locks in a fixed order: the active operators first, then the credential.
            active_operators = await credentials_db.lock_active_operators(connection)
            row = await credentials_db.fetch_credential(connection, request.credential_id, lock=True)
            details = {"status": status, "previous_status": row.status, "reason": request.reason}
            version = await record(connection, action, details, NO_SCOPE)
            if version is not None:
                refusal = refuse_status_change(
                    acting_operator_id=action.operator_id,
                    credential_id=row.credential_id,
                    role=row.role,
                    current_status=row.status,
                    new_status=status,
                    active_operator_ids=active_operators,
                )
                if refusal is not None:
                    # Raising rolls the audit row back with the rest: a refused call changes nothing.
                    raise ApiError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        common_pb2.ERROR_REASON_INVALID_STATE,
                        f"status: {refusal.message}",
                        {"field": "status", "refusal": refusal.refusal},
                    )
                await credentials_db.set_status(connection, row, status)
            row = await credentials_db.fetch_credential(connection, request.credential_id)
        self._log(action, version)
        reference_version = await self._publish(pool, request.credential_id)
        return pb.SetCredentialStatusResponse(credential=credential_message(row), reference_version=reference_version)

    async def ListCredentials(
        self, request: credentials_pb2.ListCredentialsRequest, context: grpc.aio.ServicerContext
    ) -> credentials_pb2.ListCredentialsResponse:
        caller(OPERATOR)
        pool = await self._deps.pool.get()
        async with pool.acquire() as connection:
            rows = await credentials_db.list_credentials(connection)
        return pb.ListCredentialsResponse(credentials=[credential_message(row) for row in rows])
