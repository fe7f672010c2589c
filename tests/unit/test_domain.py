"""Pure rules: GTIN check digits, reference-data validation, configuration, signing."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from subsidy_client import signing

from server.config import Config, ConfigError
from server.domain.gtin import is_valid_gtin13
from server.domain.reference import ReferenceError, parse_reference


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("6901234000016", True),
        ("4006381333931", True),  # a published GS1 example
        ("6901234000017", False),  # wrong check digit
        ("690123400001", False),  # 12 digits
        ("69012340000161", False),
        ("69012340000a6", False),
        ("６９０１２３４０００００１６"[:13], False),  # full-width digits are not ASCII
    ],
)
def test_gtin13_check_digit(value: str, valid: bool) -> None:
    """GTIN-13 validation accepts exactly 13 ASCII digits with the GS1 mod-10 check digit."""
    assert is_valid_gtin13(value) is valid


VALID: dict[str, Any] = {
    "campaigns": [
        {
            "id": "c1",
            "starts_at": "2026-01-01T00:00:00+08:00",
            "ends_at": "2026-12-31T00:00:00+08:00",
            "rules": [
                {
                    "category": "fridge",
                    "kind": "PERCENT",
                    "rates_bp": {"1": 2000},
                    "cap_fen": 200000,
                    "per_person_limit": 1,
                    "budget_fen": 1000,
                },
                {
                    "category": "general",
                    "kind": "FIXED",
                    "threshold_fen": 2000,
                    "off_fen": 500,
                    "per_person_limit": 2,
                    "budget_fen": 1000,
                },
            ],
        }
    ],
    "products": [{"gtin": "6901234000016", "brand": "b", "model": "m", "category": "fridge", "energy_grade": 1}],
    "merchants": [{"id": "m1", "name": "n", "licence_number": "l", "terminals": [{"id": "t1"}]}],
}


def test_a_valid_document_parses() -> None:
    """The reference format round-trips into typed records."""
    data = parse_reference(VALID)
    assert data.campaigns[0].rules[0].rates_bp == {"1": 2000}
    assert data.merchants[0].terminals[0].secret is None


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("campaigns", 0, "rules", 0, "cap_fen"), -1, "campaigns[0].rules[0].cap_fen"),
        (("campaigns", 0, "rules", 0, "rates_bp"), {"1": 10001}, "campaigns[0].rules[0].rates_bp.1.rate"),
        (("campaigns", 0, "rules", 0, "rates_bp"), {"9": 100}, "campaigns[0].rules[0].rates_bp"),
        (("campaigns", 0, "ends_at"), "2025-01-01T00:00:00+08:00", "campaigns[0].ends_at"),
        (("campaigns", 0, "starts_at"), "2026-01-01T00:00:00", "campaigns[0].starts_at"),
        (("campaigns", 0, "rules", 1, "off_fen"), 3000, "campaigns[0].rules[1].off_fen"),
        (("campaigns", 0, "rules", 0, "per_person_limit"), 0, "campaigns[0].rules[0].per_person_limit"),
        (("campaigns", 0, "rules", 0, "budget_fen"), 10**13, "campaigns[0].rules[0].budget_fen"),
        (("campaigns", 0, "rules", 0, "budget_fen"), 1.5, "campaigns[0].rules[0].budget_fen"),
        (("products", 0, "gtin"), "6901234000017", "products[0].gtin"),
        (("merchants", 0, "terminals", 0, "id"), "t 1", "merchants[0].terminals[0].id"),
    ],
)
def test_rules_that_cannot_work_are_refused_naming_the_field(path: tuple[Any, ...], value: Any, field: str) -> None:
    """Impossible rules (negative cap, rate over 100%, window ending before it starts, ...) name the field."""
    document = copy.deepcopy(VALID)
    target: Any = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(ReferenceError) as raised:
        parse_reference(document)
    assert raised.value.field == field


def test_config_from_environment_validates_and_names_the_variable() -> None:
    """Typed configuration: good values convert, bad ones stop start-up naming the variable."""
    config = Config.from_env({"SUBSIDY_WORKERS": "4", "SUBSIDY_HOLD_TTL_S": "30", "SUBSIDY_USE_UVLOOP": "false"})
    assert (config.workers, config.hold_ttl_s, config.use_uvloop) == (4, 30, False)
    for variable, value in [
        ("SUBSIDY_WORKERS", "0"),
        ("SUBSIDY_WORKERS", "many"),
        ("SUBSIDY_LISTEN", "50051"),
        ("SUBSIDY_REDIS_URL", "http://x"),
        ("SUBSIDY_USE_UVLOOP", "maybe"),
    ]:
        with pytest.raises(ConfigError, match=variable):
            Config.from_env({variable: value})


def test_signature_covers_method_terminal_time_nonce_and_body() -> None:
    """Changing any signed element changes the signature."""
    base = ("secret", "/m", "t1", 1000, "n" * 16, b"body")
    reference = signing.signature(*base)
    for index, changed in [(1, "/other"), (2, "t2"), (3, 1001), (4, "m" * 16), (5, b"body2")]:
        altered = list(base)
        altered[index] = changed
        assert signing.signature(*altered) != reference  # type: ignore[arg-type]
    assert signing.signature("other-secret", *base[1:]) != reference  # type: ignore[arg-type]
