"""The complaints desk's rules (issue 14, section 3): a ticket's categories, states and the moves
between them, what ticket text may contain, and the service-level agreement in business days.

Business days are Monday to Friday in the business time zone (Asia/Shanghai by default, the
daily reports' zone). That is a documented simplification: China's public holidays and the
weekend days worked in their place (调休) are not modelled, so around the Spring Festival or
National Day a deadline falls earlier than a civil servant's calendar would put it, never
later. A holiday calendar would be a table the bureau maintains; it is not built.

Pure functions and frozen values: no I/O, no gRPC.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from server.domain.errors import InvalidField
from server.domain.identity import check_digit

NOT_RECEIVED, WRONGLY_DECLINED, REFUND, MERCHANT_CONDUCT, OTHER = (
    "NOT_RECEIVED",
    "WRONGLY_DECLINED",
    "REFUND",
    "MERCHANT_CONDUCT",
    "OTHER",
)
CATEGORIES = (NOT_RECEIVED, WRONGLY_DECLINED, REFUND, MERCHANT_CONDUCT, OTHER)
OPEN, IN_PROGRESS, RESOLVED, REJECTED = "OPEN", "IN_PROGRESS", "RESOLVED", "REJECTED"
STATES = (OPEN, IN_PROGRESS, RESOLVED, REJECTED)
CLOSED = frozenset({RESOLVED, REJECTED})
# Every move a ticket may make; each carries a reply. Closed tickets stay closed: a consumer
# who is not satisfied opens a new ticket, which keeps the first one's record as it was.
TRANSITIONS: dict[str, frozenset[str]] = {
    OPEN: frozenset({IN_PROGRESS, RESOLVED, REJECTED}),
    IN_PROGRESS: frozenset({RESOLVED, REJECTED}),
    RESOLVED: frozenset(),
    REJECTED: frozenset(),
}
CONSUMER, MERCHANT = "CONSUMER", "MERCHANT"
AUTHORIZATION, QUALIFICATION, MERCHANT_LINK = "AUTHORIZATION", "QUALIFICATION", "MERCHANT"
LINK_KINDS = (AUTHORIZATION, QUALIFICATION, MERCHANT_LINK)

TEXT_CHARS_MAX = 2000
PURPOSE_CHARS_MAX = 200
# The longest SLA period a deployment may configure, in business days (six calendar weeks).
SLA_BUSINESS_DAYS_MAX = 30
# Newline and tab are text; every other control character (C0, DEL, C1) is refused, as are
# surrogates, private-use and unassigned code points, and the bidirectional overrides and
# isolates that can make a reply display differently from what it says.
ALLOWED_CONTROLS = frozenset("\n\t")
REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Cn"})
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Personal numbers typed into the text would be stored in clear beside the consumer key, which is
# exactly what the programme never keeps (docs/privacy.md): a resident ID number (its check
# character right) or a mainland mobile number in the text is refused, and the refusal says
# where the number belongs (nowhere; contact_phone) without repeating it.
ID_NUMBER_IN_TEXT = re.compile(r"(?<![0-9])[1-9][0-9]{16}[0-9X](?![0-9])", re.IGNORECASE)
PHONE_IN_TEXT = re.compile(r"(?<![0-9])1[3-9][0-9]{9}(?![0-9])")


class InvalidTransition(Exception):
    """A move the ticket's state does not allow (the gRPC edge: FAILED_PRECONDITION, INVALID_STATE)."""

    def __init__(self, state: str, to_state: str) -> None:
        super().__init__(f"a ticket in state {state} cannot move to {to_state}")
        self.state = state
        self.to_state = to_state


class RateLimited(Exception):
    """A submitter reached its daily ticket limit (the gRPC edge: RESOURCE_EXHAUSTED, RATE_LIMITED)."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"at most {limit} tickets a day per {scope}; try again tomorrow")
        self.scope = scope
        self.limit = limit


def check_transition(state: str, to_state: str) -> None:
    if to_state not in TRANSITIONS.get(state, frozenset()):
        raise InvalidTransition(state, to_state)


def canonical_text(value: str, field: str, chars_max: int = TEXT_CHARS_MAX) -> str:
    """Ticket and reply text: NFKC (full-width letters and digits become ASCII, so what staff
    search for matches), CR LF and CR as LF, trimmed; 1 to ``chars_max`` characters after that;
    no control characters but newline and tab."""
    text = unicodedata.normalize("NFKC", value.replace("\r\n", "\n").replace("\r", "\n")).strip()
    if not text:
        raise InvalidField(field, "is required")
    if len(text) > chars_max:
        raise InvalidField(field, f"at most {chars_max} characters (after NFKC normalisation), got {len(text)}")
    for position, character in enumerate(text):
        if character in ALLOWED_CONTROLS:
            continue
        if unicodedata.category(character) in REFUSED_CATEGORIES or character in BIDI_CONTROLS:
            raise InvalidField(
                field, f"contains a control or unassigned character U+{ord(character):04X} at {position}"
            )
    check_no_personal_numbers(text, field)
    return text


def check_no_personal_numbers(text: str, field: str) -> None:
    """Refuses a resident ID number (its check character right) or a mobile number in ``text``."""
    for found in ID_NUMBER_IN_TEXT.finditer(text):
        number = found.group().upper()
        if check_digit(number[:17]) == number[17]:
            raise InvalidField(field, f"contains a resident ID number at {found.start()}; it must not be written here")
    found_phone = PHONE_IN_TEXT.search(text)
    if found_phone is not None:
        raise InvalidField(
            field, f"contains a mobile number at {found_phone.start()}; send it as contact_phone, which is kept sealed"
        )


@dataclass(frozen=True)
class SlaPolicy:
    """First reply within ``first_reply_business_days``, resolution within
    ``resolution_business_days``, counted in business days of ``timezone``."""

    first_reply_business_days: int = 1
    resolution_business_days: int = 5
    timezone: str = "Asia/Shanghai"

    def __post_init__(self) -> None:
        for name, days in (
            ("first_reply_business_days", self.first_reply_business_days),
            ("resolution_business_days", self.resolution_business_days),
        ):
            if not 0 <= days <= SLA_BUSINESS_DAYS_MAX:
                raise ValueError(f"{name} must be between 0 and {SLA_BUSINESS_DAYS_MAX}, got {days}")
        if self.first_reply_business_days > self.resolution_business_days:
            raise ValueError("the first reply cannot be due after the resolution")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"unknown time zone {self.timezone!r}") from error

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def deadlines(self, opened_at: datetime) -> tuple[datetime, datetime]:
        """(first reply due, resolution due) for a ticket opened at ``opened_at``."""
        return (
            add_business_days(opened_at, self.first_reply_business_days, self.zone),
            add_business_days(opened_at, self.resolution_business_days, self.zone),
        )

    def business_date(self, moment: datetime) -> date:
        return moment.astimezone(self.zone).date()

    def day_start(self, moment: datetime) -> datetime:
        """The start (UTC) of the calendar day in the business time zone that ``moment`` is in:
        the window of the daily ticket limit."""
        local = moment.astimezone(self.zone)
        return datetime.combine(local.date(), time(0), tzinfo=self.zone).astimezone(UTC)


def is_business_day(day: date) -> bool:
    return day.weekday() < 5


def add_business_days(moment: datetime, days: int, zone: ZoneInfo) -> datetime:
    """``days`` business days after ``moment``, at the same local time of day.

    A ticket opened on a Saturday or Sunday starts counting at 00:00 on the Monday, so with 0
    days it is due then, and with 1 day at 00:00 on Tuesday. A ticket opened on Friday at 15:00
    with 1 day is due on Monday at 15:00. Times stay wall-clock times in ``zone`` (Shanghai has
    no daylight saving time; elsewhere a deadline keeps its local hour)."""
    if moment.tzinfo is None:
        raise ValueError("moment must be timezone-aware")
    if days < 0:
        raise ValueError("days must not be negative")
    local = moment.astimezone(zone)
    day, clock = local.date(), local.time().replace(tzinfo=None)
    if not is_business_day(day):
        while not is_business_day(day):
            day += timedelta(days=1)
        clock = time(0)
    remaining = days
    while remaining:
        day += timedelta(days=1)
        if is_business_day(day):
            remaining -= 1
    return datetime.combine(day, clock, tzinfo=zone).astimezone(UTC)


def overdue(due_at: datetime, done_at: datetime | None, now: datetime) -> bool:
    """Past its deadline: done after it, or not done and the deadline passed."""
    return (done_at if done_at is not None else now) > due_at


@dataclass(frozen=True)
class SlaStatus:
    first_reply_overdue: bool
    resolution_overdue: bool

    @property
    def any(self) -> bool:
        return self.first_reply_overdue or self.resolution_overdue


def sla_status(
    first_reply_due_at: datetime,
    resolution_due_at: datetime,
    first_replied_at: datetime | None,
    closed_at: datetime | None,
    now: datetime,
) -> SlaStatus:
    """A ticket's two flags as of ``now``."""
    return SlaStatus(
        overdue(first_reply_due_at, first_replied_at, now),
        overdue(resolution_due_at, closed_at, now),
    )
