"""The contract between the Lua scripts and the Python that calls them, written once.

Each script is declared here, and nowhere else: its ``KEYS`` and its ``ARGV`` by name and in
order (a NamedTuple each), an optional repeated tail of either (a line's keys, a refund's line
ids), the decline reasons it numbers, and the type of its answer. From that one declaration:

- the Python call: ``storage/redis/store.py`` builds the NamedTuples (mypy checks every name)
  and ``Scripts.call`` sends them flattened, in declared order;
- the Lua names: a script reads ``KEY.nonce`` and ``ARG.hold_ttl_s`` (integers as numbers, but
  those marked ``IntAsSent`` as the decimal sent), never ``KEYS[1]`` or ``ARGV[9]``; the loader
  (``storage/redis/scripts.py``) turns each such name into the read it stands for (``bind``:
  ``KEYS[1]``, ``tonumber(ARGV[9])``), and refuses a name the declaration lacks when it loads the
  script, so no script reads a nil; it puts ``lua_bindings()`` first: the count of KEYS and ARGV
  checked, the tails' tables, the decline reasons as constants (``BUDGET_EXHAUSTED``, checked
  against the proto by tests/unit/test_script_contract.py);
- the answer: decoded by msgspec into the declared Structs (no ``dict[str, Any]``), the lines'
  one-letter JSON fields (kept in Redis, ledger events and PostgreSQL) into named attributes.

A script returns ``{kind, JSON}`` (see ``_lib.lua``): kind ``new`` (this call acted) or
``replay`` (the stored answer to an earlier call with the same request id) carry the declared
answer, decoded into ``Answer``; kind ``error`` (nothing was written) a ``Failure``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, NamedTuple, TypeVar, get_type_hints

import msgspec

# --- What the scripts answer, and what they keep -------------------------------------------------

AuthorizationState = Literal["PENDING", "CAPTURED", "VOIDED", "EXPIRED", "PARTIALLY_REFUNDED", "REFUNDED"]
QualificationState = Literal["ISSUED", "RESERVED", "REDEEMED", "EXPIRED", "CANCELLED"]
EventType = Literal["AUTHORIZED", "CAPTURED", "VOIDED", "EXPIRED", "REFUNDED", "CLAWED_BACK"]


class Line(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """One line (one unit) as the scripts keep it: in an authorization's hash and answer, and in
    ledger events (``lines``, ``all_lines``). The JSON keeps its one-letter names (they are in
    Redis, the stream and PostgreSQL's ``lines`` columns); Python reads the named attributes.
    A ledger event needs only the category, subsidy and GTIN of a line (and its serial, "" when
    none); the rest default as an event's validation always allowed."""

    line_id: str = msgspec.field(name="l", default="")
    gtin: str = msgspec.field(name="g")
    category: str = msgspec.field(name="c")
    unit_price_fen: int = msgspec.field(name="p", default=0)
    subsidy_fen: Annotated[int, msgspec.Meta(ge=0)] = msgspec.field(name="s")
    serial_number: str = msgspec.field(name="sn", default="")
    refunded: int = msgspec.field(name="r", default=0)  # 1 once refunded, 2 once clawed back (clawback.lua)
    # A basket voucher's line (authorize.lua): the units it counts against the per-person limit
    # (1 on the basket's first line, 0 on the others; in a refund's event, what it gives back).
    # None: an ordinary line, one unit.
    units: int | None = msgspec.field(name="u", default=None)


class AuthorizationView(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """An authorization as the scripts answer it (``auth_view`` in ``_lib.lua``) and as
    ``RedisStore.get_authorization`` reads it from its hash."""

    authorization_id: str = msgspec.field(name="id")
    state: AuthorizationState
    campaign_id: str = msgspec.field(name="campaign")
    merchant_id: str = msgspec.field(name="merchant")
    terminal_id: str = msgspec.field(name="terminal")
    channel: int
    lines: list[Line]
    total_price_fen: int = msgspec.field(name="total_fen")
    subsidy_fen: int
    refunded_fen: int
    created_ms: int
    hold_expires_ms: int = msgspec.field(name="expires_ms")
    updated_ms: int
    redemption_code: str = msgspec.field(name="qualification", default="")
    # The payment channel's transaction id given at capture (absent before one was given).
    channel_reference: str = ""


class QualificationView(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """A qualification as the scripts answer it (``qualification_view`` in ``_lib.lua``) and as
    ``RedisStore.get_qualification`` reads it; the masks are sealed, as stored."""

    redemption_code: str = msgspec.field(name="code")
    state: QualificationState
    campaign_id: str = msgspec.field(name="campaign")
    category: str
    consumer_key: str = msgspec.field(name="consumer")
    issued_ms: int
    expires_ms: int
    updated_ms: int
    authorization_id: str = msgspec.field(name="authorization", default="")
    masked_id: str = ""
    masked_phone: str = ""
    location_cell: str = msgspec.field(name="cell", default="")
    # A pack's voucher: its pack and its own amounts ("" and 0 for one claimed by category).
    pack_id: str = msgspec.field(name="pack", default="")
    threshold_fen: int = 0
    off_fen: int = 0


class Approved(msgspec.Struct, frozen=True, gc=False, tag_field="decision", tag="APPROVED"):
    authorization: AuthorizationView


class Declined(msgspec.Struct, frozen=True, gc=False, tag_field="decision", tag="DECLINED"):
    reason: int  # a DeclineReason number (DECLINE_REASONS)
    line_id: str = ""


class Settled(msgspec.Struct, frozen=True, gc=False):
    """Capture's and void's answer: the authorization as it now stands."""

    authorization: AuthorizationView


class Refunded(msgspec.Struct, frozen=True, gc=False):
    authorization: AuthorizationView
    refunded_fen: int


class ClawedBack(msgspec.Struct, frozen=True, gc=False):
    """clawback.lua's answer: the authorization (its clawed-back lines r = 2) and the subsidy
    this claw-back took back."""

    authorization: AuthorizationView
    clawed_back_fen: int
    line_ids: list[str]  # the lines this claw-back took back


class Expiry(msgspec.Struct, frozen=True, gc=False):
    """A sweeper's answer: whether this call expired the hold or qualification, and its state."""

    expired: bool
    state: str


class Issued(msgspec.Struct, frozen=True, gc=False, tag_field="decision", tag="ISSUED"):
    qualification: QualificationView
    # Every qualification issued: a pack's vouchers in its order (absent from answers stored
    # before packs: the one qualification).
    qualifications: list[QualificationView] = []


class ClaimDeclined(msgspec.Struct, frozen=True, gc=False, tag_field="decision", tag="DECLINED"):
    reason: int  # a ClaimDeclineReason number (CLAIM_DECLINE_REASONS)


class Cancelled(msgspec.Struct, frozen=True, gc=False):
    qualification: QualificationView


AuthorizeAnswer = Approved | Declined
ClaimAnswer = Issued | ClaimDeclined
R = TypeVar("R")


class Answer(msgspec.Struct, Generic[R], frozen=True, gc=False):
    """A script's answer: ``body`` is the declared type; ``replayed`` when it is the stored answer
    to an earlier call with the same request id."""

    body: R
    replayed: bool


class Failure(msgspec.Struct, frozen=True, gc=False):
    """A script's refusal (kind ``error``, ``fail`` in ``_lib.lua``): nothing was written, except
    that a hold found past its expiry was expired first. ``error`` is the code (NONCE_REUSED,
    IDEMPOTENCY_CONFLICT, AUTHORIZATION_NOT_FOUND, INVALID_STATE, ...); ``state`` and ``line_id``
    are "" unless the code has one."""

    error: str
    state: str = ""
    line_id: str = ""
    # Why a state-allowed call was refused anyway (capture of a blocked merchant's hold: error
    # MERCHANT_SUSPENDED, refusal MERCHANT_BLOCKED), or "".
    refusal: str = ""

    def details(self) -> dict[str, str]:
        """The refusal's details by name, as the error's metadata carries them."""
        found = {}
        if self.state:
            found["state"] = self.state
        if self.line_id:
            found["line_id"] = self.line_id
        if self.refusal:
            found["refusal"] = self.refusal
        return found


Reply = Answer[R] | Failure


class LedgerEventRecord(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """A ledger event as ``emit`` in ``_lib.lua`` appends it to the ledger stream (field ``e``).
    The fields from ``state`` on describe the authorization as it stands after the event (older
    events lack them: each defaults to what the event itself says)."""

    type: EventType
    authorization_id: str
    campaign_id: str = msgspec.field(name="campaign")
    merchant_id: str = msgspec.field(name="merchant")
    terminal_id: str = msgspec.field(name="terminal")  # the terminal that acted
    authorization_terminal: str = ""  # the terminal that authorized ("" in older events: terminal)
    consumer_key: str = msgspec.field(name="consumer")
    request_id: str = ""
    payload_hash: str = ""
    amount_fen: int
    at_ms: int
    lines: list[Line]  # the lines this event moves money for
    # The programme day (days since 1970-01-01 in its time zone) of an authorization counted
    # against its campaign's per-merchant daily limit, carried by its every event; 0 when not
    # counted (no limit, older events). Reconcile and rebuild derive the daily counters from it.
    day: int = 0
    state: str = ""
    channel: int = 0
    total_fen: int = 0
    subsidy_fen: int = 0
    refunded_fen: int = 0
    created_ms: int | None = None
    expires_ms: int | None = None
    all_lines: list[Line] | None = None
    qualification: str = ""
    # The payment channel's transaction id of a capture or refund (absent when none was given,
    # and in every other event and older ones).
    channel_reference: str = ""
    # A claw-back's risk case (clawback.lua); 0 in every other event.
    risk_case: int = 0


class RiskEventRecord(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """A risk event as ``risk_event`` in ``_lib.lua`` appends it to the risk event stream (field
    ``r``): a decline by a risk rule (a block, a velocity limit) or a flag (the price flag, on an
    approved authorization). Written into PostgreSQL's risk_events by the ledger writer process."""

    action: Literal["DECLINE", "FLAG"]
    rule: str  # the DeclineReason / ClaimDeclineReason name, or PRICE_AT_CAP_THRESHOLD
    subject_kind: str  # CONSUMER, DEVICE, MERCHANT, TERMINAL or PARTNER_APP
    subject_id: str
    campaign_id: str = msgspec.field(name="campaign")
    merchant_id: str = msgspec.field(name="merchant", default="")
    terminal_id: str = msgspec.field(name="terminal", default="")  # the caller (a partner's id for a claim)
    request_id: str
    authorization_id: str = msgspec.field(name="authorization", default="")
    evidence: dict[str, Any] = msgspec.field(default_factory=dict)
    at_ms: int


RISK_EVENT = msgspec.json.Decoder(RiskEventRecord)


# --- Enums the scripts number ---------------------------------------------------------------------

# DeclineReason in authorization.proto, without its prefix: authorize.lua's constants (lower wins).
DECLINE_REASONS: Mapping[str, int] = {
    "TERMINAL_INACTIVE": 1,
    "MERCHANT_INACTIVE": 2,
    "CAMPAIGN_NOT_FOUND": 3,
    "CAMPAIGN_NOT_ACTIVE": 4,
    "PRODUCT_NOT_ELIGIBLE": 5,
    "CATEGORY_NOT_COVERED": 6,
    "MERCHANT_CATEGORY_NOT_ALLOWED": 7,
    "GRADE_NOT_ELIGIBLE": 8,
    "PRICE_ABOVE_CEILING": 9,
    "PRICE_BELOW_THRESHOLD": 10,
    "SERIAL_REQUIRED": 11,
    "SERIAL_ALREADY_SUBSIDISED": 12,
    "CONSUMER_LIMIT_REACHED": 13,
    "BUDGET_EXHAUSTED": 14,
    "QUALIFICATION_REQUIRED": 15,
    "QUALIFICATION_NOT_FOUND": 16,
    "QUALIFICATION_NOT_USABLE": 17,
    "QUALIFICATION_EXPIRED": 18,
    "QUALIFICATION_CATEGORY_MISMATCH": 19,
    "CONSUMER_USED_ELSEWHERE": 20,
    "NO_SUBSIDY": 21,
    "STORE_OUTSIDE_REGION": 22,
    "MERCHANT_DAILY_LIMIT_REACHED": 23,
    "LOCATION_REQUIRED": 24,
    "LOCATION_MOCKED": 25,
    "LOCATION_STALE": 26,
    "LOCATION_INACCURATE": 27,
    "LOCATION_OUTSIDE_REGION": 28,
    "BASKET_BELOW_THRESHOLD": 29,
    "TERMINAL_VELOCITY_MINUTE": 30,
    "TERMINAL_VELOCITY_HOUR": 31,
    "MERCHANT_VELOCITY_DAY": 32,
    "CONSUMER_VELOCITY_HOUR": 33,
    "CONSUMER_BLOCKED": 34,
    "DEVICE_BLOCKED": 35,
    "MERCHANT_BLOCKED": 36,
    "TERMINAL_BLOCKED": 37,
    "PARTNER_APP_BLOCKED": 38,
}

# ClaimDeclineReason in qualification.proto, without its prefix: claim_qualification.lua's
# constants. The LOCATION_* reasons are the service's verdict, which the script passes on.
CLAIM_DECLINE_REASONS: Mapping[str, int] = {
    "CAMPAIGN_NOT_FOUND": 1,
    "CAMPAIGN_NOT_ACTIVE": 2,
    "USED_ELSEWHERE": 3,
    "LOCATION_MOCKED": 4,
    "LOCATION_STALE": 5,
    "LOCATION_INACCURATE": 6,
    "LOCATION_OUTSIDE_REGION": 7,
    "PERSON_LIMIT_REACHED": 8,
    "NOT_YET_RELEASED": 9,
    "QUOTA_EXHAUSTED": 10,
    "ALREADY_CLAIMED_THIS_ROUND": 11,
    "CONSUMER_BLOCKED": 12,
    "PARTNER_APP_BLOCKED": 13,
}


# --- KEYS and ARGV -----------------------------------------------------------------------------


class _AsSent:
    """The mark of ``IntAsSent``."""


# An integer argument the scripts only pass on (to a Redis command, or into their JSON): the script
# reads it as the decimal the caller sent, not as a Lua number, which would cost a tonumber on the
# way in and Redis's number-to-text conversion on the way out, about 3,400 instructions a TTL
# (README, "The authorize script inside Redis"). Python gives an int, as for any integer.
IntAsSent = Annotated[int, _AsSent]


class AuthorizeKeys(NamedTuple):
    nonce: str  # string: the request's nonce, claimed first
    idempotency: str  # string: "<payload hash>|<answer JSON>" under the caller and request id
    terminal: str  # hash: status, merchant
    merchant: str  # hash: status, categories (",a,b," or "" for every category)
    campaign: str  # hash: status, starts_ms, ends_ms, q_validity_s, region_bound, day_limit, loc_redeem
    rules: str  # hash: category -> rule JSON (storage/redis/reference.py)
    budget: str  # hash: <category>:total|reserved|spent|refunded, fen
    # hash: category -> units held or bought by this consumer; day:<day>:<merchant> -> the
    # consumer's payments at that merchant that day, under a per-merchant daily limit. With no
    # consumer_key in ARGV (a till that sent only a redemption code) this is the key's prefix
    # (keys.usage with an empty consumer key): the script appends the qualification's owner.
    usage: str
    authorization: str  # hash: written on approval
    holds: str  # zset: authorization id scored by hold expiry (ms)
    ledger: str  # stream: one event per reservation
    qualification: str  # hash: the redemption code's (a placeholder, never read, without one)
    # hash: category -> provider that reported this consumer using it (a prefix, completed by
    # the script, like usage, when ARGV has no consumer_key)
    external_consumer: str
    qualification_events: str  # stream: the qualification's new state, mirrored into PostgreSQL
    # set: the stores inside the campaign's region (read only when it binds redemption to it)
    region_stores: str
    blocks: str  # hash: <KIND>:<subject id> -> block expiry ms (0: until lifted), the blocks in force
    risk_events: str  # stream: each decline by a risk rule and each flag, written into PostgreSQL
    # Velocity counters of the campaign (touched only for the limits it sets): zset of the
    # terminal's sales (authorization id scored by ms, the last hour); hash day -> the merchant's
    # sales; zset of the consumer's sales (a prefix, completed by the script like usage, when
    # ARGV has no consumer_key)
    velocity_terminal: str
    velocity_merchant: str
    velocity_consumer: str
    # hash per programme day (a prefix: the script appends the day): the price flag's counts
    price_mix: str


class LineKeys(NamedTuple):
    product: str  # hash: active, category, grade, reference_price_fen, serial_required
    serial: str  # string: the device's holder (a placeholder, never touched, without a serial)


class AuthorizeArgs(NamedTuple):
    payload_hash: str
    request_id: str
    terminal_id: str
    merchant_id: str
    campaign_id: str
    consumer_key: str  # "" when the consumer is the redemption code's owner (read by the script)
    channel: IntAsSent
    authorization_id: str  # the new authorization's id
    hold_ttl_s: int
    idempotency_ttl_s: IntAsSent
    nonce_ttl_s: IntAsSent
    redemption_code: str  # "" when none
    # The programme time zone's UTC offset now, in ms: the script's day (per-merchant daily
    # limit) is floor((Redis TIME + this) / 86,400,000), a calendar day in that zone.
    day_offset_ms: int
    # Location at redemption: 0 (the phone's location accepted) or the DeclineReason the
    # service's verdict gave (LOCATION_REQUIRED when none was sent, LOCATION_MOCKED ...
    # LOCATION_OUTSIDE_REGION); the script applies it only when the campaign's loc_redeem is 1.
    location_verdict: int


class LineArgs(NamedTuple):
    """One line of an Authorize (what ``RedisStore.authorize`` is given per line)."""

    line_id: str
    gtin: str
    unit_price_fen: int
    serial_number: str  # "" when none


class HoldKeys(NamedTuple):
    """An authorization's keys (expire_hold's KEYS; capture, void and refund have these too):
    named by the caller from its immutable fields. Its qualification's five keys are
    placeholders, never touched, when it redeemed none."""

    authorization: str  # hash
    holds: str  # zset
    budget: str  # hash: its campaign's
    usage: str  # hash: its consumer's in that campaign
    ledger: str  # stream
    qualification: str  # hash: the qualification it redeemed
    qualification_quota: str  # hash: <category>:claimed of that campaign
    qualification_holder: str  # hash: category -> the consumer's qualifications out of the pool
    qualification_expiry: str  # zset: codes by expiry (ms)
    qualification_events: str  # stream


class LifecycleKeys(NamedTuple):
    """Capture's, void's and refund's KEYS: the caller's, then the authorization's (HoldKeys)."""

    nonce: str
    idempotency: str
    terminal: str  # hash: the calling terminal's status and merchant
    merchant: str  # hash: its merchant's status
    authorization: str
    holds: str
    budget: str
    usage: str
    ledger: str
    qualification: str
    qualification_quota: str
    qualification_holder: str
    qualification_expiry: str
    qualification_events: str
    # hash: the blocks in force; capture refuses a blocked merchant's holds (MERCHANT_BLOCKED)
    blocks: str


class LifecycleArgs(NamedTuple):
    payload_hash: str
    request_id: str
    merchant_id: str  # the caller's merchant
    idempotency_ttl_s: IntAsSent
    nonce_ttl_s: IntAsSent
    campaign_id: str  # as the caller read them from the authorization (re-checked)
    consumer_key: str
    terminal_id: str  # the calling terminal


class NoArgs(NamedTuple):
    pass


class ClaimKeys(NamedTuple):
    nonce: str
    idempotency: str
    campaign: str  # hash: status, starts_ms, ends_ms, q_validity_s, q_refund, q_reclaim
    rules: str  # hash: category -> rule JSON (q_quota, q_tranches, per_person_limit)
    qualification_quota: str  # hash: <category>:claimed -> qualifications out of the pool
    # hash: category -> this consumer's qualifications out of the pool; <category>:issued ->
    # every one ever issued to them in the campaign (claim once per round)
    qualification_holder: str
    external_consumer: str  # hash: category -> provider that reported this consumer using it
    qualification: str  # hash: written when issued
    consumer_qualifications: str  # zset: the consumer's codes by issue time
    qualification_expiry: str  # zset: codes by expiry (ms), for the sweeper
    qualification_events: str  # stream: the new qualification, mirrored into PostgreSQL
    blocks: str  # hash: the blocks in force (CONSUMER and PARTNER_APP are read)
    risk_events: str  # stream: a decline by a block


class ClaimArgs(NamedTuple):
    payload_hash: str
    request_id: str
    partner_id: str
    campaign_id: str
    category: str
    consumer_key: str
    redemption_code: str  # the new qualification's code
    location_verdict: int  # 0, or the ClaimDeclineReason the service's location check gave
    idempotency_ttl_s: IntAsSent
    nonce_ttl_s: IntAsSent
    # Each sealed under the provider's local data key, or "" (no key, no phone); never a mask
    # in clear (docs/privacy.md).
    masked_id_number: str
    masked_phone_number: str
    location_cell: str  # the coarse cell kept with the qualification
    # A pack claim: the campaign's pack to issue whole ("" for a claim by category, which
    # issues redemption_code into KEY.qualification); its vouchers take the first codes of
    # the VOUCHERS tails, one per voucher in the pack's order (the rest are never written).
    pack_id: str


class VoucherArgs(NamedTuple):
    """One code a pack claim may issue (ARG.vouchers[i]; its hash is KEY.vouchers[i])."""

    code: str
    masked_id_number: str  # sealed for this code, as ClaimArgs' masks
    masked_phone_number: str


class CancelKeys(NamedTuple):
    nonce: str
    idempotency: str
    qualification: str
    qualification_quota: str
    qualification_holder: str
    qualification_expiry: str
    qualification_events: str


class CancelArgs(NamedTuple):
    payload_hash: str
    request_id: str
    partner_id: str
    idempotency_ttl_s: IntAsSent
    nonce_ttl_s: IntAsSent
    campaign_id: str  # as the caller read them from the qualification (re-checked)
    consumer_key: str


class QualificationKeys(NamedTuple):
    """expire_qualification's KEYS (cancel_qualification's and the lifecycle's have these too)."""

    qualification: str
    qualification_quota: str
    qualification_holder: str
    qualification_expiry: str
    qualification_events: str


class ExpireQualificationArgs(NamedTuple):
    redemption_code: str


class ClawBackKeys(NamedTuple):
    """clawback.lua's KEYS: an operator's call (no nonce, no terminal), the authorization and
    its campaign's budget."""

    idempotency: str  # string: the answer under "operator:<operator id>" and the request id
    authorization: str  # hash
    budget: str  # hash: <category>:clawed_back rises; spent stays (recovered money is not re-granted)
    ledger: str  # stream


class ClawBackArgs(NamedTuple):
    payload_hash: str
    request_id: str
    idempotency_ttl_s: IntAsSent
    campaign_id: str  # as the caller read it from the authorization (re-checked)
    operator_id: str  # the event's terminal is "operator:<operator id>"
    risk_case: int  # the CONFIRMED risk case, carried in the event


# --- The declarations -----------------------------------------------------------------------------

K = TypeVar("K", bound=tuple[Any, ...])
A = TypeVar("A", bound=tuple[Any, ...])


@dataclass(frozen=True)
class Tail:
    """A repeated tail of KEYS or ARGV after the declared names: the script sees it as the list
    ``KEY.<name>`` / ``ARG.<name>``, of tables of the item's fields when the item is a NamedTuple,
    of strings when it is ``str``."""

    name: str
    item: type[Any]

    @property
    def width(self) -> int:
        """How many KEYS or ARGV one item takes."""
        return 1 if self.item is str else len(self.item._fields)


class Script(Generic[K, A, R]):
    """One script's declaration: its name (``lua/<name>.lua``), KEYS, ARGV, the tails after
    them, the enums it numbers and its answer's type."""

    def __init__(
        self,
        name: str,
        keys: type[K],
        args: type[A],
        answer: Any,
        key_tail: Tail | None = None,
        arg_tail: Tail | None = None,
        enums: Mapping[str, int] | None = None,
    ) -> None:
        self.name = name
        self.keys = keys
        self.args = args
        self.answer_type = answer
        self.key_tail = key_tail
        self.arg_tail = arg_tail
        self.enums: Mapping[str, int] = enums or {}
        # KEYS and ARGV per item of each tail (0: no tail).
        self.key_width = key_tail.width if key_tail else 0
        self.arg_width = arg_tail.width if arg_tail else 0
        self.decoder: msgspec.json.Decoder[R] = msgspec.json.Decoder(answer)

    def lua_bindings(self) -> str:
        """The Lua the loader puts before everything else in the script: KEYS and ARGV checked to
        hold at least the declared names (a call missing one fails before it reads anything), each
        tail's table (``KEY_<name>``, ``ARG_<name>``: what ``KEY.<name>`` reads, see ``bind``) and
        the enum constants. Nothing else is built per call: ``KEY.nonce`` is ``KEYS[1]`` itself."""
        keys, args = len(_fields(self.keys)), len(_fields(self.args))
        declared = f"' ARGV, not {keys} and {args}'"
        out = [
            f"-- Generated by the loader from storage/redis/contract.py (script {self.name!r}): the",
            "-- script reads its KEYS and ARGV through the names KEY.<name> and ARG.<name> only.",
            # Globals read once, as locals: the script and the helpers read them on every call.
            "local KEYS, ARGV, tonumber = KEYS, ARGV, tonumber",
            f"if #KEYS < {keys} or #ARGV < {args} then",
            f"  error('not in the script contract: ' .. #KEYS .. ' KEYS and ' .. #ARGV .. {declared})",
            "end",
        ]
        if any(tail is not None and tail.item is not str for tail in (self.key_tail, self.arg_tail)):
            # The metatable of the tails' items: a name the declaration lacks is an error.
            out.append(
                "local STRICT = {__index = function(_, name)"
                " error('not in the script contract: ' .. tostring(name), 2) end}"
            )
        out += _tail("KEY", "KEYS", keys, self.key_tail)
        out += _tail("ARG", "ARGV", args, self.arg_tail)
        out += [f"local {name} = {number}" for name, number in self.enums.items()]
        return "\n".join(out) + "\n"

    def bind(self, code: str) -> str:
        """``code`` (Lua) with each ``KEY.<name>`` and ``ARG.<name>`` replaced by the read it stands
        for: ``KEYS[i]``, ``ARGV[i]`` or ``tonumber(ARGV[i])`` for an integer (not ``IntAsSent``), the tail's table for
        a tail. A name the declaration lacks, or ``KEY`` or ``ARG`` not followed by a name, raises
        ValueError: the script would read a nil. Comments and strings are left as they are."""
        reads: dict[str, dict[str, str]] = {}
        for table, source, declared, tail in (
            ("KEY", "KEYS", self.keys, self.key_tail),
            ("ARG", "ARGV", self.args, self.arg_tail),
        ):
            fields = enumerate(_fields(declared), 1)
            reads[table] = {field: _value(source, str(index), numeric) for index, (field, numeric) in fields}
            if tail is not None:
                reads[table][tail.name] = f"{table}_{tail.name}"

        def read(found: re.Match[str]) -> str:
            table, name = found.group("table"), found.group("field")
            if table is None:
                return found.group(0)
            if name is None:
                raise ValueError(f"script {self.name!r} uses {table} other than as {table}.<name>")
            if name not in reads[table]:
                raise ValueError(f"script {self.name!r} reads {table}.{name}: not in the script contract")
            return reads[table][name]

        return LUA_TABLE_READS.sub(read, code)


# Lua comments and string literals (a regular expression, compiled with re.DOTALL): what a scan
# of Lua code for names skips.
LUA_COMMENTS_AND_STRINGS = (
    r"""--\[(?P<level>=*)\[.*?\](?P=level)\]|--[^\n]*"""
    r"""|'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"|\[(?P<string>=*)\[.*?\](?P=string)\]"""
)
# Reads of KEY.<name> or ARG.<name> outside comments and strings; a KEY or ARG that is not such a
# read leaves the group "field" empty.
LUA_TABLE_READS = re.compile(
    LUA_COMMENTS_AND_STRINGS + r"|(?<![\w.:])(?P<table>KEY|ARG)\b(?:\.(?P<field>[A-Za-z_]\w*))?", re.DOTALL
)


def _fields(item: type[Any]) -> list[tuple[str, bool]]:
    """(name, is a Lua number: an integer not marked ``IntAsSent``) for each field of a
    NamedTuple, in order."""
    hints = get_type_hints(item, include_extras=True)
    return [(name, hints[name] is int) for name in item._fields]


def _value(source: str, index: str, numeric: bool) -> str:
    read = f"{source}[{index}]"
    return f"tonumber({read})" if numeric else read


def _tail(table: str, source: str, declared: int, tail: Tail | None) -> list[str]:
    """The tail's table, ``<table>_<name>``: its items from KEYS or ARGV after the declared ones."""
    if tail is None:
        return []
    if tail.item is str:
        item = f"{source}[i]"
    else:
        values = ", ".join(
            f"{field} = {_value(source, 'i' if offset == 0 else f'i + {offset}', numeric)}"
            for offset, (field, numeric) in enumerate(_fields(tail.item))
        )
        item = f"setmetatable({{{values}}}, STRICT)"
    step = "" if tail.width == 1 else f", {tail.width}"
    return [
        f"local {table}_{tail.name} = {{}}",
        "do",
        f"  local tail, n = {table}_{tail.name}, 0",
        f"  for i = {declared + 1}, #{source}{step} do",
        "    n = n + 1",
        f"    tail[n] = {item}",
        "  end",
        "end",
    ]


SERIALS = Tail("serials", str)  # the serial keys of the authorization's lines that carry one, in line order

AUTHORIZE: Script[AuthorizeKeys, AuthorizeArgs, AuthorizeAnswer] = Script(
    "authorize",
    AuthorizeKeys,
    AuthorizeArgs,
    AuthorizeAnswer,
    key_tail=Tail("lines", LineKeys),
    arg_tail=Tail("lines", LineArgs),
    enums=DECLINE_REASONS,
)


class ChannelLifecycleArgs(NamedTuple):
    """Capture's and refund's ARGV: LifecycleArgs, then the payment channel's reference."""

    payload_hash: str
    request_id: str
    merchant_id: str
    idempotency_ttl_s: IntAsSent
    nonce_ttl_s: IntAsSent
    campaign_id: str
    consumer_key: str
    terminal_id: str
    channel_reference: str  # the acquirer's or wallet's transaction id; "" when none


CAPTURE: Script[LifecycleKeys, ChannelLifecycleArgs, Settled] = Script(
    "capture", LifecycleKeys, ChannelLifecycleArgs, Settled, key_tail=SERIALS
)
VOID: Script[LifecycleKeys, LifecycleArgs, Settled] = Script(
    "void", LifecycleKeys, LifecycleArgs, Settled, key_tail=SERIALS
)
REFUND: Script[LifecycleKeys, ChannelLifecycleArgs, Refunded] = Script(
    "refund",
    LifecycleKeys,
    ChannelLifecycleArgs,
    Refunded,
    key_tail=SERIALS,
    # The line ids to refund; none means every line not yet refunded.
    arg_tail=Tail("line_ids", str),
)
EXPIRE_HOLD: Script[HoldKeys, NoArgs, Expiry] = Script("expire_hold", HoldKeys, NoArgs, Expiry, key_tail=SERIALS)
# The line ids to claw back; none means every line neither refunded nor clawed back.
CLAW_BACK: Script[ClawBackKeys, ClawBackArgs, ClawedBack] = Script(
    "clawback", ClawBackKeys, ClawBackArgs, ClawedBack, arg_tail=Tail("line_ids", str)
)
CLAIM: Script[ClaimKeys, ClaimArgs, ClaimAnswer] = Script(
    "claim_qualification",
    ClaimKeys,
    ClaimArgs,
    ClaimAnswer,
    # A pack claim's candidate codes: their qualification hashes and their codes and masks
    # (empty for a claim by category).
    key_tail=Tail("vouchers", str),
    arg_tail=Tail("vouchers", VoucherArgs),
    enums=CLAIM_DECLINE_REASONS,
)
CANCEL: Script[CancelKeys, CancelArgs, Cancelled] = Script("cancel_qualification", CancelKeys, CancelArgs, Cancelled)
EXPIRE_QUALIFICATION: Script[QualificationKeys, ExpireQualificationArgs, Expiry] = Script(
    "expire_qualification", QualificationKeys, ExpireQualificationArgs, Expiry
)

SCRIPTS: tuple[Script[Any, Any, Any], ...] = (
    AUTHORIZE,
    CAPTURE,
    VOID,
    REFUND,
    EXPIRE_HOLD,
    CLAIM,
    CANCEL,
    EXPIRE_QUALIFICATION,
    CLAW_BACK,
)

FAILURE = msgspec.json.Decoder(Failure)
LINES = msgspec.json.Decoder(list[Line])
