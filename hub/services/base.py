"""What both hub services share: HubOAuth handlers, identity from the token, JSON and errors,
strict security headers, and starting the tornado app where the hub says.

A service is started by the hub with ``JUPYTERHUB_API_TOKEN``, ``JUPYTERHUB_SERVICE_URL`` and
``JUPYTERHUB_SERVICE_PREFIX`` in its environment. Requests reach it through the proxy at
``/services/<name>/``; a browser is sent through the hub's OAuth, an API client sends
``Authorization: token <its hub token>``. Either way the user is what the hub says the token
belongs to (:meth:`ServiceHandler.actor`).

Runs as: the service's account (the service account; the runs service starts as root and drops
to it, taking root back only to start a run as its user).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import url_path_join
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

from lora_kernel.common.errors import (
    ConfigError,
    LoraError,
    NoMatch,
    PolicyRefusal,
    UnsafeModelError,
    VerificationError,
)
from lora_kernel.trusted.identity import Actor

from ..identity import hub_actor

log = logging.getLogger("lora.hub")

# No scripts, no external anything: pages are server-rendered HTML, images are inline data.
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


@dataclass
class ServiceConfig:
    """What a service knows besides the hub's environment."""

    name: str
    state: Path                     # the trusted state directory (records, ledger, queue)
    demo: bool = False              # hub-only users allowed (make hub without root)
    service_user: str | None = None  # drop to this account for writes (root mode)


def status_for(exc: LoraError) -> int:
    """The HTTP status of a typed platform error."""
    if isinstance(exc, NoMatch):
        return 404
    if isinstance(exc, ConfigError):
        return 400
    if isinstance(exc, (PolicyRefusal, UnsafeModelError)):
        return 403
    if isinstance(exc, VerificationError):
        return 409
    return 500


class ServiceHandler(HubOAuthenticated, web.RequestHandler):
    """Base handler: authenticated by the hub; JSON under ``api/``, HTML elsewhere."""

    @property
    def lora(self) -> ServiceConfig:
        config: ServiceConfig = self.settings["lora"]
        return config

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Cache-Control", "no-store")

    def actor(self) -> Actor:
        """The authenticated user as an :class:`Actor` (from the hub's token)."""
        model = self.current_user
        if not model:
            raise web.HTTPError(401, "not authenticated")
        try:
            return hub_actor(model, demo=self.lora.demo)
        except PolicyRefusal as exc:
            raise web.HTTPError(403, str(exc)) from None

    def check_xsrf_cookie(self) -> None:
        """Browser (cookie) posts need the xsrf token; token-authenticated API posts do not.

        Tornado checks xsrf *before* the user is known, while the hub's check skips only
        requests already marked token-authenticated; so when an ``Authorization`` header is
        present, identify the user first (which marks the request), then check."""
        if self.request.headers.get("Authorization"):
            _ = self.current_user
        super().check_xsrf_cookie()

    def scopes(self) -> set[str]:
        model = self.current_user or {}
        return set(model.get("scopes") or ())

    def require_scope(self, scope: str) -> None:
        if scope not in self.scopes():
            raise web.HTTPError(403, f"this needs the hub scope {scope}; ask an admin for the "
                                     "role that grants it")

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError as exc:
            raise web.HTTPError(400, f"the request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the request body must be a JSON object")
        return body

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(obj, default=str))

    def is_api(self) -> bool:
        return "/api/" in self.request.path

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = self._reason
        exc_info = kwargs.get("exc_info")
        if exc_info and isinstance(exc_info[1], web.HTTPError) and exc_info[1].log_message:
            message = exc_info[1].log_message % exc_info[1].args if exc_info[1].args else \
                exc_info[1].log_message
        if self.is_api():
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps({"status": status_code, "message": message}))
        else:
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.finish(error_page(status_code, str(message), self.settings["service_prefix"]))

    def fail(self, exc: LoraError) -> None:
        """Answer a platform error with its status and message."""
        raise web.HTTPError(status_for(exc), "%s", str(exc))


ERROR_STYLE = ("body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;"
               "background:#f6f7f9}header{background:#1d2330;color:#fff;padding:.6em 1.2em}"
               "header a{color:#cfe0ff;margin-right:1em}main{padding:1em 1.2em;max-width:"
               "900px}.bad{color:#a4161a;font-weight:600}.box{background:#fff;border:1px "
               "solid #d6d9de;padding:.8em;margin:.8em 0}")
_WHY = {401: "You are not signed in to the hub.",
        403: "Your hub account may not do this.",
        404: "There is nothing here.",
        400: "The request was not understood."}


def error_page(status: int, message: str, service_prefix: str) -> str:
    """A service's error page: the status, what it means and the platform's message, with the
    same header as its pages and ways back (the service's start page, the hub's home), not a
    bare status line."""
    from html import escape

    why = _WHY.get(status, "The service could not do this.")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{status} — "
            f"LoRA Enclave</title><style>{ERROR_STYLE}</style></head><body><header>"
            f"<a href=\"{escape(service_prefix)}\">Back to this service</a>"
            f"<a href=\"/hub/home\">Hub home</a></header><main><h1>{status}: "
            f"{escape(why)}</h1><div class=box><p class=bad>{escape(message)}</p></div>"
            f"<p><a href=\"{escape(service_prefix)}\">Back to this service</a> · "
            f"<a href=\"/hub/home\">Hub home</a></p></main></body></html>")


def make_app(config: ServiceConfig, handlers: Sequence[tuple[str, type, dict[str, Any]] |
                                                       tuple[str, type]]) -> web.Application:
    """The service's tornado app: ``handlers`` are paths relative to the service prefix."""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", f"/services/{config.name}/")
    routes: list[Any] = [(url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler)]
    for spec in handlers:
        path, cls, *rest = spec
        routes.append((url_path_join(prefix, path), cls, *(rest or [])))
    hub_auth = HubOAuth(api_token=os.environ.get("JUPYTERHUB_API_TOKEN", ""),
                        cache_max_age=60)
    return web.Application(routes, lora=config, hub_auth=hub_auth,
                           cookie_secret=secrets.token_bytes(32), xsrf_cookies=True,
                           service_prefix=prefix)


def listen(app: web.Application) -> HTTPServer:
    """Listen where the hub says (``$JUPYTERHUB_SERVICE_URL``, loopback by default)."""
    url = urlsplit(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:10101"))
    server = HTTPServer(app, xheaders=True)
    server.listen(url.port or 80, url.hostname or "127.0.0.1")
    log.info("listening on %s", url.geturl())
    return server


def run_forever(on_stop: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT (the hub stopping its services, or Ctrl-C of ``make
    hub``), then call ``on_stop`` and return: a service ends quietly, not with a
    KeyboardInterrupt traceback."""
    loop = IOLoop.current()

    def shutdown() -> None:
        log.info("stopping (signal)")
        if on_stop is not None:
            on_stop()
        loop.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.asyncio_loop.add_signal_handler(sig, shutdown)  # type: ignore[attr-defined]
    loop.start()
