"""Memory scaling of batch jobs: peak RSS of the whole service for 10k, 30k and 100k documents.

Starts the real service (`annotate serve`, a temporary data dir) with only the ``fake``
engine, so labelling costs next to nothing and what grows is the service's own
bookkeeping: reading, sharding, Ray Data tasks, Parquet shards, DuckDB registration.
Writes JSONL corpora of short SMS texts into the service's input dir, runs one batch job
(``"mode": "batch"``) per corpus, and samples the summed RSS of the service's process
tree (`annotate serve`, raylet, GCS, Serve replicas, Ray Data workers) every 0.2 s. The
comparison rows run the same corpora as stream jobs (``"source"`` file, the default mode:
every document stored with the job, then labelled batch by batch). PASS when the 100k
batch peak is within 20% of the 10k batch peak.

    .venv/bin/python benchmarks/memory_scaling.py [--sizes 10000,30000,100000]
        [--stream-sizes 10000,30000,100000] [--shard-size 2000] [--concurrency 2]
        [--fresh-service] [--workdir DIR]

``--fresh-service`` starts a new service (empty store) for every job instead of one
service for all, so a job's peak does not include what earlier jobs left in the store.
The default run takes about 10 minutes on 2 cores, most of it the 100k stream job;
``--stream-sizes 10000,30000`` cuts it to about 4.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import _service
from _report import fmt, load_now, machine_facts, print_facts, print_table

MODELS_YAML = "default: fake\nmodels:\n  fake: {engine: fake}\n"
TOLERANCE = 0.20
WARM_UP = "warm-up.jsonl"  # 200 documents, run as a batch and a stream job before the measured ones


def sizes(text: str) -> list[int]:
    """Comma-separated corpus sizes."""
    return [int(part) for part in text.split(",") if part.strip()]


def corpora_name(n: int) -> str:
    """The corpus file of ``n`` documents, inside the input dir."""
    return f"sms-{n}.jsonl"


def measure(running: _service.Service, body: dict, tag: str) -> dict:
    """One job's size, time and RSS (before, and the peak while it ran)."""
    idle_mib = sum(_service.tree_rss([running.process.pid]).values()) / 2**20
    run, rss = _service.measured_job(running, {**body, "model": "fake"}, tag=tag, poll_s=0.5)
    top = rss.peak_detail[0] if rss.peak_detail else ("?", 0.0)
    print("  largest at peak: " + ", ".join(f"{name} {mib:.0f}" for name, mib in rss.peak_detail[:6]),
          file=sys.stderr, flush=True)
    return {"docs": run.job["total"], "shards": run.job.get("shards") or None, "seconds": run.seconds,
            "idle_mib": idle_mib, "peak_mib": rss.peak_mib, "top": f"{top[0].split(' ', 1)[-1]} {top[1]:.0f}"}


def main() -> None:
    """Parse flags, write the corpora, run the jobs, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=sizes, default=[10_000, 30_000, 100_000], help="batch-job corpus sizes")
    parser.add_argument("--stream-sizes", type=sizes, default=[10_000, 30_000, 100_000],
                        help="stream-job (comparison) corpus sizes; empty string to skip")
    parser.add_argument("--shard-size", type=int, default=2000, help="rows per shard of the batch jobs")
    parser.add_argument("--concurrency", type=int, default=2, help="ANNOTATE_BATCH_CONCURRENCY (shards in flight)")
    parser.add_argument("--fresh-service", action="store_true", help="a new service (empty store) for every job")
    parser.add_argument("--workdir", type=Path, help="keep data dirs and logs here (default: a temporary dir)")
    args = parser.parse_args()
    wall, facts = time.perf_counter(), machine_facts()
    plan = [("batch", n) for n in args.sizes] + [("stream", n) for n in args.stream_sizes]
    env = {"ANNOTATE_BATCH_CONCURRENCY": str(args.concurrency), "ANNOTATE_SHARD_SIZE": str(args.shard_size)}
    texts, origin = _service.sms_texts(max(n for _, n in plan))
    results: dict[tuple[str, int], dict] = {}
    with ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-memory-")))
        corpora = workdir / "corpora"
        corpora.mkdir(parents=True, exist_ok=True)
        for n in sorted({n for _, n in plan}):
            _service.write_jsonl(corpora / corpora_name(n), [text for text, _ in texts[:n]])
        _service.write_jsonl(corpora / WARM_UP, [text for text, _ in texts[:200]])
        groups = [[job] for job in plan] if args.fresh_service else [plan]  # jobs sharing one service
        for g, group in enumerate(groups):
            started = time.perf_counter()
            with _service.service(workdir / f"service-{g}", MODELS_YAML, env, input_dir=corpora) as running:
                print(f"[service up in {time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)
                for mode in ("batch", "stream"):  # Ray Data workers started, code paths warm; not measured
                    measure(running, {"source": WARM_UP, "mode": mode}, f"warm-up-{mode}-{g}")
                for mode, n in group:
                    print(f"[{mode} job, {n:,} docs ...]", file=sys.stderr, flush=True)
                    body = {"source": corpora_name(n), "mode": mode}
                    if mode == "batch":
                        body["shard_size"] = args.shard_size
                    results[(mode, n)] = r = measure(running, body, f"mem-{mode}-{n}")
                    print(f"  {r['seconds']:.1f} s, peak {r['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    report(args, results, facts + [f"texts: {origin}"], time.perf_counter() - wall)


def report(args, results: dict[tuple[str, int], dict], facts: list[str], wall_s: float) -> None:
    """Machine facts, the table, and the verdict."""
    print_facts("Memory scaling: batch jobs (Ray Data) vs stream jobs, fake engine", facts + [
        f"shard size {args.shard_size} rows, {args.concurrency} shards in flight "
        f"(ANNOTATE_BATCH_CONCURRENCY), ANNOTATE_BATCH_SIZE default (32)",
        "one service for all jobs, in table order" if not args.fresh_service else "a fresh service for every job",
        f"whole benchmark wall time: {wall_s:.0f} s", load_now()])
    batch = {n: r for (mode, n), r in results.items() if mode == "batch"}
    base = batch[min(batch)] if batch else None
    rows = []
    for (mode, n), r in results.items():
        path = "batch (Ray Data)" if mode == "batch" else "stream (naive: whole corpus stored, then batches)"
        rows.append([path, f"{n:,}", r["shards"], fmt(r["seconds"]), f"{n / r['seconds']:.0f}", f"{r['idle_mib']:.0f}",
                     f"{r['peak_mib']:.0f}", fmt(r["peak_mib"] / base["peak_mib"], 2) if base else None, r["top"]])
    print_table(["path", "docs", "shards", "seconds", "docs/s", "RSS before MiB", "peak RSS MiB",
                 "peak / smallest batch peak", "largest process at peak (MiB)"], rows,
                "RSS: the sum over `annotate serve` and all its descendants, sampled every 0.2 s during the job "
                "(shared pages count once per process). \"RSS before\": the same sum just before the job.")
    if len(batch) >= 2:
        small, large = min(batch), max(batch)
        ratio = batch[large]["peak_mib"] / batch[small]["peak_mib"]
        verdict = "PASS" if ratio <= 1 + TOLERANCE else "FAIL"
        print(f"{verdict}: the {large:,}-document batch peak is {ratio:.2f}× the {small:,}-document peak "
              f"({batch[large]['peak_mib']:.0f} vs {batch[small]['peak_mib']:.0f} MiB; within {TOLERANCE:.0%} passes).")


if __name__ == "__main__":
    main()
