"""worker/slots.py: a worker running several jobs at once gives each its own GPUs and port."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from server import jobs
from server.settings import Settings
from tests.worker.support import REPO, add_round, settings_env, trainer_starts, wait_for
from worker import launch, runner
from worker.slots import Slot, SlotError, Slots, plan, slot_devices, visible_gpus
from worker.watchdog import read_environ


def test_slot_to_devices_mapping():
    gpus = [str(i) for i in range(8)]
    assert plan(4, 2, gpus) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert plan(2, 3, gpus) == [["0", "1", "2"], ["3", "4", "5"]]  # 6, 7 unused
    assert plan(3, 1, ["3", "1", "GPU-ab12"]) == [["3"], ["1"], ["GPU-ab12"]]  # CUDA_VISIBLE_DEVICES order
    assert slot_devices(1, 2, gpus) == ["2", "3"]
    with pytest.raises(SlotError, match="needs 4 GPUs, one set per job; 3 visible"):
        plan(2, 2, ["0", "1", "2"])
    with pytest.raises(SlotError):
        slot_devices(4, 2, gpus)


def test_visible_gpus_from_the_environment_or_nvidia_smi(tmp_path: Path):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"})[0] == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,3"})[0] == ["0"]  # CUDA stops at an invalid id
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""})[0] == []
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n"
        "echo '  MIG 1g.10gb Device 0: (UUID: MIG-x)'\n"
    )
    smi.chmod(0o755)
    assert visible_gpus({}, nvidia_smi=str(smi))[0] == ["0", "1"]
    assert visible_gpus({}, nvidia_smi=str(tmp_path / "missing"))[0] == []


def test_slots_assign_disjoint_gpus_and_free_ports(tmp_path: Path):
    gpu = Settings(data_dir=tmp_path, num_processes=2, main_process_port=29500)
    four = Slots(gpu, 2, environ={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    a, b = four.acquire(), four.acquire()
    assert (a.env, b.env) == ({"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"})
    assert a.main_process_port() is None and b.main_process_port() is None  # port ignored: a free one per job
    four.release(a)
    assert four.acquire().env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(SlotError):
        Slots(gpu, 3, environ={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    one = Slots(gpu, 1, environ={"CUDA_VISIBLE_DEVICES": ""})  # one job at a time: no restriction
    s = one.acquire()
    assert s.env == {} and s.main_process_port() == 29500
    cpu = Slots(Settings(data_dir=tmp_path, use_cpu=True, num_processes=2), 4, environ={"CUDA_VISIBLE_DEVICES": ""})
    assert cpu.acquire().env == {}
    cfg = launch.accelerate_config(gpu, port_from_settings=False)
    assert cfg["main_process_port"] != 29500
    assert launch.accelerate_config(gpu)["main_process_port"] == 29500


def test_worker_refuses_to_start_without_a_gpu_set_per_job(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data", use_cpu=False, num_processes=1)
    env = {**settings_env(settings), "HALOS_USE_CPU": "false", "CUDA_VISIBLE_DEVICES": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "worker", "--concurrency", "2", "--no-sweeper"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "refusing to start the worker: worker concurrency 2 x HALOS_NUM_PROCESSES 1 needs 2 GPUs" in proc.stderr


def test_the_trainer_sees_only_its_slots_gpus(make_env, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    env = make_env("slot")
    job = add_round(env.session, env.run, env.root, {"steps": 30, "sleep": 0.1})
    claim = jobs.claim(
        env.session, job.id, "h", 1, env.settings.lease_ttl_s, run_dir=str(env.settings.runs_dir / job.id)
    )
    box: dict = {}
    stop = threading.Event()
    thread = threading.Thread(
        target=lambda: box.setdefault("report", runner.run_job(claim, env.settings, stop, slot=Slot(1, ["6", "7"])))
    )
    thread.start()
    try:
        start = wait_for(lambda: trainer_starts(env.settings.runs_dir / job.id), 60, what="trainer start")[0]
        seen = read_environ(start["pid"], prefix=b"CUDA_VISIBLE_DEVICES")
        assert seen == {"CUDA_VISIBLE_DEVICES": "6,7"}
    finally:
        stop.set()
        thread.join(30)
    assert box["report"].action == "released"
