"""Basket vouchers (issue 13, item 6): how a basket's amount off is shared among its lines.

A FIXED rule with ``threshold_scope: BASKET`` ("X off Y" on the payment, not on one line) takes
X off the basket once and gives each line a share, so that a later refund of some lines returns
exactly their part and the shares of all lines add up to X. The share is the largest-remainder
apportionment of X in proportion to the lines' prices, to the fen:

- each line gets floor(X * price / total) fen;
- the fen left over (fewer than the number of lines) go one each to the lines with the largest
  remainder (X * price mod total), ties broken by line order: the earlier line first.

So 1000 fen over three lines of the same price is 334 / 333 / 333, the first line getting the
extra fen. A line never gets more than its price (X <= Y <= total) and the result depends only
on the prices in order. ``apportion`` in storage/redis/lua/_lib.lua is the same rule, computed
exactly in Lua's doubles (tests/integration/test_basket_apportion.py runs both).

Bounds: a price is below PRICE_FEN_MAX (10^10 fen) and a payment has at most 100 lines
(SUBSIDY_MAX_LINES), so a basket's total is below 10^12 fen; X is at most the threshold, itself
below 10^10.
"""

from __future__ import annotations

from collections.abc import Sequence


def apportion(off_fen: int, prices_fen: Sequence[int]) -> list[int]:
    """Each line's share of ``off_fen``, in line order; the shares add up to ``off_fen``.

    ``prices_fen``: at least one price, each at least 1 fen; ``off_fen`` between 0 and their
    total (a basket below its threshold is declined before anything is shared)."""
    if not prices_fen:
        raise ValueError("a basket has at least one line")
    if any(price < 1 for price in prices_fen):
        raise ValueError("every price is at least 1 fen")
    total = sum(prices_fen)
    if not 0 <= off_fen <= total:
        raise ValueError("the amount off is between 0 and the basket's total")
    shares: list[int] = []
    remainders: list[int] = []
    for price in prices_fen:
        share, remainder = divmod(off_fen * price, total)
        shares.append(share)
        remainders.append(remainder)
    left = off_fen - sum(shares)
    for index in sorted(range(len(prices_fen)), key=lambda index: (-remainders[index], index))[:left]:
        shares[index] += 1
    return shares
