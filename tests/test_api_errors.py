"""Bad input over real HTTP: each gets a 4xx with a message that names the problem, and nothing breaks.

These run against the same real service as the end-to-end tests; none of them reaches
the model, so they are quick. The ones at the end, about what errors give away, run the
same app in this process (the ``in_process`` fixture), with files laid out around its input dir.
"""

from __future__ import annotations

import pytest
from conftest import REPO

GOOD_YAML = (REPO / "taxonomy" / "sms-spam.yaml").read_text()


def _error(response, status: int) -> dict:
    """Assert the status and the one error shape; return the error body."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["message"]
    return body


def test_malformed_yaml_points_at_the_line(service):
    """A YAML syntax error names the line."""
    with service.client() as client:
        body = _error(client.post("/v1/taxonomies", content=b"name: x\nlabels: [a, b\ndescription: y\n"), 422)
    assert body["type"] == "TaxonomyError"
    assert body["problems"][0]["line"] is not None
    assert "YAML syntax error" in body["message"]


def test_unknown_label_field_is_an_error(service):
    """A misspelt key inside a label names its path and line and lists the allowed keys."""
    bad = GOOD_YAML.replace("  - name: spam\n", "  - name: spam\n    colour: red\n")
    with service.client() as client:
        body = _error(client.post("/v1/taxonomies", content=bad.encode()), 422)
    problem = body["problems"][0]
    assert problem["location"] == "labels[1].colour"
    assert problem["line"] == bad.splitlines().index("    colour: red") + 1
    assert "allowed keys" in problem["message"]


def test_non_utf8_taxonomy_body(service):
    """Bytes that are not UTF-8 are refused with a message, not a 500."""
    with service.client() as client:
        body = _error(client.post("/v1/taxonomies", content=b"name: caf\xe9\n"), 422)
    assert "UTF-8" in body["message"]


def test_job_for_unknown_taxonomy(service):
    """404 naming the taxonomy and the known ones."""
    with service.client() as client:
        body = _error(client.post("/v1/jobs", json={"taxonomy": "nope", "documents": [{"text": "hi"}]}), 404)
    assert "unknown taxonomy 'nope'" in body["message"]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"taxonomy": "sms-spam", "documents": []}, "'documents' is empty"),
        ({"taxonomy": "sms-spam"}, "exactly one of 'documents'"),
        ({"taxonomy": "sms-spam", "documents": [{"id": 1}]}, "documents[0].text"),
        ({"taxonomy": "sms-spam", "documents": [{"text": "a", "lang": "en"}]}, "documents[0].lang"),
        ({"taxonomy": "sms-spam", "documents": [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]},
         "duplicate id 'x'"),
        ({"taxonomy": "sms-spam", "source": "../../etc/passwd.csv"}, "outside the input directory"),
        ({"taxonomy": "sms-spam", "source": "missing.jsonl"}, "no such file"),
        ({"taxonomy": "sms-spam", "source": "a\u0000b.csv"}, "source: contains a NUL byte"),
    ],
)
def test_bad_job_bodies(service, labelled_taxonomy, payload, fragment):
    """Each malformed job body is a 4xx naming the field."""
    with service.client() as client:
        response = client.post("/v1/jobs", json=payload)
    assert 400 <= response.status_code < 500, response.text
    assert fragment in response.json()["error"]["message"]


def test_lone_surrogate_text_is_refused(service, labelled_taxonomy):
    """JSON can smuggle a lone surrogate (not encodable as UTF-8); it is a 422, not a crash."""
    body = b'{"taxonomy": "sms-spam", "documents": [{"id": 1, "text": "bad \\ud800 text"}]}'
    with service.client() as client:
        error = _error(client.post("/v1/jobs", content=body, headers={"content-type": "application/json"}), 422)
    assert "documents[0].text" in error["message"] and "surrogate" in error["message"]


def test_invalid_utf8_job_body(service, labelled_taxonomy):
    """A body with raw invalid UTF-8 bytes is a 4xx."""
    body = b'{"taxonomy": "sms-spam", "documents": [{"id": 1, "text": "caf\xe9"}]}'
    with service.client() as client:
        response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500


def test_ten_megabyte_document(service, labelled_taxonomy):
    """A 10 MB document is over the per-document limit: 413 naming it and the setting."""
    with service.client() as client:
        body = _error(client.post("/v1/jobs", json={"taxonomy": "sms-spam",
                                                    "documents": [{"id": "big", "text": "a" * 10_000_000}]}), 413)
    assert "documents[0].text" in body["message"] and "ANNOTATE_MAX_DOCUMENT_CHARS" in body["message"]


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("DELETE FROM jobs", "DELETE statements are not allowed"),
        ("INSERT INTO jobs SELECT * FROM jobs", "INSERT statements are not allowed"),
        ("CREATE TABLE x AS SELECT 1", "CREATE statements are not allowed"),
        ("SELECT * FROM read_csv('/etc/passwd')", "not allowed"),
        ("COPY jobs TO '/tmp/out.csv'", "COPY statements are not allowed"),
        ("ATTACH '/tmp/other.duckdb' AS other", "ATTACH statements are not allowed"),
        ("SELECT 1; DROP TABLE jobs", "one statement at a time"),
    ],
)
def test_sql_that_writes_or_reads_files(service, query, fragment):
    """Writes and file access are refused with 400 saying why."""
    with service.client() as client:
        body = _error(client.post("/v1/sql", json={"sql": query}), 400)
    assert fragment in body["message"]


def test_sql_that_runs_forever_is_cut_off(service):
    """A runaway recursive query is interrupted at the (lowered) time limit; the service stays healthy."""
    forever = "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r"
    with service.client() as client:
        body = _error(client.post("/v1/sql", json={"sql": forever, "timeout_s": 1}), 408)
        assert "time limit" in body["message"]
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/sql", json={"sql": "SELECT 42 AS answer"}).json()["rows"] == [[42]]


def test_sql_row_cap_says_it_cut(service):
    """Rows past the cap are dropped and the answer says so."""
    with service.client() as client:
        body = client.post("/v1/sql", json={"sql": "SELECT * FROM range(100)", "max_rows": 7}).json()
    assert len(body["rows"]) == 7 and body["truncated"] is True


def test_unknown_job(service):
    """404 for a job id that does not exist."""
    with service.client() as client:
        assert _error(client.get("/v1/jobs/job_missing"), 404)["type"] == "NotFound"


def test_unknown_model_is_named_with_the_known_ones(service, labelled_taxonomy):
    """A job naming a model the models file lacks gets 422 listing the models there are."""
    with service.client() as client:
        body = _error(client.post("/v1/jobs", json={"taxonomy": "sms-spam", "model": "gpt-9",
                                                    "documents": [{"text": "hi"}]}), 422)
    assert "unknown model 'gpt-9'" in body["message"] and "smollm2" in body["message"]


def test_a_taxonomy_can_name_its_model(service):
    """A taxonomy with `model: fake` labels on the fake engine unless the job names another model."""
    yaml_text = GOOD_YAML.replace("name: sms-spam", "name: sms-spam-fake").replace("labels:", "model: fake\nlabels:", 1)
    with service.client() as client:
        assert client.post("/v1/taxonomies", content=yaml_text.encode()).status_code == 201
        by_taxonomy = client.post("/v1/jobs", json={"taxonomy": "sms-spam-fake", "documents": [{"text": "hi"}]})
        by_job = client.post("/v1/jobs", json={"taxonomy": "sms-spam-fake", "model": "slow-fake",
                                               "documents": [{"text": "hi"}]})
    assert by_taxonomy.status_code == 202 and by_taxonomy.json()["model"] == "fake"
    assert by_job.status_code == 202 and by_job.json()["model"] == "slow-fake"


def test_source_errors_name_the_source_as_given_and_nothing_outside(in_process, tmp_path):
    """No server path in any message; outside the input dir, a file that exists and one that does not (directly,
    by '..', absolute or through a link) get the same answer; inside it, the caller's own files are described."""
    inputs = in_process.settings.input_dir
    (tmp_path / "secret.csv").write_text("password,user\nhunter2,root\n")
    (inputs / "link.csv").symlink_to(tmp_path / "secret.csv")
    (inputs / "dangling.csv").symlink_to(tmp_path / "nothing.csv")
    (inputs / "sub").mkdir()
    (inputs / "sub" / "d.csv").write_text("body\nx\n")

    def refused(source: str) -> str:
        response = in_process.client.post("/v1/jobs", json={"taxonomy": "sms-spam", "source": source})
        message = _error(response, 422)["message"].replace(repr(source), "SOURCE")  # echoing the caller is fine
        assert str(tmp_path) not in message and "password" not in message, message
        return message

    outside = {refused(source) for source in ("../secret.csv", "../nothing.csv", str(tmp_path / "secret.csv"),
                                              str(tmp_path / "nothing.csv"), "link.csv", "dangling.csv",
                                              "sub/../../secret.csv", "sub/../d.csv")}
    assert len(outside) == 1 and next(iter(outside)).startswith("source SOURCE is outside the input directory")
    assert refused("sub/missing.csv") == "sub/missing.csv: no such file"
    assert refused("sub/d.csv") == "sub/d.csv: no 'text' column; columns are body"
    assert refused("a\x00b.csv").startswith("source: contains a NUL byte")


def test_a_page_past_any_job_is_a_422_naming_it(in_process):
    """A 30-digit ?page= on the job page is refused by name, not turned into a row offset."""
    created = in_process.client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": [{"text": "win a prize"}]})
    assert created.status_code == 202, created.text
    page = f"/console/jobs/{created.json()['job_id']}"
    assert in_process.client.get(page, params={"page": 2}).status_code == 200
    body = _error(in_process.client.get(page, params={"page": "1" + "0" * 29}), 422)
    assert body["message"].startswith("page:")


def test_an_induction_document_over_the_character_limit_is_413(in_process):
    """Inline induction documents obey ANNOTATE_MAX_DOCUMENT_CHARS as a job's do (they went whole to the embedder)."""
    huge = "a" * (in_process.settings.max_document_chars + 1)
    answer = in_process.client.post("/v1/taxonomies:induce", json={"name": "big", "documents": [huge, "b b b"],
                                                                   "sample_size": 2, "report_size": 1})
    assert answer.status_code == 413, answer.text
    message = answer.json()["error"]["message"]
    assert "documents[0]" in message and "ANNOTATE_MAX_DOCUMENT_CHARS" in message


def test_a_plain_text_prompt_on_a_server_model_is_refused_at_submission(in_process):
    """Only the embedded engine scores completion templates: another engine's job is a 422, not failed documents."""
    answer = in_process.client.post("/v1/jobs", json={"taxonomy": "sms-spam", "documents": [{"id": "a", "text": "hi"}],
                                                      "annotators": [{"kind": "llm", "prompt": "classify_fewshot"}]})
    assert answer.status_code == 422, answer.text
    assert "plain-text completion" in answer.json()["error"]["message"]
