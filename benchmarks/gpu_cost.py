"""GPU cost model on paper: prefill tokens per document and expected docs/s for each scoring method.

Nothing here runs on a GPU; it prints what a document costs before one is rented. For a
model of ``--params`` billion parameters (``--hidden`` wide, ``--vocab`` tokens), a
taxonomy of L labels of ``--label-tokens`` tokens each, documents of D tokens and a system
prompt of S tokens, on a GPU of ``--tflops`` dense bf16 TFLOP/s (at ``--mfu`` of it) and
``--bandwidth`` GB/s of memory bandwidth:

- ``echo`` (one request per label, prompt log-probabilities): vLLM skips the prefix cache
  for such requests (``skip_reading_prefix_cache``, vLLM 0.29), so each label recomputes
  S + D + its own tokens, and the vocabulary projection runs on every prompt position;
- ``auto`` (the OpenAI engine's default: one request per label-trie node, ``max_tokens: 1``
  with top-k log-probabilities): the document is computed once (S is shared by every
  document), and each later step recomputes the last partial KV block (``--block`` tokens,
  half on average) plus its new token; steps are small, so their cost is one read of the
  weights per forward pass shared by ``--batch`` concurrent sequences;
- the embedded CPU engine's layout (document and label trie in one forward pass) is shown
  as the floor: D + the trie's tokens, nothing recomputed.

Also the OpenAI engine's ``timeout_s`` this implies: twice the time ``--concurrency``
documents' first prefills (S + D) take when queued on one replica.

    .venv/bin/python benchmarks/gpu_cost.py [--params 7.6] [--tflops 121] [--bandwidth 300] [--labels 6,50,500]

The defaults are Qwen2.5-7B-Instruct on an NVIDIA L4 (deploy/serve-gpu.yaml).
"""

from __future__ import annotations

import argparse

from _report import fmt, print_facts, print_table


def step_count(labels: int, label_tokens: int) -> int:
    """Trie nodes walked per document, at most: every label's tokens plus its end-of-turn (shared prefixes ignored)."""
    return labels * (label_tokens + 1)


def costs(args, labels: int, document: int) -> dict[str, dict[str, float]]:
    """Per method: prefill tokens per document, requests per document, FLOPs and seconds per document."""
    per_token = 2 * args.params * 1e9  # a forward pass per token
    head = 2 * args.hidden * args.vocab  # the vocabulary projection for one position
    rate = args.tflops * 1e12 * args.mfu
    weights_s = 2 * args.params * 1e9 / (args.bandwidth * 1e9)  # one read of bf16 weights
    steps = step_count(labels, args.label_tokens)
    echo_tokens = labels * (args.system + document + args.label_tokens + 1)
    walk_tokens = document + steps * (args.block / 2 + 1)
    floor_tokens = document + steps
    return {
        "echo (one uncached prefill per label)": {
            "tokens": echo_tokens, "requests": labels,
            "seconds": echo_tokens * (per_token + head) / rate},
        "auto (top-k walk on the cached prompt)": {
            "tokens": walk_tokens, "requests": 1 + steps,
            "seconds": walk_tokens * per_token / rate + steps * weights_s / args.batch},
        "floor (document + label trie, one pass)": {
            "tokens": floor_tokens, "requests": 1,
            "seconds": floor_tokens * per_token / rate},
    }


def main() -> None:
    """Print the table for every label count and document length asked for."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=7.6, help="model parameters, billions")
    parser.add_argument("--hidden", type=int, default=3584, help="hidden size")
    parser.add_argument("--vocab", type=int, default=152064, help="vocabulary size")
    parser.add_argument("--tflops", type=float, default=121.0, help="GPU dense bf16 TFLOP/s (L4: 121)")
    parser.add_argument("--bandwidth", type=float, default=300.0, help="GPU memory bandwidth, GB/s (L4: 300)")
    parser.add_argument("--mfu", type=float, default=0.5, help="fraction of peak FLOP/s prefill reaches")
    parser.add_argument("--batch", type=int, default=64, help="sequences sharing one forward pass (max_num_seqs)")
    parser.add_argument("--block", type=int, default=16, help="KV-cache block size (vLLM caches whole blocks)")
    parser.add_argument("--system", type=int, default=300, help="system prompt tokens (instruction + labels)")
    parser.add_argument("--label-tokens", type=int, default=3, help="tokens per label name")
    parser.add_argument("--labels", default="6,50,500", help="label counts, comma-separated")
    parser.add_argument("--documents", default="500,2000", help="document lengths in tokens, comma-separated")
    parser.add_argument("--concurrency", type=int, default=32, help="documents in flight (models.yaml max_concurrency)")
    args = parser.parse_args()

    rows = []
    for document in (int(d) for d in args.documents.split(",")):
        for labels in (int(n) for n in args.labels.split(",")):
            table = costs(args, labels, document)
            echo = table["echo (one uncached prefill per label)"]["seconds"]
            for method, cost in table.items():
                rows.append([document, labels, method, fmt(cost["tokens"], 0), cost["requests"],
                             fmt(cost["seconds"] * 1000, 1), fmt(1 / cost["seconds"], 1),
                             fmt(echo / cost["seconds"], 1)])
    first_prefill = (args.system + max(int(d) for d in args.documents.split(","))) * 2 * args.params * 1e9 \
        / (args.tflops * 1e12 * args.mfu)
    print_facts("GPU cost model (on paper: nothing here ran on a GPU)", [
        f"model {args.params:g} B parameters, hidden {args.hidden}, vocabulary {args.vocab}; system prompt "
        f"{args.system} tokens, labels of {args.label_tokens} tokens",
        f"GPU {args.tflops:g} TFLOP/s bf16 at {args.mfu:.0%} = {args.tflops * args.mfu:g} TFLOP/s for prefill, "
        f"{args.bandwidth:g} GB/s; {args.batch} sequences per forward pass; KV blocks of {args.block} tokens",
        f"timeout_s for the OpenAI engine: {args.concurrency} documents' first prefills queued on one replica take "
        f"{args.concurrency * first_prefill:.0f} s; set at least {2 * args.concurrency * first_prefill:.0f} s"])
    print_table(["doc tokens", "labels", "method", "prefill tokens/doc", "requests/doc", "ms/doc", "docs/s",
                 "× echo"], rows,
                "One replica, compute-bound prefill at the stated utilisation; walk steps cost a weight read shared by "
                "the batch. Echo also runs the vocabulary projection on every prompt position.")


if __name__ == "__main__":
    main()
