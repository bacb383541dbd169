"""lora_kernel.common.runspec: the pin answer and the run description, typed once at the trust
boundary; lora_kernel.common.errors.error_from_answer: the one answer → error mapping."""
from __future__ import annotations

import pytest

from lora_kernel.common.errors import (
    ConfigError,
    LoraError,
    NoMatch,
    RunFailed,
    UnsafeModelError,
    error_from_answer,
)
from lora_kernel.common.runspec import (
    PinnedInputs,
    ResumePoint,
    RunActor,
    RunDescription,
    RunUser,
    pinned_parameters,
)

SHA = "a" * 64
NOTEBOOK = {"kind": "notebook", "notebook": "/h/x.ipynb", "notebook_sha256": SHA,
            "declared": ["x", "result_path"]}
TRAINING = {**NOTEBOOK, "kind": "training", "declared": ["config_path", "overrides"],
            "config": {"base_model": "/m"}, "overrides": {"output_dir": "/w/output"},
            "config_path": "/h/c.yaml", "config_sha256": "b" * 64, "task": "image",
            "seed": 7, "dataset_digests": {"a.png": "c" * 64}, "dataset_version": "v1",
            "base_model_sha256": "d" * 64, "dataset_warnings": []}


def test_a_pin_answer_is_typed_once_and_round_trips():
    pinned = PinnedInputs.from_untrusted({**TRAINING, "notebook_source": "{}",
                                          "base_model_stat_key": "k"})
    assert pinned.training and pinned.seed == 7 and pinned.declared == ("config_path",
                                                                         "overrides")
    assert pinned.to_dict() == TRAINING  # the helper keys are left out
    assert PinnedInputs.from_untrusted(NOTEBOOK).to_dict() == NOTEBOOK
    resumed = PinnedInputs.from_untrusted({**TRAINING, "resume": {
        "run_id": "r", "checkpoint": "/w/c", "step": 3, "sha256": SHA}})
    assert resumed.resume == ResumePoint("r", "/w/c", 3, SHA)
    assert PinnedInputs.from_untrusted(resumed.to_dict(), resume=False).resume is None


@pytest.mark.parametrize("change, field", [
    ({"notebook_sha256": "x"}, "notebook_sha256"),
    ({"kind": "other"}, "kind"),
    ({"declared": "x"}, "declared"),
    ({"seed": "7"}, "seed"),
    ({"seed": True}, "seed"),
    ({"dataset_digests": {"a": 1}}, "dataset_digests"),
    ({"base_model_sha256": "nope"}, "base_model_sha256"),
    ({"config": None}, "config"),
    ({"config_sha256": None}, "config_sha256"),
    ({"resume": {"run_id": "r"}}, "resume"),
])
def test_a_malformed_pin_answer_names_the_field(change, field):
    with pytest.raises(LoraError, match=field):
        PinnedInputs.from_untrusted({**TRAINING, **change}, where="pinned.json")
    with pytest.raises(LoraError, match="not a JSON object"):
        PinnedInputs.from_untrusted(["x"])


def test_pinned_parameters_for_typed_and_plain_answers(tmp_path):
    params = {"config_path": "mine.yaml", "overrides": {}, "x": 1}
    typed = pinned_parameters(params, PinnedInputs.from_untrusted(TRAINING), tmp_path)
    assert typed == {"config_path": "/h/c.yaml", "overrides": {"output_dir": "/w/output"},
                     "x": 1}
    assert pinned_parameters({"x": 1}, NOTEBOOK, tmp_path) == {
        "x": 1, "result_path": str(tmp_path / "run_result.json")}
    assert params["config_path"] == "mine.yaml"  # the caller's dict is not changed


def _description(pinned):
    return RunDescription(run_id="r1", notebook="/h/x.ipynb", parameters={"x": 1}, home="/h",
                          work="/h/work/r1", started="2026-01-01T00:00:00Z",
                          actor=RunActor("alice", 1000, "local"), run_as=RunUser(None, None),
                          pinned=pinned)


def test_a_run_description_round_trips_and_reads_the_older_unpinned_form():
    run = _description(PinnedInputs.from_untrusted(TRAINING))
    run.staging = "/s/r1.x"
    assert RunDescription.from_untrusted(run.to_dict()) == run
    unpinned = _description(None)
    unpinned.backend, unpinned.evidence = "kubernetes", "/out/evidence.tar"
    doc = unpinned.to_dict()
    assert doc["pinned"] == {"kind": None, "notebook_sha256": ""}  # as written before
    assert RunDescription.from_untrusted(doc) == unpinned
    for key, value in (("run_id", None), ("actor", {"name": "a"}), ("run_as", []),
                       ("pinned", None), ("extra", "x")):
        with pytest.raises(LoraError, match=key):
            RunDescription.from_untrusted({**run.to_dict(), key: value})


def test_error_from_answer_is_the_one_mapping():
    assert type(error_from_answer({"type": "ConfigError", "exit_code": 2,
                                   "message": "m"})) is ConfigError
    assert type(error_from_answer({"exit_code": 3, "message": "m"})) is UnsafeModelError
    assert type(error_from_answer({"type": "NoMatch", "exit_code": 3})) is NoMatch
    assert type(error_from_answer({"type": "RunFailed", "exit_code": 7})) is RunFailed
    # must be refused: a name that does not match its code, junk, an unknown code
    assert type(error_from_answer({"type": "ConfigError", "exit_code": 7})) is RunFailed
    assert type(error_from_answer("junk")) is LoraError
    assert type(error_from_answer({"exit_code": 99, "message": "m"})) is LoraError
    err = error_from_answer({"exit_code": 2, "message": "x" * 50}, prefix="p: ", limit=10)
    assert str(err) == "p: " + "x" * 10


def test_runspec_is_plain_json():
    import json

    run = _description(PinnedInputs.from_untrusted(TRAINING))
    assert json.loads(json.dumps(run.to_dict())) == run.to_dict()
