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

``server``: a llama.cpp server (llama-cpp-python, the same SmolLM2 GGUF) labelled by the
service's OpenAI-compatible engine (``scoring: top_logprobs``) against the naive loop:
one ``/v1/chat/completions`` request per document, up to 8 generated tokens, label parsed.

    .venv/bin/python benchmarks/label_throughput.py [--sections engine,service,server]
        [--n 200] [--naive-n 50] [--skip-fine]                     # engine section
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
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import _service
from _report import fmt, machine_facts, percentile, print_facts, print_table

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "trec_questions.csv"
WARMUP_TEXT = "What is the capital of Peru ?"  # not in the measured set; excluded from timings
METHODS = {  # method -> (taxonomy file, description for the table)
    "scoring": ("trec-coarse.yaml", "scoring (service), 6 coarse"),
    "naive": ("trec-coarse.yaml", "naive generate+parse, 6 coarse"),
    "fine": ("trec-questions.yaml", "scoring, 50 fine leaves"),
}


def read_rows(path: Path, n: int) -> list[dict]:
    """The first ``n`` rows of the CSV (columns text, coarse, fine)."""
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))[:n]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM; ru_maxrss would carry the parent's peak across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(taxonomy_file: str):
    """Load the engine and a Labeller for the taxonomy; returns (engine, labeller, taxonomy)."""
    from service.engines.embedded import EmbeddedEngine
    from service.labelling import Labeller
    from service.prompts import load_template
    from service.settings import Settings
    from service.taxonomy import load_taxonomy

    settings = Settings()
    engine = EmbeddedEngine(settings.models_dir, threads=settings.engine_threads)
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

    engine.score_sync([labeller.request(WARMUP_TEXT)[0]])  # warm-up: also computes the shared prefix KV cache
    engine._forward = timed
    start = time.perf_counter()
    requests = [labeller.request(row["text"])[0] for row in rows]
    annotations = [labeller.decide(s) for s in engine.score_sync(requests)]
    elapsed = time.perf_counter() - start
    print(file=sys.stderr)
    per_doc = [1000 * seconds / size for seconds, size in batches]
    return [a.candidates[0] for a in annotations], per_doc, {"run_s": elapsed, "batches": len(batches)}


def parse_label(output: str, options: tuple[str, ...]) -> str | None:
    """The label name (case-insensitive, whole word) that appears first in the output, else None."""
    alternatives = "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))
    match = re.search(rf"(?<![A-Za-z0-9])({alternatives})(?![A-Za-z0-9])", output, re.IGNORECASE)
    return None if match is None else next(o for o in options if o.lower() == match.group(1).lower())


def generate_one(engine, labeller, text: str) -> str:
    """Greedy-generate up to 8 tokens for one document with the service's prompt."""
    messages = [{"role": "system", "content": labeller.system},
                {"role": "user", "content": labeller.request(text)[0].user}]
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


def fmt_acc(k: int, n: int) -> str:
    """Accuracy with its 95% Wilson interval."""
    low, high = wilson(k, n)
    return f"{k / n:.1%} [{low:.1%}, {high:.1%}]"


def print_report(results: list[dict], rows: list[dict], prepare_s: float, wall_s: float) -> None:
    """Print machine facts, the comparison table and notes."""
    print("## Label throughput: embedded engine (SmolLM2-135M-Instruct)\n")
    for fact in machine_facts() + [f"torch threads: {results[0]['torch_threads']}", f"dtype: {results[0]['dtype']}"]:
        print(f"- {fact}")
    print(f"- data: first {len(rows)} rows of trec_questions.csv (file order, no shuffle)")
    print(f"- one-time model conversion/check (fetch_model): {prepare_s:.1f} s; whole benchmark wall time: {wall_s:.1f} s\n")
    print("| method | docs | load s | run s | docs/s | ms/doc p50 | ms/doc p95 | RSS after load MB | peak RSS MB | coarse acc [95% CI] | fine acc [95% CI] | unparsed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for r in results:
        fine = fmt_acc(r["fine_correct"], r["n"]) if "fine_correct" in r else "—"
        unparsed = str(r["unparsed"]) if r["method"] == "naive" else "—"
        print(f"| {METHODS[r['method']][1]} | {r['n']} | {r['load_s']:.1f} | {r['run_s']:.1f} | {r['n'] / r['run_s']:.2f} "
              f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['rss_after_load_mb']:.0f} | {r['peak_rss_mb']:.0f} "
              f"| {fmt_acc(r['correct'], r['n'])} | {fine} | {unparsed} |")
    label, count = Counter(row["coarse"] for row in rows).most_common(1)[0]
    print(f"| majority class ({label}, in-sample) | {len(rows)} | | | | | | | | {fmt_acc(count, len(rows))} | — | — |\n")
    print("Notes: scoring ms/doc p50/p95 are per internal engine batch (forward time / batch size); its docs/s "
          "also counts prompt rendering, tokenisation and packing. Naive ms/doc are per-document wall latencies. "
          "Fine accuracy rolls the top leaf up to its coarse parent via taxonomy.ancestors. Naive output is "
          "parsed as the first whole-word label name (case-insensitive); unparsed counts as wrong. Each method ran "
          "in its own subprocess after one un-timed warm-up document. The machine is shared with other jobs, so "
          "timings are noisy.")
    for r in results:
        if r.get("unparsed_samples"):
            print(f"\nUnparsed naive outputs (first {len(r['unparsed_samples'])}): {r['unparsed_samples']!r}")


def main() -> None:
    """Parse flags, then run each method in a subprocess (or, with --worker, one method here)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="documents for the scoring methods")
    parser.add_argument("--naive-n", type=int, default=500, help="documents for naive generate+parse (first of --n)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV with columns text, coarse, fine")
    parser.add_argument("--skip-fine", action="store_true", help="skip the 50-leaf two-level scoring run")
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = args.data.resolve()
    if not data.exists():
        sys.exit(f"data file not found: {data}; pass --data PATH to a CSV with columns text, coarse, fine")
    if args.worker:
        print(json.dumps(worker(args.worker, read_rows(data, args.n))))
        return
    wall = time.perf_counter()
    rows = read_rows(data, args.n)
    from service.engines.embedded import fetch_model
    from service.settings import Settings

    start = time.perf_counter()
    fetch_model(Settings().models_dir)
    prepare_s = time.perf_counter() - start
    plan = [("scoring", len(rows)), ("naive", min(args.naive_n, len(rows)))] + ([] if args.skip_fine else [("fine", len(rows))])
    results = [spawn(method, n, data) for method, n in plan]
    print_report(results, rows, prepare_s, time.perf_counter() - wall)


if __name__ == "__main__":
    main()
