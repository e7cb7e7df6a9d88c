"""Which floating-point type the embedded engine computes in, chosen by measurement on this machine.

CPUs of the same cloud kind differ: with AVX-512 BF16 or AMX, torch's bfloat16 matrix
products are fast; with only AVX2 they ran 160 times slower than float32 (0.001 against
0.164 TFLOP/s measured). So nothing is assumed: the first start on a machine times one
matrix product of the model's own shape (hidden × intermediate, 64 query rows) in each
candidate type, keeps the fastest, and remembers the result under the models dir, keyed by
the CPU's model name and flags, the instruction set torch dispatches to (which
``ATEN_CPU_CAPABILITY``/``ONEDNN_MAX_CPU_ISA`` can lower, as the throughput benchmark's
``--cpu-isa avx2`` does to stand in for an AVX2-only CPU), the torch version and the
thread count, so a copied models dir on another machine measures again.

float32 is the exact reference: bfloat16 is kept only when it is at least ``BF16_MARGIN``
times faster, since it rounds every product to 8 bits of mantissa (ranking agreement with
float32 is what ``tests/test_engine.py`` checks). ``ANNOTATE_ENGINE_DTYPE`` overrides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from service.files import atomic_path

log = logging.getLogger(__name__)

CANDIDATES = ("float32", "bfloat16")
BF16_MARGIN = 1.5  # bfloat16 must be this much faster than float32 to be worth its rounding
QUERY_ROWS = 64  # a short document's worth of tokens: small enough that a slow path costs ~0.1 s
CACHE_FILE = "numeric-path.json"


@dataclass(frozen=True)
class NumericChoice:
    """The chosen type, the measured rate of each candidate (TFLOP/s), and whether it was measured or set."""

    dtype: str
    tflops: dict[str, float]
    source: str  # "measured", "cached" or "setting"


def machine_key(threads: int) -> str:
    """What makes a measurement valid elsewhere: the CPU, its flags, the ISA torch uses, torch and the thread count."""
    import torch

    cpu, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = f"{torch.backends.cpu.get_cpu_capability()}|{os.environ.get('ONEDNN_MAX_CPU_ISA', '')}"
    text = f"{cpu}|{flags}|{isa}|{torch.__version__}|{threads}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def gemm_tflops(dtype: str, rows: int, inner: int, outer: int, *, seconds: float = 0.2) -> float:
    """Rate of ``[rows×inner]·[inner×outer]`` in ``dtype`` on this machine (best of repeated runs).

    ``int8`` (``torch._int_mm``, int32 out) is not an engine type: the throughput benchmark
    times it to bound what an int8 path could reach.
    """
    import torch

    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if dtype == "int8":
        left = torch.randint(-127, 127, (rows, inner), dtype=torch.int8)
        right = torch.randint(-127, 127, (inner, outer), dtype=torch.int8)
        product = torch._int_mm
    else:
        kind = getattr(torch, dtype)
        left, right, product = torch.randn(rows, inner).to(kind), torch.randn(inner, outer).to(kind), torch.matmul
    product(left, right)  # warm-up: kernels chosen, memory touched
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 3 or (spent < seconds and runs < 50):
        start = time.perf_counter()
        product(left, right)
        took = time.perf_counter() - start
        best, spent, runs = min(best, took), spent + took, runs + 1
    return 2 * rows * inner * outer / best / 1e12


def pick(tflops: dict[str, float]) -> str:
    """float32 unless bfloat16 is clearly faster (``BF16_MARGIN``)."""
    if tflops.get("bfloat16", 0.0) >= BF16_MARGIN * tflops["float32"]:
        return "bfloat16"
    return "float32"


def choose_dtype(models_dir: Path, hidden: int, intermediate: int, threads: int, setting: str = "auto") -> NumericChoice:
    """The engine's type: the setting if not ``auto``, else this machine's cached or fresh measurement."""
    if setting != "auto":
        return NumericChoice(setting, {}, "setting")
    path, key = Path(models_dir) / CACHE_FILE, f"{machine_key(threads)}-{hidden}x{intermediate}"
    cached = _read_cache(path)
    earlier = _cached_choice(cached.get(key))
    if earlier is not None:
        choice = earlier
    else:
        rates = {dtype: round(gemm_tflops(dtype, QUERY_ROWS, hidden, intermediate), 5) for dtype in CANDIDATES}
        choice = NumericChoice(pick(rates), rates, "measured")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as partial:  # two replicas starting together never read half a file
            partial.write_text(json.dumps({**cached, key: asdict(choice)}, indent=1, sort_keys=True))
    log.info("engine numeric type", extra={"dtype": choice.dtype, "tflops": choice.tflops, "source": choice.source})
    return choice


def _cached_choice(entry: object) -> NumericChoice | None:
    """An earlier verdict, if it has this version's shape; anything else (another version's file) is measured again."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "tflops", "source"}:
        return None
    dtype, tflops = entry["dtype"], entry["tflops"]
    if dtype not in CANDIDATES or not isinstance(tflops, dict):
        return None
    return NumericChoice(dtype, tflops, "cached")


def _read_cache(path: Path) -> dict:
    """Earlier measurements by machine key; an unreadable file counts as none."""
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
