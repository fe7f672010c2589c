"""Identifier patterns match the whole string: Python's ``$`` also matches before a final
newline, so ``re.compile(r"^X$").match("X\\n")`` succeeds and ``S`` and ``S\\n`` became two
devices (issue 10, item 2). Every pattern anchored at the end uses ``\\Z`` or is used with
``fullmatch``; this test fails on any ``$``-anchored pattern in the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.domain import validation
from server.domain.exchange_file import CONSUMER_KEY, SERIAL
from server.domain.reference import CATEGORY, IDENTIFIER
from server.rpc.auth import NONCE_PATTERN, TERMINAL_PATTERN, TIMESTAMP_PATTERN

ROOT = Path(__file__).resolve().parents[2]
DOLLAR_ANCHORED = re.compile(r"""re\.(compile|match|search|fullmatch)\(\s*r?["'][^"']*\$["']""")


def test_no_pattern_in_the_code_is_anchored_with_dollar() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("server", "storage", "clients/python/subsidy_client")
        for path in (ROOT / folder).rglob("*.py")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if DOLLAR_ANCHORED.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        (IDENTIFIER, "c-main"),
        (CATEGORY, "fridge"),
        (CONSUMER_KEY, "a" * 64),
        (SERIAL, "SN1"),
        (TERMINAL_PATTERN, "t-main-01"),
        (NONCE_PATTERN, "n" * 16),
        (TIMESTAMP_PATTERN, "1700000000000"),
        (validation.SERIAL, "SN1"),
        (validation.LINE_ID, "1"),
        (validation.CONSUMER_KEY, "a" * 64),
    ],
)
@pytest.mark.parametrize("suffix", ["\n", "\r\n", " ", "\x00"])
def test_a_trailing_character_never_matches(pattern: re.Pattern[str], value: str, suffix: str) -> None:
    assert pattern.fullmatch(value)
    assert not pattern.fullmatch(value + suffix)
    assert not pattern.match(value + suffix) or pattern.match(value + suffix).end() < len(value + suffix)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("SN1", "SN1"),
        ("sn1", "SN1"),
        ("SN1\n", "SN1"),
        (" SN1\r\n", "SN1"),
        ("ＳＮ１", "SN1"),
        ("SN1\u3000", "SN1"),
    ],
)
def test_spellings_of_one_serial_canonicalise_to_it(raw: str, canonical: str) -> None:
    assert validation.canonical_serial(raw) == canonical


def test_request_ids_in_any_case_are_one_request() -> None:
    lower = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert validation.canonical_request_id(lower.upper()) == lower
    assert validation.canonical_request_id(f" {lower}\n") == lower
