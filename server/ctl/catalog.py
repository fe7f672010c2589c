"""subsidyctl catalog: import, get, list, deactivate eligible products."""

from __future__ import annotations

import click


@click.group()
def catalog() -> None:
    """The eligible-product catalog."""
