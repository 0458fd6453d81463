"""The trainer's command line and `accelerate launch`'s config file, from the worker's settings.

    python -m accelerate.commands.launch --config_file accelerate.yaml \
        -m <settings.trainer_module> --config run.json          # several processes, or FSDP
    python -m <settings.trainer_module> --config run.json       # one process (`needs_launcher`)

A multi-node attempt (`Node`: this worker's machine rank in a gang of k, server/jobs/gang.py):
every node runs `accelerate launch` with `num_machines: k`, its `machine_rank`, `num_processes:
k x num_processes` and the gang's c10d rendezvous endpoint (`rdzv_backend: c10d`,
`main_process_ip:main_process_port` = rank 0's worker); torchrun's elastic agents meet there.
Rank 0's worker hosts the rendezvous store (`--rdzv_conf is_host=true`, the others `false`: on
one machine every node's address matches the endpoint). Each node writes its own
`accelerate-node<r>.yaml`; they all read rank 0's run.json.

The worker never imports accelerate (or torch): it only writes the YAML accelerate reads.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from halos_core.run_dir import RunDir
from server.settings import Settings


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Node:
    """This worker's place in a multi-node attempt."""

    rank: int  # machine rank (0: the worker that opened the gang and hosts the rendezvous)
    nodes: int
    address: str  # rank 0's worker: the c10d rendezvous endpoint
    port: int


def accelerate_config(
    settings: Settings,
    *,
    main_process_port: int | None = None,
    port_from_settings: bool = True,
    node: Node | None = None,
) -> dict[str, Any]:
    n = max(1, int(settings.num_processes))
    if node is not None:
        return _node_config(settings, n, node)
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


def _node_config(settings: Settings, n: int, node: Node) -> dict[str, Any]:
    """One node of a multi-node attempt. `MULTI_GPU` also on CPU (see above: it goes through
    torch.distributed.run, which runs the multi-node rendezvous); FSDP across nodes likewise."""
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP" if settings.fsdp else "MULTI_GPU",
        "num_processes": n * node.nodes,  # accelerate counts every machine's processes
        "num_machines": node.nodes,
        "machine_rank": node.rank,
        "main_process_ip": node.address,
        "main_process_port": node.port,
        # c10d: torchrun's dynamic rendezvous (its store on rank 0's worker); not `same_network`,
        # which would make accelerate fall back to a static rendezvous on master_addr/port
        "rdzv_backend": "c10d",
        "same_network": False,
        "mixed_precision": settings.mixed_precision,
        "use_cpu": bool(settings.use_cpu),
        "gpu_ids": "all",
        "debug": False,
        "main_training_function": "main",
        "enable_cpu_affinity": False,
        "downcast_bf16": "no",
    }
    if settings.fsdp:
        config["fsdp_config"] = accelerate_config(settings.model_copy(update={"num_processes": 2}))["fsdp_config"]
    return config


def write_accelerate_config(
    run_dir: RunDir,
    settings: Settings,
    *,
    main_process_port: int | None = None,
    port_from_settings: bool = True,
    node: Node | None = None,
) -> Path:
    """`port_from_settings=False` (a worker running several jobs at once): ignore a configured
    `main_process_port`, every job gets a free port unless `main_process_port` is given. A node of
    a multi-node attempt writes `accelerate-node<rank>.yaml` (several nodes share the directory)."""
    path = run_dir.accelerate_yaml if node is None else run_dir.node_accelerate_yaml(node.rank)
    tmp = path.with_name(".tmp-" + path.name)
    config = accelerate_config(
        settings, main_process_port=main_process_port, port_from_settings=port_from_settings, node=node
    )
    tmp.write_text(yaml.safe_dump(config, sort_keys=True))
    tmp.replace(path)
    return path


def launch_env(settings: Settings) -> dict[str, str]:
    """Environment for the launcher: the multi-process launcher does not export `use_cpu` itself."""
    return {"ACCELERATE_USE_CPU": "true"} if settings.use_cpu else {}


def needs_launcher(settings: Settings, node: Node | None = None) -> bool:
    """Whether a round needs `accelerate launch`: several processes (it starts the ranks), FSDP
    (it exports the FSDP settings the trainer reads) or several nodes (the rendezvous). One process
    without FSDP does not: the launcher would only be a second interpreter (its own imports, memory
    and start-up time) that starts the trainer with `distributed_type: NO`, which is what the
    trainer does on its own."""
    return max(1, int(settings.num_processes)) > 1 or bool(settings.fsdp) or node is not None


def command(settings: Settings, run_dir: RunDir, node: Node | None = None) -> list[str]:
    python = settings.python_executable or sys.executable
    trainer = ["-m", settings.trainer_module, "--config", str(run_dir.run_json)]
    if not needs_launcher(settings, node):
        return [python, *trainer]
    if node is None:
        return [python, "-m", "accelerate.commands.launch", "--config_file", str(run_dir.accelerate_yaml), *trainer]
    return [
        python,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(run_dir.node_accelerate_yaml(node.rank)),
        "--rdzv_conf",
        f"is_host={'true' if node.rank == 0 else 'false'}",
        *trainer,
    ]
