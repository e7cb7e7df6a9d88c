"""annotate: an LLM-driven annotation service (taxonomies in YAML, labelling jobs over HTTP, results in DuckDB).

The sub-packages are the architecture, bottom layer first; each imports only from its own
package and the layers below (docs/architecture.md has the map and how a job flows):

- ``errors``, ``settings``, ``logs``, ``vocabulary``, ``files``: the foundation
- ``taxonomy``, ``documents``: what is labelled, and with which labels
- ``engines``: the models (embedded transformers, OpenAI-compatible servers, the embedder)
- ``labelling``: from a document to an annotation; aggregation of several annotators
- ``store``: the DuckDB file, one repository per aggregate
- ``quality``, ``induction``, ``distill``: gold and statistics, taxonomies from a corpus, students
- ``work``: background work (jobs, batch shards, inductions, trainings) and the job policy
- ``api``, ``console``: the HTTP API (a router per resource) and the web console
- ``serve``: the FastAPI app and the Ray Serve deployments
- ``cli``: the ``annotate`` command
"""

__version__ = "0.1.0"
