"""The `annotate` command: a client of the HTTP API, plus local commands that need no service."""
