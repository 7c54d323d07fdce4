"""cluster.yaml and the cluster workflow of the README.

Offline: cluster.yaml passes Ray's own cluster-config validation (what `ray up` checks before it
calls a cloud) and sets nodes up with run.sh, the README's own set-up script. With Ray: a head started with
Ray's fake multi-node provider, whose node types mirror cluster.yaml, gets a `ray job submit` of
jobs/train.py (token authentication on) that needs more CPUs than the head has; the autoscaler
adds a worker node, which is lost mid-epoch (its processes killed, as a machine that goes away);
the run resumes on a replacement node from its newest checkpoint, finishes, and the replacement
is removed once idle.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from raymoll.checkpoint import CHECKPOINT_FILE, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))  # the venv's ray CLI, like the cluster's


def load_cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def code_dir(cfg: dict) -> str:
    """Where file_mounts puts this repository on every node."""
    return next(remote for remote, local in cfg["file_mounts"].items() if local == ".")


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(load_cluster()))


def test_head_runs_no_training_and_gpu_workers_autoscale_from_zero():
    cfg = load_cluster()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert len(workers) >= 2  # one type for single-GPU trials, one for multi-GPU DDP
    for name, t in workers.items():
        assert t["min_workers"] == 0 < t["max_workers"] <= cfg["max_workers"], name
    assert cfg["idle_timeout_minutes"] > 0


def test_nodes_set_up_with_the_readmes_own_script():
    cfg = load_cluster()
    # The same idempotent script as the README's two commands, run in the synced repository.
    assert cfg["setup_commands"][0] == f"cd {code_dir(cfg)} && ./run.sh setup"
    assert "setup)" in (REPO / "run.sh").read_text()  # run.sh has the set-up-only verb
    assert code_dir(cfg) in cfg["file_mounts"]


def test_ray_runs_from_the_venv_with_token_auth_and_a_loopback_dashboard():
    cfg = load_cluster()
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
              if " start " in c]
    assert len(starts) == 2
    for command in starts:
        assert f"{code_dir(cfg)}/.venv/bin/ray start" in command
        assert "RAY_AUTH_MODE=token" in command
    head = next(c for c in cfg["head_start_ray_commands"] if " start " in c)
    assert "--dashboard-host=127.0.0.1" in head
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def test_readme_cluster_section_matches_cluster_yaml():
    readme = REPO / "README.md"
    section = re.search(r"^## On a cluster\n(.*?)(?=^## |\Z)",
                        readme.read_text() if readme.exists() else "", flags=re.M | re.S)
    if section is None:
        pytest.skip("README.md has no 'On a cluster' section yet")
    text = section.group(1)
    cfg = load_cluster()
    for name, t in cfg["available_node_types"].items():  # the node-type table's rows
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}` |")), "")
        assert row, f"README's node-type table lacks {name}"
        if name != cfg["head_node_type"]:
            assert f"| {t['min_workers']}-{t['max_workers']} |" in row, row
    for path in set(re.findall(r"\bjobs/[\w/]+\.(?:py|yaml)", text)):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"
    assert "ray up cluster.yaml" in text and "ray down cluster.yaml" in text


# ---------------------------------------------------------------------------------------------
# Autoscaling on one machine: Ray's fake multi-node provider

# Fake resources per worker type of cluster.yaml (there they are read from the instance type).
FAKE_RESOURCES = {"gpu1": {"CPU": 2, "GPU": 1}, "gpu8": {"CPU": 8, "GPU": 8}}
IDLE_TIMEOUT_MINUTES = 0.25


def fake_cluster_config(gcs_address: str) -> dict:
    """cluster.yaml's node types for the fake_multinode provider; every field spelled out,
    because the wheel lacks that provider's defaults file."""
    real = load_cluster()
    head_type = "ray.head.default"  # the only head type name the fake provider knows
    assert real["head_node_type"] == head_type
    types = {head_type: {"resources": real["available_node_types"][head_type]["resources"],
                         "node_config": {}, "min_workers": 0, "max_workers": 0}}
    for name, t in real["available_node_types"].items():
        if name != head_type:
            types[name] = {"resources": FAKE_RESOURCES[name], "node_config": {},
                           "min_workers": t["min_workers"], "max_workers": t["max_workers"]}
    return {
        "cluster_name": "raymoll-fake", "max_workers": 2,  # 2 cores here
        "upscaling_speed": 1.0, "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "auth": {}, "docker": {}, "available_node_types": types, "head_node_type": head_type,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def test_fake_cluster_mirrors_cluster_yaml_and_is_valid():
    from ray.autoscaler._private.util import validate_config
    real = load_cluster()
    fake = fake_cluster_config("127.0.0.1:6379")
    assert fake["available_node_types"].keys() == real["available_node_types"].keys()
    validate_config(fake)  # every field is given: nothing for prepare_config to fill in


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def ray_env(token_path: Path, **extra: str) -> dict:
    """This process's environment without any Ray settings of its own, plus token auth."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The venv first on PATH, as cluster.yaml sets it: a job's `python` must be the venv's.
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), **extra)
    return env


def dashboard_get(dashboard: str, token: str, path: str):
    """The JSON the head's dashboard answers for `path` (token-authenticated)."""
    request = urllib.request.Request(f"{dashboard}{path}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def nodes(dashboard: str, token: str) -> list[dict]:
    """Every node the cluster has seen (alive and dead), from the state API."""
    return dashboard_get(dashboard, token,
                         "/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]


def train_workers(dashboard: str, token: str) -> list[dict]:
    """Every Ray Train worker actor the cluster has seen (alive and dead), from the state API."""
    actors = dashboard_get(dashboard, token,
                           "/api/v0/actors?limit=1000&detail=true")["data"]["result"]["result"]
    return [a for a in actors if a["class_name"] == "RayTrainWorker"]


def wait_for(predicate, timeout: float, what: str, every: float = 2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def submit_job(dashboard: str, env: dict, submission_id: str, *entrypoint: str) -> None:
    """`ray job submit --working-dir <repo>` as the README runs it, without waiting for the end.

    Retried while the head's job agent is still starting (Ray answers "try again later").
    """
    for _ in range(30):
        job = subprocess.run([RAY, "job", "submit", f"--address={dashboard}", "--no-wait",
                              f"--submission-id={submission_id}", f"--working-dir={REPO}", "--",
                              *entrypoint], env=env, capture_output=True, text=True, timeout=120)
        if "No available agent to submit job" not in job.stderr:
            break
        time.sleep(2)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]


def job_ended(dashboard: str, token: str, submission_id: str) -> tuple[str, str] | None:
    """(status, output) of a job that has ended; None while it runs."""
    status = dashboard_get(dashboard, token, f"/api/jobs/{submission_id}")["status"]
    if status in ("PENDING", "RUNNING"):
        return None
    return status, dashboard_get(dashboard, token, f"/api/jobs/{submission_id}/logs")["logs"]


def complete_epochs(run_folder: Path) -> list[int]:
    """The epochs of the complete checkpoints in a run folder, in order, repeats kept."""
    epochs = []
    for path in run_folder.glob("checkpoint_*"):
        with contextlib.suppress(Exception):  # one still being written does not load yet
            epochs.append(load_checkpoint(path)["epoch"])
    return sorted(epochs)


def lose_node(node_id: str, marker: str) -> None:
    """Kill every process of one fake node at once (its raylet, agents and the workers they
    started), as a machine that goes away: the fake provider starts each node's processes with
    its node id in their environment, and each has this test cluster's `marker` too."""
    procs = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            env = proc.environ()
            if (env.get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id
                    and env.get("RAYMOLL_TEST_CLUSTER") == marker):
                procs.append(proc)
    assert procs, f"no processes of node {node_id}"
    for proc in procs:  # no waiting for them: their parents, not this test, reap them
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def stop_ray(marker: str) -> None:
    """Stop this test's Ray only (`ray stop` would stop every Ray on the machine, the test
    session's embedded one included): every process whose environment carries `marker`, which
    they all inherit from `ray start`, also those whose parent has exited."""
    procs = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("RAYMOLL_TEST_CLUSTER") == marker:
                procs.append(proc)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)  # as `ray stop`: SIGTERM, then SIGKILL
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


# The head's environment: the fake provider; the autoscaler looks every second; the GCS declares
# a node whose raylet stopped answering dead after 3 missed health checks 1 s apart (a lost
# node is noticed in seconds instead of Ray's default quarter of a minute or so).
HEAD_SETTINGS = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                 "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@pytest.fixture
def fake_cluster(tmp_path):
    """A head with the fake multi-node provider and token auth; yields (dashboard URL, token,
    client environment); stops this cluster's processes afterwards."""
    temp_dir = Path("/tmp") / f"raymoll-{secrets.token_hex(4)}"  # Ray's socket paths must stay short
    temp_dir.mkdir()
    token = secrets.token_hex(32)
    (tmp_path / "auth_token").write_text(token)
    env = ray_env(tmp_path / "auth_token", RAYMOLL_TEST_CLUSTER=str(temp_dir))
    gcs_port, dashboard_port, client_port, agent_port = free_ports(4)
    config = tmp_path / "fake_cluster.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(f"127.0.0.1:{gcs_port}")))
    head = load_cluster()["available_node_types"]["ray.head.default"]["resources"]
    try:
        subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1",
                        f"--num-cpus={head['CPU']}", "--num-gpus=0",
                        f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
                        f"--ray-client-server-port={client_port}",
                        f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={temp_dir}",
                        f"--autoscaling-config={config}", "--disable-usage-stats"],
                       env=env | HEAD_SETTINGS, check=True, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dashboard_port}", token, env
    finally:
        stop_ray(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
def test_submitted_train_job_scales_a_fake_cluster_up_survives_a_lost_node_and_scales_down(
        fake_cluster, fashion_mnist_dir, tmp_path):
    dashboard, token, env = fake_cluster
    [head] = nodes(dashboard, token)
    assert head["is_head_node"]
    with pytest.raises(urllib.error.HTTPError) as refused:  # token auth is on
        nodes(dashboard, secrets.token_hex(32))
    assert refused.value.code in (401, 403)

    # 2 workers x 1 CPU: the head has none, so the job can only run on a node the autoscaler
    # adds; both fit on one (2 CPUs). Epochs of a few seconds, 3 of them: the node is lost
    # after epoch 1's checkpoint, before the last one's.
    storage = tmp_path / "results"
    run = storage / "fake-cluster"
    submit_job(dashboard, env, "node-loss", "python", "jobs/train.py",
               "--config", "jobs/configs/fashion_small.yaml", f"data.path={fashion_mnist_dir}",
               "data.train_subset=2048", "data.batch_size=32", "data.num_workers=1",
               "eval.val_subset=256", "optim.epochs=3", "model.width=8",
               f"run.storage_path={storage}", "run.name=fake-cluster", "run.num_workers=2",
               "run.cpus_per_worker=1", "run.max_failures=1",
               "run.num_to_keep=10")  # keeps every epoch's checkpoint: a redone one would show

    def ended() -> tuple[str, str] | None:
        return job_ended(dashboard, token, "node-loss")

    def while_running(predicate):
        def check():  # fails at once when the job ends before `predicate` holds
            value = predicate()
            if not value and (end := ended()):
                raise AssertionError(f"the job ended early ({end[0]}): {end[1][-5000:]}")
            return value
        return check

    def alive_workers() -> list[dict]:
        alive = [w for w in train_workers(dashboard, token) if w["state"] == "ALIVE"]
        return alive if len(alive) == 2 else []

    alive = wait_for(while_running(alive_workers), 300, "2 training workers")
    [lost] = {w["node_id"] for w in alive}  # both on the one node the autoscaler added
    assert lost != head["node_id"]
    wait_for(while_running(lambda: complete_epochs(run)), 300, "epoch 1's checkpoint", every=0.5)
    lost_at = time.time()
    lose_node(lost, env["RAYMOLL_TEST_CLUSTER"])
    before = complete_epochs(run)
    assert before in ([1], [1, 2]), before  # lost mid-epoch, with an epoch still to train

    status, output = wait_for(ended, 400, "the job to end")
    assert status == "SUCCEEDED", output[-5000:]
    printed = re.search(r"last checkpoint:\s+(\S+)", output)
    assert printed and Path(printed.group(1)).is_relative_to(storage), output[-3000:]
    last = Path(printed.group(1))
    assert load_checkpoint(last)["epoch"] == 3
    # Resumed from the newest checkpoint: each epoch trained (and saved) once.
    assert complete_epochs(run) == [1, 2, 3]
    # ... on a node the autoscaler added after the loss.
    started = {n["node_id"]: n["start_time_ms"] / 1000 for n in nodes(dashboard, token)}
    resumed_on = {w["node_id"] for w in train_workers(dashboard, token)} - {lost}
    assert resumed_on and all(started[node] > lost_at for node in resumed_on), resumed_on

    def workers_if_all_removed() -> list[dict]:
        workers = [n for n in nodes(dashboard, token) if not n["is_head_node"]]
        return workers if all(n["state"] == "DEAD" for n in workers) else []

    workers = wait_for(workers_if_all_removed, IDLE_TIMEOUT_MINUTES * 60 + 120,
                       "every worker node removed")
    assert {n["node_id"] for n in workers} >= {lost} | resumed_on
    saved = (last / CHECKPOINT_FILE).stat().st_mtime  # the run's last work
    for node in workers:
        assert {k: node["resources_total"].get(k, 0) for k in ("CPU", "GPU")} in FAKE_RESOURCES.values()
        # The lost node died with the run unfinished; the others outlived their work, removed
        # once idle (Ray's status text says so too, but its wording is not an interface).
        if node["node_id"] == lost:
            assert lost_at < node["end_time_ms"] / 1000 < saved
        else:
            assert node["end_time_ms"] / 1000 > saved
