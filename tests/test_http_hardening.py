"""Attacks on the HTTP boundary, sent over real sockets to the real app served by uvicorn on loopback.

Each test here failed on the code before the security review's fixes (commit fb5fb94):
tokenless admin through a forged or missing ``Host`` or through a local reverse proxy, a
chunked body past ``ANNOTATE_MAX_BODY_BYTES``, cross-origin and login CSRF, unlimited token
guessing, prompt templates picked by path and rendered unsandboxed, YAML alias bombs and
unbounded taxonomies. The app runs in this process (no model is needed for any of it) with
``ANNOTATE_AUTH=auto`` on loopback, the set-up where tokens are optional.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import REPO, free_port

from service.api.context import Context, attach
from service.api.token_store import TokenStore
from service.serve.http import create_api
from service.settings import Settings
from service.store import Store

OPERATOR_TOKEN = "hardening-operator-" + "0123456789abcdef"
BODY_LIMIT = 1 << 20
UPLOAD_LIMIT = 200_000


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """The app on a real uvicorn server on loopback (auth 'auto': tokens optional); yields its URL."""
    data = tmp_path_factory.mktemp("hardening")
    settings = Settings(data_dir=data, host="127.0.0.1", auth="auto", max_body_bytes=BODY_LIMIT,
                        admin_token=OPERATOR_TOKEN, auth_failures_per_minute=5, taxonomy_max_labels=50,
                        taxonomy_max_chars=20_000, max_upload_bytes=UPLOAD_LIMIT)
    store, tokens = Store(settings.db_path, export_dir=settings.export_dir), TokenStore(data / "tokens.sqlite")
    attach(Context(settings, store, None, {}, None, None, None, tokens))
    port = free_port()
    running = uvicorn.Server(uvicorn.Config(create_api(), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not running.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    running.should_exit = True
    thread.join(timeout=10)
    attach(None)
    store.close()
    tokens.close()


def raw(url: str, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client fixes the Host for us); the status and the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def get_tokens(url: str, host: bytes, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> int:
    """GET /v1/tokens (admin) without a token, naming ``host``; the status."""
    host_line = b"Host: " + host + b"\r\n" if host is not None else b""
    return raw(url, b"GET /v1/tokens " + version + b"\r\n" + host_line + extra + b"Connection: close\r\n\r\n")[0]


def test_a_plain_loopback_request_is_trusted_without_a_token(server):
    """The rule still lets the local user in: loopback peer, loopback Host, no proxy header."""
    port = server.rsplit(":", 1)[1].encode()
    assert get_tokens(server, b"127.0.0.1:" + port) == 200
    assert get_tokens(server, b"localhost:" + port) == 200


@pytest.mark.parametrize("host", [b"127.0.0.1@evil.com", b"evil.com#@127.0.0.1", b"localhost, evil.com",
                                  b"127.0.0.1:8000/x", b"[::1", b"127.0.0.1:99999", b""])
def test_a_malformed_host_is_refused_with_400(server, host):
    """Starlette would read the socket's address for these; the service refuses them before any route."""
    assert get_tokens(server, host) == 400


def test_two_host_headers_are_refused(server):
    """Two Host headers could be read differently by a proxy and by the service."""
    status = get_tokens(server, b"127.0.0.1", extra=b"Host: evil.example\r\n")
    assert status == 400


def test_no_host_is_not_trusted(server):
    """An HTTP/1.0 request without Host gets no tokenless admin."""
    assert get_tokens(server, None, version=b"HTTP/1.0") == 401


@pytest.mark.parametrize("header", [b"X-Forwarded-For: 203.0.113.9", b"Forwarded: for=203.0.113.9",
                                    b"X-Real-IP: 203.0.113.9", b"X-Forwarded-Host: annotate.example.com"])
def test_a_proxied_request_needs_a_token(server, header):
    """Behind a reverse proxy on the same machine every request comes from loopback: its headers give it away."""
    assert get_tokens(server, b"127.0.0.1", extra=header + b"\r\n") == 401


def test_another_host_name_is_not_trusted(server):
    """DNS rebinding: a page on another name reaching loopback."""
    assert get_tokens(server, b"attacker.example") == 401


def test_a_chunked_body_is_cut_at_the_limit(server):
    """No Content-Length, 5 MiB in chunks against a 1 MiB limit: 413 naming the setting, before the rest is read."""
    chunk = b"x" * 65536
    head = (b"POST /v1/sql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(head)
        sent = 0
        try:
            while sent < 5 * BODY_LIMIT:
                conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
            conn.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed while we were still sending
            pass
        answer = b""
        try:
            while part := conn.recv(65536):
                answer += part
        except OSError:
            pass
    assert answer.split(b" ", 2)[1] == b"413", answer[:300]
    assert b"ANNOTATE_MAX_BODY_BYTES" in answer
    with httpx.Client(base_url=server) as client:
        assert client.get("/v1/jobs").status_code == 200  # still serving


def test_no_site_can_frame_a_page_or_sniff_a_reply(server):
    """Every answer (a console page, an API reply, an error, the body limit's own 413) forbids framing and sniffing."""
    with httpx.Client(base_url=server) as client:
        answers = [client.get("/console/login"), client.get("/v1/jobs"), client.get("/v1/jobs/nope"),
                   client.post("/v1/sql", content=b"x" * (BODY_LIMIT + 1))]
    assert [a.status_code for a in answers] == [200, 200, 404, 413]
    for answer in answers:
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["content-security-policy"] == "frame-ancestors 'none'"
        assert answer.headers["x-content-type-options"] == "nosniff"


def test_a_chunked_body_under_the_limit_passes(server):
    """Counting must not break ordinary chunked uploads."""
    def body():
        yield b'{"sql": '
        yield b'"SELECT 42 AS answer"}'
    with httpx.Client(base_url=server) as client:
        response = client.post("/v1/sql", content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.json()["rows"] == [[42]]


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Origin": "null"},
                                     {"Referer": "http://evil.example/page"},
                                     {"Sec-Fetch-Site": "cross-site"}])
def test_cross_origin_writes_are_refused(server, headers):
    """A form or fetch from another site (even an old browser without Sec-Fetch headers) cannot change data."""
    with httpx.Client(base_url=server) as client:
        response = client.post("/v1/tokens", content='{"name": "x", "scope": "admin"}',
                               headers={"content-type": "text/plain", **headers})
    assert response.status_code == 403 and "refused" in response.json()["error"]["message"]


def test_same_origin_writes_pass(server):
    """The console's own pages post with their own origin."""
    with httpx.Client(base_url=server) as client:
        response = client.post("/v1/tokens", json={"name": "console", "scope": "read"},
                               headers={"Origin": server, "Referer": server + "/console"})
    assert response.status_code == 201


def test_login_form_refuses_cross_site_posts(server):
    """Login CSRF: another site cannot sign a visitor's browser in with the attacker's token."""
    with httpx.Client(base_url=server) as client:
        response = client.post("/console/login", data={"token": "ann_x_y", "next": "/console"},
                               headers={"Origin": "http://evil.example"})
    assert response.status_code == 403


def test_guessing_tokens_is_slowed_down(server):
    """After the per-minute allowance of invalid tokens from one address they get 429; valid tokens still pass."""
    with httpx.Client(base_url=server) as client:
        good = client.post("/v1/tokens", json={"name": "reader", "scope": "read"}).json()["token"]
        statuses = [client.get("/v1/jobs", headers={"Authorization": f"Bearer ann_guess{i}_wrong"}).status_code
                    for i in range(6)]
        assert statuses[:5] == [401] * 5 and statuses[5] == 429
        blocked = client.get("/v1/jobs", headers={"Authorization": "Bearer ann_guess9_wrong"})
        assert blocked.status_code == 429 and "ANNOTATE_AUTH_FAILURES_PER_MINUTE" in blocked.json()["error"]["message"]
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {good}"}).status_code == 200
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}).status_code == 200
        assert client.get("/v1/jobs").status_code == 200  # the local user without a token is not guessing


def test_a_weak_operator_token_is_refused_at_start():
    """The operator's token opens everything: a short or repetitive one stops the service from starting."""
    for weak in ("admin", "a" * 40):
        with pytest.raises(ValueError, match="ANNOTATE_ADMIN_TOKEN"):
            Settings(admin_token=weak)
    assert Settings(admin_token=OPERATOR_TOKEN).admin_token == OPERATOR_TOKEN


def test_a_prompt_is_a_name_never_a_path(server, tmp_path):
    """annotators[].prompt cannot name a file: refused at the boundary, naming the field."""
    (tmp_path / "evil.md").write_text("### system\n{{ 7 * 7 }}\n")
    with httpx.Client(base_url=server) as client:
        assert client.get("/v1/prompts").json() == sorted(p.stem for p in (REPO / "prompts").glob("*.md"))
        for prompt in (str(tmp_path / "evil"), "../../" + str(tmp_path / "evil"), "classify/../classify"):
            response = client.post("/v1/jobs", json={"taxonomy": "x", "documents": [{"id": 1, "text": "hi"}],
                                                     "annotators": [{"kind": "llm", "prompt": prompt}]})
            assert response.status_code == 422 and "annotators[0].prompt" in response.text


YAML_BOMB = """name: bomb
description: d
instruction: i
labels:
  - {name: a, description: &big "%s"}
%s""" % ("x" * 1000, "".join(f"  - {{name: l{i}, description: *big}}\n" for i in range(30)))


def test_yaml_aliases_are_refused(server):
    """A small file whose labels alias one large anchor would be stored and prompted at its expanded size."""
    with httpx.Client(base_url=server) as client:
        response = client.post("/v1/taxonomies", content=YAML_BOMB.encode())
    assert response.status_code == 422
    problem = response.json()["error"]["problems"][0]
    assert problem["line"] == 5 and "aliases" in problem["message"]


def test_taxonomy_size_limits_name_their_settings(server):
    """Too many labels, too much text, or more YAML than the largest taxonomy allowed needs (checked before it is
    parsed) is a 413 naming the setting; nothing is stored."""
    many = "name: many\ndescription: d\ninstruction: i\nlabels:\n" + "".join(
        f"  - {{name: l{i}, description: label {i}}}\n" for i in range(51))
    wordy = "name: wordy\ndescription: d\ninstruction: i\nlabels:\n" + "".join(
        f"  - {{name: l{i}, description: {'word ' * 1000}}}\n" for i in range(5))
    padded = "# " + "x" * (UPLOAD_LIMIT - 1000) + "\nname: padded\ndescription: d\ninstruction: i\nlabels: []\n"
    with httpx.Client(base_url=server) as client:
        for yaml_text, setting in ((many, "ANNOTATE_TAXONOMY_MAX_LABELS"), (wordy, "ANNOTATE_TAXONOMY_MAX_CHARS"),
                                   (padded, "6 per character of ANNOTATE_TAXONOMY_MAX_CHARS")):
            response = client.post("/v1/taxonomies", content=yaml_text.encode())
            assert response.status_code == 413 and setting in response.json()["error"]["message"]
        assert client.get("/v1/taxonomies").json() == []


def test_a_pushed_taxonomy_without_examples_gets_advice(server):
    """Stored all the same, with advice naming the labels that have fewer than two examples."""
    bare = "name: bare\ndescription: d\ninstruction: i\nlabels:\n  - {name: a, description: A.}\n" \
           "  - {name: b, description: B., examples: [one b, two b]}\n"
    with httpx.Client(base_url=server) as client:
        pushed = client.post("/v1/taxonomies", content=bare.encode())
    assert pushed.status_code == 201 and pushed.json()["created"]
    [advice] = pushed.json()["advice"]
    assert advice.startswith("1 of 2 labels have fewer than 2 examples (a): ")


def test_templates_render_sandboxed(tmp_path: Path):
    """Even a template in the registry cannot reach Python: the SSTI payload raises instead of running."""
    from jinja2.exceptions import SecurityError

    from service.labelling.prompts import load_template

    marker = tmp_path / "pwned"
    (tmp_path / "evil.md").write_text(
        "### system\n{{ cycler.__init__.__globals__.os.system('touch %s') }}\n" % marker)
    template = load_template("evil", directory=tmp_path)
    with pytest.raises(SecurityError):
        template.render("system")
    assert not marker.exists()


def test_unknown_prompts_list_the_known_and_reveal_nothing(tmp_path: Path):
    """A path or a missing name gets the same answer, whether or not some other file exists."""
    from service.errors import InvalidInput
    from service.labelling.prompts import load_template

    (tmp_path / "exists.md").write_text("### system\nhi\n")
    messages = []
    for name in (str(tmp_path / "exists"), "../" + tmp_path.name + "/exists", "nowhere"):
        with pytest.raises(InvalidInput) as caught:
            load_template(name)
        messages.append(str(caught.value).split(";", 1)[1])
    assert len(set(messages)) == 1 and "classify" in messages[0]


def test_uploads_parsed_in_python_have_their_own_limit(server):
    """A 3 MB taxonomy took the ingress's event loop for 79 s to parse: such uploads stop at their own cap."""
    big = "name: big\ndescription: d\ninstruction: i\nlabels:\n" + "  - {name: a, description: x}\n" * 10_000
    with httpx.Client(base_url=server) as client:
        response = client.post("/v1/taxonomies", content=big.encode())
        assert response.status_code == 413 and "ANNOTATE_MAX_UPLOAD_BYTES" in response.json()["error"]["message"]
        deep = client.post("/v1/taxonomies", content=b"[" * 5000)
        assert deep.status_code == 422 and "nested too deeply" in deep.text
        assert client.post("/v1/jobs/nojob/gold", content=b"x" * (2 * UPLOAD_LIMIT)).status_code == 404


def test_deeply_nested_gold_json_is_a_clear_error():
    """A RecursionError from the JSON parser was a 500."""
    from service.errors import InvalidInput
    from service.quality.gold import parse_upload

    with pytest.raises(InvalidInput, match="nested too deeply"):
        parse_upload(b"[" * 200_000, "application/json", "alice")


def test_taxonomy_diffs_are_bounded():
    """difflib is quadratic at worst: two long versions are not compared on the page."""
    from service.console.pages import DIFF_MAX_LINES, _diff

    long = "\n".join(f"line {i}" for i in range(DIFF_MAX_LINES + 1))
    assert len(_diff(long, long + "\nmore", "a", "b")) == 1
    assert _diff("a\nb", "a\nc", "x@1", "x@2")[-2:] == ["-b", "+c"]


def test_a_download_leaves_no_file_whatever_the_client_does(tmp_path: Path):
    """A built download is unlinked as soon as its answer exists, before a byte is sent, so a client that hangs up
    midway leaves nothing in the downloads dir; the one that reads gets every byte, its length and its name."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.api.context import DOWNLOAD_CHUNK, sent_once
    from service.files import download_path

    body = os.urandom(DOWNLOAD_CHUNK * 2 + 5)
    app = FastAPI()

    @app.get("/file")
    def file():
        path = download_path(tmp_path / "downloads", ".bin")
        path.write_bytes(body)
        answer = sent_once(path, "application/octet-stream", "x.bin")
        assert not path.exists()
        return answer

    response = TestClient(app).get("/file")
    assert response.content == body and response.headers["content-length"] == str(len(body))
    assert response.headers["content-disposition"] == "attachment; filename*=utf-8''x.bin"
    assert list((tmp_path / "downloads").iterdir()) == []


def test_a_long_run_keeps_its_turn_until_its_work_ends_even_when_the_request_is_cancelled():
    """A client that hangs up cancels its request, not the thread doing the work: the token's turn stays taken (429 for
    another) until that work has finished, and is free after it."""
    import asyncio

    from service.api.context import OneAtATime
    from service.errors import TooManyRequests

    async def scenario() -> None:
        guard, finish = OneAtATime("a test run"), threading.Event()
        request = asyncio.ensure_future(guard.run("t", asyncio.to_thread(finish.wait)))
        await asyncio.sleep(0)  # the run takes the turn and starts its thread
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        with pytest.raises(TooManyRequests, match="a test run of this token is running"):
            await guard.run("t", asyncio.sleep(0))
        finish.set()
        deadline = time.monotonic() + 60
        while guard._locks["t"].locked() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert await guard.run("t", asyncio.sleep(0, result="next")) == "next"

    asyncio.run(scenario())
