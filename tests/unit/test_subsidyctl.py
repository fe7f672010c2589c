"""subsidyctl, the one command line (issue 11, section 3): its help lists every operator task,
every command that prints a result takes --json, tables measure display width (Chinese store
names line up), progress bars are drawn only on a terminal and never with --json, and the
``python -m`` aliases still answer. No gateway, PostgreSQL or Redis is needed here."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner
from rich.cells import cell_len

from server.ctl import main as subsidyctl
from server.ctl.common import Options, emit_document, format_document, format_table, steps
from tests.conftest import ROOT

# Every task an operator runs, by its subsidyctl name.
TASKS = {
    "campaign apply",
    "campaign show",
    "budget status",
    "catalog import",
    "catalog get",
    "catalog list",
    "catalog deactivate",
    "merchant onboard",
    "merchant show",
    "merchant suspend",
    "merchant reinstate",
    "merchant suspend-terminal",
    "merchant reinstate-terminal",
    "merchant rotate-credential",
    "ledger verify",
    "ledger reconcile",
    "ledger rebuild",
    "ledger lag",
    "ledger requeue-set-aside",
    "ledger writer",
    "reference load",
    "reference publish",
    "exchange export",
    "exchange import",
    "exchange reapply",
    "serve",
    "dashboard",
    "dev run",
    "dev reset",
    "dev-certs",
}
# Long-running processes log JSON lines; they print no result to format.
PROCESSES = {"ledger writer", "serve", "dashboard", "dev run", "dev reset"}


def leaves(command: click.Command, path: str = "") -> Iterator[tuple[str, click.Command]]:
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from leaves(sub, f"{path} {name}".strip())
    else:
        yield path, command


def test_help_lists_every_operator_task() -> None:
    result = CliRunner().invoke(subsidyctl, ["--help"], terminal_width=120)
    assert result.exit_code == 0, result.output
    listed = {line.strip().split("  ")[0] for line in result.output.splitlines() if line.startswith("  ")}
    every = {path for path, _ in leaves(subsidyctl)}
    assert TASKS <= every, sorted(TASKS - every)
    assert every <= listed, sorted(every - listed)  # and whatever groups other modules add
    assert "Exit statuses" in result.output and "3  a dependency did not answer" in result.output


@pytest.mark.parametrize("task", sorted({path for path, _ in leaves(subsidyctl)} - PROCESSES))
def test_every_command_that_prints_a_result_takes_json(task: str) -> None:
    command = dict(leaves(subsidyctl))[task]
    assert any("--json" in parameter.opts for parameter in command.params), task
    result = CliRunner().invoke(subsidyctl, [*task.split(), "--help"])
    assert result.exit_code == 0 and "--json" in result.output, result.output


def test_tables_measure_display_width() -> None:
    """A CJK character takes two terminal cells: the columns after a Chinese store name start
    at the same cell in every line, as they do after ASCII names."""
    rows = [
        {"store_id": "s-xs-01", "name": "苏宁易购萧山旗舰店", "kind": "PHYSICAL"},
        {"store_id": "s-2", "name": "Suning.com Tmall", "kind": "ONLINE"},
        {"store_id": "s-xs-03", "name": "国美电器（萧山）", "kind": "PHYSICAL"},
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["STORE_ID", "NAME", "KIND"]
    starts = set()
    for line, row in zip(lines[1:], rows, strict=True):
        before_kind = line[: line.index(row["kind"])]
        starts.add(cell_len(before_kind))
    assert len(starts) == 1, lines
    assert all(line == line.rstrip() for line in lines)


def test_numbers_are_right_aligned_and_documents_become_tables() -> None:
    lines = format_table([{"campaign": "c-1", "units": 7}, {"campaign": "c-22", "units": 1234}]).splitlines()
    assert lines[1].endswith("   7") and lines[2].endswith("1234")
    text = format_document(
        {"entries_checked": 12, "breaks": [{"campaign_id": "c-1", "entry_seq": 3, "problem": "hash"}], "ok": True}
    )
    assert "entries_checked  12" in text and "BREAKS" in text and "c-1" in text and "yes" in text
    assert format_table([]) == "(none)"


def test_emit_document_is_json_with_json() -> None:
    @click.command()
    def show() -> None:
        emit_document({"name": "国美", "count": 2})

    result = CliRunner().invoke(show, [], obj=Options(json_output=True))
    assert json.loads(result.output) == {"name": "国美", "count": 2}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("terminal", "json_output", "drawn"), [(True, False, True), (True, True, False), (False, False, False)]
)
def test_progress_only_on_a_terminal_and_never_with_json(
    monkeypatch: pytest.MonkeyPatch, terminal: bool, json_output: bool, drawn: bool
) -> None:
    stderr = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    with steps(json_output) as progress:
        task = progress.add("importing", 10)
        progress.advance(task, 4)
        report = progress.reporter("reapply")
        report(5, 10)
        progress.finish(task)
    assert bool(stderr.getvalue()) is drawn, stderr.getvalue()


@pytest.mark.parametrize("alias", ["server.ledger", "server.reference", "server.exchange"])
def test_python_m_aliases_answer(alias: str) -> None:
    """The aliases make, docker-compose, CI and the tests call are subsidyctl's groups."""
    result = subprocess.run(
        [sys.executable, "-m", alias, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert f"Usage: python -m {alias}" in result.stdout
