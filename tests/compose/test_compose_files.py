"""The compose files, read as compose reads them (no Docker needed): every long-running service has
a health check and a restart policy, and the CPU override's `worker-cpu` is the GPU `worker` minus
the device reservation (anchors do not reach across files, so it is a copy that must not drift)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
LONG_RUNNING = ("postgres", "redis", "api", "worker")
CPU_ONLY_ENV = {"HALOS_USE_CPU": "true", "HALOS_MIXED_PRECISION": "no"}


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())  # resolves the `<<: *anchor` merges


def test_long_running_services_have_health_checks_and_restart_policies() -> None:
    main, cpu = load("docker-compose.yml"), load("docker-compose.cpu.yml")
    services = {**main["services"], "worker-cpu": cpu["services"]["worker-cpu"]}
    for name in (*LONG_RUNNING, "worker-cpu"):
        svc = services[name]
        assert svc.get("restart") == "unless-stopped", name
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    assert main["services"]["migrate"]["restart"] == "no"  # one-shot: exits 0 and stays down
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "halos", "check"]


def test_main_file_runs_unchanged_with_compose_v1_and_v2() -> None:
    main = load("docker-compose.yml")
    assert "name" not in main and "version" not in main  # docker-compose 1.29 refuses a top-level `name`
    assert [s["image"] for s in (main["services"]["postgres"], main["services"]["redis"])] == ["postgres:16", "redis:7"]
    gpu = main["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]  # as GPU users need it


def test_cpu_worker_is_the_gpu_worker_without_the_reservation() -> None:
    main, cpu = load("docker-compose.yml"), load("docker-compose.cpu.yml")
    gpu_worker, cpu_worker = main["services"]["worker"], cpu["services"]["worker-cpu"]
    assert cpu["services"]["worker"] == {"profiles": ["gpu"]}  # the GPU worker is not started
    assert "deploy" not in cpu_worker and "profiles" not in cpu_worker
    differs = {"deploy", "shm_size", "environment"}
    assert {k: v for k, v in cpu_worker.items() if k not in differs} == {
        k: v for k, v in gpu_worker.items() if k not in differs
    }
    gpu_env = {k: v for k, v in gpu_worker["environment"].items() if k != "HALOS_MIXED_PRECISION"}
    assert cpu_worker["environment"] == {**gpu_env, **CPU_ONLY_ENV}
    assert gpu_env == {**main["x-halos-env"], "HALOS_WORKER_CONCURRENCY": "1"}
    assert cpu_worker["volumes"] == main["x-halos-volumes"]


def test_registration_roots_and_shared_settings() -> None:
    env = load("docker-compose.yml")["x-halos-env"]
    assert env["HALOS_DATA_DIR"] == "/data" and env["HALOS_MODEL_ROOTS"] == "/models"  # + /data/models by default
    assert {"HALOS_NUM_PROCESSES", "HALOS_FSDP"} <= env.keys()  # the API and the workers must agree
