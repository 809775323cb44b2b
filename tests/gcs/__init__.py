"""gs:// on loopback for tests: a GCS emulator that every client of the project talks to.

``GcsServer`` starts ``emulator.py`` (gcp-storage-emulator with the fixes these clients
need, fault injection and request statistics) and ``tlsproxy.py`` on free 127.0.0.1
ports, and gives the environment that points each client there:

- tensorstore (orbax's arrays, the workdir lock): ``TENSORSTORE_GCS_HTTP_URL`` and
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING``;
- google-cloud-storage (orbax's step listing, the folder scan): ``STORAGE_EMULATOR_HOST``;
- TensorFlow's own gs:// (tf.io.gfile, tf.summary, TFDS, etils epath) has no endpoint
  setting: it follows ``https_proxy`` to the TLS proxy, which answers for
  ``*.googleapis.com`` with a throwaway CA (``CURL_CA_BUNDLE``).

The variables must be set before a process first touches gs:// (TF and tensorstore read
them once), so tests run the real commands as subprocesses with ``server.env``. Nothing
binds or connects anywhere but 127.0.0.1. Packages: requirements-test.txt.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

HERE = pathlib.Path(__file__).parent
BUCKET = "bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_certs(directory: pathlib.Path) -> None:
    """A throwaway CA and a certificate for *.googleapis.com that it signed."""

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=sasa_flax test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=www.googleapis.com",
    )
    (directory / "ext.cnf").write_text(
        "subjectAltName=DNS:www.googleapis.com,DNS:storage.googleapis.com,DNS:*.googleapis.com\n"
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )


class GcsServer:
    """The emulator and the proxy, running until ``stop``."""

    def __init__(self, directory: pathlib.Path):
        _make_certs(directory)
        self.port, proxy = _free_port(), _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        logs = open(directory / "emulator.log", "w")  # noqa: SIM115 - open until stop
        self._processes = [
            subprocess.Popen(
                [sys.executable, str(HERE / "emulator.py"), str(self.port), BUCKET],
                stdout=logs,
                stderr=subprocess.STDOUT,
            ),
            subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "tlsproxy.py"),
                    str(proxy),
                    str(self.port),
                    str(directory / "server.pem"),
                    str(directory / "server.key"),
                ],
                stdout=logs,
                stderr=subprocess.STDOUT,
            ),
        ]
        self.env = dict(
            TENSORSTORE_GCS_HTTP_URL=self.endpoint,
            GOOGLE_AUTH_TOKEN_FOR_TESTING="dummy",
            STORAGE_EMULATOR_HOST=self.endpoint,
            https_proxy=f"http://127.0.0.1:{proxy}",
            CURL_CA_BUNDLE=str(directory / "ca.pem"),
            no_proxy="127.0.0.1,localhost",
            NO_PROXY="127.0.0.1,localhost",
            NO_GCE_CHECK="true",
            GCE_METADATA_HOST="127.0.0.1:9",  # no metadata server: a closed port
            GOOGLE_CLOUD_PROJECT="test",
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self._call("GET", f"/storage/v1/b/{BUCKET}")
                break
            except OSError:
                if time.monotonic() > deadline or self._processes[0].poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        f"the GCS emulator did not start: {directory}/emulator.log"
                    ) from None
                time.sleep(0.1)

    def _call(self, method: str, path: str) -> bytes:
        request = urllib.request.Request(self.endpoint + path, method=method)
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.read()

    def prefix(self, name: str = "t") -> str:
        """A fresh gs:// prefix: each test works under its own."""
        return f"gs://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"

    def fail_uploads(self, match: str, status: int = 412, count: int = 1000) -> None:
        """The next ``count`` uploads of objects whose names contain ``match`` fail."""
        self._call("POST", f"/_fault?match={match}&status={status}&count={count}")

    def clear_faults(self) -> None:
        self._call("DELETE", "/_fault")

    def requests(self) -> list[list]:
        """Every request since the last ``clear_requests``: [method, path, upload bytes]."""
        return json.loads(self._call("GET", "/_stats"))

    def clear_requests(self) -> None:
        self._call("DELETE", "/_stats")

    def stop(self) -> None:
        for process in self._processes:
            process.terminate()
            process.wait(timeout=10)


def environment(server: GcsServer, **extra: str) -> dict[str, str]:
    """``os.environ`` with the emulator's variables."""
    return {**os.environ, **server.env, **extra}
