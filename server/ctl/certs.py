"""subsidyctl dev-certs: a local CA, a server certificate and client certificates for the
callers of a reference file (README "Security"). Works offline; talks to no gateway."""

from __future__ import annotations

import os
from pathlib import Path

import click
import yaml
from subsidy_client import TlsConfig

from server.commands.certs import DEFAULT_HOSTS, dev_certificates
from server.domain.reference import parse_reference


def operator_tls() -> TlsConfig | None:
    """subsidyctl's TLS to the gateway, from SUBSIDYCTL_TLS_CA (the CA of the gateway's
    certificate; set: TLS), SUBSIDYCTL_TLS_CERT and SUBSIDYCTL_TLS_KEY (the operator's client
    certificate, for mutual TLS). None: plaintext, for a gateway on loopback."""
    ca, certificate, key = (os.environ.get(f"SUBSIDYCTL_TLS_{name}") for name in ("CA", "CERT", "KEY"))
    if not (ca or certificate):
        return None
    if bool(certificate) != bool(key):
        raise click.UsageError("SUBSIDYCTL_TLS_CERT and SUBSIDYCTL_TLS_KEY go together")
    return TlsConfig(ca_file=ca or None, cert_file=certificate or None, key_file=key or None)


@click.command("dev-certs")
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
def dev_certs(out: Path, reference: Path, hosts: tuple[str, ...], days: int, new_ca: bool) -> None:
    """Create development certificates: OUT/ca.pem, OUT/server.pem and .key, OUT/clients/ID.pem and .key."""
    data = parse_reference(yaml.safe_load(reference.read_text()))
    callers = [terminal.terminal_id for merchant in data.merchants for terminal in merchant.terminals]
    callers += [partner.partner_id for partner in data.partners]
    callers += [operator.operator_id for operator in data.operators]
    dev_certificates(out, callers, hosts=hosts or DEFAULT_HOSTS, days=days, new_ca=new_ca)
    names = ", ".join(hosts or DEFAULT_HOSTS)
    click.echo(f"{out}/ca.pem: the CA (keep {out}/ca.key private); {out}/server.pem and .key for {names}")
    click.echo(f"{out}/clients/<id>.pem and .key for: {', '.join(callers)}")
    click.echo(f"TLS:  SUBSIDY_TLS_CERT={out}/server.pem SUBSIDY_TLS_KEY={out}/server.key")
    click.echo(f"mTLS: add SUBSIDY_TLS_CLIENT_CA={out}/ca.pem")
