"""A throw-away test CA and a server certificate for 127.0.0.1 / localhost."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TLSFiles:
    """PEM file paths: the CA certificate, the server certificate (leaf only) and its key.

    ``cert_dir`` holds only ``ca.crt``: pass it to skopeo ``--cert-dir``/``--src-cert-dir``
    (a directory with a ``*.key`` but no matching ``*.cert`` makes skopeo fail).
    """

    ca_cert: Path
    cert: Path
    key: Path
    ca_key: Path
    cert_dir: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "regproxy tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def self_signed_rsa(
    common_name: str, validity_days: int = 30
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """An RSA key and a self-signed certificate for it (used by the token issuer)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_ca_and_cert(
    directory: Path | str,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    validity_days: int = 30,
) -> TLSFiles:
    """Write ca.crt, ca.key, server.crt, server.key into *directory* and return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=validity_days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("regproxy test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TLSFiles(
        ca_cert=directory / "ca.crt",
        cert=directory / "server.crt",
        key=directory / "server.key",
        ca_key=directory / "ca.key",
        cert_dir=directory / "certs.d",
    )
    files.cert_dir.mkdir(exist_ok=True)
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (files.cert_dir / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkcs8 = serialization.PrivateFormat.PKCS8
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
    )
    files.ca_key.write_bytes(
        ca_key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
    )
    files.key.chmod(0o600)
    files.ca_key.chmod(0o600)
    return files


@dataclass(frozen=True)
class ChainFiles:
    """A root, an intermediate it signed, and a leaf for 127.0.0.1 the intermediate signed:
    a client trusting only the root needs the server to send the intermediate."""

    root: Path
    intermediate: Path
    leaf: Path
    leaf_key: Path
    fullchain: Path  # the leaf, then the intermediate


def make_chain(directory: Path | str, host: str = "127.0.0.1") -> ChainFiles:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: Any, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    root_key, middle_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = issue("chain root", root_key, "chain root", root_key, ca=True)
    middle = issue("chain intermediate", middle_key, "chain root", root_key, ca=True)
    leaf = issue(host, leaf_key, "chain intermediate", middle_key, ca=False)
    pem = serialization.Encoding.PEM
    files = ChainFiles(
        root=directory / "root.crt",
        intermediate=directory / "intermediate.crt",
        leaf=directory / "leaf.crt",
        leaf_key=directory / "leaf.key",
        fullchain=directory / "fullchain.crt",
    )
    files.root.write_bytes(root.public_bytes(pem))
    files.intermediate.write_bytes(middle.public_bytes(pem))
    files.leaf.write_bytes(leaf.public_bytes(pem))
    files.fullchain.write_bytes(leaf.public_bytes(pem) + middle.public_bytes(pem))
    files.leaf_key.write_bytes(
        leaf_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.leaf_key.chmod(0o600)
    return files
