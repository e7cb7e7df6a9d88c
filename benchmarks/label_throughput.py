"""Label throughput: the service's continuation scoring against the naive ways, in one run.

Three sections, each with its naive baseline measured in the same run:

``engine``: the embedded engine in-process (SmolLM2-135M-Instruct, bf16, CPU) on the
first N rows (file order) of ``../shared/data/trec_questions.csv``: scoring against
generate-and-parse. Each method runs in its own subprocess (this script re-invoked with
``--worker METHOD``) so its peak RSS is its own; accuracy with 95% Wilson intervals.
Skipped, with a note, when the data file is absent.

``service``: the embedded model through the real service (`annotate serve`, a temporary
data dir): one stream job and one Ray Data batch job of ``--docs`` SMS texts for every
ModelServer replica count (``--replicas``) and engine batch size (``--engine-batches``,
the model entry's ``max_batch``), against the naive client that submits one-document
jobs one after another and waits for each.

``long``: the engine in-process, one document at a time, on real-length text (the
convention speeches of ``../shared/data`` with ``taxonomy/convention-speeches.yaml``, cut
at ``ANNOTATE_MODEL_INPUT_CHARS`` as the default job does) beside short SMS texts: docs/s,
ms/doc p50/p95, tokens/s, peak RSS, and the floor: the fastest matrix-product rate
measured in the same run (float32, bfloat16, or int8 through ``torch._int_mm``, which the
engine does not use but which bounds what an int8 path could reach) applied to the FLOPs each document needs
(the model's non-embedding weights over the tokens it processes, plus the vocabulary
projection of the scored positions); then the same speeches as one job through the
service (``--no-long-service`` skips it).

``--cpu-isa avx2`` re-runs the whole script with torch, oneDNN, MKL and fbgemm held to AVX2
(``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``,
``FBGEMM_ENABLE_INSTRUCTIONS``): on an AMX machine this reproduces an AVX2-only CPU's
rates (bfloat16 about 0.001 TFLOP/s, float32 about 0.15-0.2), so the engine's choice there
can be measured anywhere.

``server``: a llama.cpp server (llama-cpp-python, the same SmolLM2 GGUF) labelled by the
service's OpenAI-compatible engine (``scoring: top_logprobs``) against the naive loop:
one ``/v1/chat/completions`` request per document, up to 8 generated tokens, label parsed.

    .venv/bin/python benchmarks/label_throughput.py [--sections engine,service,server]
        [--n 200] [--naive-n 50] [--fine-n 50] [--skip-fine]       # engine section
        [--docs 64] [--naive-docs 32] [--replicas 1,2] [--engine-batches 1,8,32]
        [--shard-size 16] [--server-docs 32] [--server-concurrency 2]  # service and server sections

SMS texts come from ``../shared/data/sms_spam.csv`` when present, else from
``tests/fixtures/sms.jsonl`` (with numbered variants), so those sections need only the
repository.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import _service
import _service_paths as paths
from _report import fmt, fmt_acc, load_now, machine_facts, parse_label, percentile, print_facts, print_table

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = _service.ROOT
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "trec_questions.csv"
SPEECHES = ROOT / ".." / "shared" / "data" / "convention_speeches_2012.csv"
SMS = ROOT / ".." / "shared" / "data" / "sms_spam.csv"
SPEECHES_TAXONOMY = ROOT / "taxonomy" / "convention-speeches.yaml"
WARMUP_TEXT = "What is the capital of Peru ?"  # not in the measured set; excluded from timings
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}  # what --cpu-isa avx2 sets before torch loads
METHODS = {  # method -> (taxonomy file, description for the table)
    "scoring": ("trec-coarse.yaml", "scoring (service), 6 coarse"),
    "naive": ("trec-coarse.yaml", "naive generate+parse, 6 coarse"),
    "fine": ("trec-questions.yaml", "scoring, 50 fine leaves"),
}


def read_rows(path: Path, n: int) -> list[dict]:
    """The first ``n`` rows of the CSV (columns text, coarse, fine)."""
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))[:n]


def peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM; ru_maxrss would carry the parent's peak across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(taxonomy_file: str):
    """Load the engine and a Labeller for the taxonomy; returns (engine, labeller, taxonomy)."""
    from service.engines.embedded import EmbeddedEngine
    from service.labelling.labeller import Labeller
    from service.labelling.prompts import load_template
    from service.settings import Settings
    from service.taxonomy import load_taxonomy

    settings = Settings()
    engine = EmbeddedEngine(settings.models_dir, threads=settings.engine_threads, dtype=settings.engine_dtype)
    taxonomy = load_taxonomy(ROOT / "taxonomy" / taxonomy_file)
    labeller = Labeller(taxonomy, taxonomy.version, load_template("classify"), engine.info, settings.model_input_chars)
    return engine, labeller, taxonomy


def run_scoring(engine, labeller, rows: list[dict]) -> tuple[list[str], list[float], dict]:
    """Score all documents in one call; per-batch amortised ms/doc via a wrapper on the engine's forward."""
    batches: list[tuple[float, int]] = []
    forward = engine._forward

    def timed(prefix, batch):
        """Time one internal batch and report progress."""
        start = time.perf_counter()
        out = forward(prefix, batch)
        batches.append((time.perf_counter() - start, len(batch)))
        print(f"\r  {sum(b for _, b in batches)}/{len(rows)} docs", end="", file=sys.stderr, flush=True)
        return out

    engine.score_sync([labeller.requests(WARMUP_TEXT)[0][0]])  # warm-up: also computes the shared prefix KV cache
    engine._forward = timed
    start = time.perf_counter()
    requests = [labeller.requests(row["text"])[0][0] for row in rows]
    annotations = [labeller.decide(s) for s in engine.score_sync(requests)]
    elapsed = time.perf_counter() - start
    print(file=sys.stderr)
    per_doc = [1000 * seconds / size for seconds, size in batches]
    return [a.candidates[0] for a in annotations], per_doc, {"run_s": elapsed, "batches": len(batches)}


def generate_one(engine, labeller, text: str) -> str:
    """Greedy-generate up to 8 tokens for one document with the service's prompt."""
    messages = [{"role": "system", "content": labeller.system},
                {"role": "user", "content": labeller.requests(text)[0][0].user}]
    inputs = engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = engine.model.generate(**inputs, max_new_tokens=8, do_sample=False,
                                pad_token_id=engine.tokenizer.eos_token_id)
    return engine.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def run_naive(engine, labeller, rows: list[dict]) -> tuple[list[str | None], list[float], dict]:
    """One document at a time: generate, then parse the first label name."""
    import torch
    from tqdm import tqdm

    engine.model.generation_config.temperature = engine.model.generation_config.top_p = None  # greedy: silence warnings
    engine.model.generation_config.top_k = None
    with torch.inference_mode():
        generate_one(engine, labeller, WARMUP_TEXT)
        predictions, latencies, samples = [], [], []
        start = time.perf_counter()
        for row in tqdm(rows, desc="  naive", file=sys.stderr, leave=False):
            t0 = time.perf_counter()
            output = generate_one(engine, labeller, row["text"])
            predictions.append(parse_label(output, labeller.options))
            latencies.append(1000 * (time.perf_counter() - t0))
            if predictions[-1] is None and len(samples) < 3:
                samples.append(output)
        elapsed = time.perf_counter() - start
    return predictions, latencies, {"run_s": elapsed, "unparsed_samples": samples}


def worker(method: str, rows: list[dict]) -> dict:
    """Run one method in this process and return its measurements as a dict."""
    import psutil
    import torch

    start = time.perf_counter()
    engine, labeller, taxonomy = load(METHODS[method][0])
    result = {"method": method, "n": len(rows), "load_s": time.perf_counter() - start,
              "rss_after_load_mb": psutil.Process().memory_info().rss / 2**20,
              "torch_threads": torch.get_num_threads(), "dtype": str(engine.model.dtype)}
    runner = run_naive if method == "naive" else run_scoring
    predictions, per_doc_ms, extra = runner(engine, labeller, rows)
    result.update(extra, peak_rss_mb=peak_rss_mb(), p50_ms=percentile(per_doc_ms, 50), p95_ms=percentile(per_doc_ms, 95))
    result["unparsed"] = sum(p is None for p in predictions)
    if method == "fine":
        result["fine_correct"] = sum(p == row["fine"] for p, row in zip(predictions, rows))
        predictions = [taxonomy.ancestors(p)[-1] for p in predictions]
    result["correct"] = sum(p == row["coarse"] for p, row in zip(predictions, rows))
    return result


def spawn(method: str, n: int, data: Path) -> dict:
    """Re-invoke this script as a worker subprocess; progress flows to stderr, the result is JSON on stdout."""
    print(f"[{method}] {n} docs in a subprocess ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--n", str(n), "--data", str(data)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"worker {method!r} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def engine_section(args) -> None:
    """Scoring vs naive generate+parse, each in its own subprocess; prints its table."""
    data = args.data.resolve()
    if not data.exists():
        print_facts("Label throughput: embedded engine in-process", [
            f"skipped: {data} not found (pass --data PATH to a CSV with columns text, coarse, fine)"])
        return
    wall = time.perf_counter()
    rows = read_rows(data, args.n)
    from service.engines.embedded import fetch_model
    from service.settings import Settings

    start = time.perf_counter()
    fetch_model(Settings().models_dir)
    prepare_s = time.perf_counter() - start
    plan = [("scoring", len(rows)), ("naive", min(args.naive_n, len(rows)))]
    plan += [] if args.skip_fine else [("fine", min(args.fine_n, len(rows)))]
    results = [spawn(method, n, data) for method, n in plan]
    print_engine(results, rows, prepare_s, time.perf_counter() - wall)


def print_engine(results: list[dict], rows: list[dict], prepare_s: float, wall_s: float) -> None:
    """Machine facts, the engine comparison table and notes."""
    print_facts("Label throughput: embedded engine in-process (SmolLM2-135M-Instruct)", [
        f"cores: {os.cpu_count()}; torch threads: {results[0]['torch_threads']}; dtype: {results[0]['dtype']}",
        f"data: first {len(rows)} rows of trec_questions.csv (file order, no shuffle)",
        f"one-time model conversion/check (fetch_model): {prepare_s:.1f} s; section wall time: {wall_s:.1f} s",
        load_now()])
    table = []
    for r in results:
        table.append([METHODS[r["method"]][1], r["n"], fmt(r["load_s"]), fmt(r["run_s"]), fmt(r["n"] / r["run_s"], 2),
                      fmt(r["p50_ms"], 0), fmt(r["p95_ms"], 0), fmt(r["rss_after_load_mb"], 0), fmt(r["peak_rss_mb"], 0),
                      fmt_acc(r["correct"], r["n"]), fmt_acc(r["fine_correct"], r["n"]) if "fine_correct" in r else None,
                      r["unparsed"] if r["method"] == "naive" else None])
    label, count = Counter(row["coarse"] for row in rows).most_common(1)[0]
    table.append([f"majority class ({label}, in-sample)", len(rows)] + [""] * 7 + [fmt_acc(count, len(rows)), None, None])
    speed = {r["method"]: r["n"] / r["run_s"] for r in results}
    verdict = (f"Scoring labels {speed['scoring'] / speed['naive']:.1f}× as many documents per second as "
               "generate+parse. " if {"scoring", "naive"} <= speed.keys() else "")
    print_table(["method", "docs", "load s", "run s", "docs/s", "ms/doc p50", "ms/doc p95", "RSS after load MB",
                 "peak RSS MB", "coarse acc [95% CI]", "fine acc [95% CI]", "unparsed"], table,
                verdict + "Scoring ms/doc p50/p95 are per internal engine batch (forward time / batch size); its "
                "docs/s also counts prompt rendering, tokenisation and packing. Naive ms/doc are per-document wall "
                "latencies. Fine accuracy rolls the top leaf up to its coarse parent via taxonomy.ancestors. Naive "
                "output is parsed as the first whole-word label name (case-insensitive); unparsed counts as wrong. "
                "Each method ran in its own subprocess after one un-timed warm-up document.")
    for r in results:
        if r.get("unparsed_samples"):
            print(f"Unparsed naive outputs (first {len(r['unparsed_samples'])}): {r['unparsed_samples']!r}\n")


def long_section(args, workdir: Path) -> None:
    """Real-length documents against short texts, in-process and through the service, with the floor; prints a table."""
    import psutil

    from service.engines.numeric import CANDIDATES, gemm_tflops
    from service.labelling.labeller import Labeller
    from service.labelling.prompts import load_template
    from service.settings import Settings
    from service.taxonomy import load_taxonomy

    if not SPEECHES.exists():
        print_facts("Label throughput: long documents", [f"skipped: {SPEECHES} not found"])
        return
    settings = Settings()
    engine, _, _ = load("sms-spam.yaml")
    config = engine.model.config
    rates = {dtype: gemm_tflops(dtype, 512, config.hidden_size, config.intermediate_size, seconds=1.0)
             for dtype in (*CANDIDATES, "int8")}
    fastest = max(rates, key=rates.get)
    rate = rates[fastest] * 1e12
    weights = sum(p.numel() for p in engine.model.model.layers.parameters())
    sets = {"convention speeches": (SPEECHES_TAXONOMY, _column(SPEECHES, "text")[:args.long_n])}
    if SMS.exists():
        sets["SMS (short baseline)"] = (ROOT / "taxonomy" / "sms-spam.yaml", _column(SMS, "text")[:args.long_n])
    table = []
    for name, (taxonomy_file, texts) in sets.items():
        taxonomy = load_taxonomy(taxonomy_file)
        labeller = Labeller(taxonomy, taxonomy.version, load_template("classify"), engine.info,
                            settings.model_input_chars)
        requests = [labeller.requests(text)[0][0] for text in texts]  # truncate: one request per document
        engine.score_sync(requests[:1])  # warm-up: the shared prefix
        prefix = engine._prefix(requests[0].system)
        tokens = [len(engine._pack(r, prefix).tokens) for r in requests]
        latencies = []
        for request in requests:
            start = time.perf_counter()
            engine.score_sync([request])
            latencies.append(1000 * (time.perf_counter() - start))
        flops = [2 * weights * n + 2 * config.hidden_size * config.vocab_size * (len(taxonomy.leaves()) + 1)
                 for n in tokens]
        floor_ms = 1000 * sum(flops) / rate / len(flops)
        total_s = sum(latencies) / 1000
        table.append([name, "in-process", len(requests), fmt(sum(map(len, (r.user for r in requests))) / len(requests), 0),
                      fmt(sum(tokens) / len(tokens), 0), fmt(len(requests) / total_s, 2), fmt(percentile(latencies, 50), 0),
                      fmt(percentile(latencies, 95), 0), fmt(sum(tokens) / total_s, 0), fmt(floor_ms, 0),
                      fmt(percentile(latencies, 50) / floor_ms, 1), fmt(psutil.Process().memory_info().rss / 2**20, 0),
                      fmt(peak_rss_mb(), 0)])
        if name == "convention speeches" and args.long_service:
            table.append(_long_through_service(texts, workdir) + ["", fmt(floor_ms, 0), "", "", ""])
    print_facts("Label throughput: long documents, one document at a time (in-process) and one job (service)", [
        f"numeric path: {engine.numeric.dtype} ({engine.numeric.source}; matrix-product rates measured at start: "
        f"{engine.numeric.tflops or 'n/a'})",
        f"GEMM rates measured now ([512×{config.hidden_size}]·[{config.hidden_size}×{config.intermediate_size}]): "
        + ", ".join(f"{dtype} {value:.3f}" for dtype, value in rates.items())
        + f" TFLOP/s; the floor uses the fastest ({fastest}); non-embedding weights: {weights / 1e6:.0f} M",
        f"documents cut at ANNOTATE_MODEL_INPUT_CHARS={settings.model_input_chars}; prompt `classify` with the "
        "taxonomies convention-speeches and sms-spam", load_now()])
    print_table(["texts", "path", "docs", "chars/doc", "tokens/doc", "docs/s", "ms/doc p50", "ms/doc p95", "tokens/s",
                 "floor ms/doc", "p50 / floor", "RSS MB", "peak RSS MB"], table,
                "Tokens are what the engine runs per document (the text, the chat suffix and the label trie; the "
                "system prompt is cached). The floor is those tokens' FLOPs at the fastest matrix-product rate "
                "measured in this run. The service row is one stream job of the same speeches through `annotate "
                "serve` (a fresh data dir, one ModelServer replica): docs/s from submission to the last document, "
                "ms/doc the gaps between documents finishing, RSS the service's process tree.")


def _long_through_service(texts: list[str], workdir: Path) -> list:
    """One stream job of the speeches through `annotate serve`: the first columns of a table row."""
    models = paths.EMBEDDED_MODELS.format(replicas=1, batch=8)
    with _service.service(workdir / "long-service", models) as running:
        warm = [{"id": "warm", "text": texts[-1][::-1]}]  # reversed: not one of the measured texts, same length
        _service.measured_job(running, {"documents": warm}, tag="long-warm", taxonomy=SPEECHES_TAXONOMY)
        documents = [{"id": f"s{i:03d}", "text": text} for i, text in enumerate(texts)]
        run, rss = _service.measured_job(running, {"documents": documents}, tag="long", taxonomy=SPEECHES_TAXONOMY)
    gaps = [1000 * (b - a) for a, b in zip([0.0, *run.done_at], run.done_at)]
    return ["convention speeches", "service", len(texts), "", "", fmt(len(texts) / run.seconds, 2),
            fmt(percentile(gaps, 50), 0), fmt(percentile(gaps, 95), 0)]


def _column(path: Path, column: str) -> list[str]:
    """One column of a CSV, in file order."""
    with path.open(newline="", encoding="utf-8") as f:
        return [row[column] for row in csv.DictReader(f)]


def int_list(text: str) -> list[int]:
    """Comma-separated integers."""
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    """Parse flags, then run the chosen sections (or, with --worker, one engine-section method here)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sections", default="engine,long,service,server", help="which sections to run, in order")
    parser.add_argument("--n", type=int, default=200, help="engine: TREC questions for the scoring methods")
    parser.add_argument("--naive-n", type=int, default=50, help="engine: questions for generate+parse (first of --n)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="engine: CSV with columns text, coarse, fine")
    parser.add_argument("--fine-n", type=int, default=50, help="engine: questions for 50-leaf scoring (first of --n)")
    parser.add_argument("--skip-fine", action="store_true", help="engine: skip the 50-leaf two-level scoring run")
    parser.add_argument("--docs", type=int, default=64, help="service: documents per stream and batch job")
    parser.add_argument("--naive-docs", type=int, default=32, help="service: one-document jobs of the naive client")
    parser.add_argument("--replicas", type=int_list, default=[1, 2], help="service: ModelServer replica counts")
    parser.add_argument("--engine-batches", type=int_list, default=[1, 8, 32],
                        help="service: engine batch sizes (the model entry's max_batch)")
    parser.add_argument("--shard-size", type=int, default=16, help="service: rows per shard of the batch jobs")
    parser.add_argument("--server-docs", type=int, default=32, help="server: documents for each path")
    parser.add_argument("--server-concurrency", type=int, default=2, help="server: the engine's max_concurrency")
    parser.add_argument("--long-n", type=int, default=40, help="long: documents of each set")
    parser.add_argument("--no-long-service", dest="long_service", action="store_false",
                        help="long: skip the job through the service")
    parser.add_argument("--workdir", type=Path, help="keep data dirs and logs here (default: a temporary dir)")
    parser.add_argument("--cpu-isa", choices=["native", "avx2"], default="native",
                        help="avx2: hold torch and its libraries to AVX2, standing in for a CPU without native bf16")
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ONLY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})
    if args.worker:
        print(json.dumps(worker(args.worker, read_rows(args.data.resolve(), args.n))))
        return
    sections = [part.strip() for part in args.sections.split(",") if part.strip()]
    unknown = set(sections) - {"engine", "long", "service", "server"}
    if unknown:
        parser.error(f"unknown sections {', '.join(sorted(unknown))}; choose from engine, long, service, server")
    wall = time.perf_counter()
    print_facts("Machine", machine_facts())
    embedded: dict[str, str] = {}
    with ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-labels-")))
        for section in sections:
            started = time.perf_counter()
            if section == "engine":
                engine_section(args)
            elif section == "long":
                long_section(args, workdir)
            elif section == "service":
                texts, origin = _service.sms_texts(args.docs)
                results, embedded = paths.service_section(args, [t for t, _ in texts], workdir / "service")
                paths.print_service(args, results, origin, time.perf_counter() - started)
            else:
                texts, _ = _service.sms_texts(args.server_docs)
                results, engine_labels, naive_labels = paths.server_section(args, [t for t, _ in texts],
                                                                            workdir / "server")
                paths.print_server(args, results, engine_labels, naive_labels, [g for _, g in texts], embedded,
                                   time.perf_counter() - started)
    print(f"Whole benchmark wall time: {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
