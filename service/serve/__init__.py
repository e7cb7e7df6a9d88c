"""Serving: the Ray Serve deployments, the FastAPI application they host, and `annotate serve`."""
