"""How the CLI prints results: tables of rows (or JSON) and metrics."""

import json

import click


def metric_text(v):
    """A metric as 4 decimals ("" when missing)."""
    return "" if v is None else f"{v:.4f}"


def print_rows(rows: list[dict], fmt: str) -> None:
    """Rows as an aligned table, or as JSON with fmt "json"."""
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("(none)")
        return
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    click.echo("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        click.echo("  ".join(str(r[c]).ljust(width[c]) for c in cols))

