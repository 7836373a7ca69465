"""Offline checks of infra/: the KubeRay manifests against the operator's CRD schemas and its
own admission rules, the job entry points, secrets, GPU and /dev/shm sizing, Ray token auth,
one image everywhere, and the Dockerfile's install. No network, no cluster, no Docker.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
INFRA = REPO_ROOT / "infra"
KUBERAY = INFRA / "kuberay"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"
README = INFRA / "README.md"
PYPROJECT = REPO_ROOT / "pyproject.toml"

MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}

# The script each RayJob runs; a new RayJob manifest must be added here.
JOB_SCRIPTS = {
    "rayjob-prepare-cc12m.yaml": "pipelines/prepare_cc12m.py",
    "rayjob-train.yaml": "training/train.py",
    "rayjob-evaluate.yaml": "evaluation/evaluate.py",
}
GPUS_PER_TRAIN_POD = 8

# KubeRay limits (ray-operator/controllers/ray/utils/constant.go): the cluster name plus the
# longest service suffix must fit a 63-character DNS label; a RayJob adds 6 characters.
MAX_RAYCLUSTER_NAME = 53
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6
MIN_TOKEN_AUTH_RAY_VERSION = (2, 52, 0)

AWS_ACCESS_KEY_ID_RE = re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b")
AWS_SECRET_KEY_RE = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
SECRET_ASSIGNMENT_RE = re.compile(
    r"(?i)(secret_?access_?key|auth_?token|password)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{16,}"
)
SENSITIVE_ENV_RE = re.compile(r"^AWS_|TOKEN|SECRET|PASSW|CREDENTIAL|API_KEY|ACCESS_KEY")
DNS1035_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------------------------------------
# Loading


def find_crd_dir() -> Path | None:
    """The KubeRay CRDs live in the workspace's shared/ folder, beside or inside the checkout."""
    candidates = [
        os.environ.get("CLIPFORGE_KUBERAY_CRDS"),
        REPO_ROOT / "shared" / "schemas" / "kuberay",
        REPO_ROOT.parent / "shared" / "schemas" / "kuberay",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / CRD_FILES["RayJob"]).is_file():
            return Path(candidate)
    return None


@cache
def load_docs(path: Path) -> tuple[dict, ...]:
    with open(path) as f:
        return tuple(doc for doc in yaml.safe_load_all(f) if doc is not None)


def load_manifest(name: str) -> dict:
    (doc,) = load_docs(KUBERAY / name)
    return doc


def all_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS for doc in load_docs(path)]


def cluster_spec(doc: dict) -> dict | None:
    """The RayCluster spec of a RayCluster, or the one a RayJob creates."""
    if doc["kind"] == "RayCluster":
        return doc["spec"]
    return doc["spec"].get("rayClusterSpec")


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group spec) for the head group and every worker group."""
    return [("head", spec["headGroupSpec"])] + [
        (group["groupName"], group) for group in spec.get("workerGroupSpecs", [])
    ]


def ray_container(group: dict) -> dict:
    # KubeRay treats the first container of a pod template as the Ray container.
    return group["template"]["spec"]["containers"][0]


def all_groups() -> list[tuple[str, str, dict]]:
    out = []
    for path, doc in all_docs():
        spec = cluster_spec(doc)
        if spec is not None:
            out += [(path.name, name, group) for name, group in groups(spec)]
    return out


def all_containers() -> list[tuple[str, dict]]:
    out = []
    for manifest, group_name, group in all_groups():
        pod = group["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            out.append((f"{manifest}:{group_name}:{container['name']}", container))
    return out


def parse_quantity(value: int | str) -> float:
    """Kubernetes resource quantity to a number (bytes for memory)."""
    units = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "Pi": 2**50,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "P": 1e15,
        "m": 1e-3,
    }
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, f"not a quantity: {value!r}"
    number, unit = match.groups()
    return float(number) * (units[unit] if unit else 1)


def entrypoint_argv(doc: dict) -> list[str]:
    return shlex.split(doc["spec"]["entrypoint"])


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"\d+(?:\.\d+)*", text).group().split("."))


def pyproject_dependencies() -> list[str]:
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def pinned_ray_version() -> str:
    for requirement in pyproject_dependencies():
        match = re.fullmatch(r"ray(\[[^\]]*\])?==(\S+)", requirement.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml does not pin ray")


# ---------------------------------------------------------------------------------------------
# CRD schema validation


def to_json_schema(node: dict) -> dict:
    """An OpenAPI v3 structural schema as a JSON schema that checks like the API server.

    x-kubernetes-* extension keys are dropped (their CEL rules are not evaluated), `nullable`
    becomes a null type, and objects with listed properties and no additionalProperties or
    x-kubernetes-preserve-unknown-fields reject unknown fields: the API server prunes them
    and `kubectl apply`'s strict field validation reports them, so a typo must fail here too.
    """
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    open_object = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not open_object:
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    crd_dir = find_crd_dir()
    if crd_dir is None:
        pytest.skip("KubeRay CRDs not found (shared/schemas/kuberay); set CLIPFORGE_KUBERAY_CRDS")
    with open(crd_dir / CRD_FILES[kind]) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served["served"] and not served.get("deprecated"), f"{api_version} {kind} is not current"
    schema = to_json_schema(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["kind"], doc["apiVersion"])
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(doc)
    ]


def test_manifests_present():
    assert {p.name for p in MANIFESTS} == {"raycluster-cpu-prepare.yaml", *JOB_SCRIPTS}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_crd_schema(path):
    for doc in load_docs(path):
        assert doc["kind"] in CRD_FILES, f"{path.name}: unexpected kind {doc['kind']}"
        assert schema_errors(doc) == []


def test_schema_check_rejects_typos_and_wrong_types():
    """The validator itself: unknown fields and wrong types must fail, or the test above is void."""
    job = load_manifest("rayjob-train.yaml")
    typo = {**job, "spec": {**job["spec"], "shutdownAfterJobsFinish": True}}
    assert any("shutdownAfterJobsFinish" in e for e in schema_errors(typo))
    wrong_type = {**job, "spec": {**job["spec"], "backoffLimit": "two"}}
    assert any(e.startswith("spec/backoffLimit") for e in schema_errors(wrong_type))
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    missing = {k: v for k, v in worker.items() if k != "maxReplicas"}
    no_max = {
        **job,
        "spec": {**job["spec"], "rayClusterSpec": {**job["spec"]["rayClusterSpec"], "workerGroupSpecs": [missing]}},
    }
    assert any("maxReplicas" in e for e in schema_errors(no_max))


# ---------------------------------------------------------------------------------------------
# Rules the KubeRay operator enforces beyond the schema (ray-operator/.../utils/validation.go)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_operator_admission_rules(path):
    for doc in load_docs(path):
        name = doc["metadata"]["name"]
        limit = MAX_RAYJOB_NAME if doc["kind"] == "RayJob" else MAX_RAYCLUSTER_NAME
        assert DNS1035_RE.match(name) and len(name) <= limit, f"bad {doc['kind']} name {name!r}"
        spec = cluster_spec(doc)
        names = [group_name for group_name, _ in groups(spec)]
        assert len(names) == len(set(names)), f"{path.name}: duplicate worker group names"
        for group_name, group in groups(spec):
            params = group.get("rayStartParams", {})
            assert "labels" not in params, f"{group_name}: use the group's labels field"
            resource_keys = ("num-cpus", "num-gpus", "memory", "resources")
            sets_resources = any(params.get(k) for k in resource_keys)
            assert not (sets_resources and group.get("resources")), (
                f"{group_name}: resources set both in rayStartParams and resources"
            )
            if group_name != "head":
                assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
            if spec.get("authOptions", {}).get("mode") == "token":
                assert version_tuple(spec["rayVersion"]) >= MIN_TOKEN_AUTH_RAY_VERSION


@pytest.mark.parametrize("name", sorted(JOB_SCRIPTS))
def test_rayjob_lifecycle(name):
    spec = load_manifest(name)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert "backoffLimit" in spec and spec["backoffLimit"] >= 0
    assert "clusterSelector" not in spec, "each RayJob brings its own cluster"
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"


def test_prepare_job_runs_on_the_prepare_cluster_spec():
    cluster = load_manifest("raycluster-cpu-prepare.yaml")["spec"]
    job = load_manifest("rayjob-prepare-cc12m.yaml")["spec"]["rayClusterSpec"]
    assert job == cluster


# ---------------------------------------------------------------------------------------------
# Entry points


@pytest.mark.parametrize("name", sorted(JOB_SCRIPTS))
def test_entrypoint_runs_its_script(name):
    argv = entrypoint_argv(load_manifest(name))
    assert argv[:2] == ["python", JOB_SCRIPTS[name]]
    assert "\n" not in load_manifest(name)["spec"]["entrypoint"]


def referenced_scripts() -> list[str]:
    scripts = set(JOB_SCRIPTS.values())
    if README.is_file():
        scripts |= set(re.findall(r"\bpython3? ((?:pipelines|training|evaluation)/[\w/]+\.py)", README.read_text()))
    return sorted(scripts)


@pytest.mark.parametrize("script", referenced_scripts())
def test_referenced_script_exists(script):
    """Paths relative to the repository root, which is the image's working directory."""
    assert (REPO_ROOT / script).is_file(), f"{script} does not exist in the repository"


def test_train_entrypoint_fits_the_gpu_cluster():
    doc = load_manifest("rayjob-train.yaml")
    argv = entrypoint_argv(doc)
    assert "--use-gpu" in argv
    for flag in ("--data", "--storage"):
        assert flag_value(argv, flag).startswith("s3://"), f"{flag} must be an S3 URI"
    gpu_groups = [
        g
        for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        if GPU in ray_container(g)["resources"].get("limits", {})
    ]
    max_gpus = sum(int(ray_container(g)["resources"]["limits"][GPU]) * g["maxReplicas"] for g in gpu_groups)
    assert int(flag_value(argv, "--num-workers")) <= max_gpus


# ---------------------------------------------------------------------------------------------
# Resources


def test_gpu_requests_are_limits():
    """Extended resources must be in limits; a request alone is rejected by Kubernetes."""
    for where, container in all_containers():
        resources = container.get("resources", {})
        if GPU in resources.get("requests", {}):
            assert resources.get("limits", {}).get(GPU) == resources["requests"][GPU], where


def test_train_cluster_has_8_gpu_worker_pods():
    spec = load_manifest("rayjob-train.yaml")["spec"]["rayClusterSpec"]
    gpu_groups = [g for g in spec["workerGroupSpecs"] if g["groupName"].startswith("gpu")]
    assert gpu_groups
    for group in gpu_groups:
        assert int(ray_container(group)["resources"]["limits"][GPU]) == GPUS_PER_TRAIN_POD
        assert 1 <= group["minReplicas"] <= group["maxReplicas"]
    assert GPU not in ray_container(spec["headGroupSpec"])["resources"].get("limits", {})


def test_evaluate_cluster_has_one_gpu():
    spec = load_manifest("rayjob-evaluate.yaml")["spec"]["rayClusterSpec"]
    gpus = [
        int(ray_container(g)["resources"].get("limits", {}).get(GPU, 0)) * (1 if name == "head" else g["maxReplicas"])
        for name, g in groups(spec)
    ]
    assert sum(gpus) == 1


def test_prepare_clusters_are_cpu_only():
    for manifest, group_name, group in all_groups():
        if "prepare" in manifest:
            assert GPU not in ray_container(group)["resources"].get("limits", {}), group_name


def test_gpu_pods_tolerate_the_gpu_taint():
    for manifest, group_name, group in all_groups():
        if GPU in ray_container(group)["resources"].get("limits", {}):
            keys = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
            assert GPU in keys, f"{manifest}:{group_name}"


def test_dev_shm_is_memory_backed_and_fits_the_object_store():
    for manifest, group_name, group in all_groups():
        where = f"{manifest}:{group_name}"
        pod = group["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in ray_container(group).get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"{where}: no /dev/shm mount"
        (volume,) = [v for v in pod.get("volumes", []) if v["name"] == mounts["/dev/shm"]]
        assert volume["emptyDir"]["medium"] == "Memory", where
        shm_bytes = parse_quantity(volume["emptyDir"]["sizeLimit"])
        object_store = group.get("rayStartParams", {}).get("object-store-memory")
        if object_store is not None:
            assert int(object_store) <= shm_bytes, f"{where}: object store exceeds /dev/shm"
        memory_limit = parse_quantity(ray_container(group)["resources"]["limits"]["memory"])
        assert shm_bytes < memory_limit, f"{where}: /dev/shm counts against the memory limit"


# ---------------------------------------------------------------------------------------------
# Secrets and authentication


def infra_text_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", infra_text_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_no_inline_secrets(path):
    text = path.read_text()
    assert not AWS_ACCESS_KEY_ID_RE.search(text), "AWS access key id"
    assert not SECRET_ASSIGNMENT_RE.search(text), "a secret assigned inline"
    assert not [s for s in AWS_SECRET_KEY_RE.findall(text) if looks_random(s)], (
        "40-character string that looks like an AWS secret access key"
    )


def looks_random(candidate: str) -> bool:
    """Mixed case and digits, as in AWS secret keys; paths and words rarely have all three."""
    return all(re.search(cls, candidate) for cls in ("[A-Z]", "[a-z]", "[0-9]"))


def test_secret_detectors_catch_aws_keys():
    """The detectors above, on AWS's documented example key pair (split so scanners skip it)."""
    key_id, secret = "AKIA" + "IOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    assert AWS_ACCESS_KEY_ID_RE.search(f"value: {key_id}")
    assert [s for s in AWS_SECRET_KEY_RE.findall(f"value: {secret}") if looks_random(s)]
    assert SECRET_ASSIGNMENT_RE.search(f"aws_secret_access_key = {secret}")
    assert not [s for s in AWS_SECRET_KEY_RE.findall("s3://BUCKET/runs/RUN/checkpoints/CHECKPOINT") if looks_random(s)]


def test_no_secret_objects_in_manifests():
    assert all(doc["kind"] != "Secret" for _, doc in all_docs())


def test_sensitive_env_vars_come_from_secrets():
    for where, container in all_containers():
        for env in container.get("env", []):
            if SENSITIVE_ENV_RE.search(env["name"]):
                assert "value" not in env, f"{where}: {env['name']} is inline"
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {env['name']}"
            if env["name"] == "RAY_AUTH_MODE":
                assert env.get("value") != "disabled", f"{where}: auth disabled"


def test_every_ray_container_gets_s3_credentials():
    for manifest, group_name, group in all_groups():
        env = {e["name"]: e for e in ray_container(group).get("env", [])}
        for name, optional in [
            ("AWS_ACCESS_KEY_ID", False),
            ("AWS_SECRET_ACCESS_KEY", False),
            ("AWS_ENDPOINT_URL", True),
        ]:
            assert name in env, f"{manifest}:{group_name}: {name} missing"
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"] and bool(ref.get("optional")) == optional


def test_token_auth_everywhere_with_one_secret():
    secrets = set()
    for path, doc in all_docs():
        spec = cluster_spec(doc)
        assert spec["authOptions"]["mode"] == "token", path.name
        secrets.add(spec["authOptions"].get("secretName"))
    assert len(secrets) == 1 and None not in secrets


# ---------------------------------------------------------------------------------------------
# One image, one Ray version


def test_one_image_across_manifests():
    images = {container["image"] for _, container in all_containers()}
    assert len(images) == 1, images
    (image,) = images
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag not in ("", "latest"), f"pin a tag: {image}"


def test_ray_versions_agree():
    ray = pinned_ray_version()
    assert {cluster_spec(doc)["rayVersion"] for _, doc in all_docs()} == {ray}
    assert base_image_match().group("ray") == ray


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, flags=re.MULTILINE)
    ]


def dockerfile_args() -> dict[str, str]:
    args = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
    return args


def base_image_match() -> re.Match:
    (base,) = [rest for instruction, rest in dockerfile_instructions() if instruction == "FROM"]
    image = re.sub(r"\$\{?(\w+)\}?", lambda m: dockerfile_args()[m.group(1)], base.split()[0])
    match = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?:gpu|cu\d+)", image)
    assert match, f"base image {image} is not an official Ray GPU image"
    return match


def pip_installs() -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN instruction."""
    installs = []
    for instruction, rest in dockerfile_instructions():
        if instruction != "RUN":
            continue
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command: list[str] = []
        for token in list(lexer) + [";"]:
            if set(token) <= set(";&|"):
                words = [w for w in command if w not in ("python", "python3", "-m")]
                if len(words) >= 2 and words[0].endswith("pip") and words[1] == "install":
                    installs.append(words[2:])
                command = []
            else:
                command.append(token)
    return installs


def test_base_image_matches_python():
    requires = tomllib.loads(PYPROJECT.read_text())["project"]["requires-python"]
    assert re.search(r">=\s*3\.11\b", requires) and base_image_match().group("py") == "311"


def test_dockerfile_installs_the_project_from_pyproject():
    installs = pip_installs()
    assert any("." in args and "--no-cache-dir" in args for args in installs), installs
    for args in installs:
        packages = [a for a in args if not a.startswith("-") and a != "."]
        assert all(a.startswith("$") for a in packages), (
            f"install dependencies through pyproject.toml, not by hand: {packages}"
        )


def test_only_headless_opencv():
    opencv = re.compile(r"^opencv-python(?![-\w])")
    for args in pip_installs():
        assert not any(opencv.match(a) for a in args), args
    dependencies = [re.split(r"[<>=!~\[; ]", d)[0].lower() for d in pyproject_dependencies()]
    assert "opencv-python" not in dependencies and "opencv-python-headless" in dependencies


def test_entrypoints_resolve_in_the_image():
    """KubeRay starts Ray in the image's working directory; the project must be copied there."""
    instructions = dockerfile_instructions()
    workdirs = [i for i, (instruction, _) in enumerate(instructions) if instruction == "WORKDIR"]
    copies = [
        i
        for i, (instruction, rest) in enumerate(instructions)
        if instruction == "COPY" and rest.split()[-2:] == [".", "."]
    ]
    assert workdirs and copies and workdirs[-1] < copies[-1]


def test_dockerfile_bakes_in_no_secrets():
    for instruction, rest in dockerfile_instructions():
        if instruction in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", rest) or [rest.split()[0]]
            assert not any(SENSITIVE_ENV_RE.search(n) for n in names), rest
        if instruction in ("COPY", "ADD"):
            assert not re.search(r"\.aws|\.env\b|credentials|\.pem|auth_token", rest), rest
    ignored = DOCKERIGNORE.read_text().split()
    for pattern in (".git", ".venv", "**/.env", "**/.aws"):
        assert pattern in ignored
