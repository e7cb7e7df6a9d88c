"""The service paths of ``label_throughput.py``: the real service and a llama.cpp server against naive clients.

``service_section``: the embedded model through `annotate serve`, one stream job and one
Ray Data batch job per ModelServer replica count and engine batch size, against a client
that submits one-document jobs one after another. ``server_section``: the service's
OpenAI-compatible engine on a llama.cpp server against one chat completion per document,
its label parsed. Each ``print_*`` prints its table with a line that reads it.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

import _service
from _report import fmt, fmt_acc, load_now, parse_label, percentile, print_facts, print_table

EMBEDDED_MODELS = """default: smollm2
models:
  smollm2: {{engine: embedded, replicas: {replicas}, max_batch: {batch}}}
"""
SERVER_MODELS = """default: llama
models:
  llama: {{engine: openai, base_url: "{url}", model: smollm2, scoring: top_logprobs, top_logprobs: 1000,
           max_concurrency: {concurrency}, timeout_s: 300}}
"""


def job_row(path: str, run: _service.JobRun, rss: _service.RssSampler, **extra) -> dict:
    """One measured job as a result row (latency: submission to the poll that first showed a document done)."""
    return {"path": path, "docs": run.job["total"], "seconds": run.seconds, "p50_s": percentile(run.done_at, 50),
            "p95_s": percentile(run.done_at, 95), "peak_mib": rss.peak_mib, **extra}


def naive_jobs(running: _service.Service, texts: list[str]) -> dict:
    """The naive client: one one-document job at a time, each waited for (polling every 50 ms)."""
    version = running.push_taxonomy(_service.SMS_TAXONOMY, "naive-jobs")
    latencies = []
    with running.client() as client, _service.RssSampler([running.process.pid]) as rss:
        started = time.perf_counter()
        for i, text in enumerate(texts):
            body = {"taxonomy": "sms-spam", "taxonomy_version": version, "documents": [{"id": f"n{i}", "text": text}]}
            latencies.append(_service.run_job(client, body, poll_s=0.05).seconds)
        seconds = time.perf_counter() - started
    return {"path": "naive: one-document jobs, one after another", "docs": len(texts), "seconds": seconds,
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95), "peak_mib": rss.peak_mib}


def warm_up(running: _service.Service, texts: list[str], replicas: int) -> None:
    """Un-timed stream and batch jobs, so every replica holds the prompt's KV cache and Ray Data has workers."""
    _service.write_jsonl(running.input_dir / "warm-up.jsonl", texts[:4])
    for body in ({"documents": [{"text": t} for t in texts[: 4 * replicas]]},
                 {"source": "warm-up.jsonl", "mode": "batch", "shard_size": 2}):
        _service.measured_job(running, body, tag=f"warm-up-{body.get('mode', 'stream')}")


def engine_batches(running: _service.Service, before: dict, replicas: int) -> float | None:
    """Mean documents per engine call since ``before`` (one replica answers GET /v1/models, so only for 1)."""
    if replicas != 1:
        return None
    with running.client() as client:
        after = _service.model_stats(client, "smollm2")
    calls = after["batches"] - before["batches"]
    return (after["documents"] - before["documents"]) / calls if calls else None


def service_section(args, texts: list[str], workdir: Path) -> tuple[list[dict], dict[str, str]]:
    """Stream and batch jobs for each replicas × engine batch setting, and the naive one-document jobs."""
    results, first_labels = [], {}
    documents = [{"id": f"d{i:04d}", "text": text} for i, text in enumerate(texts)]
    for replicas in args.replicas:
        for batch in args.engine_batches:
            started = time.perf_counter()
            models = EMBEDDED_MODELS.format(replicas=replicas, batch=batch)
            with _service.service(workdir / f"embedded-r{replicas}-b{batch}", models,
                                  {"ANNOTATE_ENGINE_MAX_BATCH": str(batch)}) as running:
                progress(f"service with {replicas} replica(s), max_batch {batch}: up in "
                         f"{time.perf_counter() - started:.0f} s")
                warm_up(running, texts, replicas)
                if not results and args.naive_docs:
                    results.append(naive_jobs(running, texts[: args.naive_docs]))
                    progress(f"naive: {results[-1]['seconds']:.1f} s")
                _service.write_jsonl(running.input_dir / "docs.jsonl", texts)
                for mode, body in (("stream", {"documents": documents}),
                                   ("batch", {"source": "docs.jsonl", "mode": "batch", "shard_size": args.shard_size})):
                    with running.client() as client:
                        before = _service.model_stats(client, "smollm2")
                    run, rss = _service.measured_job(running, body, tag=f"{mode}-r{replicas}-b{batch}")
                    results.append(job_row(mode, run, rss, replicas=replicas, batch=batch, shards=run.job["shards"],
                                           mean_batch=engine_batches(running, before, replicas)))
                    progress(f"{mode}: {run.seconds:.1f} s")
                    if not first_labels and mode == "stream":
                        with running.client() as client:
                            rows = _service.job_labels(client, run.job["job_id"])
                        first_labels = {row["doc_id"]: row["label"] for row in rows}
    return results, first_labels


def print_service(args, results: list[dict], origin: str, wall_s: float) -> None:
    """The service paths' table and what it says."""
    print_facts("Label throughput: the embedded model through the service (stream and Ray Data batch jobs)", [
        f"cores: {os.cpu_count()}; texts: {origin}", "taxonomy: sms-spam (2 labels)",
        f"batch jobs: {args.shard_size} rows per shard, 2 shards in flight (ANNOTATE_BATCH_CONCURRENCY), "
        "32 documents per score_many call (ANNOTATE_BATCH_SIZE)",
        "every setting is a fresh `annotate serve`, warmed up by one small stream and one small batch job (not timed)",
        f"section wall time (service start-ups included): {wall_s:.0f} s", load_now()])
    rows = []
    for r in results:
        path = r["path"] if r["path"].startswith("naive") else (
            "stream job" if r["path"] == "stream" else f"batch job ({r['shards']} shards)")
        rows.append([path, r.get("replicas"), r.get("batch"), r["docs"], fmt(r["seconds"]),
                     fmt(r["docs"] / r["seconds"], 2), fmt(r["p50_s"], 2), fmt(r["p95_s"], 2), fmt(r.get("mean_batch")),
                     fmt(r["peak_mib"], 0)])
    print_table(["path", "replicas", "max_batch", "docs", "seconds", "docs/s", "latency p50 s", "latency p95 s",
                 "docs per engine call", "peak RSS MiB"], rows, service_verdict(results) +
                " Latency: per document, from its job's submission to the first poll (every 0.2 s; naive: 50 ms) that "
                "showed it done; naive jobs hold one document each. Docs per engine call: from GET /v1/models "
                "(replicas 1 only: with 2 it answers for one replica); batch jobs call ModelServer.score_many with "
                "a shard's documents (up to ANNOTATE_BATCH_SIZE a call), which bypasses @serve.batch and so "
                "max_batch. Peak RSS: `annotate serve` and all its "
                "descendants (Ray, replicas, Ray Data workers), sampled every 0.2 s.")


def service_verdict(results: list[dict]) -> str:
    """Sentences from the numbers: best stream and batch settings against the naive client, replicas against 1."""
    def speed(r: dict) -> float:
        return r["docs"] / r["seconds"]

    naive = next((r for r in results if r["path"].startswith("naive")), None)
    parts = []
    for mode in ("stream", "batch"):
        runs = [r for r in results if r["path"] == mode]
        if not runs:
            continue
        best = max(runs, key=speed)
        ratio = f", {speed(best) / speed(naive):.1f}× the naive client" if naive else ""
        by_replicas = {n: max(speed(r) for r in runs if r["replicas"] == n) for n in {r["replicas"] for r in runs}}
        scaling = "".join(f"; best with {n} replicas / best with 1: {by_replicas[n] / by_replicas[1]:.2f}×"
                          for n in sorted(by_replicas) if n != 1 and 1 in by_replicas)
        parts.append(f"Fastest {mode} job: {speed(best):.1f} docs/s with {best['replicas']} replica(s), max_batch "
                     f"{best['batch']}{ratio}{scaling}.")
    return " ".join(parts)


def naive_chat(url: str, texts: list[str], llama_pid: int) -> tuple[dict, list[str | None]]:
    """One /v1/chat/completions request per document (greedy, up to 8 tokens), label parsed from the reply."""
    import httpx

    from service.engines.base import EngineInfo
    from service.labelling.labeller import Labeller
    from service.labelling.prompts import load_template
    from service.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(_service.SMS_TAXONOMY)
    labeller = Labeller(taxonomy, taxonomy.version, load_template("classify"), EngineInfo("naive", "smollm2"), 2000)

    def ask(client: httpx.Client, text: str) -> str:
        messages = [{"role": "system", "content": labeller.system},
                    {"role": "user", "content": labeller.requests(text)[0][0].user}]
        reply = client.post("/chat/completions", json={"model": "smollm2", "messages": messages, "max_tokens": 8,
                                                       "temperature": 0})
        reply.raise_for_status()
        return reply.json()["choices"][0]["message"]["content"] or ""

    labels, latencies, unparsed = [], [], []
    with httpx.Client(base_url=url, timeout=300) as client, _service.RssSampler([llama_pid]) as rss:
        ask(client, "warm-up: see you at 6")
        started = time.perf_counter()
        for text in texts:
            t0 = time.perf_counter()
            output = ask(client, text)
            latencies.append(time.perf_counter() - t0)
            labels.append(parse_label(output, labeller.options))
            if labels[-1] is None:
                unparsed.append(output)
        seconds = time.perf_counter() - started
    return ({"path": "naive: chat/completions, generate ≤8 tokens, parse", "docs": len(texts), "seconds": seconds,
             "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95), "peak_mib": rss.peak_mib,
             "rss_of": "llama.cpp server", "unparsed": len(unparsed), "samples": unparsed[:3]}, labels)


def server_section(args, texts: list[str], workdir: Path) -> tuple[list[dict], list[str | None], list[str | None]]:
    """The service's OpenAI-compatible engine on a llama.cpp server, then the naive chat loop on the same server."""
    documents = [{"id": f"d{i:04d}", "text": text} for i, text in enumerate(texts)]
    with _service.llama_server(workdir / "llama", threads=os.cpu_count()) as (url, llama):
        models = SERVER_MODELS.format(url=url, concurrency=args.server_concurrency)
        with _service.service(workdir / "server", models) as running:
            _service.measured_job(running, {"documents": documents[:1]}, tag="server-warm-up")
            run, rss = _service.measured_job(running, {"documents": documents}, tag="server-engine",
                                             also=[llama.pid])
            with running.client() as client:
                by_id = {row["doc_id"]: row["label"] for row in _service.job_labels(client, run.job["job_id"])}
            engine = job_row("service: openai engine, top_logprobs scoring", run, rss,
                             rss_of="service tree + llama.cpp server")
        progress(f"server engine: {run.seconds:.1f} s")
        naive, naive_labels = naive_chat(url, texts, llama.pid)
        progress(f"naive chat: {naive['seconds']:.1f} s")
    return [engine, naive], [by_id.get(d["id"]) for d in documents], naive_labels


def print_server(args, results: list[dict], engine_labels: list, naive_labels: list, gold: list,
                 embedded: dict[str, str], wall_s: float) -> None:
    """The server paths' table, agreement and accuracy."""
    print_facts("Label throughput: llama.cpp server (SmolLM2 Q4 GGUF), service engine vs naive chat loop", [
        f"cores: {os.cpu_count()}; llama.cpp server with --n_threads {os.cpu_count()}; "
        f"engine max_concurrency {args.server_concurrency}; taxonomy sms-spam",
        f"section wall time (start-ups included): {wall_s:.0f} s", load_now()])
    n = len(engine_labels)
    agree = sum(a is not None and a == b for a, b in zip(engine_labels, naive_labels))
    accuracy = [None, None]
    if all(g is not None for g in gold):
        accuracy = [fmt_acc(sum(p == g for p, g in zip(labels, gold)), n) for labels in (engine_labels, naive_labels)]
    rows = [[r["path"], r["docs"], fmt(r["seconds"]), fmt(r["docs"] / r["seconds"], 2), fmt(1000 * r["p50_s"], 0),
             fmt(1000 * r["p95_s"], 0), fmt(r["peak_mib"], 0), r["rss_of"], acc, r.get("unparsed")]
            for r, acc in zip(results, accuracy)]
    if all(g is not None for g in gold):
        label, count = Counter(gold).most_common(1)[0]
        rows.append([f"majority class ({label}, in-sample)", n] + [None] * 6 + [fmt_acc(count, n), None])
    speed = [r["docs"] / r["seconds"] for r in results]
    extra = ""
    both = [(embedded[f"d{i:04d}"], label) for i, label in enumerate(engine_labels) if f"d{i:04d}" in embedded]
    if both:
        same = sum(a == b for a, b in both)
        extra = (f" The server engine's labels agree with the embedded engine's (first stream job of the service "
                 f"section, same texts) on {same}/{len(both)}.")
    print_table(["path", "docs", "seconds", "docs/s", "latency p50 ms", "latency p95 ms", "peak RSS MiB",
                 "RSS of", "accuracy vs gold [95% CI]", "unparsed"], rows,
                f"The two paths give the same label on {agree}/{n} documents ({agree / n:.0%}); the engine labels "
                f"{speed[0] / speed[1]:.1f}× as many documents per second as the naive loop.{extra} Latency: engine, "
                "per document from job submission to the poll (every 0.2 s) that showed it done; naive, per request.")
    for r in results:
        if r.get("samples"):
            print(f"Unparsed naive outputs (first {len(r['samples'])}): {r['samples']!r}\n")


def progress(message: str) -> None:
    """A progress line on stderr (tables go to stdout)."""
    print(f"[{message}]", file=sys.stderr, flush=True)
