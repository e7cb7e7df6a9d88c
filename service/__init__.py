"""annotate: an LLM-driven annotation service (taxonomies in YAML, labelling jobs over HTTP, results in DuckDB)."""

__version__ = "0.1.0"
