"""Base-model licences from ``policies/models.yaml``: matching by name, the groups a licence
allows, the refusal (exit 6) and its pair that must work, a malformed entry named."""
from __future__ import annotations

import pytest
import yaml

from lora_kernel.common.errors import ConfigError, PolicyRefusal
from lora_kernel.common.licences import allowed_groups, check_licence, model_licence


@pytest.fixture
def policy(tmp_path, monkeypatch):
    def write(data: dict):
        (tmp_path / "models.yaml").write_text(yaml.safe_dump(data))
        monkeypatch.setenv("LORA_POLICIES", str(tmp_path))
    return write


def test_the_licence_comes_from_the_first_matching_entry(policy):
    policy({"models": [{"match": "FLUX.1-dev*", "licence": "flux-nc"},
                       {"match": "*flux*", "licence": "other"}]})
    assert model_licence("/store/models/FLUX.1-dev") == "flux-nc"
    assert model_licence("/store/FLUX.1-dev-fp8.safetensors") == "flux-nc"
    assert model_licence("/store/tiny-flux") == "other"
    assert model_licence("/store/tiny-sd") is None


def test_a_licence_limited_to_groups_refuses_others_and_admits_members(policy):
    policy({"models": [{"match": "FLUX.1-dev", "licence": "flux-nc"}],
            "licences": {"flux-nc": {"allowed_groups": ["research"]}, "open": {}}})
    assert allowed_groups("flux-nc") == ["research"] and allowed_groups("open") is None
    with pytest.raises(PolicyRefusal, match="flux-nc") as info:
        check_licence("/m/FLUX.1-dev", "carol", ["users"])
    assert "research" in str(info.value) and "carol" in str(info.value)
    assert check_licence("/m/FLUX.1-dev", "alice", ["users", "research"]) == "flux-nc"
    assert check_licence("/m/tiny-sd", "carol", ["users"]) is None  # no licence named


def test_a_malformed_entry_names_the_policy_file(policy):
    policy({"models": [{"match": "FLUX*"}]})
    with pytest.raises(ConfigError, match="models.yaml") as info:
        model_licence("/m/FLUX.1-dev")
    assert info.value.key == "models"


def test_the_shipped_policy_marks_flux_dev_non_commercial(monkeypatch):
    monkeypatch.delenv("LORA_POLICIES", raising=False)
    assert model_licence("/shared/models/FLUX.1-dev") == "flux-1-dev-non-commercial"
    assert model_licence("/shared/models/FLUX.1-schnell") == "apache-2.0"
