"""The store's disk refusing writes mid-job: the job fails loudly and nothing half-written counts as done.

Real DuckDB, real job runner (fake engine, so only the store can fail): a child process
labels a 3,000-document job with its file-size limit (RLIMIT_FSIZE) set a little above the
database's size, so DuckDB's write-ahead log hits "File too large" after some batches,
as on a full disk. Afterwards the parent opens the same file without the limit.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

from conftest import REPO
from test_jobs import _runner, _store, _submit  # the same real store and runner as the job tests

from service.engines.fake import FakeEngine

DOCUMENTS, BATCH = 3000, 16
CHILD = f"""
import asyncio, resource, signal, sys
from pathlib import Path
sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
from service.engines.fake import FakeEngine
from service.store import Store
from test_jobs import _runner

db = Path(sys.argv[1])
store = Store(db, export_dir=db.parent / "exports")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
limit = max(p.stat().st_size for p in db.parent.glob(db.name + "*")) + 300_000
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

async def main():
    runner = await _runner(store, FakeEngine(), batch_size={BATCH})
    runner.submit("job_disk")
    while store.jobs.get("job_disk").status in ("queued", "running"):
        await asyncio.sleep(0.1)
    await runner.close()

asyncio.run(main())
"""


def test_disk_write_failure_fails_the_job_loudly_and_keeps_whole_batches(tmp_path):
    """The job ends failed with DuckDB's error, logged; its rows are whole batches, each document once."""
    store = _store(tmp_path)

    async def create():
        runner = await _runner(store, FakeEngine(), batch_size=BATCH)
        _submit(store, runner, "job_disk", [f"message {i} " + "x" * 200 for i in range(DOCUMENTS)], batch_size=500)

    asyncio.run(create())
    store.close()
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "db.duckdb")], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "job failed" in child.stderr and "File too large" in child.stderr  # loud: logged with the cause
    store = _store(tmp_path)
    job = store.jobs.get("job_disk")
    rows, distinct, ok = store.cursor().execute(
        "SELECT count(*), count(DISTINCT doc_id), count(*) FILTER (status = 'ok') FROM annotations"
        " WHERE job_id = 'job_disk'").fetchone()
    assert job.status == "failed" and "File too large" in job.error
    assert 0 < rows < DOCUMENTS and rows == distinct == ok == job.done
    assert rows % BATCH == 0  # batches commit whole or not at all
