"""What the service benchmarks share: the real service (`annotate serve`), a llama.cpp server, RSS, texts.

Both are started as a user would start them (subprocesses on free loopback ports, the
service on its own temporary data dir) and stopped with SIGTERM; anything of theirs still
alive a minute later is killed by pid. ``RssSampler`` sums the RSS of a process and all
its descendants (for the service: Ray's raylet, GCS, Serve controller, proxy, replicas
and Ray Data workers) every 0.2 s and keeps the peak.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the `service` package, for the helpers that render its prompts
SHARED_SMS = ROOT / ".." / "shared" / "data" / "sms_spam.csv"
FIXTURE_SMS = ROOT / "tests" / "fixtures" / "sms.jsonl"
SMS_TAXONOMY = ROOT / "taxonomy" / "sms-spam.yaml"
ANNOTATE = Path(sys.executable).parent / "annotate"
STARTUP_TIMEOUT_S = 600
FINISHED = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    """A running `annotate serve`: where it answers, where it keeps data and reads sources."""

    url: str
    data_dir: Path
    input_dir: Path
    process: subprocess.Popen
    log: Path

    def client(self, timeout: float = 600) -> httpx.Client:
        """An HTTP client for this service."""
        return httpx.Client(base_url=self.url, timeout=timeout)

    def push_taxonomy(self, path: Path, tag: str) -> str:
        """Push ``path`` with its ``version:`` replaced by ``tag``; returns the new content version.

        The prompt does not contain the version string, so every tag labels exactly
        alike, but the annotator key differs: a measurement never reads another's cache.
        """
        lines = [f'version: "{tag}"' if line.startswith("version:") else line
                 for line in path.read_text(encoding="utf-8").splitlines()]
        with self.client() as client:
            response = client.post("/v1/taxonomies", content="\n".join(lines).encode())
        response.raise_for_status()
        return response.json()["version"]


@contextlib.contextmanager
def service(workdir: Path, models_yaml: str, env: dict[str, str] | None = None, *,
            input_dir: Path | None = None) -> Iterator[Service]:
    """`annotate serve` on a free port with a fresh data dir under ``workdir``; SIGTERM on exit.

    Sources are read from ``input_dir`` (default ``workdir/inputs``); ``env`` adds or
    overrides ANNOTATE_* settings.
    """
    data_dir, input_dir = workdir / "data", input_dir or workdir / "inputs"
    if data_dir.exists():  # a used store would resume its jobs and serve its cache
        raise FileExistsError(f"{data_dir} exists; give the benchmark a new --workdir")
    data_dir.mkdir(parents=True)
    input_dir.mkdir(parents=True, exist_ok=True)
    models_file = workdir / "models.yaml"
    models_file.write_text(models_yaml)
    port = free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "ANNOTATE_DATA_DIR": str(data_dir),
                "ANNOTATE_INPUT_DIR": str(input_dir), "ANNOTATE_PORT": str(port),
                "ANNOTATE_MODELS_FILE": str(models_file),
                "ANNOTATE_DEFAULT_ANNOTATORS": "llm",  # throughput of the model: jobs that list no annotators run it alone
                **(env or {})}
    log = workdir / "serve.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([str(ANNOTATE), "serve"], env=full_env, stdout=handle, stderr=subprocess.STDOUT)
    running = Service(f"http://127.0.0.1:{port}", data_dir, input_dir, process, log)
    try:
        _wait_until(process, log, f"{running.url}/healthz", "annotate serve")
        yield running
    finally:
        _terminate(process)


@contextlib.contextmanager
def llama_server(workdir: Path, *, threads: int) -> Iterator[tuple[str, subprocess.Popen]]:
    """llama-cpp-python's OpenAI-compatible server on the SmolLM2 GGUF; yields (its /v1 URL, process)."""
    from service.engines.embedded import gguf_path

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--model_alias", "smollm2",
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads),
               "--logits_all", "true"]
    log = workdir / "llama-server.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until(process, log, f"{url}/models", "llama.cpp server")
        yield url, process
    finally:
        _terminate(process)


def _wait_until(process: subprocess.Popen, log: Path, url: str, what: str) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if the process dies or stays silent."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _terminate(process: subprocess.Popen) -> None:
    """SIGTERM the process, wait for it and its descendants, then kill (by pid) whatever is left."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _, alive = psutil.wait_procs(children, timeout=60)
    for leftover in alive:
        with contextlib.suppress(psutil.Error):
            leftover.kill()


def tree_rss(pids: list[int]) -> dict[str, int]:
    """RSS in bytes of each live process under (and including) ``pids``, keyed by 'pid name'."""
    sizes: dict[str, int] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                name = (proc.cmdline() or [proc.name()])[0]
                if name.startswith("ray::"):  # Ray appends the running method: ray::Actor.method
                    name = name.split(".", 1)[0]
                sizes[f"{proc.pid} {Path(name).name if name.startswith('/') else name}"] = proc.memory_info().rss
    return sizes


@dataclass
class RssSampler:
    """Samples the summed RSS of process trees every ``interval_s`` while in a ``with`` block.

    ``peak_mib`` is the highest sum seen; ``peak_detail`` is the per-process RSS of that
    sample (the biggest first), to say which process grew. RSS counts shared pages (Ray's
    object store, shared libraries) once per process that maps them.
    """

    pids: list[int]
    interval_s: float = 0.2
    peak_mib: float = 0.0
    start_mib: float = 0.0
    samples: int = 0
    peak_detail: list[tuple[str, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self.start_mib = self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> float:
        sizes = tree_rss(self.pids)
        total = sum(sizes.values()) / 2**20
        self.samples += 1
        if total > self.peak_mib:
            self.peak_mib = total
            self.peak_detail = sorted(((name, rss / 2**20) for name, rss in sizes.items()), key=lambda kv: -kv[1])
        return total


@dataclass
class JobRun:
    """A finished job as the client saw it: its final status and when each document was done."""

    job: dict
    seconds: float  # submission to the end
    done_at: list[float] = field(default_factory=list)  # seconds after submission, one per document


def run_job(client: httpx.Client, body: dict, *, poll_s: float = 0.2, timeout_s: float = 3600) -> JobRun:
    """Submit a job and poll it to its end; a document counts as done at the first poll that shows it done."""
    started = time.perf_counter()
    response = client.post("/v1/jobs", json=body)
    if response.status_code != 202:
        raise RuntimeError(f"POST /v1/jobs answered {response.status_code}: {response.text[:500]}")
    job_id = response.json()["job_id"]
    done_at: list[float] = []
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        elapsed = time.perf_counter() - started
        finished = job["done"] + job["failed"]
        done_at += [elapsed] * max(0, finished - len(done_at))
        if job["status"] in FINISHED:
            break
        if elapsed > timeout_s:
            raise RuntimeError(f"job {job_id} not finished after {timeout_s} s: {job}")
        time.sleep(poll_s)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
    return JobRun(job, elapsed, done_at)


def measured_job(running: Service, body: dict, *, tag: str, taxonomy: Path = SMS_TAXONOMY, poll_s: float = 0.2,
                 also: list[int] = ()) -> tuple[JobRun, RssSampler]:
    """Run one job on a fresh taxonomy version (so nothing comes from the cache) while sampling RSS.

    The RSS is the service's process tree plus the trees of the ``also`` pids.
    """
    version = running.push_taxonomy(taxonomy, tag)
    name = body.get("taxonomy") or _taxonomy_name(taxonomy)
    with running.client() as client, RssSampler([running.process.pid, *also]) as rss:
        run = run_job(client, {**body, "taxonomy": name, "taxonomy_version": version}, poll_s=poll_s)
    return run, rss


def _taxonomy_name(path: Path) -> str:
    """The ``name:`` of a taxonomy file."""
    return next(line.split(":", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("name:"))


def job_labels(client: httpx.Client, job_id: str) -> list[dict]:
    """The job's label rows (JSON lines), in input order."""
    response = client.get(f"/v1/jobs/{job_id}/labels")
    response.raise_for_status()
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def model_stats(client: httpx.Client, name: str) -> dict:
    """The named model deployment's counters from GET /v1/models."""
    for model in client.get("/v1/models").json():
        if model["name"] == name:
            return model["stats"] or {}
    raise KeyError(name)


def sms_texts(n: int) -> tuple[list[tuple[str, str | None]], str]:
    """``n`` distinct SMS texts with their gold label (None if unknown), and where they came from.

    The first distinct messages of ``../shared/data/sms_spam.csv`` when it exists, else
    the 10 messages of ``tests/fixtures/sms.jsonl``; past the end of the source, its texts
    come round again with a counter appended (" (2)"), so no two texts are equal and no
    document is served from the annotation cache of another.
    """
    if SHARED_SMS.exists():
        with SHARED_SMS.open(newline="", encoding="utf-8") as handle:
            base = list({row["text"]: row["label"] for row in csv.DictReader(handle)}.items())
        origin = f"{SHARED_SMS.resolve()} (first {min(n, len(base))} distinct messages)"
    else:
        base = [(json.loads(line)["text"], None) for line in FIXTURE_SMS.read_text().splitlines() if line.strip()]
        origin = f"{FIXTURE_SMS.relative_to(ROOT)} (../shared/data absent)"
    if n > len(base):
        origin += f", repeated with a counter to {n}"
    return [(text if i < len(base) else f"{text} ({i // len(base) + 1})", label)
            for i, (text, label) in ((i, base[i % len(base)]) for i in range(n))], origin


def write_jsonl(path: Path, texts: list[str]) -> Path:
    """A JSONL corpus of ``{"id", "text"}`` rows."""
    with path.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"d{i:06d}", "text": text}) + "\n")
    return path


def progress(message: str) -> None:
    """A progress line on stderr (tables go to stdout)."""
    print(f"[{message}]", file=sys.stderr, flush=True)


def call(client: httpx.Client, method: str, url: str, **kwargs) -> dict | list:
    """One API call; a non-2xx answer stops the benchmark with the service's message."""
    response = client.request(method, url, **kwargs)
    if not response.is_success:
        raise RuntimeError(f"{method} {url} answered {response.status_code}: {response.text[:1000]}")
    return response.json()


def sql(client: httpx.Client, query: str) -> list[dict]:
    """Rows of a read-only query as dicts; a truncated answer is an error (raise ANNOTATE_SQL_MAX_ROWS)."""
    answer = call(client, "POST", "/v1/sql", json={"sql": query})
    if answer["truncated"]:
        raise RuntimeError(f"SQL answer truncated at {len(answer['rows'])} rows: {query}")
    return [dict(zip(answer["columns"], row)) for row in answer["rows"]]


def follow_job(client: httpx.Client, body: dict, what: str, detail=lambda job: "",
               every_s: float = 10.0) -> tuple[dict, float]:
    """Submit a job and poll it to its end, a progress line every ``every_s``; (final status, seconds).

    ``detail(job)`` adds to each line; a job that does not succeed stops the benchmark.
    """
    started = last = time.perf_counter()
    job_id = call(client, "POST", "/v1/jobs", json=body)["job_id"]
    while (job := call(client, "GET", f"/v1/jobs/{job_id}"))["status"] not in FINISHED:
        if time.perf_counter() - last >= every_s:
            last = time.perf_counter()
            progress(f"{what}: {job['status']} {job['progress']:.0%} after {last - started:.0f} s{detail(job)}")
        time.sleep(0.5)
    if job["status"] != "succeeded":
        raise RuntimeError(f"{what}: job {job_id} ended {job['status']}: {job.get('error')}")
    return job, time.perf_counter() - started
