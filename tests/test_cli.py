"""CLI commands that need no running service: validate, settings, and SQL on the file itself."""

from __future__ import annotations

import subprocess

from conftest import ANNOTATE, REPO

from service.store import Store


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `annotate` and capture its output."""
    return subprocess.run([str(ANNOTATE), *args], capture_output=True, text=True, timeout=120, env=env)


def test_validate_ok_and_error_with_line(tmp_path):
    """A good file prints its version; a bad one exits 1 with FILE:LINE: FIELD: MESSAGE."""
    good = _run("taxonomy", "validate", str(REPO / "taxonomy" / "news-topics.yaml"))
    assert good.returncode == 0 and "news-topics" in good.stdout and "advice" not in good.stdout
    terse = _run("taxonomy", "validate", str(REPO / "benchmarks" / "taxonomies" / "terse" / "sms-spam.yaml"))
    printed = " ".join(terse.stdout.split())  # the console wraps long lines
    assert terse.returncode == 0 and "advice: 2 of 2 labels have fewer than 2 examples (ham, spam)" in printed
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text((REPO / "taxonomy" / "sms-spam.yaml").read_text().replace("- name: spam", "- name: ham"))
    bad = _run("taxonomy", "validate", str(bad_file))
    assert bad.returncode == 1
    assert "bad.yaml:" in bad.stderr and "duplicate label 'ham'" in bad.stderr


def test_settings_table_lists_every_setting():
    """`annotate settings` prints a Markdown row per setting (docs/configuration.md carries it: test_docs.py)."""
    from service.settings import Settings

    table = _run("settings").stdout
    for name in Settings.model_fields:
        assert f"`ANNOTATE_{name.upper()}`" in table


def test_sql_without_a_service_reads_the_file(tmp_path):
    """With no service at the URL, `annotate sql` opens the data dir's DuckDB file through the sandbox."""
    Store(tmp_path / "annotate.duckdb", export_dir=tmp_path / "exports").close()
    env = {"ANNOTATE_DATA_DIR": str(tmp_path), "ANNOTATE_URL": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    answer = _run("sql", "--json", "SELECT count(*) AS n FROM jobs", env=env)
    assert answer.returncode == 0, answer.stderr
    assert '"rows": [[0]]' in answer.stdout
    refused = _run("sql", "DROP TABLE jobs", env=env)
    assert refused.returncode == 1 and "DROP statements are not allowed" in refused.stderr
