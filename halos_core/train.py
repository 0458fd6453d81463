"""Entry point of one training round.

    run(config) -> RunResult                       in-process (tests)
    python -m halos_core.train --config run.json   what the worker runs (one process), or `accelerate launch` runs

All settings come from run.json (a `halos_core.job_spec.RunConfig`); nothing is read from the
environment except what `accelerate launch` itself sets (ranks, world size, device) when it starts the round.

Exit status: 0 after result.json was written (rank 0); 1 on any exception, after printing the
traceback (the worker reports its tail). SIGTERM/SIGINT keep their default meaning (the process
dies), so killing the process group stops every rank.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halos_core.job_spec import RunConfig
from halos_core.round_result import RoundResult
from halos_core.run_dir import RunDir


@dataclass
class RunResult:
    """A finished in-process round: where it ran and its result.json (None on non-main processes)."""

    run_dir: Path
    result: RoundResult | None
    step: int
    examples: int
    round_step: int
    total_steps: int

    @property
    def final_dir(self) -> Path | None:
        return Path(self.result.final_dir) if self.result is not None else None

    @property
    def eval(self) -> dict[str, float]:
        return dict(self.result.eval) if self.result is not None else {}


def _load_config(config: RunConfig | str | Path) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    return RunConfig.model_validate_json(Path(config).read_text())


def run(config: RunConfig | str | Path, *, stop_after: int | None = None, keep_last: int | None = None) -> RunResult:
    """Train one round described by `config` (or the path of a run.json); returns its result.

    `stop_after` (tests) raises `halos_core.training.Stopped` after that many round steps, as if
    the process had been killed right after the step (and its checkpoint, if one was due).
    """
    from halos_core.checkpoint import DEFAULT_KEEP_LAST
    from halos_core.training import Trainer

    cfg = _load_config(config)
    trainer = Trainer.from_config(cfg, keep_last=DEFAULT_KEEP_LAST if keep_last is None else keep_last)
    try:
        result = trainer.train(stop_after=stop_after)
    finally:
        _release(trainer)
    return RunResult(
        run_dir=Path(cfg.run_dir),
        result=result,
        step=trainer.global_step(),
        examples=trainer.global_examples(),
        round_step=trainer.round_step,
        total_steps=trainer.train_loader.total_steps,
    )


def _release(trainer: Any) -> None:
    """Forget accelerate's process-wide singletons so another in-process run can configure its own."""
    acc = trainer.accelerator
    if acc.num_processes != 1:
        return
    try:
        from accelerate.state import AcceleratorState, GradientState

        acc.free_memory()
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    except Exception:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halos_core.train", description="Train one HALOs round.")
    parser.add_argument("--config", required=True, help="path of run.json (a RunConfig)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = _load_config(args.config)
        result = run(cfg)
        if result.result is not None:  # rank 0
            print(
                f"halos_core.train: ok step={result.step} examples={result.examples} "
                f"round_step={result.round_step} final={result.final_dir}",
                flush=True,
            )
        if result.result is not None and not RunDir(cfg.run_dir).result_json.is_file():
            raise RuntimeError("result.json was not written")
        return 0
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        return 1


if __name__ == "__main__":
    sys.exit(main())
