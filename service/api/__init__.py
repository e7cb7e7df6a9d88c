"""The HTTP API: one router per resource, each route declaring its scope; request and answer models."""
