"""cluster.yaml is a valid Ray cluster-launcher config (checked against the schema that ships with Ray)."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)


def test_cluster_yaml_installs_gpu_extra_and_uses_token_auth():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert any("EXTRAS=gpu" in command for command in config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)
    # the token reaches every node as Ray's token file; it is never written in the config
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    text = (ROOT / "cluster.yaml").read_text()
    assert "RAY_AUTH_TOKEN=" not in text and "RAY_AUTH_MODE=disabled" not in text
    gpu_types = {t: v["node_config"]["InstanceType"] for t, v in config["available_node_types"].items() if t != config["head_node_type"]}
    assert gpu_types and all(i.startswith(("g5", "g6", "p4", "p5")) for i in gpu_types.values())
