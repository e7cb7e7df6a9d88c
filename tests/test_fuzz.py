"""Schemathesis against the published OpenAPI schema of the real service: no 5xx, and answers match the schema.

Every operation of ``/openapi.json`` gets generated requests (valid and invalid bodies,
parameters and paths, 15 per operation, seeded), with the operator's token. Checked on each
answer: no server error, a body that matches the schema the operation declares for that
status, and the declared content type. Operations that could start real work (induction,
jobs, training) are fuzzed too: generated bodies name taxonomies, jobs and models that do
not exist, so they are refused before any work starts.

(Schemathesis' own pytest plugin does not run under pytest 9, so the operations are looped
here, each under its own Hypothesis run.)
"""

from __future__ import annotations

import schemathesis
from conftest import OPERATOR_TOKEN
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

EXAMPLES = 15
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


def test_every_operation_holds_its_schema(service):
    """Each operation, many generated requests: never a 5xx, always the declared shape."""
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    failures, operations, calls = [], 0, []
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def holds(case):
            calls.append(case.call_and_validate(base_url=service.url, headers=headers, checks=CHECKS, timeout=60))

        try:
            holds()
        except Exception as exc:  # noqa: BLE001 (collected: every operation is reported, not just the first)
            failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:600]}")
    assert operations >= 30 and len(calls) >= 10 * operations
    assert not failures, "\n\n".join(failures)
