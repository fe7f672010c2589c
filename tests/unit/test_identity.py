"""Consumer identity: ID number validation (GB 11643 check character), consumer keys, masking."""

from __future__ import annotations

from datetime import date

import pytest

from server.domain.identity import (
    IdentityError,
    check_digit,
    consumer_key,
    mask_id_number,
    mask_phone,
    validate_id_number,
)

KEY = b"k" * 32
# 11010519491231002X is the example number printed in the GB 11643-1999 standard.
STANDARD_EXAMPLE = "11010519491231002X"


def test_the_standard_example_validates() -> None:
    """The number printed in GB 11643-1999 passes, its check character computed as X."""
    assert check_digit(STANDARD_EXAMPLE[:17]) == "X"
    assert validate_id_number(STANDARD_EXAMPLE) == STANDARD_EXAMPLE
    assert validate_id_number(" 11010519491231002x ") == STANDARD_EXAMPLE


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("110105194912310021", "check character"),  # last character altered
        ("11010519491331002X", "not a date"),  # month 13
        ("11010520991231002X", "impossible"),  # born in the future
        ("1101051949123100", "18 characters"),
        ("01010519491231002X", "18 characters"),  # region code cannot start with 0
        ("11010519491231002Y", "18 characters"),
    ],
)
def test_invalid_numbers_are_refused_without_repeating_them(number: str, reason: str) -> None:
    """Each defect gets its own reason, and the message never contains the number."""
    with pytest.raises(IdentityError) as raised:
        validate_id_number(number, today=date(2026, 11, 27))
    assert reason in str(raised.value)
    assert number not in str(raised.value)


def test_consumer_keys_are_stable_per_person_and_keyed() -> None:
    """The same person (however typed) gets the same key; another programme key, another key."""
    first = consumer_key(KEY, STANDARD_EXAMPLE)
    assert first == consumer_key(KEY, "11010519491231002x")
    assert len(first) == 64 and int(first, 16) >= 0
    assert first != consumer_key(b"j" * 32, STANDARD_EXAMPLE)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        consumer_key(b"short", STANDARD_EXAMPLE)


def test_masks_keep_only_what_support_needs() -> None:
    assert mask_id_number(STANDARD_EXAMPLE) == "110***********002X"
    assert mask_phone("13812345678") == "138****5678"
    with pytest.raises(IdentityError):
        mask_phone("23812345678")
