"""POST /v1/sql on the real app in-process (no Ray): the byte cap of an answer, and each token's share of the
SQL threads, with the operator's queries never waiting behind other tokens'."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from service.api.context import Context, attach
from service.api.token_store import TokenStore
from service.serve.http import create_api
from service.settings import Settings
from service.store import Store

MAX_BYTES = 1_000_000
OPERATOR_TOKEN = "operator-secret-for-tests"
SLOW = "SELECT count(*) FROM range(1_000_000_000) a, range(1_000_000_000) b"  # runs until its time limit
SLOW_S = 15
WIDE = "SELECT i, s FROM range(100_000) t(i), (SELECT string_agg('x', '') AS s FROM range(200))"  # ~210 bytes a row
HUGE_ROW = "SELECT s FROM (SELECT string_agg('x', '') AS s FROM range(2_000_000)), range(20)"  # 2 MB rows


@pytest.fixture
def client(tmp_path) -> TestClient:
    """The real app over a real store on loopback (a request without a token acts as one caller), small byte cap."""
    settings = Settings(data_dir=tmp_path, host="127.0.0.1", auth="auto", admin_token=OPERATOR_TOKEN,
                        sql_max_bytes=MAX_BYTES, sql_timeout_s=2 * SLOW_S)
    store, tokens = Store(settings.db_path, export_dir=settings.export_dir), TokenStore(tmp_path / "tokens.sqlite")
    attach(Context(settings, store, None, {}, None, None, None, tokens))
    try:
        with TestClient(create_api(), base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000)) as client:
            yield client
    finally:
        attach(None)
        store.close()
        tokens.close()


def test_answer_is_cut_at_the_byte_cap_which_a_request_may_only_lower(client):
    """Rows stop before ANNOTATE_SQL_MAX_BYTES of JSON (the answer says so and why); asking for more gets no more."""
    for asked, cap in ((None, MAX_BYTES), (10_000, 10_000), (10**9, MAX_BYTES)):
        response = client.post("/v1/sql", json={"sql": WIDE} | ({"max_bytes": asked} if asked else {}))
        body = response.json()
        assert response.status_code == 200 and body["truncated"] is True
        assert "ANNOTATE_SQL_MAX_BYTES" in body["truncated_reason"]
        assert 0.9 * cap < len(json.dumps(body["rows"], separators=(",", ":"))) <= cap
        assert len(response.content) < cap + 1_000


def test_row_cap_still_cuts_first_and_says_so(client):
    """Small rows meet the row cap before the byte cap, and the answer names the row cap."""
    body = client.post("/v1/sql", json={"sql": "SELECT * FROM range(100)", "max_rows": 7}).json()
    assert (len(body["rows"]), body["truncated"]) == (7, True)
    assert "ANNOTATE_SQL_MAX_ROWS" in body["truncated_reason"]
    assert client.post("/v1/sql", json={"sql": "SELECT 1"}).json()["truncated_reason"] is None


def test_a_single_row_over_the_byte_cap_is_413(client):
    """The finding's query, smaller: rows of 2 MB each under a 1 MB cap answer 413 naming the setting."""
    response = client.post("/v1/sql", json={"sql": HUGE_ROW})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["type"] == "PayloadTooLarge" and "ANNOTATE_SQL_MAX_BYTES" in error["message"]


def test_a_token_over_its_sql_limit_gets_429_while_others_and_the_operator_run(client):
    """One token holding its two slow queries is refused a third (429 naming the setting), another token's query
    still runs; with two tokens filling every shared thread, the operator's query still runs on its own."""
    greedy, other, third = (_token(client, name) for name in ("greedy", "other", "third"))
    held = _hold(client, greedy)
    refused = _until_refused(client, greedy)
    assert refused.status_code == 429
    assert "ANNOTATE_SQL_MAX_CONCURRENT_PER_TOKEN" in refused.json()["error"]["message"]
    assert _select_one(client, other).json()["rows"] == [[1]]
    assert all(thread.is_alive() for thread, _ in held), "the other token's query answered while greedy's ran"
    held += _hold(client, third)
    assert _until_refused(client, third).status_code == 429  # both of its queries hold shared threads now
    assert _select_one(client, {"Authorization": f"Bearer {OPERATOR_TOKEN}"}).json()["rows"] == [[1]]
    assert all(thread.is_alive() for thread, _ in held), "the operator's query answered while every shared thread ran"
    for thread, statuses in held:
        thread.join()
        assert statuses == [408]


def _token(client: TestClient, name: str) -> dict[str, str]:
    """Headers carrying a new read token."""
    made = client.post("/v1/tokens", json={"name": name, "scope": "read"}).json()
    return {"Authorization": f"Bearer {made['token']}"}


def _select_one(client: TestClient, headers: dict[str, str]):
    """SELECT 1 as the caller of ``headers``."""
    return client.post("/v1/sql", json={"sql": "SELECT 1"}, headers=headers)


def _hold(client: TestClient, headers: dict[str, str]) -> list[tuple[threading.Thread, list[int]]]:
    """Two slow queries of one token on threads, each retried until admitted; each thread's final status lands in
    its list."""
    held = []
    for _ in range(2):
        statuses: list[int] = []
        thread = threading.Thread(target=_run_slow, args=(client, headers, statuses), daemon=True)
        thread.start()
        held.append((thread, statuses))
    return held


def _run_slow(client: TestClient, headers: dict[str, str], statuses: list[int]) -> None:
    """A slow query until its time limit, sent again while the token's own probes take its slot."""
    slow = {"sql": SLOW, "timeout_s": SLOW_S}
    while (status := client.post("/v1/sql", json=slow, headers=headers).status_code) == 429:
        time.sleep(0.05)
    statuses.append(status)


def _until_refused(client: TestClient, headers: dict[str, str]):
    """SELECT 1 as this token until it is refused (its slow queries hold its slots) or half the slow time passes."""
    deadline = time.monotonic() + SLOW_S / 2
    while (response := _select_one(client, headers)).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    return response
