"""The settlement file reader and the matching rules (server/domain/settlement_file.py,
bill_matching.py), without a database: exact yuan to fen, backticks, the summary check, and
each pairing rule with its status and fen difference."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

import pytest

from server.domain.bill_matching import (
    AMOUNT_MISMATCH,
    DUPLICATE_IN_FILE,
    MATCHED,
    MISSING_IN_CHANNEL,
    MISSING_IN_LEDGER,
    LedgerItem,
    Summary,
    match_group,
    merge,
)
from server.domain.settlement_file import (
    PAYMENT,
    REFUND,
    YUAN,
    BadLine,
    ChannelLine,
    ColumnMapping,
    FileRefused,
    SettlementReader,
    clean,
    fen_of,
    mapping_from_dict,
)

AT = datetime(2026, 3, 1, 4, 0, tzinfo=UTC)
A, B, C = "a" * 32, "b" * 32, "c" * 32


def rows(text: str) -> list[tuple[int, list[str]]]:
    return list(enumerate(csv.reader(io.StringIO(text)), start=1))


def test_yuan_become_fen_exactly_and_more_decimals_are_refused() -> None:
    assert fen_of("23.80", YUAN) == 2380 and fen_of("0.07", YUAN) == 7 and fen_of("5", YUAN) == 500
    assert fen_of("19999999.99", YUAN) == 1_999_999_999 and fen_of("0.1", YUAN) == 10
    assert fen_of("", YUAN) == 0
    for bad in ("23.805", "1e3", "-1.00", "12,00", " 1.00x"):
        with pytest.raises(ValueError):
            fen_of(bad, YUAN)
    with pytest.raises(ValueError, match="more than two decimals"):
        fen_of("0.001", YUAN)
    assert clean(" `4200001234 ") == "4200001234"


def test_the_reader_names_line_and_column() -> None:
    text = (
        "channel_txn_id,authorization_id,captured_fen,subsidy_fen,refund_fen,time,status\n"
        f"T1,{A},1000,200,0,2026-03-01T12:00:00+08:00,SUCCESS\n"
        "\n"
        f"T2,{B},1000,2x0,0,2026-03-01T12:00:00+08:00,SUCCESS\n"
        f"T3,{C},0,0,50,2026-03-01 12:00:00,REFUND\n"
        f"T4,{C},0,0,50,2026-03-01 12:00:00,CLOSED\n"
    )
    items = list(SettlementReader(ColumnMapping()).read(rows(text)))
    assert isinstance(items[0], ChannelLine) and items[0].time == AT and items[0].amount_fen == 200
    assert isinstance(items[1], BadLine) and (items[1].error.line_number, items[1].error.column) == (4, "subsidy_fen")
    assert isinstance(items[2], ChannelLine) and items[2].kind == REFUND and items[2].amount_fen == 50
    assert isinstance(items[3], BadLine) and items[3].error.column == "status"
    with pytest.raises(FileRefused) as refused:
        list(SettlementReader(ColumnMapping()).read(rows("channel_txn_id,authorization_id\n")))
    assert refused.value.line_number == 1 and refused.value.column == "subsidy_fen"


def test_the_summary_is_told_apart_and_checked() -> None:
    mapping = mapping_from_dict(
        {
            "name": "bill",
            "columns": {"channel_txn_id": "单号", "authorization_id": "商户订单号", "order_amount": None,
                        "subsidy_amount": "券", "refund_amount": "退券", "time": "时间", "status": "状态"},
            "amount_unit": "yuan",
            "trailer": {"marker": "总笔数", "count": "总笔数", "subsidy_total": "券总额"},
            "time_format": "%Y-%m-%d %H:%M:%S",
        }
    )  # fmt: skip
    text = (
        f"单号,商户订单号,券,退券,时间,状态\n`T1,`{A},`2.00,`0,`2026-03-01 12:00:00,`SUCCESS\n总笔数,券总额\n`1,`2.00\n"
    )
    [line] = list(SettlementReader(mapping).read(rows(text)))
    assert isinstance(line, ChannelLine) and line.subsidy_fen == 200 and line.order_fen is None
    with pytest.raises(FileRefused) as refused:
        list(SettlementReader(mapping).read(rows(text.replace("`1,`2.00", "`1,`2.01"))))
    assert (refused.value.line_number, refused.value.column) == (4, "券总额")
    with pytest.raises(FileRefused, match="after the summary"):
        list(SettlementReader(mapping).read(rows(text + "more,lines\n")))
    with pytest.raises(ValueError, match="unknown column role"):
        mapping_from_dict({"columns": {"amount": "x"}})


def line(number: int, kind: str, txn: str, auth: str, subsidy: int, order: int | None = None) -> ChannelLine:
    payment = kind == PAYMENT
    return ChannelLine(number, kind, txn, auth, order, subsidy if payment else 0, 0 if payment else subsidy, AT)


def item(event: str, kind: str, auth: str, subsidy: int, reference: str = "", order: int = 0) -> LedgerItem:
    return LedgerItem(event, kind, auth, "m-1", reference, subsidy, order, AT)


def test_pairing_rules_and_differences() -> None:
    ledger = [
        item("1-0", PAYMENT, A, 500, "P1", 2000),
        item("2-0", REFUND, A, 100, "R1"),
        item("3-0", REFUND, A, 200),
        item("4-0", REFUND, A, 300, "R9"),
    ]
    lines = [
        line(2, PAYMENT, "P1", A, 500, 2100),  # order differs
        line(3, REFUND, "R2", A, 200),  # no reference on our side: pairs by amount
        line(4, REFUND, "R1", A, 100),  # by reference
        line(5, REFUND, "R1", A, 100),  # repeated
        line(6, REFUND, "R3", A, 300),  # our 300 refund is R9: another transaction
    ]
    results = match_group(lines, ledger)
    assert [
        (r.status, r.line_number, r.ledger_event_id, r.difference_fen, r.order_difference_fen) for r in results
    ] == [
        (AMOUNT_MISMATCH, 2, "1-0", 0, 100),
        (MATCHED, 3, "3-0", 0, 0),
        (MATCHED, 4, "2-0", 0, 0),
        (DUPLICATE_IN_FILE, 5, "", 100, 0),
        (MISSING_IN_LEDGER, 6, "", 300, 0),
        (MISSING_IN_CHANNEL, 0, "4-0", -300, 0),
    ]


def test_merge_groups_by_authorization_and_the_nets_tie_out() -> None:
    lines = [line(3, PAYMENT, "PA", A, 500), line(2, PAYMENT, "PC", C, 70)]
    ledger = [item("1-0", PAYMENT, A, 450), item("2-0", PAYMENT, B, 80), item("3-0", REFUND, B, 30)]
    results = list(merge(sorted(lines, key=lambda x: (x.authorization_id, x.line_number)), ledger))
    assert [(r.status, r.authorization_id, r.difference_fen) for r in results] == [
        (AMOUNT_MISMATCH, A, 50),
        (MISSING_IN_CHANNEL, B, -80),
        (MISSING_IN_CHANNEL, B, -30),
        (MISSING_IN_LEDGER, C, 70),
    ]
    summary = Summary()
    for result in results:
        summary.add(result)
    assert summary.channel_net_subsidy_fen == 570 and summary.ledger_net_subsidy_fen == 450 + 80 - 30
    signed = sum(-r.difference_fen if r.kind == REFUND else r.difference_fen for r in results)
    assert summary.channel_net_subsidy_fen - summary.ledger_net_subsidy_fen == signed
    assert summary.exception_lines == 4


async def test_the_chunked_merge_of_two_streams_equals_the_whole_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    """storage's merge over two cursors, in chunks of 3, gives exactly what merging both sides
    whole gives, whichever side is denser where (groups straddling chunk ends included)."""
    import random
    from collections.abc import AsyncIterator, Sequence
    from typing import TypeVar

    from storage.postgres import reconciliation

    monkeypatch.setattr(reconciliation, "BATCH", 3)
    item_type = TypeVar("item_type")

    async def stream(values: Sequence[item_type]) -> AsyncIterator[item_type]:
        for value in values:
            yield value

    rng = random.Random(7)
    for _ in range(40):
        keys = sorted({f"{rng.randrange(40):032x}" for _ in range(rng.randrange(1, 30))})
        lines = sorted(
            (line(0, PAYMENT, f"T{i}", rng.choice(keys), rng.randrange(3)) for i in range(rng.randrange(0, 25))),
            key=lambda x: x.authorization_id,
        )
        lines = [x._replace(line_number=n) for n, x in enumerate(lines, start=2)]
        items = sorted(
            (item(f"{i}-0", PAYMENT, rng.choice(keys), rng.randrange(3)) for i in range(rng.randrange(0, 25))),
            key=lambda x: x.authorization_id,
        )
        whole = list(merge(lines, items))
        chunked = [result async for result in reconciliation._async_merge(stream(lines), stream(items))]
        assert chunked == whole
