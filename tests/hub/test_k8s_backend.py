"""hub.k8s_backend: the Job manifests a submission becomes on Kubernetes.

No cluster here: the manifests are rendered, serialized as the API server would receive them
(``ApiClient().sanitize_for_serialization``) and read back into the client's models
(``ApiClient().deserialize``), whose client-side validation rejects missing required fields and
bad enum values; then the security context, GPU limits, volumes and labels are asserted.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hubtools import k8s_round_trip

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


round_trip = k8s_round_trip


def test_job_round_trips_and_is_locked_down():
    job = kb.job_manifest(sub(), settings(), run_id="20261126T101500Z-AB12cd")
    data, back = round_trip(job, "V1Job")
    assert isinstance(back, client.V1Job)
    assert data["apiVersion"] == "batch/v1" and data["kind"] == "Job"
    # named by run id (a valid DNS label), never by submission id: ids restart with a queue
    assert data["metadata"]["name"] == "lora-20261126t101500z-ab12cd"
    assert data["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60
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
    data, _ = round_trip(kb.job_manifest(sub(), settings(), run_id="r1"), "V1Job")
    pod = data["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["home"]["persistentVolumeClaim"]["claimName"] == "claim-alice"
    # one shared output claim (ReadWriteMany), the run's own folder of it as a subPath
    assert vols["output"]["persistentVolumeClaim"]["claimName"] == "lora-run-outputs"
    assert "emptyDir" in vols["tmp"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert {k: m["mountPath"] for k, m in mounts.items()} == {
        "home": "/home/jovyan", "output": "/lora-run", "tmp": "/tmp"}
    assert mounts["output"]["subPath"] == "lora-r1" == data["metadata"]["name"]
    assert "subPath" not in mounts["home"]


def test_labels_select_the_singleuser_network_policy():
    data, _ = round_trip(kb.job_manifest(sub(), settings(), run_id="20261125T201500Z-ab12cd"),
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


def test_the_pod_runs_the_job_steps_for_a_notebook_or_a_config():
    data, _ = round_trip(kb.job_manifest(sub(), settings(), run_id="20261126T101500Z-ab12cd"),
                         "V1Job")
    (c,) = data["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["/opt/lora-enclave/.venv/bin/python", "-m",
                            "lora_kernel.steps.jobstep"]
    (arg,) = c["args"]
    assert json.loads(arg) == {"run_id": "20261126T101500Z-ab12cd", "kind": "notebook",
                               "notebook": "/home/jovyan/lora/nb/train.ipynb",
                               "parameters": {"steps": 3}, "home": "/home/jovyan/lora",
                               "out": "/lora-run"}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["LORA_RUN_ID"] == "20261126T101500Z-ab12cd"
    assert env["LORA_NOTEBOOKS"] == "/opt/lora-enclave/notebooks"

    cfg = sub(kind="config", path="/home/alice/lora/my.yaml",
              parameters={"overrides": {"max_train_steps": 2}})
    data, _ = round_trip(kb.job_manifest(cfg, settings(), run_id="r"), "V1Job")
    spec = json.loads(data["spec"]["template"]["spec"]["containers"][0]["args"][0])
    # the pod's pin step reads the config's task and picks the notebook, as lora run does
    assert spec["kind"] == "config" and spec["config"] == "/home/jovyan/lora/my.yaml"
    assert spec["overrides"] == {"max_train_steps": 2} and "notebook" not in spec
    with pytest.raises(ConfigError):
        kb.job_manifest(sub(kind="script"), settings())


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
        self.created, self.deleted, self.job, self.error = [], [], job, error

    def create_namespaced_job(self, namespace, body):
        self.created.append((namespace, body))
        return body

    def read_namespaced_job_status(self, name, namespace):
        if self.error:
            raise self.error
        return self.job

    def delete_namespaced_job(self, name, namespace, propagation_policy):
        if self.error:
            raise self.error
        self.deleted.append((namespace, name, propagation_policy))


def test_submit_and_delete():
    job = kb.job_manifest(sub(), settings())
    batch = FakeBatch()
    assert kb.submit(batch, job) is job
    assert batch.created == [("lora-enclave", job)]
    assert kb.delete(batch, "lora-run-42") is True
    assert batch.deleted == [("lora-enclave", "lora-run-42", "Foreground")]
    gone = FakeBatch(error=client.exceptions.ApiException(status=404))
    assert kb.delete(gone, "lora-run-42") is False
    with pytest.raises(client.exceptions.ApiException):
        kb.delete(FakeBatch(error=client.exceptions.ApiException(status=500)), "x")


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


def test_job_names_are_dns_labels():
    assert kb.job_name("20261126T101500Z-ab12cd") == "lora-20261126t101500z-ab12cd"
    for bad in ("a/b", "x" * 70, "a_b", "x-"):
        with pytest.raises(ConfigError):
            kb.job_name(bad)


def test_label_value():
    assert kb.label_value("a b/c") == "a-b-c"
    assert len(kb.label_value("x" * 100)) == 63
    assert kb.label_value("---") == "none"


def test_constants_match_the_runner_and_the_image():
    from pathlib import Path

    from lora_kernel.steps import jobstep
    from lora_kernel.trusted import runner

    assert jobstep.KERNEL_NAME == runner.KERNEL_NAME
    repo = Path(__file__).resolve().parents[2]
    defaults = kb.K8sSettings()
    assert defaults.notebooks_dir == "/opt/lora-enclave/notebooks"
    for name in runner.NOTEBOOKS.values():
        assert (repo / "notebooks" / name).is_file()
    assert defaults.python == "/opt/lora-enclave/.venv/bin/python"
    assert "/opt/lora-enclave" in (repo / "docker" / "singleuser.Dockerfile").read_text()


# -- the services on a cluster (docker/k8s/services.yaml) -----------------------------------
REPO = Path(__file__).resolve().parents[2]
SERVICES = REPO / "docker" / "k8s" / "services.yaml"
VALUES = REPO / "docker" / "k8s" / "values.yaml"


@pytest.fixture(scope="module")
def services():
    """Each document of services.yaml read back into the kubernetes client's model of its
    kind (what the API server would accept), by kind and name."""
    out = {}
    for doc in yaml.safe_load_all(SERVICES.read_text()):
        version = doc["apiVersion"].split("/")[-1].capitalize()
        _, model = k8s_round_trip(doc, f"{version}{doc['kind']}")
        assert model.kind == doc["kind"]
        out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def test_services_run_as_the_service_account_never_root(services):
    dep = services[("Deployment", "lora-services")]
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 990 and pod["securityContext"]["runAsNonRoot"]
    assert "useradd --system --uid 990" in (REPO / "docker" / "hub.Dockerfile").read_text()
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    names = {c["name"]: c for c in pod["containers"]}
    assert set(names) == {"lora-runs", "lora-audit"}
    for c in names.values():
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["command"][1:3] == ["-m", f"hub.services.{c['name'].split('-')[1]}"]
        assert importlib.util.find_spec(c["command"][2]) is not None
        assert c["command"][0] == kb.K8sSettings().python  # the images' one venv


def test_services_mount_the_state_and_the_runs_service_the_job_outputs(services):
    K8sSettings = kb.K8sSettings

    pod = services[("Deployment", "lora-services")]["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
              for c in pod["containers"]}
    defaults = K8sSettings()
    assert vols["outputs"]["persistentVolumeClaim"]["claimName"] == defaults.output_claim
    assert mounts["lora-runs"]["outputs"] == defaults.output_root
    assert "outputs" not in mounts["lora-audit"]
    claims = {name: doc for (kind, name), doc in services.items()
              if kind == "PersistentVolumeClaim"}
    assert claims[defaults.output_claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    state = vols["state"]["persistentVolumeClaim"]["claimName"]
    assert claims[state]["spec"]["accessModes"] == ["ReadWriteOnce"]
    for c in pod["containers"]:
        assert c["command"][c["command"].index("--state") + 1] == \
            mounts[c["name"]]["state"]


def test_services_role_is_jobs_and_reading_their_logs_only(services):
    role = services[("Role", "lora-runs-jobs")]
    allowed = {(r, v) for rule in role["rules"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert {r for r, _ in allowed} == {"jobs", "jobs/status", "pods", "pods/log"}
    assert {v for r, v in allowed if r == "jobs"} <= {"create", "get", "list", "watch",
                                                       "delete"}
    # pods and their logs: read only (no exec, no create, no delete)
    assert {v for r, v in allowed if r.startswith("pods")} == {"get", "list"}
    binding = services[("RoleBinding", "lora-runs-jobs")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lora-runs"}]
    pod = services[("Deployment", "lora-services")]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "lora-runs"


def test_services_policy_selects_the_kubernetes_backend(services, tmp_path, monkeypatch):
    from hub.settings import load_settings

    cm = services[("ConfigMap", "lora-enclave-policies")]
    (tmp_path / "hub.yaml").write_text(cm["data"]["hub.yaml"])
    monkeypatch.setenv("LORA_POLICIES", str(tmp_path))
    settings = load_settings()
    assert settings.runs_backend == "kubernetes"
    assert settings.kubernetes.output_root == "/srv/lora-run-outputs"
    values = yaml.safe_load(VALUES.read_text())
    image = values["singleuser"]["image"]
    assert settings.kubernetes.image == f"{image['name']}:{image['tag']}"
    monkeypatch.delenv("LORA_POLICIES")  # the repository's policies/hub.yaml
    assert load_settings().roles == settings.roles
    for name in ("lora-runs", "lora-audit"):
        svc = services[("Service", name)]
        assert name in values["hub"]["services"]
        port = int(values["hub"]["services"][name]["url"].rsplit(":", 1)[1])
        assert svc["spec"]["ports"][0]["port"] == port


def test_a_run_asking_for_more_gpus_than_a_node_has_is_refused_a_full_node_accepted():
    """Issue 26: one Job is one pod on one node; more GPUs than a node has would leave it
    unscheduled, and runs spanning nodes are not built: refused naming the setting. A run
    asking for exactly a node's GPUs renders (its num_processes: auto trains on all)."""
    with pytest.raises(ConfigError, match=r"asks for 16 GPUs but a node has 8") as info:
        kb.job_manifest(sub(gpus=16), settings())
    assert info.value.key == "gpus" and "gpus_per_node" in str(info.value)
    data, _ = round_trip(kb.job_manifest(sub(gpus=8), settings()), "V1Job")
    (c,) = data["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    data, _ = round_trip(kb.job_manifest(sub(gpus=4), settings(gpus_per_node=4)), "V1Job")
    with pytest.raises(ConfigError, match="a node has 4"):
        kb.job_manifest(sub(gpus=5), settings(gpus_per_node=4))
