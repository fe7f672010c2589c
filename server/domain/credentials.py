"""Credentials of the callers that are not terminals (issue 13, item 9): partner apps, other
service providers and the bureau's operator, government and auditor staff.

Pure rules: which roles exist and where each is kept, and when a status change must be refused.
Nothing here touches a database or gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.domain.reference import STAFF_ROLES

# Where each role lives: staff (STAFF_ROLES) in ``operators`` with their role, the others in
# ``partners`` with their kind. One caller namespace is shared with the terminals.
PARTNER_KINDS = {"partner": "APP", "provider": "PROVIDER"}
ROLES = ("partner", "provider", *STAFF_ROLES)
STATUSES = ("ACTIVE", "SUSPENDED")


@dataclass(frozen=True)
class StatusRefusal:
    """Why a status change cannot be made: ``refusal`` is machine-readable, ``message`` says it."""

    refusal: str
    message: str


def refuse_status_change(
    *,
    acting_operator_id: str,
    credential_id: str,
    role: str,
    current_status: str,
    new_status: str,
    active_operator_ids: frozenset[str],
) -> StatusRefusal | None:
    """An operator cannot suspend itself (it would lock itself out mid-task, and a stolen
    operator credential cannot be made to look legitimately retired by its holder), nor the
    last active operator credential (nobody could reinstate anyone through the API)."""
    if new_status != "SUSPENDED" or current_status == "SUSPENDED":
        return None
    if credential_id == acting_operator_id:
        return StatusRefusal("SELF_SUSPENSION", "an operator cannot suspend its own credential; ask another operator")
    if role == "operator" and active_operator_ids <= {credential_id}:
        return StatusRefusal(
            "LAST_ACTIVE_OPERATOR",
            f"{credential_id} is the last active operator credential; create or reinstate another first",
        )
    return None
