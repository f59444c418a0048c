"""Optional TLS for ``ccsr serve``: a self-signed localhost certificate and the uvicorn plumbing.

Why: ``fal_client`` hard-codes ``https://`` and is redirected only by ``FAL_RUN_HOST`` /
``FAL_QUEUE_RUN_HOST`` read at import time, so an unmodified client can talk to us only over TLS, trusting our
certificate through ``SSL_CERT_FILE`` (README, "Server"). The certificate made here carries SAN
``DNS:localhost``, ``IP:127.0.0.1`` and ``IP:::1`` and is its own CA, so the same PEM file serves as the
server certificate and as the client's trust store. The three options (``--tls-cert``, ``--tls-key``,
``--tls-self-signed``, with their ``CCSR_TLS_*`` variables) are declared with the others in
:data:`ccsr.api.settings.OPTIONS`.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TLSFiles", "ensure_self_signed", "make_self_signed", "uvicorn_ssl_kwargs"]

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path


def make_self_signed(
    cert_path: str | os.PathLike,
    key_path: str | os.PathLike,
    hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS,
    days: int = 30,
) -> TLSFiles:
    """Write a fresh self-signed certificate (PEM) and its private key (PEM, mode 0600).

    ``hosts`` become subjectAltName entries: IP literals as ``IPAddress``, everything else as ``DNSName``.
    The certificate is marked CA so that OpenSSL (used by httpx through ``SSL_CERT_FILE``) accepts it as its
    own trust anchor.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")])
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = Path(cert_path), Path(key_path)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return TLSFiles(cert_path, key_path)


def ensure_self_signed(
    directory: str | os.PathLike, hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS
) -> TLSFiles:
    """Reuse ``directory/cert.pem`` + ``key.pem`` when both exist, else make them."""
    d = Path(directory)
    files = TLSFiles(d / "cert.pem", d / "key.pem")
    if files.cert.is_file() and files.key.is_file():
        return files
    return make_self_signed(files.cert, files.key, hosts)


def uvicorn_ssl_kwargs(
    tls_cert: str | None = None, tls_key: str | None = None, tls_self_signed: str | None = None
) -> dict:
    """Keyword arguments for ``uvicorn.run``/``uvicorn.Config``: ``{}`` for plain HTTP.

    Raises ``ValueError`` when only one of cert/key is given or a file is missing.
    """
    if tls_self_signed and not (tls_cert or tls_key):
        files = ensure_self_signed(tls_self_signed)
        tls_cert, tls_key = str(files.cert), str(files.key)
    if not tls_cert and not tls_key:
        return {}
    if not (tls_cert and tls_key):
        raise ValueError("--tls-cert and --tls-key must be given together")
    for p in (tls_cert, tls_key):
        if not Path(p).is_file():
            raise ValueError(f"TLS file not found: {p}")
    return {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)}


def main(argv: list[str] | None = None) -> int:
    """``python -m ccsr.api.tls DIR [HOST ...]``: write DIR/cert.pem and DIR/key.pem."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m ccsr.api.tls", description="make a self-signed localhost cert"
    )
    p.add_argument("directory")
    p.add_argument("hosts", nargs="*", default=list(DEFAULT_HOSTS))
    a = p.parse_args(argv)
    files = make_self_signed(Path(a.directory) / "cert.pem", Path(a.directory) / "key.pem", a.hosts)
    print(files.cert)
    print(files.key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
