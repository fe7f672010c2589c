"""A local certificate authority for development and tests (``subsidyctl dev-certs``,
``make certs``), built with ``cryptography``: ECDSA P-256 keys, SHA-256 signatures.

Not a production PKI: the CA key sits beside the certificates it signs. A deployment uses its
own CA (or a public one for the server certificate) and never this module's output.

Client certificates name their caller (terminal, partner app, operator or provider id) in the
subject CN and in a DNS SAN, which is what the gateway compares with the id that signed the
request (server/rpc/tls.py).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(self, certificate_path: Path, key_path: Path) -> None:
        """Writes the certificate (0644) and the key (0600, created so before any byte lands)."""
        certificate_path.parent.mkdir(parents=True, exist_ok=True)
        certificate_path.write_bytes(self.certificate_pem)
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(self.key_pem)
        os.chmod(key_path, 0o600)


def _name(common_name: str, organisation: str = "Subsidy gateway (development)") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _window(not_before: datetime | None, not_after: datetime | None, days: int) -> tuple[datetime, datetime]:
    start = not_before or datetime.now(UTC) - timedelta(minutes=5)
    return start, not_after or start + timedelta(days=days)


def make_ca(
    common_name: str = "Subsidy gateway development CA",
    *,
    days: int = 365,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window(not_before, not_after, days)
    name = _name(common_name)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, certificate)


def issue(
    ca: Issued,
    common_name: str,
    *,
    server: bool = False,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    uris: Sequence[str] = (),
    days: int = 90,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    """A leaf certificate signed by ``ca``: for a server (serverAuth, names in SANs) or a
    client (clientAuth, the caller id in CN and a DNS SAN unless ``dns`` says otherwise)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window(not_before, not_after, days)
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in (dns or (() if server else (common_name,)))]
    names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ips]
    names += [x509.UniformResourceIdentifier(uri) for uri in uris]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def load(certificate_path: Path, key_path: Path) -> Issued:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: not an EC key written by this module")
    return Issued(key, x509.load_pem_x509_certificate(certificate_path.read_bytes()))


def split_hosts(hosts: Iterable[str]) -> tuple[list[str], list[str]]:
    """Host names and IP addresses, apart."""
    dns, ips = [], []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            ips.append(host)
        except ValueError:
            dns.append(host)
    return dns, ips


def dev_certificates(
    folder: Path, callers: Iterable[str], *, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 90, new_ca: bool = False
) -> list[Path]:
    """Writes (or keeps) ``folder``/ca.pem and ca.key, then server.pem/.key for ``hosts`` and
    clients/<id>.pem/.key for every caller id; returns the paths written. An existing CA is
    reused unless ``new_ca``, so certificates issued earlier stay valid."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    written: list[Path] = []
    ca_pem, ca_key = folder / "ca.pem", folder / "ca.key"
    if ca_pem.exists() and ca_key.exists() and not new_ca:
        ca = load(ca_pem, ca_key)
    else:
        ca = make_ca(days=max(days, 365))
        ca.write(ca_pem, ca_key)
        written += [ca_pem, ca_key]
    dns, ips = split_hosts(hosts)
    server = issue(ca, dns[0] if dns else ips[0], server=True, dns=dns, ips=ips, days=days)
    server.write(folder / "server.pem", folder / "server.key")
    written += [folder / "server.pem", folder / "server.key"]
    for caller in callers:
        client = issue(ca, caller, days=days)
        client.write(folder / "clients" / f"{caller}.pem", folder / "clients" / f"{caller}.key")
        written += [folder / "clients" / f"{caller}.pem", folder / "clients" / f"{caller}.key"]
    return written
