"""The trainer's command line and `accelerate launch`'s config file, from the worker's settings.

    python -m accelerate.commands.launch --config_file accelerate.yaml \
        -m <settings.trainer_module> --config run.json          # several processes, or FSDP
    python -m <settings.trainer_module> --config run.json       # one process (`needs_launcher`)

The worker never imports accelerate (or torch): it only writes the YAML accelerate reads.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import yaml

from halos_core.run_dir import RunDir
from server.settings import Settings


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_config(
    settings: Settings, *, main_process_port: int | None = None, port_from_settings: bool = True
) -> dict[str, Any]:
    n = max(1, int(settings.num_processes))
    if settings.fsdp:
        # FSDP2; also on CPU (tests/CI): the trainer turns accelerate's MULTI_CPU into FSDP over gloo
        # when the launcher exports ACCELERATE_USE_FSDP (halos_core.sharded). LoRA + FSDP is refused.
        distributed_type = "FSDP"
    elif n > 1:
        # also on CPU: accelerate 1.x hands MULTI_CPU to its simple launcher, which starts ONE
        # process; MULTI_GPU goes through torch.distributed.run (N local ranks) and the trainer
        # forms a gloo group because ACCELERATE_USE_CPU=true is in its environment (launch_env)
        distributed_type = "MULTI_GPU"
    else:
        distributed_type = "NO"
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed_type,
        "num_processes": n,
        "num_machines": 1,
        "machine_rank": 0,
        "mixed_precision": settings.mixed_precision,
        "use_cpu": bool(settings.use_cpu),
        "debug": False,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "enable_cpu_affinity": False,
        "downcast_bf16": "no",
    }
    config["gpu_ids"] = "all"
    if n > 1:
        config["main_process_ip"] = "127.0.0.1"
        configured = settings.main_process_port if port_from_settings else None
        config["main_process_port"] = main_process_port or configured or free_port()
    if distributed_type == "FSDP":
        config["fsdp_config"] = {
            "fsdp_version": 2,  # FSDP2 (fully_shard); the trainer refuses FSDP1
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # decoder layers (the LM's _no_split_modules)
            "fsdp_reshard_after_forward": True,  # FULL_SHARD
            # checkpoints hold the FULL state, gathered by every rank and written by rank 0: the
            # model export and optimizer.pt are complete (not rank 0's shard), in the DDP layout
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_offload_params": False,
            # every rank loads the weights: with this on, transformers leaves ranks > 0 of the
            # (never prepared) frozen reference model on the meta device
            "fsdp_cpu_ram_efficient_loading": False,
        }
    return config


def write_accelerate_config(
    run_dir: RunDir, settings: Settings, *, main_process_port: int | None = None, port_from_settings: bool = True
) -> Path:
    """`port_from_settings=False` (a worker running several jobs at once): ignore a configured
    `main_process_port`, every job gets a free port unless `main_process_port` is given."""
    path = run_dir.accelerate_yaml
    tmp = path.with_name(".tmp-" + path.name)
    config = accelerate_config(settings, main_process_port=main_process_port, port_from_settings=port_from_settings)
    tmp.write_text(yaml.safe_dump(config, sort_keys=True))
    tmp.replace(path)
    return path


def launch_env(settings: Settings) -> dict[str, str]:
    """Environment for the launcher: the multi-process launcher does not export `use_cpu` itself."""
    return {"ACCELERATE_USE_CPU": "true"} if settings.use_cpu else {}


def needs_launcher(settings: Settings) -> bool:
    """Whether a round needs `accelerate launch`: several processes (it starts the ranks) or FSDP
    (it exports the FSDP settings the trainer reads). One process without FSDP does not: the
    launcher would only be a second interpreter (its own imports, memory and start-up time) that
    starts the trainer with `distributed_type: NO`, which is what the trainer does on its own."""
    return max(1, int(settings.num_processes)) > 1 or bool(settings.fsdp)


def command(settings: Settings, run_dir: RunDir) -> list[str]:
    python = settings.python_executable or sys.executable
    trainer = ["-m", settings.trainer_module, "--config", str(run_dir.run_json)]
    if not needs_launcher(settings):
        return [python, *trainer]
    return [python, "-m", "accelerate.commands.launch", "--config_file", str(run_dir.accelerate_yaml), *trainer]
