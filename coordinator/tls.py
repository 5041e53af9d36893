"""TLS with a self-signed certificate, pinned by its SHA-256 fingerprint (on by default).

There is no CA on a LAN: the coordinator makes its own certificate once (kept next to the
database, so the fingerprint survives restarts). Its fingerprint reaches devices inside the
join code (`edge_sdk.client.joincode`), which is how a device authenticates the coordinator
before it sends any secret; the fingerprint in the mDNS TXT record is only a hint. The
certificate (ECDSA P-256, 10 years) is made with the `openssl` command line: the
`cryptography` package is not a dependency.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from coordinator.errors import CoordinatorError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsMaterial:
    cert_path: Path
    key_path: Path
    fingerprint: str
    """sha256 of the DER certificate, lowercase hex (what `openssl x509 -fingerprint -sha256`
    shows)."""

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def tls_directory(db_path: Path) -> Path:
    """Where a coordinator with database `db_path` keeps its certificate and key."""
    return db_path.with_name(db_path.name + ".tls")


def certificate_fingerprint(cert_path: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(cert_path.read_text(encoding="ascii"))
    return hashlib.sha256(der).hexdigest()


def ensure_self_signed(
    directory: Path, common_name: str = "fedlm-coordinator", days: int = 3650
) -> TlsMaterial:
    """Load `directory`/cert.pem + key.pem, or create them (ECDSA P-256) on first use."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.is_file() != key_path.is_file():
        # Half a pair (a crash mid-creation, or a deleted key): refuse rather than replace the
        # identity that enrolled devices have pinned without the operator noticing.
        missing = key_path if cert_path.is_file() else cert_path
        raise CoordinatorError(
            f"{missing} is missing but its pair is there: restore it, or delete {directory} "
            "to make a new certificate (devices must then re-enroll with the new join code)"
        )
    if not cert_path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        _create_with_openssl(cert_path, key_path, common_name, days)
        log.info("created a self-signed TLS certificate in %s", directory)
    try:
        fingerprint = certificate_fingerprint(cert_path)
    except (OSError, ValueError) as exc:
        raise CoordinatorError(f"{cert_path}: not a PEM certificate ({exc})") from None
    return TlsMaterial(cert_path, key_path, fingerprint)


def _create_with_openssl(cert_path: Path, key_path: Path, common_name: str, days: int) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise CoordinatorError(
            "TLS needs the `openssl` command to create the coordinator's certificate: install "
            "OpenSSL, or run with --insecure (plain HTTP, not recommended)"
        )
    # Written aside and renamed key first, certificate last: a certificate on disk means the
    # pair is complete (a crash leaves only *.tmp files, made again on the next start).
    key_tmp, cert_tmp = key_path.with_suffix(".pem.tmp"), cert_path.with_suffix(".pem.tmp")
    command = [
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", str(days), "-subj", f"/CN={common_name}",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "-keyout", str(key_tmp), "-out", str(cert_tmp),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise CoordinatorError(
            f"openssl could not create a certificate: {result.stderr.strip()[-300:]}"
        )
    key_tmp.chmod(0o600)
    os.replace(key_tmp, key_path)
    os.replace(cert_tmp, cert_path)
