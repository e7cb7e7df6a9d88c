"""Shared fixtures: one real service (Ray Serve + embedded model) per test session, and real stores.

The session service requires API tokens (ANNOTATE_AUTH=required), as a service off loopback
does; clients and the CLI carry the operator's token unless a test says otherwise.

The service is started once, as a user would (`annotate serve` in a subprocess on a free
loopback port, its own data dir), because Ray Serve on 2 cores is slow to start and its
proxy can miss readiness checks when tests starve the CPU.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ANNOTATE = Path(sys.executable).parent / "annotate"
STARTUP_TIMEOUT_S = 600
OPERATOR_TOKEN = "test-operator-" + os.urandom(8).hex()  # the session service requires tokens, as off loopback


@dataclass
class Service:
    """A running service: its base URL, data dir, process and environment for CLI calls."""

    url: str
    data_dir: Path
    input_dir: Path
    process: subprocess.Popen | None
    env: dict

    def client(self, token: str | None = OPERATOR_TOKEN) -> httpx.Client:
        """An HTTP client for this service, carrying ``token`` (the operator's admin token by default)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, timeout=120, headers=headers)

    def start(self) -> None:
        """Start `annotate serve` on this data dir and port and wait until it answers."""
        log = self.data_dir / "serve.log"
        with open(log, "a") as handle:
            self.process = subprocess.Popen([str(ANNOTATE), "serve"], env=self.env, stdout=handle,
                                            stderr=subprocess.STDOUT)
        _wait_ready(self.url, self.process, log)

    def stop(self) -> None:
        """SIGTERM, as a supervisor would; assert no Ray process outlives it."""
        children = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        _, alive = psutil.wait_procs(children, timeout=60)
        leftovers = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not leftovers, f"processes left behind after SIGTERM: {[p.cmdline()[:2] for p in leftovers]}"

    def kill(self) -> None:
        """SIGKILL to the service and every process it started, as a crash or an OOM killer would."""
        processes = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=60)
        self.process.wait(timeout=60)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run the `annotate` command against this service."""
        result = subprocess.run([str(ANNOTATE), *args], env=self.env, capture_output=True, text=True, timeout=600)
        if check and result.returncode != 0:
            raise AssertionError(f"annotate {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result


def run_engine(engine, call):
    """Await one engine call in a fresh event loop, then release the engine's pooled connections (no socket leaks)."""

    async def run():
        try:
            return await call
        finally:
            await engine.close()

    return asyncio.run(run())


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    """Wait for /healthz; fail with the server's log when it dies or stays silent."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"annotate serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"annotate serve not healthy after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@contextmanager
def running_llama_server(log: Path):
    """A real llama.cpp server (llama-cpp-python) serving the SmolLM2 GGUF on loopback, its output in ``log``;
    yields its /v1 URL."""
    from service.engines.embedded import gguf_path

    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--host", "127.0.0.1",
               "--port", str(port), "--model_alias", "smollm2", "--n_ctx", "4096", "--n_threads", "1",
               "--logits_all", "true"]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    try:
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama.cpp server did not start ({' '.join(command)}):\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory) -> str:
    """The session's llama.cpp server (see ``running_llama_server``); yields its /v1 URL."""
    with running_llama_server(tmp_path_factory.mktemp("llama-server") / "server.log") as url:
        yield url


class UpstreamProxy(BaseHTTPRequestHandler):
    """A loopback proxy in front of the real llama.cpp server (``upstream``), for tests that put faults between."""

    upstream = ""

    def forward(self, body: bytes) -> tuple[int, bytes]:
        """Pass a request body on to the upstream server; its status and body."""
        answer = httpx.post(self.upstream + self.path.removeprefix("/v1"), content=body,
                            headers={"content-type": "application/json"}, timeout=300)
        return answer.status_code, answer.content

    def reply(self, status: int, body: bytes, headers: dict | None = None) -> None:
        """Answer, unless the client has already given up and closed the connection."""
        try:
            self.send_response(status)
            for name, value in {"content-type": "application/json", **(headers or {})}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


class FaultyProxy(UpstreamProxy):
    """A request whose prompt holds STALL_ME hangs past the engine's timeout, one holding GARBLE_ME gets a 200
    whose body is not JSON; the rest pass through. Counts requests."""

    hits: dict[str, int] = {}

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        marker = next((m for m in ("STALL_ME", "GARBLE_ME") if m.encode() in body), "other")
        type(self).hits[marker] = type(self).hits.get(marker, 0) + 1
        if marker == "STALL_ME":
            time.sleep(FAULTY_TIMEOUT_S + 5)
            self.reply(200, b"{}")
        elif marker == "GARBLE_ME":
            self.reply(200, b"<html>upstream proxy error</html>")
        else:
            self.reply(*self.forward(body))


FAULTY_TIMEOUT_S = 12.0  # llama.cpp answers a real request in 2-8 s on 2 busy cores


@pytest.fixture(scope="session")
def faulty_proxy(llama_server) -> str:
    """A FaultyProxy on loopback in front of the llama.cpp server; yields its /v1 URL."""
    FaultyProxy.upstream = llama_server
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), FaultyProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{proxy.server_port}/v1"
    proxy.shutdown()
    proxy.server_close()


def models_file(directory: Path, llama_url: str, faulty_url: str) -> Path:
    """The test models config: the embedded default, the fake engine (also slowed down), the llama.cpp server,
    and the llama.cpp server behind the faulty proxy."""
    path = directory / "models.yaml"
    path.write_text(f"""default: smollm2
models:
  smollm2: {{engine: embedded}}
  fake: {{engine: fake}}
  slow-fake: {{engine: fake, delay_ms: 1}}
  llama: {{engine: openai, base_url: "{llama_url}", model: smollm2, scoring: auto, top_logprobs: 1000,
           max_concurrency: 2, timeout_s: 300}}
  faulty: {{engine: openai, base_url: "{faulty_url}", model: smollm2, scoring: top_logprobs, top_logprobs: 1000,
            max_concurrency: 4, timeout_s: {FAULTY_TIMEOUT_S}, max_retries: 0}}
""")
    return path


@pytest.fixture(scope="session")
def service(tmp_path_factory, llama_server, faulty_proxy) -> Service:
    """The real service with the embedded model, started once; stopped with SIGTERM at the end."""
    data_dir = tmp_path_factory.mktemp("service-data")
    input_dir = tmp_path_factory.mktemp("service-inputs")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ANNOTATE_DATA_DIR": str(data_dir), "ANNOTATE_PORT": str(port),
           "ANNOTATE_INPUT_DIR": str(input_dir), "ANNOTATE_URL": url, "HF_HUB_OFFLINE": "1",
           "ANNOTATE_AUTH": "required", "ANNOTATE_ADMIN_TOKEN": OPERATOR_TOKEN, "ANNOTATE_TOKEN": OPERATOR_TOKEN,
           "ANNOTATE_AUTH_FAILURES_PER_MINUTE": "100000",  # the route battery sends bad tokens on purpose
           # one annotator per job unless a test lists several: the default panel is tested in test_default_panel.py
           "ANNOTATE_DEFAULT_ANNOTATORS": "llm",
           "ANNOTATE_MODELS_FILE": str(models_file(data_dir.parent, llama_server, faulty_proxy))}
    running = Service(url=url, data_dir=data_dir, input_dir=input_dir, process=None, env=env)
    running.start()
    yield running
    running.stop()


def wait_for_job(client: httpx.Client, job_id: str, timeout_s: float = 600) -> dict:
    """Poll a job until it ends; return its final status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s: {job}")


def sql(client: httpx.Client, query: str) -> list[dict]:
    """Run SQL through the API and return rows as dicts."""
    response = client.post("/v1/sql", json={"sql": query})
    assert response.status_code == 200, response.text
    body = response.json()
    return [dict(zip(body["columns"], row)) for row in body["rows"]]


@pytest.fixture(scope="session")
def labelled_taxonomy(service) -> str:
    """The SMS spam taxonomy pushed to the service; returns its version."""
    with service.client() as client:
        response = client.post("/v1/taxonomies", content=(REPO / "taxonomy" / "sms-spam.yaml").read_bytes())
    assert response.status_code in (200, 201), response.text
    return response.json()["version"]


@dataclass
class InProcessApp:
    """The real FastAPI app in this process: its client, settings, store and job runner."""

    client: object  # starlette's TestClient
    settings: object
    store: object
    runner: object


@pytest.fixture
def in_process(tmp_path) -> InProcessApp:
    """The real app over a real store in ``tmp_path``, the FakeEngine as its one model and no Ray: for requests
    refused before any labelling. A loopback peer without a token (ANNOTATE_AUTH=auto); the input dir is tmp_path/inputs."""
    from fastapi.testclient import TestClient

    from service.api.context import Context, attach
    from service.api.token_store import TokenStore
    from service.engines.fake import FakeEngine
    from service.labelling.scoring import engine_scorer
    from service.serve.http import create_api
    from service.settings import Settings
    from service.store import Store
    from service.taxonomy import load_taxonomy
    from service.work.jobs import JobRunner
    from service.work.panels import Model
    from service.work.trainings import ClassifierRunner

    settings = Settings(data_dir=tmp_path / "data", input_dir=tmp_path / "inputs", host="127.0.0.1", auth="auto")
    settings.input_dir.mkdir()
    store, tokens = Store(settings.db_path, export_dir=settings.export_dir), TokenStore(tmp_path / "tokens.sqlite")
    taxonomy = REPO / "taxonomy" / "sms-spam.yaml"
    store.taxonomies.put(load_taxonomy(taxonomy), taxonomy.read_text())
    engine = FakeEngine()

    async def runner() -> JobRunner:  # its workers are tasks of the client's event loop
        return JobRunner(store, {"fake": Model("fake", engine_scorer(engine), engine.info)}, "fake",
                         batch_size=settings.batch_size, model_input_chars=settings.model_input_chars)

    with TestClient(create_api(), base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000)) as client:
        jobs = client.portal.call(runner)
        attach(Context(settings, store, jobs, {}, None, ClassifierRunner(store, settings), None, tokens))
        try:
            yield InProcessApp(client, settings, store, jobs)
        finally:
            client.portal.call(jobs.close)
            attach(None)
            store.close()
            tokens.close()
