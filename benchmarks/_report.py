"""What the benchmarks share in their reports: machine facts, percentiles, accuracy, the naive parser, tables."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else float("nan")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def fmt_acc(k: int, n: int) -> str:
    """Accuracy with its 95% Wilson interval."""
    low, high = wilson(k, n)
    return f"{k / n:.1%} [{low:.1%}, {high:.1%}]"


def parse_label(output: str, options: tuple[str, ...]) -> str | None:
    """The label name (case-insensitive, whole word) that appears first in the output, else None."""
    alternatives = "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))
    match = re.search(rf"(?<![A-Za-z0-9])({alternatives})(?![A-Za-z0-9])", output, re.IGNORECASE)
    return None if match is None else next(o for o in options if o.lower() == match.group(1).lower())


def machine_facts() -> list[str]:
    """CPU model, core count, memory and load, read from /proc and os."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = "unknown"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    load1, load5, _ = os.getloadavg()
    held = os.environ.get("ATEN_CPU_CAPABILITY")
    cpu += f" (instruction set held to {held} by ATEN_CPU_CAPABILITY)" if held else ""
    return [f"CPU: {cpu}", f"cores (os.cpu_count): {os.cpu_count()}", f"memory: {memory}",
            f"load average at start: {load1:.2f} (1 min), {load5:.2f} (5 min)"]


def load_now() -> str:
    """The load average now, to read timings by (the machine may be shared)."""
    load1, load5, _ = os.getloadavg()
    return f"load average at the end: {load1:.2f} (1 min), {load5:.2f} (5 min)"


def print_facts(title: str, facts: list[str]) -> None:
    """A section title and its bullet list of facts."""
    print(f"## {title}\n")
    for fact in facts:
        print(f"- {fact}")
    print()


def print_table(headers: list[str], rows: list[list], note: str = "") -> None:
    """A Markdown table (columns after the first right-aligned) and a one-line note under it."""
    print("| " + " | ".join(headers) + " |")
    print("|---|" + "---:|" * (len(headers) - 1))
    for row in rows:
        print("| " + " | ".join("—" if cell is None else str(cell) for cell in row) + " |")
    if note:
        print(f"\n{note}")
    print(flush=True)


def fmt(value: float | None, digits: int = 1) -> str | None:
    """A number with ``digits`` decimals; None (printed as —) for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return f"{value:.{digits}f}"
