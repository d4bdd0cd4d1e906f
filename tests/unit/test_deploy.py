"""deploy/rayjob.yaml is a RayJob KubeRay accepts: every field is one of its CRD's, the entrypoint runs the job, the
workers ask for GPUs, Ray's token and the S3 keys come from Kubernetes Secrets, and no secret value is in the file.

The allowed field names below are copied from KubeRay v1.7.0 (tag v1.7.0, commit 59d663aeec13760646da3db9c1cf8cfe883e30b7):
ray-operator/config/crd/bases/ray.io_rayjobs.yaml, version v1 (openAPIV3Schema properties), which is generated from
ray-operator/apis/ray/v1/rayjob_types.go and raycluster_types.go; the pod-level names are the Kubernetes core/v1
fields that CRD embeds. The validation rules quoted are from ray-operator/controllers/ray/utils/validation.go.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RAYJOB = ROOT / "deploy" / "rayjob.yaml"

# --- KubeRay v1.7.0, ray.io_rayjobs.yaml (v1) ---------------------------------------------------------------------
TOP = {"apiVersion", "kind", "metadata", "spec", "status"}
OBJECT_META = {"name", "namespace", "labels", "annotations", "generateName"}  # metadata: type object (ObjectMeta)
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
               "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
               "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
RAYCLUSTER_SPEC = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                   "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy",
                   "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs"}
AUTH_OPTIONS = {"enableK8sTokenAuth", "mode", "secretName"}
AUTH_TOKEN_SECRET_KEY = "auth_token"  # utils.RAY_AUTH_TOKEN_SECRET_KEY: the key the Secret named by secretName holds
HEAD_GROUP = {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources", "serviceType",
              "template"}
WORKER_GROUP = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
                "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"}
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
POD_TEMPLATE = {"metadata", "spec"}
POD_TEMPLATE_META = {"annotations", "finalizers", "labels", "name", "namespace"}
POD_SPEC = {"activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers", "dnsConfig", "dnsPolicy",
            "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork", "hostPID", "hostUsers",
            "hostname", "hostnameOverride", "imagePullSecrets", "initContainers", "nodeName", "nodeSelector", "os",
            "overhead", "preemptionPolicy", "priority", "priorityClassName", "readinessGates", "resourceClaims",
            "resources", "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates", "schedulingGroup",
            "securityContext", "serviceAccount", "serviceAccountName", "setHostnameAsFQDN", "shareProcessNamespace",
            "subdomain", "terminationGracePeriodSeconds", "tolerations", "topologySpreadConstraints", "volumes"}
CONTAINER = {"args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle", "livenessProbe", "name", "ports",
             "readinessProbe", "resizePolicy", "resources", "restartPolicy", "restartPolicyRules", "securityContext",
             "startupProbe", "stdin", "stdinOnce", "terminationMessagePath", "terminationMessagePolicy", "tty",
             "volumeDevices", "volumeMounts", "workingDir"}
ENV_VAR = {"name", "value", "valueFrom"}
ENV_VALUE_FROM = {"configMapKeyRef", "fieldRef", "fileKeyRef", "resourceFieldRef", "secretKeyRef"}
SECRET_KEY_REF = {"key", "name", "optional"}
RESOURCES = {"claims", "limits", "requests"}
CONTAINER_PORT = {"containerPort", "hostIP", "hostPort", "name", "protocol"}
TOLERATION = {"effect", "key", "operator", "tolerationSeconds", "value"}
# validation.go: a RayJob's name is a DNS-1035 label of at most MaxRayJobNameLength (MaxRayClusterNameLength 53 - 6)
MAX_RAYJOB_NAME = 47
MIN_TOKEN_AUTH_RAY = (2, 52, 0)  # validation.go: "authOptions.mode is 'token' but minimum Ray version is 2.52.0"

SECRET_NAMES = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY", re.IGNORECASE)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    documents = list(yaml.safe_load_all(RAYJOB.read_text(encoding="utf-8")))
    assert len(documents) == 1
    return documents[0]


def _only(node: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(node) - allowed)
    assert not unknown, f"{where}: {unknown} are not fields of KubeRay v1.7.0's RayJob CRD here (allowed: {sorted(allowed)})"


def _check_pod_template(template: dict, where: str) -> None:
    _only(template, POD_TEMPLATE, where)
    _only(template.get("metadata", {}), POD_TEMPLATE_META, f"{where}.metadata")
    spec = template["spec"]
    _only(spec, POD_SPEC, f"{where}.spec")
    assert spec["containers"], f"{where}: a Ray pod needs a container (validation.go)"
    for i, container in enumerate(spec["containers"]):
        at = f"{where}.spec.containers[{i}]"
        _only(container, CONTAINER, at)
        assert container.get("name"), f"{at}: name is required"
        _only(container.get("resources", {}), RESOURCES, f"{at}.resources")
        for port in container.get("ports", []):
            _only(port, CONTAINER_PORT, f"{at}.ports")
        for env in container.get("env", []):
            _only(env, ENV_VAR, f"{at}.env[{env.get('name')}]")
            if "valueFrom" in env:
                _only(env["valueFrom"], ENV_VALUE_FROM, f"{at}.env[{env['name']}].valueFrom")
                _only(env["valueFrom"].get("secretKeyRef", {}), SECRET_KEY_REF, f"{at}.env[{env['name']}].valueFrom.secretKeyRef")
    for toleration in spec.get("tolerations", []):
        _only(toleration, TOLERATION, f"{where}.spec.tolerations")


def test_every_field_is_one_of_kuberays_rayjob_crd(rayjob):
    _only(rayjob, TOP, "(top)")
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    _only(rayjob["metadata"], OBJECT_META, "metadata")
    spec = rayjob["spec"]
    _only(spec, RAYJOB_SPEC, "spec")
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    cluster = spec["rayClusterSpec"]
    _only(cluster, RAYCLUSTER_SPEC, "spec.rayClusterSpec")
    _only(cluster["authOptions"], AUTH_OPTIONS, "spec.rayClusterSpec.authOptions")
    head = cluster["headGroupSpec"]
    _only(head, HEAD_GROUP, "headGroupSpec")
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # map[string]string
    _check_pod_template(head["template"], "headGroupSpec.template")
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        where = f"workerGroupSpecs[{group.get('groupName')}]"
        _only(group, WORKER_GROUP, where)
        assert WORKER_GROUP_REQUIRED <= set(group), f"{where} lacks {sorted(WORKER_GROUP_REQUIRED - set(group))}"
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        _check_pod_template(group["template"], f"{where}.template")


def test_the_name_and_versions_pass_kuberays_validation(rayjob):
    name = rayjob["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= MAX_RAYJOB_NAME
    ray_version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert tuple(int(p) for p in ray_version.split(".")) >= MIN_TOKEN_AUTH_RAY
    pinned = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert ray_version == pinned  # the cluster's Ray is the one the engine is tested with
    assert rayjob["spec"]["ttlSecondsAfterFinished"] >= 0


def test_it_runs_the_job_and_deletes_its_cluster(rayjob):
    spec = rayjob["spec"]
    assert spec["entrypoint"].startswith("python -m engine run jobs/apixaban.yaml")
    assert "--output s3://" in spec["entrypoint"]  # several nodes write the answers: a store they all reach
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["ttlSecondsAfterFinished"], int)
    assert "clusterSelector" not in spec  # its own cluster, made for the job


def _containers(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]["containers"][0]


def test_the_workers_ask_for_gpus_and_the_head_for_none(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    for group in cluster["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert resources.get("requests", {}).get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) == resources["limits"]["nvidia.com/gpu"]
    head = cluster["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    assert head["rayStartParams"].get("num-cpus") == "0"  # no model actor or read task on the head


def _env(container) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_token_auth_and_s3_keys_come_from_secrets(rayjob):
    auth = rayjob["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    for name, container in _containers(rayjob):
        env = _env(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        token = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert (token["name"], token["key"]) == (auth["secretName"], AUTH_TOKEN_SECRET_KEY), name
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"]["name"], (name, key)
        assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True  # only for backend openai


def test_no_secret_value_is_in_the_file(rayjob):
    for name, container in _containers(rayjob):
        for var, env in _env(container).items():
            if SECRET_NAMES.search(var):
                assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {var} must come from a Secret"
    text = RAYJOB.read_text(encoding="utf-8")
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # an AWS access key id
    assert not re.search(r"\bsk-[A-Za-z0-9_-]{16,}", text)  # an OpenAI-style key
    assert not re.search(r"(?im)^\s*(auth_token|aws_secret_access_key|api_key)\s*:", text)  # a Secret's data inlined
    assert "kind: Secret" not in text and "stringData" not in text


def test_the_image_is_a_marked_placeholder(rayjob):
    lines = [line for line in RAYJOB.read_text(encoding="utf-8").splitlines() if line.strip().startswith("image:")]
    assert len(lines) == len(list(_containers(rayjob)))
    for line in lines:
        assert "REPLACE-ME" in line and "IMAGE PLACEHOLDER" in line
    for _, container in _containers(rayjob):
        assert container["image"].startswith("REPLACE-ME")
