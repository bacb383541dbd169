"""docker/: the images, compose file, entrypoint and Kubernetes values hold together.

No docker and no cluster here: images are not built and nothing is deployed. What is checked
is everything that can be checked offline: every file, path, make target, module and class the
Dockerfiles, compose.yaml, the entrypoint and values.yaml name exists in the repository; the
compose file validates against the Compose Specification's JSON schema (vendored from the
``docker-compose`` wheel, docker/schema/README.md) and has the structure the design asks for
(internal network, named volumes, GPU reservation); values.yaml turns off every egress
allowance, has GPU profiles limited by group, PostgreSQL from a Secret, and agrees with
policies/hub.yaml, hub/settings.py, hub/spawner.py and hub/k8s_backend.py.
"""
from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
COMPOSE = DOCKER / "compose.yaml"
ENTRYPOINT = DOCKER / "entrypoint-hub.sh"
VALUES = DOCKER / "k8s" / "values.yaml"
IMAGE_ROOT = "/opt/lora-enclave/"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


# -- helpers ----------------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (the ARGs before the first FROM are stage 0's)."""
    result: list[list[tuple[str, str]]] = [[]]
    for ins in instructions(path):
        if ins[0] == "FROM" and result[-1] and any(i[0] == "FROM" for i in result[-1]):
            result.append([])
        result[-1].append(ins)
    return result


def copy_sources(rest: str) -> list[str]:
    """Source paths of COPY/ADD (without --from=: those come from another stage)."""
    parts = shlex.split(rest)
    if any(p.startswith("--from=") for p in parts):
        return []
    parts = [p for p in parts if not p.startswith("--")]
    return parts[:-1]


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    venv = re.search(r"^VENV\s*\?=\s*(\S+)", text, re.M).group(1)
    targets = set()
    for m in re.finditer(r"^([^\s:#=][^:=\n]*?):(?!=)", text, re.M):
        for t in m.group(1).split():
            targets.add(t.replace("$(VENV)", venv))
    return targets


def makefile_vars() -> set[str]:
    return set(re.findall(r"^([A-Z_]+)\s*\??=", (REPO / "Makefile").read_text(), re.M))


def image_paths(text: str) -> set[str]:
    """Every /opt/lora-enclave/... path a file names."""
    return {m.rstrip(".,'\")]") for m in re.findall(r"/opt/lora-enclave/[\w./-]*", text)}


def check_image_path(path: str) -> None:
    """An image path exists in the repository, or is something `make setup` installs there."""
    rel = path[len(IMAGE_ROOT):].rstrip("/")
    if not rel:
        return
    if rel.startswith(".venv/bin/"):
        tool = rel.split("/")[-1]
        assert (REPO / ".venv" / "bin" / tool).exists(), f"{path}: `make setup` installs no {tool}"
        return
    if rel.startswith("hub/node_modules/"):
        pkg = json.loads((REPO / "hub" / "package.json").read_text())
        assert rel.split("/")[-1] in pkg["dependencies"], f"{path}: not in hub/package.json"
        return
    assert (REPO / rel).exists(), f"{path}: {rel} is not in the repository"


def dockerignore_patterns(dockerfile: Path) -> list[str]:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} missing: the context would carry .venv and homes"
    return [p.strip() for p in ignore.read_text().splitlines()
            if p.strip() and not p.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    rel = rel.rstrip("/")
    for pat in patterns:
        pat = pat.rstrip("/")
        for candidate in (pat, pat.removeprefix("**/")):
            if fnmatch.fnmatch(rel, candidate) or fnmatch.fnmatch(rel.split("/")[0], candidate):
                return True
    return False


def dotted_exists(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


# -- Dockerfiles ------------------------------------------------------------------------------
def test_dockerfiles_exist():
    assert {p.name for p in DOCKERFILES} >= {"hub.Dockerfile", "singleuser.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_pinned_by_digest_and_overridable(dockerfile):
    ins = instructions(dockerfile)
    args = {r.split("=", 1)[0]: r.split("=", 1)[1] if "=" in r else None
            for w, r in ins if w == "ARG"}
    assert "BASE_IMAGE" in args
    assert args["BASE_IMAGE"].startswith("debian:bookworm-slim@sha256:")
    assert DIGEST.search(args["BASE_IMAGE"]), args["BASE_IMAGE"]
    froms = [r.split()[0] for w, r in ins if w == "FROM"]
    assert froms and all(f == "${BASE_IMAGE}" for f in froms), froms
    assert "docker buildx imagetools inspect" in dockerfile.read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_not_ignored(dockerfile):
    patterns = dockerignore_patterns(dockerfile)
    seen = 0
    for word, rest in instructions(dockerfile):
        if word not in ("COPY", "ADD"):
            continue
        for src in copy_sources(rest):
            seen += 1
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src}: not in the repo"
            assert not ignored(src, patterns), f"{dockerfile.name}: COPY {src} is dockerignored"
    assert seen
    for needed in (".venv", "hub_data", "lora_home", "lora_state", "node_modules", ".git"):
        assert ignored(needed, patterns), f"{needed} would be sent to the build"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_make_targets_and_build_args(dockerfile):
    targets, variables = makefile_targets(), makefile_vars()
    text = " && ".join(r for w, r in instructions(dockerfile) if w == "RUN")
    called = re.findall(r"(?:^|&&|;|\|\|)\s*make\s+([^\s&;|]+)", text)
    assert called, f"{dockerfile.name} does not run `make setup` (or its Python half)"
    for target in called:
        assert target in targets, f"{dockerfile.name}: make {target}: no such target"
    for var in re.findall(r"\b([A-Z_]+)=\"?\$\{", text):
        assert var in variables, f"{dockerfile.name}: make {var}=...: not a Makefile variable"
    args = {r.split("=", 1)[0] for w, r in instructions(dockerfile) if w == "ARG"}
    assert {"TORCH_SPEC", "TORCH_INDEX_URL"} <= args
    assert {"TORCH_SPEC", "TORCH_INDEX_URL", "SYSTEM_PYTHON"} <= variables


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_final_image_has_no_build_tools(dockerfile):
    st = stages(dockerfile)
    assert len(st) >= 2, "expected a build stage and a final stage"
    final = " ".join(r for w, r in st[-1] if w == "RUN")
    for tool in ("build-essential", " make", " npm", "python3.11-venv", "gcc", "git"):
        assert tool not in final, f"{dockerfile.name}: final stage installs {tool.strip()}"
    assert any(w == "COPY" and "--from=build" in r for w, r in st[-1])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_paths_and_classes_named_in_images_exist(dockerfile):
    text = dockerfile.read_text()
    for path in image_paths(text):
        check_image_path(path)
    for cls in re.findall(r"=((?:hub|lora_kernel)\.[\w.]+)", text):
        assert dotted_exists(cls), f"{dockerfile.name}: {cls} cannot be imported"


def test_singleuser_is_non_root_with_the_lora_kernel():
    path = DOCKER / "singleuser.Dockerfile"
    ins = stages(path)[-1]
    users = [r for w, r in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    args = {r.split("=", 1)[0]: r.split("=", 1)[1] for w, r in ins if w == "ARG" and "=" in r}
    assert args.get("NB_UID") not in (None, "0")
    text = path.read_text()
    assert "kernelspec list" in text and "'^ *lora '" in text
    assert "lora_kernel install --sys-prefix" in (REPO / "Makefile").read_text()
    # the same restrictions the local spawner passes on the command line
    spawner = (REPO / "hub" / "spawner.py").read_text()
    for flag in ("--ServerApp.kernel_spec_manager_class=hub.kernels.LoraOnlyKernelSpecManager",
                 "--MappingKernelManager.default_kernel_name=lora"):
        assert flag in spawner and flag in text
    assert "--ServerApp.terminals_enabled=False" in text


def test_hub_image_runs_the_entrypoint_as_root_with_pam():
    path = DOCKER / "hub.Dockerfile"
    final = stages(path)[-1]
    entry = [r for w, r in final if w == "ENTRYPOINT"][-1]
    assert "/usr/local/bin/entrypoint-hub.sh" in entry
    assert any(w == "COPY" and "docker/entrypoint-hub.sh" in r for w, r in final)
    envs = " ".join(r for w, r in final if w == "ENV")
    assert "LORA_HUB_AUTH=pam" in envs and "LORA_STATE=/var/lib/lora-enclave" in envs
    assert [r for w, r in final if w == "USER"][-1] == "root"
    assert any(w == "HEALTHCHECK" for w, _ in final)


# -- entrypoint -------------------------------------------------------------------------------
def test_entrypoint_is_executable_and_parses():
    assert ENTRYPOINT.stat().st_mode & 0o111
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-s", "sh", str(ENTRYPOINT)], check=True)


def test_entrypoint_runs_what_make_hub_runs():
    text = ENTRYPOINT.read_text()
    make = (REPO / "Makefile").read_text()
    hub_recipe = re.search(r"^hub:.*\n\t(.+)$", make, re.M).group(1)
    assert "-m hub.demo" in hub_recipe
    assert '"$PY" -m hub.demo' in text                       # LORA_HUB_AUTH=demo: make hub
    demo = (REPO / "hub" / "demo.py").read_text()          # ... which execs jupyterhub -f ...
    assert '"-m", "jupyterhub", "-f"' in demo and '"jupyterhub_config.py"' in demo
    assert '"$PY" -m jupyterhub -f "$REPO/hub/jupyterhub_config.py"' in text
    assert ': "${LORA_HUB_AUTH:=pam}"' in text
    for module in re.findall(r"-m ([\w.]+)", text):
        assert importlib.util.find_spec(module) is not None, f"python -m {module}"
    for path in image_paths(text):
        check_image_path(path)
    # every environment variable it relies on is one jupyterhub_config.py reads
    config = (REPO / "hub" / "jupyterhub_config.py").read_text()
    for var in ("LORA_HUB_AUTH", "LORA_SERVICE_USER", "LORA_HUB_DIR"):
        assert var in config


# -- compose ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_validates_against_the_compose_spec(compose):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DOCKER / "schema" / "compose_spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    # the schema does catch mistakes (a wrong GPU reservation)
    bad = json.loads(json.dumps(compose))
    bad["services"]["hub"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"] = "gpu"
    assert list(validator.iter_errors(bad))


def test_compose_structure(compose):
    services, networks, volumes = compose["services"], compose["networks"], compose["volumes"]
    hub = services["hub"]
    # the hub (and everything that runs inside it) is on internal networks only, unpublished
    assert hub["networks"] and all(networks[n].get("internal") is True for n in hub["networks"])
    assert "ports" not in hub
    assert hub["user"] in ("0:0", "root", "0")
    assert hub["environment"]["LORA_HUB_AUTH"] == "${LORA_HUB_AUTH:-pam}"
    # GPU: the NVIDIA runtime through a device reservation
    (dev,) = hub["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    assert set(hub["healthcheck"]) >= {"test", "interval", "retries"}
    # persistent named volumes: models, the state directory, the hub database
    mounts = {v.split(":")[1]: v.split(":")[0] for v in hub["volumes"]}
    for target in ("/srv/lora-enclave/models", "/var/lib/lora-enclave", "/srv/lora-enclave/hub"):
        assert mounts[target] in volumes, f"{target} is not a declared named volume"
    for service in services.values():
        for v in service.get("volumes", []):
            src = v.split(":")[0]
            assert src.startswith("/") or src in volumes, f"undeclared volume {src}"
    # the only service that is reachable from outside has nothing mounted and no privileges
    for name, service in services.items():
        outside = [n for n in service.get("networks", []) if not networks[n].get("internal")]
        if outside or service.get("ports"):
            assert name != "hub"
            assert not service.get("volumes") and service.get("cap_drop") == ["ALL"]
            assert service.get("read_only") is True
            assert service["user"].split(":")[0] not in ("0", "root")
    # the build and the paths it names exist
    build = hub["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO and (context / build["dockerfile"]).is_file()
    assert set(build["args"]) >= {"TORCH_SPEC", "TORCH_INDEX_URL"}
    for path in image_paths(COMPOSE.read_text()):
        check_image_path(path)


# -- Kubernetes values ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def values():
    return yaml.safe_load(VALUES.read_text())


def test_values_egress_all_off(values):
    netpol = values["singleuser"]["networkPolicy"]
    assert netpol["enabled"] is True
    rules = netpol["egressAllowRules"]
    for key in ("privateIPs", "nonPrivateIPs", "dnsPortsPrivateIPs",
                "dnsPortsKubeSystemNamespace", "dnsPortsCloudMetadataServer",
                "cloudMetadataServer"):
        assert rules[key] is False, key
    # the one extra rule: the proxy pod (services are behind it), nothing by address
    for rule in netpol.get("egress", []):
        for peer in rule["to"]:
            assert "ipBlock" not in peer and "namespaceSelector" not in peer
            assert peer["podSelector"]["matchLabels"]["app"] == "jupyterhub"


def test_values_database_is_postgres_from_a_secret(values):
    db = values["hub"]["db"]
    assert db["type"] == "postgres" and "url" not in db and "password" not in db
    ref = values["hub"]["extraEnv"]["LORA_HUB_DB_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] == "url"
    assert 'os.environ["LORA_HUB_DB_URL"]' in values["hub"]["extraConfig"]["10-lora-db"]


def test_values_services_and_roles_match_the_hub(values):
    from hub.settings import AUDIT_READ, AUDIT_SERVICE, REVIEW_WRITE, RUNS_SERVICE, load_settings

    settings = load_settings()
    hub = values["hub"]
    assert set(hub["services"]) == {RUNS_SERVICE, AUDIT_SERVICE}
    assert set(hub["config"]["JupyterHub"]["custom_scopes"]) == {AUDIT_READ, REVIEW_WRITE}
    assert set(hub["config"]["LDAPAuthenticator"]["allowed_groups"]) == set(settings.roles)
    for role in hub["loadRoles"].values():
        for group in role["groups"]:
            assert group in settings.roles
    assert hub["config"]["LDAPAuthenticator"]["admin_groups"] == [
        g for g, r in settings.roles.items() if r == "admin"]


def test_values_gpu_profiles_within_quotas(values):
    from hub.gpus import quota_for
    from hub.settings import load_settings

    settings = load_settings()
    profiles = values["singleuser"]["profileList"]
    gpu_profiles = [p for p in profiles
                    if "nvidia.com/gpu" in p["kubespawner_override"].get("extra_resource_limits",
                                                                       {})]
    assert gpu_profiles, "no GPU profile"
    for p in gpu_profiles:
        n = int(p["kubespawner_override"]["extra_resource_limits"]["nvidia.com/gpu"])
        groups = p.get("lora_allowed_groups")
        assert groups, f"GPU profile {p['slug']} is not limited by group"
        for group in groups:
            quota = quota_for(settings.roles_of([group]), settings.quotas)
            assert n <= quota, f"{p['slug']}: {n} GPUs > {group}'s quota {quota}"
    for p in profiles:
        if p not in gpu_profiles:
            assert p["kubespawner_override"]["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"


class _FakeConfig:
    def __init__(self, profiles):
        self.KubeSpawner = type("KS", (), {"profile_list": profiles})()


def test_values_profile_filter_by_group(values):
    profiles = values["singleuser"]["profileList"]
    c = _FakeConfig(profiles)
    scope = {"c": c}
    exec(compile(values["hub"]["extraConfig"]["20-lora-profiles"], "20-lora-profiles", "exec"),
         scope)
    pick = c.KubeSpawner.profile_list

    def offered(*groups):
        user = type("U", (), {"groups": [type("G", (), {"name": g})() for g in groups]})()
        got = pick(type("S", (), {"user": user})())
        assert all("lora_allowed_groups" not in p for p in got)
        return [p["slug"] for p in got]

    assert offered("lora-auditors") == ["cpu"]
    assert offered("lora-researchers") == ["cpu", "gpu-1"]
    assert offered("lora-engineers") == ["cpu", "gpu-1", "gpu-2"]


def test_values_extra_config_compiles(values):
    for name, code in values["hub"]["extraConfig"].items():
        compile(code, name, "exec")


def test_values_singleuser_image_and_k8s_backend_agree(values):
    from hub.k8s_backend import K8sSettings

    su = values["singleuser"]
    defaults = K8sSettings()
    assert defaults.image == f"{su['image']['name']}:{su['image']['tag']}"
    assert su["storage"]["homeMountPath"] == defaults.home_mount
    assert su["storage"]["dynamic"]["pvcNameTemplate"].replace("{username}", "{user}") == \
        defaults.home_claim
    assert su["allowPrivilegeEscalation"] is False
    spawner = (REPO / "hub" / "spawner.py").read_text()
    for flag in su["cmd"][1:]:
        if flag.startswith("--config="):
            check_image_path(flag.split("=", 1)[1])
        else:
            assert flag in spawner or flag == "--ServerApp.terminals_enabled=False"
    for path in image_paths(VALUES.read_text()):
        check_image_path(path)

