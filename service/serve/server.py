"""Starting and stopping the service: a private local Ray instance running the Serve app.

``serve_forever`` starts Ray with the dashboard off and logs quiet, deploys the
application, waits until ``/healthz`` answers (saying why when it does not), then blocks
until SIGTERM or Ctrl-C and shuts Serve and Ray down so no Ray process outlives it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import httpx

from service.errors import AnnotateError
from service.settings import Settings

STARTUP_TIMEOUT_S = 600


def serve_forever(settings: Settings, *, on_ready=print) -> None:
    """Run the service in the foreground until SIGTERM/SIGINT."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")  # a busy CPU must not fail the proxy
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    import ray
    from ray import serve

    from service.serve.app import build

    for name, value in settings.model_dump(mode="json").items():
        if value is not None:  # an unset setting stays unset (not the text "None")
            os.environ[f"ANNOTATE_{name.upper()}"] = str(value)
    stop = threading.Event()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # quiet by default; our own logs are JSON
    ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=settings.log_level.upper() == "DEBUG",
             configure_logging=True, num_cpus=os.cpu_count())
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own handlers
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config={"log_level": "WARNING"})
        serve.run(build(settings.model_dump(mode="json")), name="annotate", route_prefix="/", blocking=False)
        _wait_healthy(settings, stop)
        on_ready(f"annotate is serving on http://{settings.host}:{settings.port} (data in {settings.data_dir})")
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _wait_healthy(settings: Settings, stop: threading.Event) -> None:
    """Poll /healthz until the app answers; explain a start-up failure instead of hanging."""
    from ray import serve

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}/healthz"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline and not stop.is_set():
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
            last = "healthz answered non-200"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        status = serve.status().applications.get("annotate")
        if status is not None and status.status == "DEPLOY_FAILED":
            raise AnnotateError(f"the Serve application failed to deploy: {status.message}")
        time.sleep(1)
    if not stop.is_set():
        raise AnnotateError(f"service did not become healthy at {url} within {STARTUP_TIMEOUT_S} s ({last}); "
                            "on a saturated CPU the Serve proxy can miss its readiness check: retry when idle")
