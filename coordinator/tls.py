"""Optional TLS with a self-signed certificate, pinned by its SHA-256 fingerprint.

There is no CA on a LAN: the coordinator makes its own certificate once (kept next to the
database, so the fingerprint survives restarts) and advertises the fingerprint in its mDNS
TXT record; clients pin it (trust on first use). The certificate is made with the `openssl`
command line, as the `cryptography` package is not a dependency.
"""

from __future__ import annotations

import hashlib
import logging
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
    """sha256 of the DER certificate, lowercase hex (what `openssl x509 -fingerprint -sha256` shows)."""

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def certificate_fingerprint(cert_path: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(cert_path.read_text(encoding="ascii"))
    return hashlib.sha256(der).hexdigest()


def ensure_self_signed(
    directory: Path, common_name: str = "fedlm-coordinator", days: int = 3650
) -> TlsMaterial:
    """Load `directory`/cert.pem + key.pem, or create them (ECDSA P-256) on first use."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if not (cert_path.is_file() and key_path.is_file()):
        openssl = shutil.which("openssl")
        if openssl is None:
            raise CoordinatorError("--tls needs the `openssl` command to create a certificate")
        directory.mkdir(parents=True, exist_ok=True)
        command = [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", str(days), "-subj", f"/CN={common_name}",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key_path), "-out", str(cert_path),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise CoordinatorError(
                f"openssl could not create a certificate: {result.stderr.strip()[-300:]}"
            )
        key_path.chmod(0o600)
        log.info("created a self-signed TLS certificate in %s", directory)
    return TlsMaterial(cert_path, key_path, certificate_fingerprint(cert_path))
