"""hub.k8s_backend: the Job manifests a submission becomes on Kubernetes.

No cluster here: the manifests are rendered, serialized as the API server would receive them
(``ApiClient().sanitize_for_serialization``) and read back into the client's models
(``ApiClient().deserialize``), whose client-side validation rejects missing required fields and
bad enum values; then the security context, GPU limits, volumes and labels are asserted.
"""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from hub import k8s_backend as kb
from hub.runqueue import Submission
from lora_kernel.common.errors import ConfigError

kubernetes = pytest.importorskip("kubernetes", reason="pip install 'lora-enclave[k8s]'")
from kubernetes import client  # noqa: E402

UIDS = {"alice": (1501, 1501), "erin": (1502, 1600)}


def settings(**kw):
    return kb.K8sSettings(uids=dict(UIDS), **kw)


def sub(**kw) -> Submission:
    base = dict(id=42, user="alice", kind="notebook", path="/home/alice/lora/nb/train.ipynb",
                parameters={"steps": 3}, home="/home/alice/lora", gpus=1, status="running",
                submitted=time.time(), timeout=1800.5)
    base.update(kw)
    return Submission(**base)


def round_trip(obj, kind: str):
    """Serialize like the API call does, validate by reading it back into the models."""
    api = client.ApiClient()
    data = api.sanitize_for_serialization(obj)
    text = json.dumps(data)
    try:
        back = api.deserialize(text, kind, "application/json")
    except TypeError:  # older clients: deserialize(response, type)
        back = api.deserialize(SimpleNamespace(data=text), kind)
    assert api.sanitize_for_serialization(back) == data
    return data, back


def test_job_round_trips_and_is_locked_down():
    job = kb.job_manifest(sub(), settings())
    data, back = round_trip(job, "V1Job")
    assert isinstance(back, client.V1Job)
    assert data["apiVersion"] == "batch/v1" and data["kind"] == "Job"
    assert data["metadata"]["name"] == "lora-run-42"
    spec = data["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 1801
    assert spec["ttlSecondsAfterFinished"] == 3600
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsUser"] == 1501
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroup"] == 1501
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["runAsUser"] == 1501 and sc["runAsGroup"] == 1501
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["image"] == kb.K8sSettings().image


def test_gpu_limits_and_tolerations():
    data, _ = round_trip(kb.job_manifest(sub(user="erin", gpus=2,
                                             path="/home/alice/lora/x.ipynb"), settings()),
                         "V1Job")
    pod = data["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["securityContext"]["runAsGroup"] == 1600
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert "NVIDIA_VISIBLE_DEVICES" not in env


def test_no_gpu_means_no_device():
    data, _ = round_trip(kb.job_manifest(sub(gpus=0), settings()), "V1Job")
    (c,) = data["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in (c["resources"].get("limits") or {})
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert not any(k.lower().endswith("_proxy") for k in env)
    assert "LORA_STATE" not in env and not any(k.startswith("JUPYTERHUB_") for k in env)


def test_volumes_home_and_output():
    data, _ = round_trip(kb.job_manifest(sub(), settings()), "V1Job")
    pod = data["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["home"]["persistentVolumeClaim"]["claimName"] == "claim-alice"
    assert vols["output"]["persistentVolumeClaim"]["claimName"] == "lora-run-42"
    assert "emptyDir" in vols["tmp"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts == {"home": "/home/jovyan", "output": "/lora-run", "tmp": "/tmp"}

    data, _ = round_trip(kb.job_manifest(sub(), settings(output_volume="emptyDir")), "V1Job")
    vols = {v["name"]: v for v in data["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in vols["output"]
    with pytest.raises(ConfigError):
        kb.job_manifest(sub(), settings(output_volume="hostPath"))


def test_output_claim_round_trips():
    data, back = round_trip(kb.output_claim_manifest(sub(), settings()),
                            "V1PersistentVolumeClaim")
    assert data["metadata"]["name"] == "lora-run-42"
    assert data["spec"]["resources"]["requests"]["storage"] == "50Gi"


def test_labels_select_the_singleuser_network_policy():
    data, _ = round_trip(kb.job_manifest(sub(run_id="20261125T201500Z-ab12cd"), settings()),
                         "V1Job")
    for labels in (data["metadata"]["labels"],
                   data["spec"]["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/part-of"] == "lora-enclave"
        assert labels["lora-enclave/run-id"] == "20261125T201500Z-ab12cd"
        assert labels["lora-enclave/submission"] == "42"
        # zero-to-jupyterhub's singleuser NetworkPolicy podSelector
        assert labels["component"] == "singleuser-server"
        assert labels["app"] == "jupyterhub" and labels["release"] == "lora-enclave"
    data, _ = round_trip(kb.job_manifest(sub(run_id=None), settings()), "V1Job")
    assert data["metadata"]["labels"]["lora-enclave/run-id"] == "sub-42"


def test_papermill_command_notebook_and_config():
    data, _ = round_trip(kb.job_manifest(sub(), settings()), "V1Job")
    (c,) = data["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[1:3] == ["-m", "papermill"]
    assert args[3] == "/home/jovyan/lora/nb/train.ipynb"
    assert args[4] == "/lora-run/executed.ipynb"
    assert args[args.index("--kernel") + 1] == "lora"
    assert json.loads(args[args.index("-y") + 1]) == {"steps": 3}

    cfg = sub(kind="config", path="/home/alice/lora/my.yaml",
              parameters={"overrides": {"max_train_steps": 2}})
    data, _ = round_trip(kb.job_manifest(cfg, settings(), task="text"), "V1Job")
    args = data["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[3] == "/opt/lora-enclave/notebooks/train_text_lora.ipynb"
    assert json.loads(args[args.index("-y") + 1]) == {
        "config_path": "/home/jovyan/lora/my.yaml", "overrides": {"max_train_steps": 2}}
    with pytest.raises(ConfigError):
        kb.job_manifest(cfg, settings(), task="audio")


def test_refuses_paths_outside_home_root_and_unknown_users():
    with pytest.raises(ConfigError, match="outside"):
        kb.job_manifest(sub(path="/etc/passwd"), settings())
    with pytest.raises(ConfigError, match="outside"):
        kb.job_manifest(sub(path="/home/alice/lora/../../bob/x.ipynb"), settings())
    with pytest.raises(ConfigError, match="root"):
        kb.job_manifest(sub(user="root"), kb.K8sSettings(uids={"root": (0, 0)}))
    with pytest.raises(ConfigError, match="root"):
        kb.job_manifest(sub(user="demo-x"), kb.K8sSettings(uids={"demo-x": (-5, -5)}))
    with pytest.raises(ConfigError, match="passwd"):
        kb.job_manifest(sub(user="no-such-user-lora-xyz"), kb.K8sSettings())


def test_passwd_lookup(monkeypatch):
    import pwd

    entry = SimpleNamespace(pw_uid=2001, pw_gid=2002)
    monkeypatch.setattr(pwd, "getpwnam", lambda name: entry)
    assert kb.user_ids("someone") == (2001, 2002)


def test_no_timeout_uses_default_deadline():
    data, _ = round_trip(kb.job_manifest(sub(timeout=None), settings(default_deadline_s=99)),
                         "V1Job")
    assert data["spec"]["activeDeadlineSeconds"] == 99


class FakeBatch:
    def __init__(self, job=None, error=None):
        self.created, self.job, self.error = [], job, error

    def create_namespaced_job(self, namespace, body):
        self.created.append((namespace, body))
        return body

    def read_namespaced_job_status(self, name, namespace):
        if self.error:
            raise self.error
        return self.job


class FakeCore:
    def __init__(self):
        self.created = []

    def create_namespaced_persistent_volume_claim(self, namespace, body):
        self.created.append((namespace, body))


def test_submit_creates_claim_then_job():
    s = sub()
    job, claim = kb.job_manifest(s, settings()), kb.output_claim_manifest(s, settings())
    batch, core = FakeBatch(), FakeCore()
    assert kb.submit(batch, job, core=core, claim=claim) is job
    assert core.created == [("lora-enclave", claim)]
    assert batch.created == [("lora-enclave", job)]
    with pytest.raises(ConfigError):
        kb.submit(batch, job, claim=claim)


def _job_with(**status):
    conds = [client.V1JobCondition(type=t, status="True", reason=r)
             for t, r in status.pop("conditions", [])]
    return client.V1Job(status=client.V1JobStatus(conditions=conds or None, **status))


@pytest.mark.parametrize("job,state", [
    (_job_with(), "pending"),
    (_job_with(active=1), "running"),
    (_job_with(succeeded=1, conditions=[("Complete", None)]), "succeeded"),
    (_job_with(failed=1, conditions=[("Failed", "BackoffLimitExceeded")]), "failed"),
    (_job_with(failed=1, conditions=[("Failed", "DeadlineExceeded")]), "timeout"),
])
def test_status(job, state):
    assert kb.status(FakeBatch(job), "lora-run-42")["state"] == state


def test_status_missing():
    err = client.exceptions.ApiException(status=404)
    assert kb.status(FakeBatch(error=err), "lora-run-1")["state"] == "missing"
    with pytest.raises(client.exceptions.ApiException):
        kb.status(FakeBatch(error=client.exceptions.ApiException(status=500)), "x")


def test_label_value():
    assert kb.label_value("a b/c") == "a-b-c"
    assert len(kb.label_value("x" * 100)) == 63
    assert kb.label_value("---") == "none"


def test_constants_match_the_runner_and_the_image():
    from pathlib import Path

    from lora_kernel.trusted import runner

    assert kb.NOTEBOOKS == runner.NOTEBOOKS and kb.KERNEL_NAME == runner.KERNEL_NAME
    repo = Path(__file__).resolve().parents[2]
    defaults = kb.K8sSettings()
    assert defaults.notebooks_dir == "/opt/lora-enclave/notebooks"
    for name in kb.NOTEBOOKS.values():
        assert (repo / "notebooks" / name).is_file()
    assert defaults.python == "/opt/lora-enclave/.venv/bin/python"
    assert "/opt/lora-enclave" in (repo / "docker" / "singleuser.Dockerfile").read_text()
