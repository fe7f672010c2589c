"""Reference data (campaigns, rules, products, merchants, terminals) parsed and validated.

Pure functions: a file or an operator call becomes these frozen dataclasses or a
``ReferenceError`` naming the offending field. Nothing here touches a database.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson
import shapely.geometry

from server.domain.geo import CoordinateSystem, region_to_wgs84
from server.domain.gtin import is_valid_gtin13

IDENTIFIER = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
CATEGORY = re.compile(r"^[a-z0-9_]{1,32}\Z")
# Upper bounds that keep every sum exact in Lua's doubles (see storage/redis/lua/_lib.lua).
PRICE_FEN_MAX = 10_000_000_000
QUOTA_MAX = 1_000_000_000
BUDGET_FEN_MAX = 10_000_000_000_000
GRADES = ("0", "1", "2", "3", "4", "5")
# What a FIXED rule's threshold applies to: each line, or the payment's lines of the category.
THRESHOLD_SCOPES = ("LINE", "BASKET")


class ReferenceError(ValueError):
    """A reference record that cannot work; ``field`` is a dotted path to the culprit."""

    def __init__(self, field_path: str, reason: str) -> None:
        super().__init__(f"{field_path}: {reason}")
        self.field = field_path
        self.reason = reason


@dataclass(frozen=True)
class Rule:
    category: str
    kind: str  # "PERCENT" or "FIXED"
    rates_bp: Mapping[str, int]
    cap_fen: int
    threshold_fen: int
    off_fen: int
    price_ceiling_fen: int
    per_person_limit: int
    budget_fen: int
    # (release time, amount) pairs in release order; empty: the whole budget is released.
    tranches: Sequence[tuple[datetime, int]] = ()
    # Campaigns that issue qualifications: how many in all, and (release time, count) pairs;
    # without tranches the whole quota is released when the campaign starts.
    qualification_quota: int = 0
    qualification_tranches: Sequence[tuple[datetime, int]] = ()
    # FIXED rules: what threshold_fen applies to, "LINE" (each line on its own, the rule before
    # this field) or "BASKET" (the payment's lines of the category together, the amount off
    # shared among them: server/domain/basket.py).
    threshold_scope: str = "LINE"


# Voucher packs (issue 13, item 5): at most this many packs per campaign and vouchers per pack.
# Hangzhou's packs hold 3 to 5 vouchers; the bound keeps one claim's script call small.
PACKS_MAX = 20
PACK_VOUCHERS_MAX = 10


@dataclass(frozen=True)
class PackVoucher:
    """One voucher of a pack: off_fen off a payment of the category of at least threshold_fen,
    in place of the category rule's amounts (the rule must be FIXED)."""

    category: str
    threshold_fen: int
    off_fen: int


@dataclass(frozen=True)
class VoucherPack:
    """Vouchers claimed together, atomically, against a quota counting packs."""

    pack_id: str
    vouchers: Sequence[PackVoucher]
    quota: int
    # (release time, count of packs) pairs; empty: the whole quota at the campaign's start.
    tranches: Sequence[tuple[datetime, int]] = ()


@dataclass(frozen=True)
class Campaign:
    campaign_id: str
    name: str
    status: str
    starts_at: datetime
    ends_at: datetime
    rules: Sequence[Rule]
    region: Mapping[str, Any] | None = None
    qualification_validity_s: int = 0
    refund_policy: str = "COUNT_AS_USED"
    packs: Sequence[VoucherPack] = ()
    location_max_accuracy_m: int = 100
    location_max_age_s: int = 300
    # Redemption only at stores inside the region (STORE_OUTSIDE_REGION); needs a region.
    redeem_in_region_only: bool = False
    # Approved payments per consumer per merchant per programme day; None: no limit.
    per_merchant_daily_limit: int | None = None
    # A person whose qualification expired unused or was cancelled may claim again this round.
    reclaim_after_expiry: bool = False
    # Authorize needs the phone's location, checked as a claim's (LOCATION_*); needs a region.
    require_location_at_redemption: bool = False
    # Hot-path risk rules (RiskLimits in campaign.proto): the fields set (non-zero), by name.
    risk_limits: Mapping[str, int] = field(default_factory=dict)

    @property
    def issues_qualifications(self) -> bool:
        """Such a campaign's Authorize needs a redemption code; others refuse one."""
        return self.qualification_validity_s > 0


@dataclass(frozen=True)
class Product:
    gtin: str
    brand: str
    model: str
    category: str
    energy_grade: int
    reference_price_fen: int
    serial_required: bool
    active: bool


@dataclass(frozen=True)
class Terminal:
    terminal_id: str
    status: str
    secret: str | None  # None: issue one when loading
    # Must call with a client certificate naming it (mutual TLS, server/rpc/tls.py).
    require_client_certificate: bool = False


@dataclass(frozen=True)
class Merchant:
    merchant_id: str
    name: str
    licence_number: str
    status: str
    categories: Sequence[str]
    terminals: Sequence[Terminal] = field(default_factory=tuple)


# The roles of staff credentials (``operators:`` in a reference file): the provider's
# operators, the bureau's read-only government users (daily reports; later the live stream,
# the dashboard and the archive) and its auditors (the audit archive only).
STAFF_ROLES = ("operator", "government", "auditor")


@dataclass(frozen=True)
class Operator:
    operator_id: str
    name: str
    status: str
    secret: str | None  # None: issue one when loading
    role: str = "operator"  # one of STAFF_ROLES


@dataclass(frozen=True)
class Partner:
    """A partner consumer app (APP) or another service provider (PROVIDER)."""

    partner_id: str
    name: str
    kind: str
    status: str
    secret: str | None  # None: issue one when loading
    require_client_certificate: bool = False


@dataclass(frozen=True)
class ReferenceData:
    campaigns: Sequence[Campaign]
    products: Sequence[Product]
    merchants: Sequence[Merchant]
    operators: Sequence[Operator] = ()
    partners: Sequence[Partner] = ()


def _require(record: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in record or record[key] is None:
        raise ReferenceError(f"{path}.{key}", "is required")
    return record[key]


def _integer(record: Mapping[str, Any], key: str, path: str, low: int, high: int, default: int | None = None) -> int:
    value = record.get(key, default)
    if value is None:
        raise ReferenceError(f"{path}.{key}", "is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReferenceError(f"{path}.{key}", "must be an integer")
    if not low <= value <= high:
        raise ReferenceError(f"{path}.{key}", f"must be between {low} and {high}")
    return value


def _pattern(record: Mapping[str, Any], key: str, path: str, pattern: re.Pattern[str]) -> str:
    value = _require(record, key, path)
    if not isinstance(value, str) or not pattern.match(value):
        raise ReferenceError(f"{path}.{key}", f"must match {pattern.pattern}")
    return value


def _choice(record: Mapping[str, Any], key: str, path: str, choices: Sequence[str], default: str) -> str:
    value = record.get(key, default)
    if value not in choices:
        raise ReferenceError(f"{path}.{key}", f"must be one of {', '.join(choices)}")
    return str(value)


def _timestamp(record: Mapping[str, Any], key: str, path: str) -> datetime:
    value = _require(record, key, path)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as error:
            raise ReferenceError(f"{path}.{key}", "must be an ISO-8601 timestamp") from error
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ReferenceError(f"{path}.{key}", "must be a timestamp with a UTC offset")
    return value


def parse_rule(record: Mapping[str, Any], path: str) -> Rule:
    kind = _choice(record, "kind", path, ("PERCENT", "FIXED"), "PERCENT")
    raw_rates = record.get("rates_bp", {}) or {}
    if not isinstance(raw_rates, Mapping):
        raise ReferenceError(f"{path}.rates_bp", "must map energy grade to basis points")
    rates: dict[str, int] = {}
    for grade, rate in raw_rates.items():
        grade_key = str(grade)
        if grade_key not in GRADES:
            raise ReferenceError(f"{path}.rates_bp", f"unknown energy grade {grade_key!r}")
        rates[grade_key] = _integer({"rate": rate}, "rate", f"{path}.rates_bp.{grade_key}", 0, 10_000)
    rule = Rule(
        category=_pattern(record, "category", path, CATEGORY),
        kind=kind,
        rates_bp=rates,
        cap_fen=_integer(record, "cap_fen", path, 0, PRICE_FEN_MAX, 0),
        threshold_fen=_integer(record, "threshold_fen", path, 0, PRICE_FEN_MAX, 0),
        off_fen=_integer(record, "off_fen", path, 0, PRICE_FEN_MAX, 0),
        price_ceiling_fen=_integer(record, "price_ceiling_fen", path, 0, PRICE_FEN_MAX, 0),
        per_person_limit=_integer(record, "per_person_limit", path, 1, 1000),
        budget_fen=_integer(record, "budget_fen", path, 0, BUDGET_FEN_MAX - 1),
        tranches=_parse_tranches(record.get("tranches") or [], f"{path}.tranches"),
        qualification_quota=_integer(record, "qualification_quota", path, 0, QUOTA_MAX, 0),
        qualification_tranches=_parse_tranches(
            record.get("qualification_tranches") or [], f"{path}.qualification_tranches", "count"
        ),
        threshold_scope=_choice(record, "threshold_scope", path, THRESHOLD_SCOPES, "LINE"),
    )
    if kind == "PERCENT" and not rates:
        raise ReferenceError(f"{path}.rates_bp", "a PERCENT rule needs at least one grade's rate")
    if kind == "PERCENT" and rule.cap_fen == 0:
        raise ReferenceError(f"{path}.cap_fen", "a PERCENT rule needs a positive cap")
    if kind == "FIXED" and rule.off_fen == 0:
        raise ReferenceError(f"{path}.off_fen", "a FIXED rule needs a positive amount off")
    if kind == "FIXED" and rule.off_fen > rule.threshold_fen:
        raise ReferenceError(f"{path}.off_fen", "must not exceed threshold_fen")
    if rule.threshold_scope == "BASKET" and kind != "FIXED":
        raise ReferenceError(f"{path}.threshold_scope", "a basket threshold needs a FIXED rule (X off Y)")
    if sum(amount for _, amount in rule.tranches) > rule.budget_fen:
        raise ReferenceError(f"{path}.tranches", "the tranches add up to more than budget_fen")
    return rule


def _parse_tranches(
    records: Sequence[Any], path: str, amount_key: str = "amount_fen"
) -> tuple[tuple[datetime, int], ...]:
    if not isinstance(records, Sequence) or isinstance(records, str):
        raise ReferenceError(path, "must be a list")
    tranches = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ReferenceError(f"{path}[{index}]", f"must have release_at and {amount_key}")
        tranches.append(
            (
                _timestamp(record, "release_at", f"{path}[{index}]"),
                _integer(record, amount_key, f"{path}[{index}]", 1, BUDGET_FEN_MAX - 1),
            )
        )
    times = [moment for moment, _ in tranches]
    if times != sorted(times) or len(set(times)) != len(times):
        raise ReferenceError(path, "release times must be strictly increasing")
    return tuple(tranches)


# The systems a region may be given in (the record's region_coordinate_system). Absent means
# WGS-84: that has been the region's documented contract since the first reference file, so
# reading it so is not a guess, and files and clients written before the field keep working.
REGION_COORDINATE_SYSTEMS = {system.value: system for system in CoordinateSystem}


def parse_region(value: Any, path: str, system: CoordinateSystem = CoordinateSystem.WGS84) -> Mapping[str, Any] | None:
    """A GeoJSON Polygon or MultiPolygon (longitude, latitude in ``system``) that shapely finds
    valid, returned in WGS-84, the system every region test works in."""
    if value in (None, "", {}):
        return None
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as error:
            raise ReferenceError(path, "must be GeoJSON") from error
    if not isinstance(value, Mapping) or value.get("type") not in ("Polygon", "MultiPolygon"):
        raise ReferenceError(path, "must be a GeoJSON Polygon or MultiPolygon")
    try:
        geometry = shapely.geometry.shape(value)
    except (ValueError, TypeError, IndexError, AttributeError) as error:
        raise ReferenceError(path, f"is not valid GeoJSON: {error}") from error
    if geometry.is_empty or not geometry.is_valid:
        raise ReferenceError(path, "is not a valid polygon (empty or self-intersecting)")
    min_x, min_y, max_x, max_y = geometry.bounds
    if not (-180 <= min_x <= max_x <= 180 and -90 <= min_y <= max_y <= 90):
        raise ReferenceError(path, "coordinates must be longitude, latitude in degrees")
    converted = region_to_wgs84(value, system)
    # Converting moves neighbouring vertices by almost the same few hundred metres, so a valid
    # ring stays valid; checked anyway, since the converted polygon is the one enforced.
    if not shapely.geometry.shape(converted).is_valid:
        raise ReferenceError(path, "is not a valid polygon once converted to WGS-84")
    return converted


def _region_system(record: Mapping[str, Any], path: str) -> CoordinateSystem:
    name = _choice(
        record, "region_coordinate_system", path, tuple(REGION_COORDINATE_SYSTEMS), CoordinateSystem.WGS84.value
    )
    return REGION_COORDINATE_SYSTEMS[name]


def parse_campaign(record: Mapping[str, Any], path: str) -> Campaign:
    starts_at = _timestamp(record, "starts_at", path)
    ends_at = _timestamp(record, "ends_at", path)
    if ends_at <= starts_at:
        raise ReferenceError(f"{path}.ends_at", "must be after starts_at")
    raw_rules = _require(record, "rules", path)
    rules = [parse_rule(rule, f"{path}.rules[{index}]") for index, rule in enumerate(raw_rules)]
    categories = [rule.category for rule in rules]
    if len(set(categories)) != len(categories):
        raise ReferenceError(f"{path}.rules", "each category may have one rule")
    validity_s = _integer(record, "qualification_validity_s", path, 0, 366 * 86_400, 0)
    if validity_s > 0:
        rules = [_with_quota(rule, f"{path}.rules[{index}]") for index, rule in enumerate(rules)]
    campaign = Campaign(
        campaign_id=_pattern(record, "id", path, IDENTIFIER),
        name=str(record.get("name", record["id"])),
        status=_choice(record, "status", path, ("ACTIVE", "PAUSED"), "ACTIVE"),
        starts_at=starts_at,
        ends_at=ends_at,
        rules=tuple(rules),
        region=parse_region(record.get("region"), f"{path}.region", _region_system(record, path)),
        qualification_validity_s=validity_s,
        refund_policy=_choice(
            record, "refund_policy", path, ("RESTORE_ON_FULL_REFUND", "COUNT_AS_USED"), "COUNT_AS_USED"
        ),
        location_max_accuracy_m=_integer(record, "location_max_accuracy_m", path, 1, 100_000, 100),
        location_max_age_s=_integer(record, "location_max_age_s", path, 1, 86_400, 300),
    )
    return _validity_covers_releases(_with_packs(_with_redemption_rules(campaign, record, path), record, path), path)


def _validity_covers_releases(campaign: Campaign, path: str) -> Campaign:
    """Refuses a qualification validity shorter than the interval between two releases of the
    same quota (a rule's qualification_tranches, a pack's tranches): a voucher claimed at one
    release would lapse before the next one opens, so each round would end with days in which
    nobody holds a usable voucher and the quota that lapsed unused waits for a release to be
    claimable again. The shortest interval of each release plan counts, so an irregular plan
    (a release on each of two days, then one a month later) is refused only when the validity
    is shorter than all of its intervals."""
    validity_s = campaign.qualification_validity_s
    if validity_s == 0:
        return campaign
    plans = [
        (f"{path}.rules[{index}].qualification_tranches", rule.qualification_tranches)
        for index, rule in enumerate(campaign.rules)
    ]
    plans += [(f"{path}.packs[{index}].tranches", pack.tranches) for index, pack in enumerate(campaign.packs)]
    for plan_path, tranches in plans:
        if len(tranches) < 2:
            continue
        interval_s = min(
            int((later - earlier).total_seconds()) for (earlier, _), (later, _) in itertools.pairwise(tranches)
        )
        if validity_s < interval_s:
            raise ReferenceError(
                f"{path}.qualification_validity_s",
                f"{validity_s} s is shorter than the {interval_s} s between two releases of {plan_path}",
            )
    return campaign


def _with_packs(campaign: Campaign, record: Mapping[str, Any], path: str) -> Campaign:
    """The campaign's voucher packs, each refused naming its field when it cannot work: a
    campaign that issues no qualifications, an empty or oversized pack, a category without a
    FIXED rule, thresholds not strictly increasing, more vouchers of a category over all packs
    than its rule's per_person_limit lets one person redeem."""
    raw = record.get("packs") or []
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise ReferenceError(f"{path}.packs", "must be a list")
    if not raw:
        return campaign
    if not campaign.issues_qualifications:
        raise ReferenceError(f"{path}.packs", "the campaign issues no qualifications (qualification_validity_s is 0)")
    if len(raw) > PACKS_MAX:
        raise ReferenceError(f"{path}.packs", f"at most {PACKS_MAX} packs")
    rules = {rule.category: rule for rule in campaign.rules}
    packs = []
    per_category: dict[str, int] = {}
    for index, item in enumerate(raw):
        pack_path = f"{path}.packs[{index}]"
        if not isinstance(item, Mapping):
            raise ReferenceError(pack_path, "must have pack_id, vouchers and quota")
        pack_id = _pattern(item, "pack_id", pack_path, IDENTIFIER)
        raw_vouchers = item.get("vouchers") or []
        if not isinstance(raw_vouchers, Sequence) or isinstance(raw_vouchers, str):
            raise ReferenceError(f"{pack_path}.vouchers", "must be a list")
        if not 1 <= len(raw_vouchers) <= PACK_VOUCHERS_MAX:
            raise ReferenceError(f"{pack_path}.vouchers", f"must hold 1 to {PACK_VOUCHERS_MAX} vouchers")
        vouchers: list[PackVoucher] = []
        for number, voucher in enumerate(raw_vouchers):
            voucher_path = f"{pack_path}.vouchers[{number}]"
            if not isinstance(voucher, Mapping):
                raise ReferenceError(voucher_path, "must have category, threshold_fen and off_fen")
            category = _pattern(voucher, "category", voucher_path, CATEGORY)
            rule = rules.get(category)
            if rule is None or rule.kind != "FIXED":
                raise ReferenceError(f"{voucher_path}.category", "the campaign has no FIXED rule for this category")
            threshold_fen = _integer(voucher, "threshold_fen", voucher_path, 1, PRICE_FEN_MAX)
            off_fen = _integer(voucher, "off_fen", voucher_path, 1, PRICE_FEN_MAX)
            if off_fen > threshold_fen:
                raise ReferenceError(f"{voucher_path}.off_fen", "must not exceed threshold_fen")
            if vouchers and threshold_fen <= vouchers[-1].threshold_fen:
                raise ReferenceError(f"{voucher_path}.threshold_fen", "thresholds must be strictly increasing")
            vouchers.append(PackVoucher(category, threshold_fen, off_fen))
            per_category[category] = per_category.get(category, 0) + 1
            if per_category[category] > rule.per_person_limit:
                raise ReferenceError(
                    f"{voucher_path}.category",
                    f"the packs hold more vouchers of this category than its per_person_limit"
                    f" ({rule.per_person_limit}) lets one person redeem",
                )
        quota = _integer(item, "quota", pack_path, 1, QUOTA_MAX)
        tranches = _parse_tranches(item.get("tranches") or [], f"{pack_path}.tranches", "count")
        if sum(count for _, count in tranches) > quota:
            raise ReferenceError(f"{pack_path}.tranches", "the tranches add up to more than the quota")
        packs.append(VoucherPack(pack_id, tuple(vouchers), quota, tranches))
    ids = [pack.pack_id for pack in packs]
    if len(set(ids)) != len(ids):
        raise ReferenceError(f"{path}.packs", "each pack_id may appear once")
    return replace(campaign, packs=tuple(packs))


# RiskLimits' fields (campaign.proto), each 0 (none) to RISK_LIMIT_MAX.
RISK_LIMIT_FIELDS = (
    "terminal_sales_per_minute",
    "terminal_sales_per_hour",
    "merchant_sales_per_day",
    "consumer_sales_per_hour",
    "price_flag_min_sales",
    "price_flag_ratio_percent",
)
RISK_LIMIT_MAX = 1_000_000


def parse_risk_limits(record: Any, path: str) -> dict[str, int]:
    """A campaign's risk_limits: a mapping of RiskLimits' fields, each 0 to RISK_LIMIT_MAX;
    returns the non-zero ones. The price flag needs a ratio above 100 % of the norm."""
    if record is None:
        return {}
    if not isinstance(record, Mapping):
        raise ReferenceError(path, "must be a mapping of limits")
    for key in record:
        if key not in RISK_LIMIT_FIELDS:
            raise ReferenceError(f"{path}.{key}", f"is not a risk limit ({', '.join(RISK_LIMIT_FIELDS)})")
    limits = {key: _integer(record, key, path, 0, RISK_LIMIT_MAX, 0) for key in RISK_LIMIT_FIELDS}
    if limits["price_flag_min_sales"] and limits["price_flag_ratio_percent"] <= 100:
        raise ReferenceError(
            f"{path}.price_flag_ratio_percent", "must be above 100 (percent of the norm) when the price flag is on"
        )
    if limits["price_flag_ratio_percent"] and not limits["price_flag_min_sales"]:
        raise ReferenceError(f"{path}.price_flag_min_sales", "is needed with price_flag_ratio_percent")
    return {key: value for key, value in limits.items() if value}


def _with_redemption_rules(campaign: Campaign, record: Mapping[str, Any], path: str) -> Campaign:
    """The redemption-side rules (issue 13), each refused naming its field when it contradicts
    the rest of the campaign: region-bound redemption without a region, a per-day limit of 0,
    claiming again in a campaign that issues no qualifications, location at redemption without
    a region."""
    redeem_in_region_only = _flag(record, "redeem_in_region_only", path)
    if redeem_in_region_only and campaign.region is None:
        raise ReferenceError(f"{path}.redeem_in_region_only", "binds redemption to the region: the campaign has none")
    daily_limit = None
    if record.get("per_merchant_daily_limit") is not None:
        daily_limit = _integer(record, "per_merchant_daily_limit", path, 1, 1000)
    reclaim_after_expiry = _flag(record, "reclaim_after_expiry", path)
    if reclaim_after_expiry and not campaign.issues_qualifications:
        raise ReferenceError(
            f"{path}.reclaim_after_expiry", "the campaign issues no qualifications (qualification_validity_s is 0)"
        )
    require_location = _flag(record, "require_location_at_redemption", path)
    if require_location and campaign.region is None:
        raise ReferenceError(
            f"{path}.require_location_at_redemption", "checks the phone against the region: the campaign has none"
        )
    return replace(
        campaign,
        redeem_in_region_only=redeem_in_region_only,
        per_merchant_daily_limit=daily_limit,
        reclaim_after_expiry=reclaim_after_expiry,
        require_location_at_redemption=require_location,
        risk_limits=parse_risk_limits(record.get("risk_limits"), f"{path}.risk_limits"),
    )


def _with_quota(rule: Rule, path: str) -> Rule:
    """A qualification-issuing rule's quota: as given, else as many as the budget funds."""
    quota = rule.qualification_quota or rule.budget_fen // (rule.off_fen if rule.kind == "FIXED" else rule.cap_fen)
    if quota < 1:
        raise ReferenceError(f"{path}.qualification_quota", "the campaign issues qualifications: must be positive")
    if sum(count for _, count in rule.qualification_tranches) > quota:
        raise ReferenceError(f"{path}.qualification_tranches", "the tranches add up to more than the quota")
    return replace(rule, qualification_quota=quota)


def parse_product(record: Mapping[str, Any], path: str) -> Product:
    gtin = str(_require(record, "gtin", path))
    if not is_valid_gtin13(gtin):
        raise ReferenceError(f"{path}.gtin", "must be a GTIN-13 with a valid check digit")
    return Product(
        gtin=gtin,
        brand=str(_require(record, "brand", path)),
        model=str(_require(record, "model", path)),
        category=_pattern(record, "category", path, CATEGORY),
        energy_grade=_integer(record, "energy_grade", path, 0, 5, 0),
        reference_price_fen=_integer(record, "reference_price_fen", path, 0, PRICE_FEN_MAX, 0),
        serial_required=bool(record.get("serial_required", False)),
        active=bool(record.get("active", True)),
    )


def parse_merchant(record: Mapping[str, Any], path: str) -> Merchant:
    categories = record.get("categories", []) or []
    for index, category in enumerate(categories):
        if not isinstance(category, str) or not CATEGORY.match(category):
            raise ReferenceError(f"{path}.categories[{index}]", f"must match {CATEGORY.pattern}")
    terminals = [
        Terminal(
            terminal_id=_pattern(terminal, "id", f"{path}.terminals[{index}]", IDENTIFIER),
            status=_choice(terminal, "status", f"{path}.terminals[{index}]", ("ACTIVE", "SUSPENDED"), "ACTIVE"),
            secret=terminal.get("secret"),
            require_client_certificate=_flag(terminal, "require_client_certificate", f"{path}.terminals[{index}]"),
        )
        for index, terminal in enumerate(record.get("terminals", []) or [])
    ]
    return Merchant(
        merchant_id=_pattern(record, "id", path, IDENTIFIER),
        name=str(_require(record, "name", path)),
        licence_number=str(_require(record, "licence_number", path)),
        status=_choice(record, "status", path, ("ACTIVE", "SUSPENDED"), "ACTIVE"),
        categories=tuple(categories),
        terminals=tuple(terminals),
    )


def parse_operator(record: Mapping[str, Any], path: str) -> Operator:
    return Operator(
        operator_id=_pattern(record, "id", path, IDENTIFIER),
        name=str(_require(record, "name", path)),
        status=_choice(record, "status", path, ("ACTIVE", "SUSPENDED"), "ACTIVE"),
        secret=record.get("secret"),
        role=_choice(record, "role", path, STAFF_ROLES, "operator"),
    )


def parse_partner(record: Mapping[str, Any], path: str) -> Partner:
    return Partner(
        partner_id=_pattern(record, "id", path, IDENTIFIER),
        name=str(_require(record, "name", path)),
        kind=_choice(record, "kind", path, ("APP", "PROVIDER"), "APP"),
        status=_choice(record, "status", path, ("ACTIVE", "SUSPENDED"), "ACTIVE"),
        secret=record.get("secret"),
        require_client_certificate=_flag(record, "require_client_certificate", path),
    )


def _flag(record: Mapping[str, Any], key: str, path: str) -> bool:
    value = record.get(key, False)
    if not isinstance(value, bool):
        raise ReferenceError(f"{path}.{key}", "must be true or false")
    return value


def parse_reference(document: Mapping[str, Any]) -> ReferenceData:
    """Parses a whole reference file; raises ReferenceError at the first bad field."""
    data = _parse_sections(document)
    # Terminals and operators share one credential namespace.
    callers = [terminal.terminal_id for merchant in data.merchants for terminal in merchant.terminals]
    for index, operator in enumerate(data.operators):
        if operator.operator_id in callers:
            raise ReferenceError(f"operators[{index}].id", "is already a terminal id")
        callers.append(operator.operator_id)
    for index, partner in enumerate(data.partners):
        if partner.partner_id in callers:
            raise ReferenceError(f"partners[{index}].id", "is already a terminal or operator id")
        callers.append(partner.partner_id)
    return data


def _parse_sections(document: Mapping[str, Any]) -> ReferenceData:
    return ReferenceData(
        campaigns=tuple(
            parse_campaign(item, f"campaigns[{index}]")
            for index, item in enumerate(document.get("campaigns", []) or [])
        ),
        products=tuple(
            parse_product(item, f"products[{index}]") for index, item in enumerate(document.get("products", []) or [])
        ),
        merchants=tuple(
            parse_merchant(item, f"merchants[{index}]")
            for index, item in enumerate(document.get("merchants", []) or [])
        ),
        operators=tuple(
            parse_operator(item, f"operators[{index}]")
            for index, item in enumerate(document.get("operators", []) or [])
        ),
        partners=tuple(
            parse_partner(item, f"partners[{index}]") for index, item in enumerate(document.get("partners", []) or [])
        ),
    )
