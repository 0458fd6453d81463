"""One round of training (imports torch; never imported by the server or the worker).

    build.py    RunConfig -> Trainer: accelerator, data, models, optimizer, restore
    forward.py  the policy and reference forward passes the losses build their inputs from
    loop.py     Trainer: optimizer steps, metrics, intermediate checkpoints, eval, result.json
    saving.py   what a checkpoint holds for full weights / LoRA / FSDP2

`python -m halos_core.train` (halos_core/train.py) is the entry point the worker launches.
"""

from halos_core.training.build import align_schedule, build_trainer, check_compatible, load_examples
from halos_core.training.loop import RoundPosition, Stopped, Trainer, warmup_lambda

__all__ = [
    "RoundPosition",
    "Stopped",
    "Trainer",
    "align_schedule",
    "build_trainer",
    "check_compatible",
    "load_examples",
    "warmup_lambda",
]
