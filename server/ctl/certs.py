"""subsidyctl dev-certs: a local CA, a server certificate and client certificates for the
callers of a reference file (README "Security"). Works offline; talks to no gateway."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from server.commands.certs import DEFAULT_HOSTS, dev_certificates
from server.ctl.common import DEVELOPMENT, emit_document, json_option, options
from server.domain.reference import parse_reference


@click.command("dev-certs", short_help="Development CA, server and client certificates.")
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path(".certs"), show_default=True, help="folder to write into"
)
@click.option(
    "--reference",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=Path("examples/demo.yaml"),
    show_default=True,
    help="client certificates for every terminal, partner and operator of this reference file",
)
@click.option(
    "--host", "hosts", multiple=True, help=f"server name or IP (repeatable; default {', '.join(DEFAULT_HOSTS)})"
)
@click.option("--days", type=click.IntRange(1, 825), default=90, show_default=True, help="validity of the leaves")
@click.option("--new-ca", is_flag=True, help="replace the CA (certificates issued before stop verifying)")
@json_option
def dev_certs(out: Path, reference: Path, hosts: tuple[str, ...], days: int, new_ca: bool) -> None:
    """Create development certificates: OUT/ca.pem, OUT/server.pem and .key, OUT/clients/ID.pem and .key."""
    data = parse_reference(yaml.safe_load(reference.read_text()))
    callers = [terminal.terminal_id for merchant in data.merchants for terminal in merchant.terminals]
    callers += [partner.partner_id for partner in data.partners]
    callers += [operator.operator_id for operator in data.operators]
    dev_certificates(out, callers, hosts=hosts or DEFAULT_HOSTS, days=days, new_ca=new_ca)
    names = ", ".join(hosts or DEFAULT_HOSTS)
    if options().json_output:
        emit_document(
            {
                "ca": str(out / "ca.pem"),
                "server_certificate": str(out / "server.pem"),
                "server_key": str(out / "server.key"),
                "hosts": list(hosts or DEFAULT_HOSTS),
                "clients": str(out / "clients"),
                "callers": callers,
            }
        )
        return
    click.echo(f"{out}/ca.pem: the CA (keep {out}/ca.key private); {out}/server.pem and .key for {names}")
    click.echo(f"{out}/clients/<id>.pem and .key for: {', '.join(callers)}")
    click.echo(f"TLS:  SUBSIDY_TLS_CERT={out}/server.pem SUBSIDY_TLS_KEY={out}/server.key")
    click.echo(f"mTLS: add SUBSIDY_TLS_CLIENT_CA={out}/ca.pem")


SECTION = DEVELOPMENT
COMMANDS = (dev_certs,)
