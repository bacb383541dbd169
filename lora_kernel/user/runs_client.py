"""The one client of the hub's runs service (``lora-runs``): ``lora run --hub`` and the studio's
"Start" both use it, with one mapping of HTTP errors to typed errors and one list of final
states (:data:`lora_kernel.common.runspec.FINAL_STATUSES`, the queue's own).

Runs as the user (their terminal, their kernel) with their hub token; the service decides what
the token may do.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from lora_kernel.common.errors import (
    ConfigError,
    LoraError,
    PolicyRefusal,
    RunFailed,
    error_from_answer,
)
from lora_kernel.common.runspec import FINAL_STATUSES

SERVICE_PATH = "services/lora-runs/"
POLL_S = 2.0


def http_error(code: int, message: str, url: str, method: str) -> LoraError:
    """The typed error of the runs service's HTTP answer ``code`` (the one mapping)."""
    if code == 400:
        return ConfigError(f"the hub refused the run: {message}")
    if code in (401, 403):
        return PolicyRefusal(f"the hub refused: {message} (HTTP {code}); fix: a fresh token in "
                             "JUPYTERHUB_API_TOKEN (hub: Token page), or ask within your quota")
    if code == 404 and method == "POST" and url.endswith("/api/runs"):
        return ConfigError(f"no runs service at {url}; fix: --hub names the hub's URL "
                           "(e.g. https://hub.example.org)")
    return LoraError(f"the hub answered HTTP {code} for {url}: {message}")


def submission_error(sub: dict[str, Any]) -> LoraError | None:
    """The error a finished submission ends with (None: it succeeded): a run refused before
    anything ran (no record; exit code 2 or 3) is that refusal, any other end a
    :class:`RunFailed`."""
    if sub["status"] == "succeeded":
        return None
    message = str(sub.get("error") or sub["status"])
    if not sub.get("record") and sub.get("exit_code") in (2, 3):
        return error_from_answer({"exit_code": sub["exit_code"], "message": message})
    return RunFailed(f"hub run #{sub['id']} {sub['status']}: {message}")


class RunsClient:
    """The runs service at ``url`` (its root: ``<hub>/services/lora-runs/``) with ``token``."""

    def __init__(self, url: str, token: str, *, timeout: float = 60) -> None:
        self.url = url.rstrip("/") + "/"
        self.token = token
        self.timeout = timeout

    @classmethod
    def for_hub(cls, hub: str, token: str) -> RunsClient:
        """The runs service of the hub at ``hub`` (its public URL)."""
        return cls(hub.rstrip("/") + "/" + SERVICE_PATH, token)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request; a JSON answer decoded, any other returned as bytes; HTTP errors as
        :func:`http_error`, an unreachable hub as :class:`ConfigError`."""
        url = self.url + path
        req = urllib.request.Request(
            url, method=method, data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"token {self.token}",
                     "Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                data = resp.read()
                if resp.headers.get_content_type().endswith("json"):
                    return json.loads(data or b"{}")
                return data
        except urllib.error.HTTPError as exc:
            raise http_error(exc.code, _message(exc), url, method) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(f"cannot reach the hub at {url}: {getattr(exc, 'reason', exc)}; "
                              "fix: check --hub URL") from None

    def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Queue a run (``{"config": ..., "overrides": ...}`` or ``{"notebook": ...,
        "parameters": ...}``, with ``gpus`` / ``timeout``); its submission."""
        return dict(self.call("POST", "api/runs", request))

    def get(self, sub_id: int | str) -> dict[str, Any]:
        return dict(self.call("GET", f"api/runs/{sub_id}"))

    def cancel(self, sub_id: int | str) -> dict[str, Any]:
        return dict(self.call("POST", f"api/runs/{sub_id}/cancel", {}))

    def list(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "api/runs")["runs"])

    def samples(self, sub_id: int | str) -> bytes | None:
        """The sample grid of a finished run (None when it has none)."""
        try:
            data = self.call("GET", f"api/runs/{sub_id}/samples.png")
        except LoraError:
            return None
        return data if isinstance(data, bytes) else None

    def wait(self, sub_id: int | str, *, poll_s: float = POLL_S,
             on_cancel: Callable[[], None] = lambda: None) -> dict[str, Any]:
        """Poll until the submission is final; return it. Ctrl-C (or SIGTERM) asks the
        service to cancel the run and waits for its record (``on_cancel`` is told); a second
        one stops waiting."""
        cancelled = False
        while True:
            try:
                sub = self.get(sub_id)
                if is_final(sub["status"]):
                    return sub
                time.sleep(poll_s)
            except KeyboardInterrupt:
                if cancelled:
                    raise
                cancelled = True
                on_cancel()
                self.cancel(sub_id)


def is_final(status: str) -> bool:
    """Whether a submission in ``status`` has ended."""
    return status in FINAL_STATUSES


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        message = json.loads(exc.read()).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or exc.reason)
