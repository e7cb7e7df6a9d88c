"""A bounded load test on loopback: many concurrent HTTP clients against one service, with a lost-job check.

    .venv/bin/python benchmarks/load.py [--clients 50] [--duration 60] [--baseline-duration 10]
        [--url http://127.0.0.1:8000] [--token TOKEN] [--drain-timeout 120] [--seed 0] [--workdir DIR]

Without ``--url`` it starts its own `annotate serve` (free loopback port, fresh data dir,
a models file with only the built-in ``fake`` engine, so the load measures the service,
not a language model). It pushes ``taxonomy/sms-spam.yaml``, then runs two phases:

- **sequential baseline** (the naive way): one client doing the mix below for
  ``--baseline-duration`` seconds;
- **concurrent**: ``--clients`` asyncio clients, each with its own ``httpx.AsyncClient``,
  for ``--duration`` seconds, back to back with no think time.

Each client repeats a weighted mix (``--mix``): submit a job of 5-20 short SMS texts
inline (POST /v1/jobs, model ``fake``), poll one of its own unfinished jobs (GET
/v1/jobs/{id}), fetch the labels of one of its own finished jobs (GET
/v1/jobs/{id}/labels, row count checked), run a small aggregate over the ``labels``
view (POST /v1/sql), list recent jobs (GET /v1/jobs?limit=20). An operation whose
precondition is missing (no job yet, none finished) runs the next one that applies.
Every text carries a unique suffix, so every document is scored (no cache hits).

After the load it waits (at most ``--drain-timeout`` s) for every accepted job to end,
then checks that none was lost: each job the service acknowledged exists, ended
``succeeded``, and has as many rows in the ``labels`` view as documents were sent.
It prints per-operation tables (count, 4xx / 5xx / transport errors, ops/s, latency
p50/p95/p99/max), the lost-job check, and the peak RSS of the service's process tree.
``Authorization: Bearer`` is sent when ``--token`` or ``ANNOTATE_TOKEN`` is set; a service
started here then takes it as its operator token (``ANNOTATE_ADMIN_TOKEN``) and requires
tokens (``ANNOTATE_AUTH=required``), so every request is authenticated. Without one, the
loopback service lets requests in without a token. (A stored, non-operator token would
meet ``ANNOTATE_MAX_ACTIVE_JOBS_PER_TOKEN``: 429s, counted as 4xx.)
Exit status 1 on any 5xx, transport error, lost job or wrong label count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import _service
import httpx
import psutil
from _report import fmt, load_now, machine_facts, percentile, print_facts, print_table

OPERATIONS = ("submit", "status", "labels", "sql", "list")
DEFAULT_MIX = "submit=20,status=35,labels=15,sql=15,list=15"
FAKE_MODELS = "default: fake\nmodels:\n  fake: {engine: fake}\n"
REQUEST_TIMEOUT_S = 60.0
CHUNK = 400  # job ids per verification query


@dataclass
class OpStats:
    """What one operation saw: latencies of every answered request and errors by kind."""

    latencies_ms: list[float] = field(default_factory=list)
    client_4xx: int = 0
    server_5xx: int = 0
    transport: int = 0
    samples: list[str] = field(default_factory=list)  # the first few error messages

    @property
    def count(self) -> int:
        """Requests sent (answered or not)."""
        return len(self.latencies_ms) + self.transport

    def error(self, message: str) -> None:
        """Keep the first three error messages of this operation."""
        if len(self.samples) < 3:
            self.samples.append(message)


@dataclass
class Phase:
    """One load phase: the per-operation stats, its wall time and content checks."""

    name: str
    clients: int
    ops: dict[str, OpStats] = field(default_factory=lambda: {op: OpStats() for op in OPERATIONS})
    seconds: float = 0.0
    service_cpu: dict[str, float] = field(default_factory=dict)  # 'pid name' -> CPU seconds in the phase
    jobs: list[str] = field(default_factory=list)  # the jobs its clients submitted
    wrong_label_rows: int = 0  # GET labels of a succeeded job with a row count other than its documents
    truncated_sql: int = 0


class LoadClient:
    """One simulated user: its own connection, its own jobs, a seeded choice of operations."""

    def __init__(self, index: int, http: httpx.AsyncClient, phase: Phase, ledger: dict[str, int], *, taxonomy: str,
                 version: str, model: str, mix: dict[str, float], texts: list[str], seed: int):
        self.index, self.http, self.phase = index, http, phase
        self.ledger = ledger  # every job the service acknowledged (all clients, all phases) -> documents sent
        self.taxonomy, self.version, self.model, self.mix, self.texts = taxonomy, version, model, mix, texts
        self.random = random.Random(seed * 1000 + index)
        self.pending: list[str] = []  # own jobs not yet seen finished
        self.finished: list[str] = []  # own jobs seen succeeded
        self.submitted = 0

    async def run(self, deadline: float) -> None:
        """Repeat the mix until the deadline (an operation in flight is finished, not cut)."""
        names, weights = zip(*self.mix.items())
        while time.perf_counter() < deadline:
            await self.step(self.random.choices(names, weights)[0])

    async def step(self, wanted: str) -> None:
        """Run ``wanted``, or the operation that applies when it cannot (no job yet, none finished)."""
        if wanted == "labels" and not self.finished:
            wanted = "status"
        if wanted == "status" and not (self.pending or self.finished):
            wanted = "submit"
        await {"submit": self.submit, "status": self.status, "labels": self.labels, "sql": self.sql,
               "list": self.list_jobs}[wanted]()

    async def request(self, op: str, method: str, url: str, **kwargs) -> httpx.Response | None:
        """One timed request; the answer for a 2xx, else None with the error counted under ``op``."""
        stats = self.phase.ops[op]
        started = time.perf_counter()
        try:
            response = await self.http.request(method, url, **kwargs)
            await response.aread()
        except httpx.HTTPError as exc:
            stats.transport += 1
            stats.error(f"{method} {url}: {type(exc).__name__}: {exc}")
            return None
        stats.latencies_ms.append(1000 * (time.perf_counter() - started))
        if response.status_code >= 500:
            stats.server_5xx += 1
        elif response.status_code >= 400:
            stats.client_4xx += 1
        else:
            return response
        stats.error(f"{method} {url} -> {response.status_code}: {response.text[:300]}")
        return None

    async def submit(self) -> None:
        """POST a job of 5-20 short texts, each made unique so that none is served from the cache."""
        n = self.random.randint(5, 20)
        tag = f"{self.phase.name[:3]}{self.index}j{self.submitted}"
        self.submitted += 1
        documents = [{"id": f"d{i}", "text": f"{self.random.choice(self.texts)} [{tag}d{i}]"} for i in range(n)]
        body = {"taxonomy": self.taxonomy, "taxonomy_version": self.version, "model": self.model,
                "documents": documents}
        response = await self.request("submit", "POST", "/v1/jobs", json=body)
        if response is not None:
            job_id = response.json()["job_id"]
            self.ledger[job_id] = n
            self.phase.jobs.append(job_id)
            self.pending.append(job_id)

    async def status(self) -> None:
        """GET one of its own jobs, preferably an unfinished one; remember it once it ended."""
        job_id = self.random.choice(self.pending or self.finished)
        response = await self.request("status", "GET", f"/v1/jobs/{job_id}")
        if response is not None and job_id in self.pending and response.json()["status"] in _service.FINISHED:
            self.pending.remove(job_id)
            if response.json()["status"] == "succeeded":
                self.finished.append(job_id)

    async def labels(self) -> None:
        """GET the labels of one of its own finished jobs; a row count other than its documents is wrong."""
        job_id = self.random.choice(self.finished)
        response = await self.request("labels", "GET", f"/v1/jobs/{job_id}/labels")
        if response is not None:
            rows = sum(1 for line in response.text.splitlines() if line.strip())
            if rows != self.ledger[job_id]:
                self.phase.wrong_label_rows += 1
                self.phase.ops["labels"].error(f"{job_id}: {rows} label rows for {self.ledger[job_id]} documents")

    async def sql(self) -> None:
        """A small aggregate over the labels view: of one own job, or (half the time, or without one) of all."""
        own = self.pending + self.finished
        where = f" WHERE job_id = '{self.random.choice(own)}'" if own and self.random.random() < 0.5 else ""
        query = f"SELECT label, count(*) AS n, round(avg(confidence), 3) AS mean_conf FROM labels{where} GROUP BY label"
        response = await self.request("sql", "POST", "/v1/sql", json={"sql": query})
        if response is not None and response.json().get("truncated"):
            self.phase.truncated_sql += 1

    async def list_jobs(self) -> None:
        """GET the 20 most recent jobs."""
        await self.request("list", "GET", "/v1/jobs", params={"limit": 20})


def http_client(url: str, headers: dict[str, str]) -> httpx.AsyncClient:
    """One client's connection to the service (a single keep-alive connection, like one user)."""
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S,
                             limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))


def tree_cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) so far of each live process under (and including) ``pid``, keyed by 'pid name'."""
    if pid is None:  # --url: not our child
        return {}
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    times = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            name = (proc.cmdline() or [proc.name()])[0]
            if name.startswith("ray::"):  # Ray appends the running method: ray::Actor.method
                name = name.split(".", 1)[0]
            times[f"{proc.pid} {Path(name).name if name.startswith('/') else name}"] = sum(proc.cpu_times()[:2])
    return times


async def run_phase(name: str, clients: int, duration: float, url: str, headers: dict[str, str], ledger: dict[str, int],
                    service_pid: int | None = None, **options) -> Phase:
    """``clients`` concurrent LoadClients for ``duration`` seconds; the phase's wall time runs to the last answer."""
    phase = Phase(name, clients)
    cpu_before = tree_cpu(service_pid)
    async with contextlib.AsyncExitStack() as stack:
        https = [await stack.enter_async_context(http_client(url, headers)) for _ in range(clients)]
        users = [LoadClient(i, http, phase, ledger, **options) for i, http in enumerate(https)]
        started = time.perf_counter()
        await asyncio.gather(*(user.run(started + duration) for user in users))
        phase.seconds = time.perf_counter() - started
    phase.service_cpu = {key: spent - cpu_before.get(key, 0.0) for key, spent in tree_cpu(service_pid).items()}
    return phase


async def sql_rows(http: httpx.AsyncClient, query: str) -> list[dict]:
    """Rows of one verification query (raises on an error or a truncated answer)."""
    response = await http.post("/v1/sql", json={"sql": query})
    response.raise_for_status()
    answer = response.json()
    if answer["truncated"]:
        raise RuntimeError(f"verification query truncated: {query[:200]}")
    return [dict(zip(answer["columns"], row)) for row in answer["rows"]]


def _in_list(job_ids: list[str]) -> str:
    """A SQL IN list of job ids (ids are the service's own 'job_' + hex)."""
    return ", ".join(f"'{job_id}'" for job_id in job_ids)


async def drain(http: httpx.AsyncClient, ledger: dict[str, int], timeout_s: float) -> tuple[float, int]:
    """Poll until every acknowledged job has ended or ``timeout_s`` passed; (seconds waited, jobs still active)."""
    started = time.perf_counter()
    active = list(ledger)
    while active:
        still = []
        for i in range(0, len(active), CHUNK):
            chunk = active[i:i + CHUNK]
            rows = await sql_rows(http, f"SELECT job_id FROM jobs WHERE job_id IN ({_in_list(chunk)})"
                                        " AND status IN ('queued', 'running')")
            still += [row["job_id"] for row in rows]
        active = still
        waited = time.perf_counter() - started
        if not active or waited > timeout_s:
            return waited, len(active)
        await asyncio.sleep(1.0)
    return 0.0, 0


@dataclass
class Verdict:
    """The lost-job check over every acknowledged job."""

    submitted: int = 0
    succeeded: int = 0
    missing: list[str] = field(default_factory=list)  # acknowledged, but unknown to the service
    not_succeeded: dict[str, str] = field(default_factory=dict)  # job id -> status (failed, cancelled, still active)
    wrong_count: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # job id -> (sent, total, label rows)
    api_missing: list[str] = field(default_factory=list)  # GET /v1/jobs/{id} answered other than 200
    turnaround_s: dict[str, float] = field(default_factory=dict)  # job id -> created to finished (server clock)

    @property
    def lost(self) -> int:
        """Jobs that do not exist or did not succeed."""
        return len(self.missing) + len(self.not_succeeded)


async def verify(http: httpx.AsyncClient, ledger: dict[str, int]) -> Verdict:
    """Status, total and labels-view row count of every acknowledged job, from SQL; existence also over the API."""
    verdict = Verdict(submitted=len(ledger))
    ids = list(ledger)
    found: dict[str, dict] = {}
    for i in range(0, len(ids), CHUNK):
        chunk = _in_list(ids[i:i + CHUNK])
        for row in await sql_rows(
                http, "SELECT j.job_id, any_value(j.status) AS status, any_value(j.total) AS total,"
                      " date_diff('millisecond', any_value(j.created_at), any_value(j.finished_at)) AS ms,"
                      f" count(l.doc_id) AS labelled FROM jobs j LEFT JOIN labels l ON l.job_id = j.job_id"
                      f" WHERE j.job_id IN ({chunk}) GROUP BY j.job_id"):
            found[row["job_id"]] = row
    for job_id, sent in ledger.items():
        row = found.get(job_id)
        if row is None:
            verdict.missing.append(job_id)
        elif row["status"] != "succeeded":
            verdict.not_succeeded[job_id] = row["status"]
        else:
            verdict.succeeded += 1
            verdict.turnaround_s[job_id] = row["ms"] / 1000
            if not row["total"] == row["labelled"] == sent:
                verdict.wrong_count[job_id] = (sent, row["total"], row["labelled"])
    semaphore = asyncio.Semaphore(8)

    async def exists(job_id: str) -> None:
        async with semaphore:
            if (status := (await http.get(f"/v1/jobs/{job_id}")).status_code) != 200:
                verdict.api_missing.append(f"{job_id} ({status})")

    await asyncio.gather(*(exists(job_id) for job_id in ids))
    return verdict


def phase_rows(phase: Phase) -> list[list]:
    """Table rows: one per operation that ran, then the total."""
    rows = []
    for op, stats in [*phase.ops.items(), ("total", _merged(phase))]:
        if not stats.count:
            continue
        lat = stats.latencies_ms
        rows.append([f"{phase.name}: {op}", stats.count, stats.client_4xx, stats.server_5xx, stats.transport,
                     fmt(stats.count / phase.seconds, 1), fmt(percentile(lat, 50), 1), fmt(percentile(lat, 95), 1),
                     fmt(percentile(lat, 99), 1), fmt(max(lat, default=float("nan")), 1)])
    return rows


def _merged(phase: Phase) -> OpStats:
    """Every operation of a phase as one."""
    total = OpStats()
    for stats in phase.ops.values():
        total.latencies_ms += stats.latencies_ms
        total.client_4xx += stats.client_4xx
        total.server_5xx += stats.server_5xx
        total.transport += stats.transport
    return total


def report(args, phases: list[Phase], verdict: Verdict, drained: tuple[float, int], rss: _service.RssSampler | None,
           server_jobs: int | None, client_cpu_s: float, url: str) -> bool:
    """Print the tables and the checks; True when the run passed."""
    base, conc = phases
    started_here = "started here: annotate serve, models file with only the fake engine"
    print_facts("Load: concurrent HTTP clients against one service", [
        f"service: {url} ({'given with --url' if args.url else started_here})",
        f"mix (weights): {', '.join(f'{op} {w:g}' for op, w in args.mix.items())}; jobs of 5-20 unique SMS texts "
        f"(model {args.model}); no think time",
        f"phases: sequential baseline, 1 client for {args.baseline_duration:.0f} s; then {args.clients} concurrent "
        f"clients for {args.duration:.0f} s (each its own httpx.AsyncClient, one connection)",
        f"load generator: this one Python process (asyncio) on the same machine, {client_cpu_s:.0f} s of CPU in all",
        load_now()])
    speedup = (_merged(conc).count / conc.seconds) / max(_merged(base).count / base.seconds, 1e-9)
    print_table(["phase: operation", "requests", "4xx", "5xx", "transport errors", "ops/s", "p50 ms", "p95 ms",
                 "p99 ms", "max ms"], [row for phase in phases for row in phase_rows(phase)],
                f"Latency is request sent to whole answer read, on the client. ops/s is requests over the phase's "
                f"wall time ({base.seconds:.1f} s and {conc.seconds:.1f} s, to the last answer). Labels are fetched "
                f"only of a client's own jobs it saw succeed; until then the client polls a status instead. "
                f"{conc.clients} concurrent clients served {speedup:.2f}× the sequential client's requests a second.")
    print_facts("Load: no lost jobs", job_checks(args, phases, verdict, drained, server_jobs)
                + service_checks(phases, rss))
    for phase in phases:
        for op, stats in phase.ops.items():
            for sample in stats.samples:
                print(f"- {phase.name} {op} error: {sample}")
    for job_id, status in list(verdict.not_succeeded.items())[:5]:
        print(f"- job {job_id} ended {status}")
    for job_id, (sent, total, labelled) in list(verdict.wrong_count.items())[:5]:
        print(f"- job {job_id}: sent {sent} documents, total {total}, {labelled} rows in labels")
    bad = sum(s.server_5xx + s.transport for p in phases for s in p.ops.values())
    return not (bad or verdict.lost or verdict.wrong_count or verdict.api_missing
                or any(p.wrong_label_rows for p in phases))


def job_checks(args, phases: list[Phase], verdict: Verdict, drained: tuple[float, int],
               server_jobs: int | None) -> list[str]:
    """The lost-job check as lines: counts, the wait, job times per phase, the API and label-count checks."""
    unfinished = sum(status in ("queued", "running") for status in verdict.not_succeeded.values())
    times = {phase.name: [verdict.turnaround_s[j] for j in phase.jobs if j in verdict.turnaround_s]
             for phase in phases}
    lines = [
        f"jobs acknowledged (202): {verdict.submitted}; succeeded: {verdict.succeeded}; lost: {verdict.lost} "
        f"(missing: {len(verdict.missing)}, failed or cancelled: {len(verdict.not_succeeded) - unfinished}, "
        f"still queued or running when the wait ended: {unfinished}); "
        f"succeeded with a wrong label count: {len(verdict.wrong_count)}",
        f"waited {drained[0]:.1f} s after the load for jobs to end (limit {args.drain_timeout:.0f} s); "
        f"still active then: {drained[1]}",
        "job time from creation to end (the service's timestamps; queueing included): " + "; ".join(
            f"{name} jobs p50 {fmt(percentile(t, 50))} s, p95 {fmt(percentile(t, 95))} s, "
            f"max {fmt(max(t), 1)} s" for name, t in times.items() if t),
        f"GET /v1/jobs/{{id}} answered other than 200 for {len(verdict.api_missing)} acknowledged jobs"
        + (f": {', '.join(verdict.api_missing[:5])}" if verdict.api_missing else ""),
        f"GET labels of a finished job with a row count other than its documents: "
        f"{sum(p.wrong_label_rows for p in phases)}; truncated SQL answers: {sum(p.truncated_sql for p in phases)}"]
    if server_jobs is not None:
        lines.append(f"jobs in the service's store: {server_jobs} (acknowledged: {verdict.submitted}; "
                     "more would be jobs created for requests whose answer never reached the client)")
    return lines


def service_checks(phases: list[Phase], rss: _service.RssSampler | None) -> list[str]:
    """Peak RSS of the service's process tree and its CPU per phase, as lines."""
    if rss is None:
        return ["service RSS and CPU: not measured (--url: the service is not a child of this script)"]
    top = ", ".join(f"{name} {mib:.0f}" for name, mib in rss.peak_detail[:4])
    lines = [f"service process tree RSS: {rss.start_mib:.0f} MiB before the load, peak {rss.peak_mib:.0f} MiB "
             f"({rss.samples} samples; largest at the peak, MiB: {top})"]
    for phase in phases:
        spent = sum(phase.service_cpu.values())
        top = ", ".join(f"{name} {cpu:.1f} s" for name, cpu in
                        sorted(phase.service_cpu.items(), key=lambda kv: -kv[1])[:4])
        lines.append(f"service CPU in the {phase.name} phase: {spent:.1f} s over {phase.seconds:.1f} s "
                     f"({spent / phase.seconds:.2f} cores of {os.cpu_count()}), "
                     f"{1000 * spent / max(_merged(phase).count, 1):.1f} ms per request; most: {top}")
    return lines


async def load(args, url: str, headers: dict[str, str], service_pid: int | None) -> tuple:
    """Push the taxonomy, run both phases, drain and verify; returns what ``report`` prints."""
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S) as http:
        response = await http.post("/v1/taxonomies", content=_service.SMS_TAXONOMY.read_bytes(),
                                   headers={"content-type": "application/yaml"})
        if not response.is_success:
            sys.exit(f"POST /v1/taxonomies answered {response.status_code}: {response.text[:500]}")
        pushed = response.json()
        texts, _ = _service.sms_texts(200)
        options = dict(taxonomy=pushed["name"], version=pushed["version"], model=args.model, mix=args.mix,
                       texts=[t for t, _ in texts], seed=args.seed, service_pid=service_pid)
        ledger: dict[str, int] = {}
        phases = []
        for name, clients, duration in (("sequential", 1, args.baseline_duration),
                                        ("concurrent", args.clients, args.duration)):
            _service.progress(f"{name}: {clients} client(s) for {duration:.0f} s")
            phases.append(await run_phase(name, clients, duration, url, headers, ledger, **options))
        _service.progress(f"waiting for {len(ledger)} jobs to end")
        drained = await drain(http, ledger, args.drain_timeout)
        _service.progress("verifying every acknowledged job")
        verdict = await verify(http, ledger)
        server_jobs = None
        if not args.url:
            server_jobs = (await sql_rows(http, "SELECT count(*) AS n FROM jobs"))[0]["n"]
    return phases, verdict, drained, server_jobs


def parse_mix(text: str) -> dict[str, float]:
    """``op=weight,...`` into weights; unknown operations are refused with the known ones."""
    mix = {}
    for part in text.split(","):
        op, _, weight = part.partition("=")
        if op.strip() not in OPERATIONS:
            raise argparse.ArgumentTypeError(f"unknown operation {op.strip()!r}; choose from {', '.join(OPERATIONS)}")
        mix[op.strip()] = float(weight)
    return mix


def main() -> None:
    """Parse flags, start a service unless --url, run the load, print, exit 1 if it failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients of the main phase")
    parser.add_argument("--duration", type=float, default=60, help="seconds of concurrent load")
    parser.add_argument("--baseline-duration", type=float, default=10, help="seconds of the one-client baseline")
    parser.add_argument("--drain-timeout", type=float, default=120, help="most seconds to wait for jobs to end")
    parser.add_argument("--mix", type=parse_mix, default=DEFAULT_MIX, help="weights of the operations")
    parser.add_argument("--model", default="fake", help="the model jobs name (fake: the built-in instant engine)")
    parser.add_argument("--url", help="load this running service instead of starting one")
    parser.add_argument("--token", default=os.environ.get("ANNOTATE_TOKEN"),
                        help="bearer token sent with every request (default from $ANNOTATE_TOKEN)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every client's choice of operations and texts")
    parser.add_argument("--workdir", type=Path, help="keep the data dir and log here, not in a temporary dir")
    args = parser.parse_args()
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    print_facts("Machine", machine_facts())
    cpu_before = sum(psutil.Process().cpu_times()[:2])
    with contextlib.ExitStack() as stack:
        sampler, service_pid = contextlib.nullcontext(), None
        if args.url:
            url = args.url.rstrip("/")
        else:
            workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-load-")))
            _service.progress("starting annotate serve (fake engine)")
            env = {"ANNOTATE_ADMIN_TOKEN": args.token, "ANNOTATE_AUTH": "required"} if args.token else None
            running = stack.enter_context(_service.service(workdir, FAKE_MODELS, env))
            url = running.url
            sampler, service_pid = _service.RssSampler([running.process.pid], interval_s=0.5), running.process.pid
        with sampler as rss:
            phases, verdict, drained, server_jobs = asyncio.run(load(args, url, headers, service_pid))
        passed = report(args, phases, verdict, drained, rss, server_jobs,
                        sum(psutil.Process().cpu_times()[:2]) - cpu_before, url)
    print("PASSED: no server errors, no transport errors, no lost jobs" if passed else
          "FAILED: see the errors and checks above")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
