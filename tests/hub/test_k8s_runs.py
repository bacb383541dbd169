"""The runs service's Kubernetes backend end to end, against a cluster stand-in that runs each
Job's container as a local process (the kubelet's part, :class:`LocalCluster`).

What is real: the Job manifest (validated by the kubernetes client's models on create), the
pod's command (``lora_kernel.steps.jobstep``: pin, papermill in the ``lora`` kernel, collect),
its env, its uid (as root: the pod's ``runAsUser``, a real system user), the output volume
(a folder per Job under the service's ``output_root``), the worker's sealing, the record and
the ledger. What the stand-in does instead of a cluster: it mounts volumes by translating the
pod's mount paths into local folders, and it reports Job conditions as the Job controller
would (Complete, Failed/BackoffLimitExceeded, Failed/DeadlineExceeded, 404 after delete).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from hubtools import k8s_round_trip
from nbtools import write_notebook
from sysusers import user_name

from hub.k8s_backend import K8sSettings
from hub.runqueue import RunQueue
from hub.services import k8s_run
from hub.services.run_worker import Cancelled, execute, kubernetes_backend
from hub.settings import HubSettings
from lora_kernel.common.errors import ConfigError, LoraError
from lora_kernel.trusted.evidence import extract_evidence_file, read_untrusted
from lora_kernel.trusted.identity import Actor
from lora_kernel.trusted.runner import RunContext

kubernetes = pytest.importorskip("kubernetes", reason="pip install 'lora-enclave[k8s]'")
from kubernetes import client  # noqa: E402

ALICE = user_name("alice")

REPO = Path(__file__).resolve().parents[2]
ROOT = os.geteuid() == 0
# Paths the stand-in's "image" has as they are: never translated as volume mounts.
IMAGE_ROOTS = tuple({str(REPO), sys.prefix, str(Path(sys.executable).parent)})


class LocalCluster:
    """``BatchV1Api`` stand-in: ``create_namespaced_job`` starts the Job's container as a
    local process; status and delete behave like the API server's."""

    def __init__(self, homes: dict[str, Path], output_root: Path, settings: K8sSettings,
                 image_env: dict[str, str], fail_to_start: bool = False) -> None:
        self.homes, self.output_root, self.settings = homes, output_root, settings
        self.image_env, self.fail_to_start = image_env, fail_to_start
        self.jobs: dict[str, dict] = {}
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.flaky = 0  # the next status reads that fail with 503

    def create_namespaced_job(self, namespace, body):
        data, _ = k8s_round_trip(body, "V1Job")  # valid for the API server
        self.created.append(data)
        name = data["metadata"]["name"]
        pod = data["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        vols = {v["name"]: v for v in pod["volumes"]}
        scratch = Path(tempfile.mkdtemp(prefix=f"{name}-tmp-", dir=self.output_root.parent))
        mounts = {}
        uid, gid = c["securityContext"]["runAsUser"], c["securityContext"]["runAsGroup"]
        for m in c["volumeMounts"]:
            vol = vols[m["name"]]
            if "emptyDir" in vol:
                real = scratch
            elif vol["persistentVolumeClaim"]["claimName"] == self.settings.output_claim:
                real = self.output_root / m["subPath"]
                real.mkdir(parents=True, exist_ok=True)
            else:
                real = self.homes[vol["persistentVolumeClaim"]["claimName"]]
            if ROOT:
                os.chown(real, uid, gid)
            mounts[m["mountPath"]] = str(real)
        pattern = re.compile(r"(?<![\w./-])(" + "|".join(
            re.escape(p) for p in sorted(mounts, key=len, reverse=True)) + r")(?=/|\"|$)")

        def mount(text: str) -> str:
            if text.startswith(IMAGE_ROOTS):  # the image's own files (this checkout, its
                return text                   # venv), wherever it lives (e.g. under /tmp)
            return pattern.sub(lambda mt: mounts[mt.group(1)], text)
        env = {**self.image_env, **{e["name"]: mount(e["value"]) for e in c["env"]}}
        argv = [mount(a) for a in c["command"] + c["args"]]
        job = {"name": name, "proc": None, "deadline": time.monotonic()
               + data["spec"]["activeDeadlineSeconds"], "state": None, "scratch": scratch,
               "log": self.output_root.parent / f"{name}.pod.log"}
        if not self.fail_to_start:
            kw = dict(user=uid, group=gid, extra_groups=[]) if ROOT else {}
            logf = open(job["log"], "ab")  # noqa: SIM115
            job["proc"] = subprocess.Popen(argv, env=env, cwd=mount(c["workingDir"]),
                                           stdout=logf, stderr=logf, start_new_session=True,
                                           **kw)
            logf.close()
        self.jobs[name] = job
        return body

    def _conditions(self, job):
        proc = job["proc"]
        if job["state"] is None:
            if proc is None:
                job["state"] = ("Failed", "ImagePullBackOff")
            elif proc.poll() is not None:
                job["state"] = (("Complete", None) if proc.returncode == 0
                                else ("Failed", "BackoffLimitExceeded"))
            elif time.monotonic() > job["deadline"]:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                job["state"] = ("Failed", "DeadlineExceeded")
        return job["state"]

    def read_namespaced_job_status(self, name, namespace):
        if self.flaky > 0:
            self.flaky -= 1
            raise client.exceptions.ApiException(status=503, reason="Service Unavailable")
        job = self.jobs.get(name)
        if job is None:
            raise client.exceptions.ApiException(status=404)
        state = self._conditions(job)
        if state is None:
            return client.V1Job(status=client.V1JobStatus(active=1))
        cond = client.V1JobCondition(type=state[0], status="True", reason=state[1])
        return client.V1Job(status=client.V1JobStatus(
            conditions=[cond], succeeded=1 if state[0] == "Complete" else None,
            failed=1 if state[0] == "Failed" else None))

    def list_namespaced_pod(self, namespace, label_selector):
        name = label_selector.removeprefix("job-name=")
        items = [client.V1Pod(metadata=client.V1ObjectMeta(name=f"{name}-pod"))] \
            if name in self.jobs else []
        return client.V1PodList(items=items)

    def read_namespaced_pod_log(self, name, namespace, container, limit_bytes):
        job = self.jobs.get(name.removesuffix("-pod"))
        if job is None:
            raise client.exceptions.ApiException(status=404)
        if job["proc"] is None:
            raise client.exceptions.ApiException(status=400, reason="ContainerCreating")
        with open(job["log"], "rb") as f:
            return f.read(limit_bytes).decode("utf-8", "replace")

    def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        """Foreground: the container's main process gets SIGTERM, SIGKILL for everything
        left after the grace period, and only then is the Job gone."""
        assert propagation_policy == "Foreground"
        job = self.jobs.get(name)
        if job is None:
            raise client.exceptions.ApiException(status=404)
        self.deleted.append(name)
        proc = job["proc"]
        if proc is not None:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.settings.grace_s)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self.jobs.pop(name, None)
        shutil.rmtree(job["scratch"], ignore_errors=True)

    def close(self):
        for name in list(self.jobs):
            self.delete_namespaced_job(name, "x")


@pytest.fixture
def cluster_env(tmp_path, monkeypatch, lora_kernel_prefix, demo_home):
    """A base folder others can traverse, alice's home claim (with the demo assets), the
    output claim, the worker's state and the settings; as root alice is the session's ALICE."""
    base = Path(tempfile.mkdtemp(prefix="lora-k8s-test-", dir="/tmp"))
    os.chmod(base, 0o711)
    user, uid, gid = "hub-alice", os.getuid() or 1, os.getgid() or 1
    if ROOT:
        import pwd

        import sysusers

        user = ALICE
        sysusers.ensure_user(user, [])
        entry = pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
        for folder in [REPO, *REPO.parents, *Path(sys.executable).parents]:
            if folder.is_dir() and not folder.stat().st_mode & 0o001:
                os.chmod(folder, folder.stat().st_mode | 0o001)
    claim = base / "homes" / user
    home = claim / "lora"
    shutil.copytree(demo_home / "demo", home / "demo", symlinks=True)
    output_root = base / "outputs"
    output_root.mkdir()
    state = base / "state"
    state.mkdir(mode=0o700)
    if ROOT:
        for p in [claim, *claim.rglob("*")]:
            os.chown(p, uid, gid, follow_symlinks=False)
        os.chmod(base / "homes", 0o711)
    settings = K8sSettings(uids={user: (uid, gid)}, output_root=str(output_root),
                           python=sys.executable, notebooks_dir=str(REPO / "notebooks"),
                           namespace="lora-test", grace_s=20)
    image_env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                 "JUPYTER_PATH": str(lora_kernel_prefix / "share" / "jupyter")}
    cluster = LocalCluster({f"claim-{user}": claim}, output_root, settings, image_env)
    monkeypatch.setenv("LORA_STATE", str(state))
    monkeypatch.setattr(k8s_run, "POLL_S", 0.2)
    yield SimpleNamespace(base=base, user=user, uid=uid, home=home, state=state,
                          settings=settings, cluster=cluster, output_root=output_root)
    cluster.close()
    shutil.rmtree(base, ignore_errors=True)


def submit_and_run(env, kind, path, parameters=None, timeout=600.0, cancel_after=None):
    """Queue a submission as the runs service does, claim it and run it through the
    worker's ``execute`` with the Kubernetes backend; returns the finished row.
    ``cancel_after``: cancel that many seconds after the notebook's last cell began (the
    pod's progress records say when)."""
    queue = RunQueue(env.state, local_gpus=False)
    sub = queue.submit(env.user, kind, str(path), parameters=parameters or {},
                       home=str(env.home), gpus=1, timeout=timeout,
                       actor={"name": env.user, "uid": env.uid, "source": "hub-token"})
    claimed = queue.claim_next()
    assert claimed is not None and claimed.id == sub.id and claimed.gpus_held == []
    hub = HubSettings(runs_backend="kubernetes", kubernetes=env.settings)
    backend = kubernetes_backend(hub, api=env.cluster, core=env.cluster)
    cancelled = Cancelled()
    if cancel_after is not None:
        import threading

        def last_cell_started() -> bool:
            """The pod's progress records (its log) show the notebook's last cell begun."""
            for job in list(env.cluster.jobs.values()):
                try:
                    lines = job["log"].read_text(errors="replace").splitlines()
                except OSError:
                    continue
                for line in lines:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and rec.get("event") == "cell" \
                            and rec.get("done") == rec.get("cells", 0) - 1:
                        return True
            return False

        def later():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not last_cell_started():
                time.sleep(0.2)
            time.sleep(cancel_after)
            queue.cancel(claimed.id)  # what POST api/runs/<id>/cancel does, then SIGTERM
            cancelled.signal = signal.SIGTERM
        threading.Thread(target=later, daemon=True).start()
    ctx = RunContext(actor=Actor(env.user, env.uid, env.uid, (), "hub-token"),
                     cancelled=cancelled)
    return execute(queue, claimed, ctx, str(env.state), cancelled, backend)


def job_of(row) -> str:
    return f"lora-{row.run_id.lower()}"


def extra_of(row) -> dict:
    return manifest_of(row)["predicate"]["runDetails"]["metadata"]["extra"]


def manifest_of(row):
    from lora_kernel.provenance.records import load_manifest

    return load_manifest(Path(row.record["path"]))


@pytest.mark.slow
def test_a_notebook_job_runs_as_the_user_and_is_sealed_by_the_service(cluster_env):
    from lora_kernel.provenance.audit import verify

    env = cluster_env
    nb = write_notebook(env.home / "hello.ipynb", "x = 1",
                        "import os\nprint('uid', os.getuid(), 'x', x, 'run',"
                        " os.environ['LORA_RUN_ID'], 'LORA_STATE' in os.environ)")
    if ROOT:
        os.chown(nb, env.uid, env.uid)
    row = submit_and_run(env, "notebook", nb, {"x": 7})
    assert row.status == "succeeded", row.error
    (job,) = env.cluster.created
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == "1"
    record = Path(row.record["path"])
    executed = "".join(o.get("text", "") for c in nbformat.read(
        record / "executed.ipynb", as_version=4).cells for o in c.get("outputs", []))
    assert f"uid {env.uid} x 7 run {row.run_id} False" in executed
    extra = manifest_of(row)["predicate"]["runDetails"]["metadata"]["extra"]
    assert extra["backend"] == "kubernetes" and extra["job"] == job_of(row)
    assert extra["executor_exit_code"] == 0 and extra["cells_executed"] >= 2
    assert (record / "executor.log").is_file()
    assert verify(row.run_id, state=env.state) == []
    # the Job is deleted and its outputs removed once the record holds them
    assert env.cluster.deleted == [job_of(row)]
    assert not (env.output_root / job_of(row)).exists()


@pytest.mark.slow
def test_a_config_job_trains_and_the_record_pins_its_inputs(cluster_env):
    from safetensors.torch import load_file

    env = cluster_env
    row = submit_and_run(env, "config", env.home / "demo" / "image_lora.yaml",
                         {"overrides": {"max_train_steps": 4, "save_steps": 0}})
    assert row.status == "succeeded", row.error
    record = Path(row.record["path"])
    metadata = manifest_of(row)["predicate"]["runDetails"]["metadata"]
    assert metadata["extra"]["kind"] == "training" and metadata["extra"]["steps"] == 4
    deps = {d["name"]: d for d in
            manifest_of(row)["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert len(deps["base_model"]["digest"]["sha256"]) == 64
    assert any(name.startswith("dataset/") for name in deps)
    adapters = list((record / "adapter").rglob("*.safetensors"))
    assert adapters and load_file(str(adapters[0]))


@pytest.mark.slow
def test_a_failing_cell_is_recorded_failed_and_its_outputs_kept(cluster_env):
    env = cluster_env
    nb = write_notebook(env.home / "boom.ipynb", "x = 1", "raise ValueError('boom in pod')")
    row = submit_and_run(env, "notebook", nb)
    assert row.status == "failed" and "boom in pod" in row.error and row.exit_code != 0
    assert row.record["status"] == "failed"
    extra = manifest_of(row)["predicate"]["runDetails"]["metadata"]["extra"]
    assert extra["executor_exit_code"] == 1 and "ValueError" in extra["error"]
    assert "boom in pod" in (Path(row.record["path"]) / "executed.ipynb").read_text()
    # a failed run's outputs stay on the volume for investigation (the record names them)
    assert (env.output_root / job_of(row) / "work").is_dir()
    assert extra["work_dir"] == str(env.output_root / job_of(row) / "work")


@pytest.mark.slow
def test_cancel_deletes_the_job_and_seals_a_failed_record(cluster_env):
    env = cluster_env
    nb = write_notebook(env.home / "slow.ipynb", "x = 1",
                        "import time\nprint('started', flush=True)\ntime.sleep(300)")
    t0 = time.monotonic()
    row = submit_and_run(env, "notebook", nb, cancel_after=2)
    assert time.monotonic() - t0 < 200
    assert row.status == "failed" and "Job was deleted" in row.error
    assert row.record["status"] == "failed"
    assert env.cluster.deleted == [job_of(row)]
    # SIGTERM stopped the run step, which still collected what the kernel had done
    executed = nbformat.read(Path(row.record["path"]) / "executed.ipynb", as_version=4)
    assert "started" in "".join(o.get("text", "") for c in executed.cells
                                for o in c.get("outputs", []))
    assert extra_of(row)["cells_executed"] >= 2


class WorkerDied(BaseException):
    pass


@pytest.mark.slow
def test_a_dead_workers_job_is_deleted_and_its_run_sealed_failed(cluster_env):
    """What a killed worker leaves: the run's descriptor without its lock, and a Job still
    running. The next recovery deletes the Job and seals the run from its outputs."""
    from lora_kernel.trusted.runner import ActiveRun

    env = cluster_env
    nb = write_notebook(env.home / "slow.ipynb", "x = 1",
                        "import time\nprint('started', flush=True)\ntime.sleep(300)")

    def die(watch, timeout, cancelled):
        deadline = time.monotonic() + 120
        while not (watch.out / "pinned.json").exists():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        raise WorkerDied()

    def exit_like_a_killed_process(self, *exc):
        os.close(self._fd)  # the lock goes with the process; the descriptor stays

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(k8s_run.Watch, "wait", die)
        mp.setattr(ActiveRun, "__exit__", exit_like_a_killed_process)
        with pytest.raises(WorkerDied):
            submit_and_run(env, "notebook", nb)
    (name,) = env.cluster.jobs
    ctx = RunContext(actor=Actor("lora-svc", 0, 0, (), "runs service"))
    (rec,) = k8s_run.recover(str(env.state), ctx, api=env.cluster, core=env.cluster,
                             settings=env.settings)
    assert env.cluster.deleted == [name] and not env.cluster.jobs
    assert rec.status == "failed" and "runner stopped" in rec.error
    extra = manifest_of(SimpleNamespace(record={"path": rec.path}))[
        "predicate"]["runDetails"]["metadata"]["extra"]
    assert extra["backend"] == "kubernetes" and extra["job"] == name
    # nothing left to recover
    assert k8s_run.recover(str(env.state), ctx, api=env.cluster, core=env.cluster) == []


FORGE_PIN = """import json, pathlib
p = pathlib.Path('..') / 'pinned.json'
d = json.loads(p.read_text())
d['pinned']['notebook_sha256'] = 'f' * 64
d['parameters'] = {'x': 'forged'}
p.write_text(json.dumps(d))
print('forged')"""


@pytest.mark.slow
def test_user_code_rewriting_the_pin_answer_gets_a_failed_record_without_it(cluster_env):
    """The notebook shares the pod's uid and folder: it can rewrite pinned.json after the
    inputs were pinned. The service believes only the answer whose sha256 the run step
    logged before the kernel started."""
    env = cluster_env
    nb = write_notebook(env.home / "forge.ipynb", "x = 1", FORGE_PIN)
    row = submit_and_run(env, "notebook", nb, {"x": 3})
    assert row.status == "failed" and "changed or removed after" in row.error
    assert row.record["status"] == "failed"
    build = manifest_of(row)["predicate"]["buildDefinition"]
    assert build["externalParameters"]["notebook_source_sha256"] != "f" * 64
    assert extra_of(row)["parameters"] == {"x": 3}  # the submission's, not the forgery

    # refusing its own inputs after the fact does not erase the run either
    nb = write_notebook(env.home / "unrun.ipynb", "x = 1",
                        "import json, pathlib\n(pathlib.Path('..') / 'pinned.json').write_text("
                        "json.dumps({'error': {'exit_code': 2, 'message': 'nothing ran'}}))")
    row = submit_and_run(env, "notebook", nb)
    assert row.status == "failed" and row.record is not None
    assert "changed or removed after" in row.error


@pytest.mark.slow
def test_a_failed_jobs_exit_json_saying_0_is_not_believed(cluster_env):
    env = cluster_env
    nb = write_notebook(env.home / "liar.ipynb", "x = 1",
                        "import subprocess\nsubprocess.Popen(['sh', '-c', 'while true; do "
                        "echo {\\\"rc\\\": 0} > ../exit.json; sleep 0.05; done'])",
                        "raise ValueError('boom after lying')")
    row = submit_and_run(env, "notebook", nb)
    assert row.status == "failed" and "boom after lying" in row.error
    assert extra_of(row)["executor_exit_code"] != 0


@pytest.mark.slow
def test_transient_api_errors_are_retried_and_a_lost_job_is_sealed_failed(cluster_env):
    env = cluster_env
    nb = write_notebook(env.home / "hello.ipynb", "x = 1", "print('hello', x)")
    env.cluster.flaky = 3  # three 503s in a row: retried
    row = submit_and_run(env, "notebook", nb)
    assert row.status == "succeeded", row.error

    nb = write_notebook(env.home / "slow.ipynb", "x = 1",
                        "import time\nprint('started', flush=True)\ntime.sleep(300)")
    queue_len = len(env.cluster.deleted)

    def break_api_once_running():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                (env.output_root / n / "work").exists() for n in env.cluster.jobs):
            time.sleep(0.2)
        env.cluster.flaky = 10 ** 6  # the API never answers again
    import threading

    threading.Thread(target=break_api_once_running, daemon=True).start()
    row = submit_and_run(env, "notebook", nb)
    env.cluster.flaky = 0
    assert row.status == "failed" and "lost the Job" in row.error
    assert row.record["status"] == "failed"  # sealed, not left without a record
    assert len(env.cluster.deleted) == queue_len + 1  # and the Job deleted
    assert not list((env.state / "runs" / ".staging").glob("*"))


def test_an_existing_output_folder_is_never_reused(cluster_env, monkeypatch):
    env = cluster_env
    monkeypatch.setattr(k8s_run, "new_run_id", lambda: "20261126T000000Z-aaaaaa")
    (env.output_root / "lora-20261126t000000z-aaaaaa").mkdir()
    nb = write_notebook(env.home / "hello.ipynb", "x = 1", "print(x)")
    row = submit_and_run(env, "notebook", nb)
    assert row.status == "failed" and "already exists" in row.error
    assert env.cluster.created == [] and row.record is None


def test_refused_inputs_end_the_submission_without_a_record(cluster_env):
    env = cluster_env
    bad = env.home / "bad.yaml"
    bad.write_text("task: image\nlearning_rate: fast\n")
    os.chmod(bad, 0o644)
    row = submit_and_run(env, "config", bad)
    assert row.status == "failed" and row.exit_code == 2 and row.record is None
    assert "learning_rate" in row.error
    assert not list((env.state / "runs").glob("2*"))  # no record sealed
    assert not list((env.state / "runs" / ".staging").glob("*"))


def test_a_job_that_never_started_ends_without_a_record(cluster_env):
    env = cluster_env
    env.cluster.fail_to_start = True
    nb = write_notebook(env.home / "never.ipynb", "x = 1", "print(x)")
    row = submit_and_run(env, "notebook", nb)
    assert row.status == "failed" and row.record is None
    assert "ImagePullBackOff" in row.error and "nothing ran" in row.error


def test_paths_outside_the_home_are_refused_before_a_job_exists(cluster_env):
    env = cluster_env
    row = submit_and_run(env, "notebook", "/etc/hostname")
    assert row.status == "failed" and row.exit_code == 2 and "outside" in row.error
    assert env.cluster.created == []


def test_output_files_are_read_without_following_links(tmp_path):
    secret = tmp_path / "signing.key"
    secret.write_bytes(b"KEY")
    out = tmp_path / "out"
    out.mkdir()
    (out / "pinned.json").symlink_to(secret)
    assert read_untrusted(out / "pinned.json", 100) is None
    (out / "exit.json").write_bytes(b'{"rc": 0}')
    assert read_untrusted(out / "exit.json", 100) == b'{"rc": 0}'
    os.mkfifo(out / "fifo")
    assert read_untrusted(out / "fifo", 100) is None  # and it did not hang
    (out / "evidence.tar").symlink_to(secret)
    dest = tmp_path / "staging"
    dest.mkdir()
    notes = extract_evidence_file(out / "evidence.tar", dest)
    assert notes and "no readable evidence" in notes[0] and not any(dest.iterdir())


def test_a_malformed_pin_answer_is_refused():
    with pytest.raises(LoraError, match="sha256"):
        k8s_run.check_pinned({"pinned": {"notebook_sha256": "x", "kind": "notebook",
                                         "declared": []}, "parameters": {}})
    good = {"notebook_sha256": "a" * 64, "kind": "notebook", "declared": ["x"],
            "notebook": "/home/jovyan/lora/x.ipynb"}
    assert k8s_run.check_pinned({"pinned": good, "parameters": {"x": 1}})[0] == good
    with pytest.raises(LoraError, match="config"):
        k8s_run.check_pinned({"pinned": {**good, "kind": "training"}, "parameters": {}})


def test_hub_yaml_selects_the_backend(tmp_path, monkeypatch):
    from hub.settings import load_settings

    monkeypatch.setenv("LORA_POLICIES", str(tmp_path))
    (tmp_path / "hub.yaml").write_text(
        "runs:\n  backend: kubernetes\n  kubernetes:\n    namespace: ml\n"
        "    image: reg.internal/lora:1\n    uids: {alice: [1500, 1500]}\n")
    s = load_settings()
    assert s.runs_backend == "kubernetes"
    assert s.kubernetes.namespace == "ml" and s.kubernetes.uids == {"alice": (1500, 1500)}
    (tmp_path / "hub.yaml").write_text("runs:\n  kubernetes:\n    namespaec: ml\n")
    with pytest.raises(ConfigError, match="runs.kubernetes.namespaec"):
        load_settings()
    for bad in ("default_deadline_s: soon", "read_only_root: 'no'", "uids: {alice: 5}",
                "uids: {alice: '1500'}", "uids: {alice: [0, 0]}", "uids: {alice: [true, 1]}",
                "node_selector: {gpu: 1}", "image: [a]", "default_deadline_s: 0",
                "ttl_after_finished_s: -5"):
        (tmp_path / "hub.yaml").write_text(f"runs:\n  kubernetes:\n    {bad}\n")
        key = bad.split(":")[0]
        with pytest.raises(ConfigError, match=f"runs.kubernetes.{key}"):
            load_settings()
    (tmp_path / "hub.yaml").write_text("runs:\n  kubernetes:\n    memory_limit: null\n"
                                       "    default_deadline_s: 60\n")
    assert load_settings().kubernetes.memory_limit is None
    (tmp_path / "hub.yaml").write_text("runs:\n  backend: slurm\n")
    with pytest.raises(ConfigError, match="runs.backend"):
        load_settings()
    (tmp_path / "hub.yaml").write_text("runs:\n  max_concurrent: 1\n")
    assert load_settings().runs_backend == "local"


def test_cluster_gpus_are_not_taken_from_the_local_pool(tmp_path):
    local = RunQueue(tmp_path / "a", devices=[])
    from hub.gpus import GpuUnavailable

    with pytest.raises(GpuUnavailable):
        local.submit("u", "notebook", "/x.ipynb", home="/h", gpus=2)
    cluster = RunQueue(tmp_path / "b", devices=[], local_gpus=False)
    cluster.submit("u", "notebook", "/x.ipynb", home="/h", gpus=2)
    sub = cluster.claim_next()
    assert sub is not None and sub.gpus == 2 and sub.gpus_held == []
