"""subsidyctl merchant: onboard merchants with stores and terminals; suspend and reinstate."""

from __future__ import annotations

import click


@click.group()
def merchant() -> None:
    """Merchants, stores and terminals."""
