"""GTIN-13 (EAN-13) validation: 13 digits whose last is the GS1 mod-10 check digit."""

from __future__ import annotations


def gtin13_check_digit(first_twelve: str) -> int:
    """The GS1 check digit: weights 1,3,1,3,... from the left over the first 12 digits."""
    total = sum(map(int, first_twelve[0::2])) + 3 * sum(map(int, first_twelve[1::2]))
    return (10 - total % 10) % 10


def is_valid_gtin13(value: str) -> bool:
    if len(value) != 13 or not value.isascii() or not value.isdigit():
        return False
    return gtin13_check_digit(value[:12]) == int(value[12])
