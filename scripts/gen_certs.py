#!/usr/bin/env python3
"""Throwaway certificates for trying TLS and mutual TLS: a CA, a server certificate and a client
certificate signed by it (ECDSA P-256, PEM). For development, tests and the compose overlay only;
in production use your organisation's CA (docs/security.md).

    .venv/bin/python scripts/gen_certs.py deploy/secrets --host fusion --host localhost --host 127.0.0.1

writes ca.pem, ca.key, server.pem, server.key, client.pem, client.key into the directory (keys
mode 0600; with --readable every file is 0644, which the compose demo needs: its file-based
secrets are bind mounts that the container's user, uid 10001, must read). Needs the
`cryptography` package (in the dev extra).
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str = "titan-fusion test CA", days: int = 30) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a self-signed CA."""
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return _pem_cert(cert), _pem_key(key)


def make_leaf(ca_cert_pem: bytes, ca_key_pem: bytes, common_name: str, *, hosts: tuple[str, ...] = (),
              client: bool = False, days: int = 30) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) signed by the CA: a server certificate for `hosts` (DNS names or
    IP addresses), or a client certificate (`client=True`)."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                     else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                              critical=False))
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _pem_cert(cert), _pem_key(key)


def write(directory: Path, hosts: tuple[str, ...], *, readable: bool = False) -> dict[str, Path]:
    """CA, server and client certificates and keys in `directory`; their paths by name."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = make_ca()
    server, server_key = make_leaf(ca, ca_key, hosts[0] if hosts else "localhost", hosts=hosts)
    client, client_key = make_leaf(ca, ca_key, "titan-fusion client", client=True)
    files = {"ca.pem": ca, "ca.key": ca_key, "server.pem": server, "server.key": server_key,
             "client.pem": client, "client.key": client_key}
    paths = {}
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        os.chmod(path, 0o600 if name.endswith(".key") and not readable else 0o644)
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--host", action="append", default=[],
                        help="DNS name or IP address of the server certificate (repeat; default localhost, 127.0.0.1)")
    parser.add_argument("--readable", action="store_true",
                        help="keys readable by every user (0644): for the compose demo's bind-mounted secrets only")
    ns = parser.parse_args(argv)
    paths = write(ns.directory, tuple(ns.host) or ("localhost", "127.0.0.1"), readable=ns.readable)
    print("\n".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
