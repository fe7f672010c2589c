"""subsidyctl campaign / budget: apply campaign files, read campaigns and budget status."""

from __future__ import annotations

import click


@click.group()
def campaign() -> None:
    """Campaigns: window, region, rules, budgets."""


@click.group()
def budget() -> None:
    """Budget status of a campaign."""
