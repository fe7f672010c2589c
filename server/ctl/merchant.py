"""subsidyctl merchant: onboard merchants with stores and terminals; show; suspend and reinstate
merchants and terminals; rotate a terminal's credential.

    subsidyctl merchant onboard examples/merchants/suning-xiaoshan.yaml
    subsidyctl merchant show m-suning-xiaoshan
    subsidyctl merchant suspend-terminal t-suning-xiaoshan-pos-01 --reason "device reported stolen"
    subsidyctl merchant rotate-credential t-suning-xiaoshan-pos-01

Onboarding derives each call's request_id from that call's content (uuid5 over the request as
read from the file), so running the same file again replays every call: nothing changes and no
secret is issued again. A file edited after it was applied gets new request ids only for the
objects that changed, and the gateway refuses those that would overwrite an existing object
(ALREADY_EXISTS): onboarding creates, it never silently edits.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import click
import yaml
from google.protobuf.message import Message
from subsidy_client import MerchantClient, SubsidyError
from subsidy_client.errors import NotFound
from subsidy_client.v1 import common_pb2, merchant_pb2

from server.ctl.common import GATEWAY, Settings, emit, format_table, json_option, pass_settings, run

T = TypeVar("T")
C = TypeVar("C")
# Fixed forever: changing it would turn every re-run of an applied file into new actions.
ONBOARD_NAMESPACE = uuid.UUID("6f4d6a52-2b7e-4f0c-9a57-3c1d2f8b9e10")
SECRET_WARNING = (
    "WARNING: the secrets above are shown this once. Store each in its terminal's secure storage now;"
    " they cannot be shown again (rotate-credential issues a new one)."
)


# --- The onboarding file ----------------------------------------------------------------------


class OnboardingError(ValueError):
    """A malformed onboarding file; ``path`` locates the culprit (e.g. stores[0].location)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


@dataclass(frozen=True)
class Onboarding:
    """What a file asks for, as requests in the order they must be made (request ids unset)."""

    merchant: merchant_pb2.CreateMerchantRequest
    stores: tuple[merchant_pb2.CreateStoreRequest, ...]
    terminals: tuple[merchant_pb2.CreateTerminalRequest, ...]


MERCHANT_KEYS = frozenset({"id", "name", "licence_number", "categories"})
STORE_KEYS = frozenset({"id", "kind", "name", "address", "location", "platform", "shop_url", "terminals"})
LOCATION_KEYS = frozenset({"latitude", "longitude", "coordinate_system", "accuracy_m"})
KINDS: dict[str, merchant_pb2.StoreKind.ValueType] = {
    "PHYSICAL": merchant_pb2.STORE_KIND_PHYSICAL,
    "ONLINE": merchant_pb2.STORE_KIND_ONLINE,
}
SYSTEMS: dict[str, common_pb2.CoordinateSystem.ValueType] = {
    "WGS84": common_pb2.COORDINATE_SYSTEM_WGS84,
    "GCJ02": common_pb2.COORDINATE_SYSTEM_GCJ02,
}


def _mapping(value: Any, path: str, allowed: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise OnboardingError(path, "must be a mapping")
    # Unknown keys are refused: a misspelt "adress" must not silently drop the address.
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        raise OnboardingError(path, f"unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return value


def _text(record: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        # YAML reads unquoted digits as numbers (and 0-prefixed ones as octal): insist on quotes.
        raise OnboardingError(f"{path}.{key}", "is required as a (quoted) string")
    return value


def _number(record: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> float:
    value = record.get(key)
    if value is None and not required:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OnboardingError(f"{path}.{key}", "is required as a number")
    return float(value)


def _choice(record: Mapping[str, Any], key: str, path: str, choices: Mapping[str, C], prefix: str) -> C:
    value = str(record.get(key, "")).upper().removeprefix(prefix)
    if value not in choices:
        raise OnboardingError(f"{path}.{key}", f"must be one of {', '.join(choices)}")
    return choices[value]


def _list(record: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = record.get(key) or []
    if not isinstance(value, list):
        raise OnboardingError(f"{path}.{key}", "must be a list")
    return value


def parse_merchant(record: Any) -> merchant_pb2.Merchant:
    fields = _mapping(record, "merchant", MERCHANT_KEYS)
    categories = _list(fields, "categories", "merchant")
    for index, category in enumerate(categories):
        if not isinstance(category, str):
            raise OnboardingError(f"merchant.categories[{index}]", "must be a string")
    return merchant_pb2.Merchant(
        merchant_id=_text(fields, "id", "merchant"),
        name=_text(fields, "name", "merchant"),
        licence_number=_text(fields, "licence_number", "merchant"),
        categories=categories,
    )


def parse_location(record: Any, path: str) -> common_pb2.Location:
    fields = _mapping(record, path, LOCATION_KEYS)
    return common_pb2.Location(
        latitude=_number(fields, "latitude", path),
        longitude=_number(fields, "longitude", path),
        coordinate_system=_choice(fields, "coordinate_system", path, SYSTEMS, "COORDINATE_SYSTEM_"),
        accuracy_m=_number(fields, "accuracy_m", path, required=False),
    )


def parse_store(record: Any, path: str, merchant_id: str) -> tuple[merchant_pb2.Store, list[str]]:
    """One store and the ids of the terminals the file binds to it."""
    fields = _mapping(record, path, STORE_KEYS)
    store = merchant_pb2.Store(
        store_id=_text(fields, "id", path),
        merchant_id=merchant_id,
        kind=_choice(fields, "kind", path, KINDS, "STORE_KIND_"),
        name=_text(fields, "name", path),
        address=_text(fields, "address", path, required=False),
        platform=_text(fields, "platform", path, required=False),
        shop_url=_text(fields, "shop_url", path, required=False),
    )
    if fields.get("location") is not None:
        store.location.CopyFrom(parse_location(fields["location"], f"{path}.location"))
    terminal_ids = []
    for index, item in enumerate(_list(fields, "terminals", path)):
        terminal_path = f"{path}.terminals[{index}]"
        terminal = {"id": item} if isinstance(item, str) else _mapping(item, terminal_path, frozenset({"id"}))
        terminal_ids.append(_text(terminal, "id", terminal_path))
    return store, terminal_ids


def parse_onboarding(document: Any) -> Onboarding:
    """Reads an onboarding document (see ``onboard --help``); the gateway validates the values."""
    top = _mapping(document, "(file)", frozenset({"merchant", "stores"}))
    merchant = parse_merchant(top.get("merchant"))
    stores, terminals = [], []
    for index, record in enumerate(_list(top, "stores", "(file)")):
        store, terminal_ids = parse_store(record, f"stores[{index}]", merchant.merchant_id)
        stores.append(merchant_pb2.CreateStoreRequest(store=store))
        terminals += [
            merchant_pb2.CreateTerminalRequest(terminal_id=tid, store_id=store.store_id) for tid in terminal_ids
        ]
    return Onboarding(merchant_pb2.CreateMerchantRequest(merchant=merchant), tuple(stores), tuple(terminals))


def derived_request_id(method: str, request: Message) -> str:
    """A request id that is a function of the request's content (with its request_id unset), so
    sending the same content again is a replay rather than a second action."""
    content = request.SerializeToString(deterministic=True)
    return str(uuid.uuid5(ONBOARD_NAMESPACE, method + "\n" + content.hex()))


def with_derived_id(method: str, request: Any) -> Any:
    request.request_id = ""
    request.request_id = derived_request_id(method, request)
    return request


# --- Applying it ------------------------------------------------------------------------------


async def existing_objects(client: MerchantClient, merchant_id: str) -> set[tuple[str, str]]:
    """What exists before onboarding, only to report each step as created or already there."""
    try:
        merchant = await client.get_merchant(merchant_id)
    except NotFound:
        return set()
    return {
        ("merchant", merchant_id),
        *(("store", store.store_id) for store in merchant.stores),
        *(("terminal", terminal.terminal_id) for terminal in merchant.terminals),
    }


def _step(kind: str, identifier: str, existed: set[tuple[str, str]], secret: str = "") -> dict[str, str]:
    if (kind, identifier) not in existed:
        result = "created"
    elif kind == "terminal":
        result = "exists, unchanged (secret not shown again)"
    else:
        result = "exists, unchanged"
    return {"object": kind, "id": identifier, "result": result, "secret": secret}


async def _labelled(label: str, call: Callable[[], Awaitable[T]]) -> T:
    """Runs one call; a failure names the object of the file it was for."""
    try:
        return await call()
    except SubsidyError as error:
        raise type(error)(error.code, error.reason, f"{label}: {error.message}", error.metadata) from None


async def apply_onboarding(client: MerchantClient, plan: Onboarding) -> list[dict[str, str]]:
    """Creates the merchant, then its stores, then their terminals (each needs the one before)."""
    merchant_id = plan.merchant.merchant.merchant_id
    existed = await existing_objects(client, merchant_id)
    request = with_derived_id("CreateMerchant", plan.merchant)
    await _labelled(f"merchant {merchant_id}", lambda: client.create_merchant(request))
    steps = [_step("merchant", merchant_id, existed)]
    for store_request in plan.stores:
        store_request = with_derived_id("CreateStore", store_request)
        store_id = store_request.store.store_id
        await _labelled(f"store {store_id}", functools.partial(client.create_store, store_request))
        steps.append(_step("store", store_id, existed))
    for terminal_request in plan.terminals:
        terminal_request = with_derived_id("CreateTerminal", terminal_request)
        terminal_id = terminal_request.terminal_id
        response = await _labelled(
            f"terminal {terminal_id}", functools.partial(client.create_terminal, terminal_request)
        )
        steps.append(_step("terminal", terminal_id, existed, response.secret))
    return steps


# --- Output -----------------------------------------------------------------------------------


def _status(value: merchant_pb2.PartyStatus.ValueType) -> str:
    return str(merchant_pb2.PartyStatus.Name(value)).removeprefix("PARTY_STATUS_")


def merchant_row(merchant: merchant_pb2.Merchant) -> dict[str, Any]:
    return {
        "merchant_id": merchant.merchant_id,
        "name": merchant.name,
        "licence_number": merchant.licence_number,
        "status": _status(merchant.status),
        "categories": ",".join(merchant.categories) or "(all)",
    }


def store_row(store: merchant_pb2.Store) -> dict[str, Any]:
    if store.kind == merchant_pb2.STORE_KIND_ONLINE:
        where = f"{store.platform} {store.shop_url}"
    else:
        where = f"{store.address} ({store.location.latitude:.6f}, {store.location.longitude:.6f} WGS-84)"
    kind = str(merchant_pb2.StoreKind.Name(store.kind)).removeprefix("STORE_KIND_")
    return {"store_id": store.store_id, "kind": kind, "name": store.name, "where": where}


def terminal_row(terminal: merchant_pb2.Terminal) -> dict[str, Any]:
    return {
        "terminal_id": terminal.terminal_id,
        "merchant_id": terminal.merchant_id,
        "store_id": terminal.store_id,
        "status": _status(terminal.status),
    }


def _warn_if_secret(secrets: Sequence[str]) -> None:
    if any(secrets):
        click.echo(SECRET_WARNING, err=True)


def run_merchant(settings: Settings, action: Callable[[MerchantClient], Awaitable[T]]) -> T:
    """``common.run`` with a MerchantClient (``run`` is typed for the base client)."""
    return run(settings, lambda client: action(cast(MerchantClient, client)), MerchantClient)


# --- Commands ---------------------------------------------------------------------------------


@click.group()
def merchant() -> None:
    """Merchants, stores and terminals."""


@merchant.command(short_help="Create a merchant, its stores and terminals from a YAML file.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@pass_settings
def onboard(settings: Settings, file: Path) -> None:
    """Create a merchant with its stores and terminals from a YAML FILE.

    \b
    merchant: {id, name, licence_number, categories: [fridge, ...]}   (no categories: all)
    stores:
      - {id, kind: PHYSICAL, name, address,
         location: {latitude, longitude, coordinate_system: GCJ02 | WGS84, accuracy_m},
         terminals: [TERMINAL_ID, ...]}
      - {id, kind: ONLINE, name, platform, shop_url, terminals: [TERMINAL_ID, ...]}

    Each call's request id is derived from its content, so running the same file again
    changes nothing. New terminals' secrets are printed once, to stdout: store them.
    See examples/merchants/suning-xiaoshan.yaml.
    """
    try:
        plan = parse_onboarding(yaml.safe_load(file.read_text(encoding="utf-8")))
    except (OnboardingError, yaml.YAMLError) as error:
        raise click.ClickException(f"{file}: {error}") from None
    steps = run_merchant(settings, lambda client: apply_onboarding(client, plan))
    emit(settings, {"merchant_id": plan.merchant.merchant.merchant_id, "steps": steps}, steps)
    _warn_if_secret([step["secret"] for step in steps])


@merchant.command()
@click.argument("merchant_id")
@json_option
@pass_settings
def show(settings: Settings, merchant_id: str) -> None:
    """Show a merchant with its stores and terminals."""
    found = run_merchant(settings, lambda client: client.get_merchant(merchant_id))
    if settings.json_output:
        emit(settings, found)
        return
    click.echo(format_table([merchant_row(found)]))
    click.echo("\nSTORES\n" + format_table([store_row(store) for store in found.stores]))
    click.echo("\nTERMINALS\n" + format_table([terminal_row(terminal) for terminal in found.terminals]))


def _set_terminal(
    settings: Settings, terminal_id: str, status: merchant_pb2.PartyStatus.ValueType, reason: str
) -> None:
    response = run_merchant(settings, lambda client: client.set_terminal_status(terminal_id, status, reason))
    emit(settings, response, [{**terminal_row(response.terminal), "reference_version": response.reference_version}])


def _set_merchant(
    settings: Settings, merchant_id: str, status: merchant_pb2.PartyStatus.ValueType, reason: str
) -> None:
    response = run_merchant(settings, lambda client: client.set_merchant_status(merchant_id, status, reason))
    emit(settings, response, [{**merchant_row(response.merchant), "reference_version": response.reference_version}])


@merchant.command("suspend-terminal", short_help="Suspend a terminal.")
@click.argument("terminal_id")
@click.option("--reason", required=True, help="why (kept in the audit trail)")
@json_option
@pass_settings
def suspend_terminal(settings: Settings, terminal_id: str, reason: str) -> None:
    """Suspend a terminal: its next authorization is declined TERMINAL_INACTIVE."""
    _set_terminal(settings, terminal_id, merchant_pb2.PARTY_STATUS_SUSPENDED, reason)


@merchant.command("reinstate-terminal")
@click.argument("terminal_id")
@click.option("--reason", default="", help="why (kept in the audit trail)")
@json_option
@pass_settings
def reinstate_terminal(settings: Settings, terminal_id: str, reason: str) -> None:
    """Reinstate a suspended terminal."""
    _set_terminal(settings, terminal_id, merchant_pb2.PARTY_STATUS_ACTIVE, reason)


@merchant.command(short_help="Suspend a merchant and all its terminals.")
@click.argument("merchant_id")
@click.option("--reason", required=True, help="why (kept in the audit trail)")
@json_option
@pass_settings
def suspend(settings: Settings, merchant_id: str, reason: str) -> None:
    """Suspend a merchant: all its terminals are declined MERCHANT_INACTIVE."""
    _set_merchant(settings, merchant_id, merchant_pb2.PARTY_STATUS_SUSPENDED, reason)


@merchant.command()
@click.argument("merchant_id")
@click.option("--reason", default="", help="why (kept in the audit trail)")
@json_option
@pass_settings
def reinstate(settings: Settings, merchant_id: str, reason: str) -> None:
    """Reinstate a suspended merchant."""
    _set_merchant(settings, merchant_id, merchant_pb2.PARTY_STATUS_ACTIVE, reason)


@merchant.command("rotate-credential", short_help="Issue a new secret for a terminal.")
@click.argument("terminal_id")
@json_option
@pass_settings
def rotate_credential(settings: Settings, terminal_id: str) -> None:
    """Issue a new secret for a terminal; the old one stops working within about a second.

    The new secret is printed once, to stdout: install it on the terminal.
    """
    response = run_merchant(settings, lambda client: client.rotate_terminal_credential(terminal_id))
    emit(settings, response, [{**terminal_row(response.terminal), "secret": response.secret}])
    _warn_if_secret([response.secret])


SECTION = GATEWAY
COMMANDS = (merchant,)
