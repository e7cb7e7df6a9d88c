"""Ray Serve LLM's OpenAI ingress behind a bearer token, for the GPU deployment (deploy/serve-gpu.yaml).

Ray Serve runs one HTTP proxy per node for every application, so the ``llm`` app's routes
(``/llm/v1/...``) listen on the same public port as the annotation API, and Ray Serve LLM
checks no credentials. Ray 2.60's ``LLMServingArgs.ingress_cls_config`` names the ingress
class; ``TokenCheckedIngress`` is Ray's ``OpenAiIngress`` with every endpoint answering 401
unless the request carries ``Authorization: Bearer <token>``, the token being the
environment variable ``ANNOTATE_LLM_TOKEN`` of the replica's node (a Kubernetes secret in
deploy/kuberay/rayservice.yaml; exported before ``ray start`` elsewhere). A replica without
a token of at least ``MIN_TOKEN_CHARS`` characters refuses to start: the route is never
open by omission. The annotation service sends the token (``api_key_env`` of
``cluster-qwen`` in deploy/models.yaml).

The class is built only where Ray Serve LLM imports (it needs vLLM: the GPU image); the
CPU set-up never imports this module's Ray LLM part.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import os

from fastapi import HTTPException, Request

TOKEN_ENV = "ANNOTATE_LLM_TOKEN"
MIN_TOKEN_CHARS = 32
REQUEST_PARAMETER = "annotate_token_request"  # added to endpoints that take no Request of their own


def authorized(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` as a bearer token (compared in constant time)."""
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def configured_token() -> str:
    """The token from the environment; a missing or short one stops the replica from starting."""
    token = os.environ.get(TOKEN_ENV, "")
    if len(token) < MIN_TOKEN_CHARS:
        raise RuntimeError(f"{TOKEN_ENV} must hold a secret of at least {MIN_TOKEN_CHARS} characters on every node "
                           "that runs the LLM ingress (e.g. `openssl rand -hex 32`); the model route stays closed")
    return token


def guarded(cls: type, endpoints) -> type:
    """A subclass of ``cls`` whose endpoint methods (names in ``endpoints``) first check the bearer token."""

    def init(self, *args, **kwargs):
        self._annotate_token = configured_token()
        cls.__init__(self, *args, **kwargs)

    namespace = {name: _checked(getattr(cls, name)) for name in endpoints}
    namespace["__init__"] = init
    return type(f"TokenChecked{cls.__name__}", (cls,), namespace)


def _checked(method):
    """``method`` behind the token check, its signature given a ``Request`` parameter if it had none."""
    signature = inspect.signature(method)
    own = next((name for name, p in signature.parameters.items() if p.annotation in (Request, "Request")), None)

    @functools.wraps(method)
    async def endpoint(self, *args, **kwargs):
        request = kwargs[own] if own else kwargs.pop(REQUEST_PARAMETER)
        if not authorized(request.headers.get("authorization"), self._annotate_token):
            raise HTTPException(status_code=401, detail=f"the model route needs the cluster's {TOKEN_ENV} "
                                                        "as a bearer token", headers={"WWW-Authenticate": "Bearer"})
        return await method(self, *args, **kwargs)

    if not own:
        extra = inspect.Parameter(REQUEST_PARAMETER, inspect.Parameter.KEYWORD_ONLY, annotation=Request)
        endpoint.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
    return endpoint


try:
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, OpenAiIngress
except ImportError:  # no vLLM: a CPU machine, which never deploys the llm app
    TokenCheckedIngress = None
else:
    TokenCheckedIngress = guarded(OpenAiIngress, DEFAULT_ENDPOINTS)
