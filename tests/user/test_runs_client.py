"""lora_kernel.user.runs_client: the one mapping of the runs service's answers (HTTP errors and
finished submissions) to typed errors, and the one list of final states."""
from __future__ import annotations

import pytest

from lora_kernel.common.errors import (
    ConfigError,
    LoraError,
    PolicyRefusal,
    RunFailed,
    UnsafeModelError,
)
from lora_kernel.user.runs_client import RunsClient, http_error, is_final, submission_error


def test_http_errors_map_once():
    url = "http://hub/services/lora-runs/api/runs"
    assert type(http_error(400, "bad", url, "POST")) is ConfigError
    assert type(http_error(403, "quota", url, "POST")) is PolicyRefusal
    assert "no runs service" in str(http_error(404, "nf", url, "POST"))
    # must work: a 404 of a GET (a submission that is not there) is no missing service
    gone = http_error(404, "nf", url + "/7", "GET")
    assert type(gone) is LoraError and "HTTP 404" in str(gone)


def test_a_finished_submission_maps_to_its_error():
    assert submission_error({"id": 1, "status": "succeeded"}) is None
    refused = submission_error({"id": 1, "status": "failed", "exit_code": 3, "error": "pickle"})
    assert type(refused) is UnsafeModelError and str(refused) == "pickle"
    recorded = submission_error({"id": 1, "status": "failed", "exit_code": 2, "error": "x",
                                 "record": {"run_id": "r"}})
    assert type(recorded) is RunFailed and "hub run #1 failed: x" in str(recorded)
    assert type(submission_error({"id": 2, "status": "cancelled"})) is RunFailed


def test_final_states_are_the_queues():
    from hub.runqueue import FINAL, STATUSES

    assert {s for s in STATUSES if is_final(s)} == set(FINAL)
    assert not is_final("queued") and not is_final("running")


def test_an_unreachable_hub_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot reach the hub"):
        RunsClient.for_hub("http://127.0.0.1:9", "t").list()
