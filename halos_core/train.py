"""Entry point of one training round.

    run(config) -> RunResult                       in-process (tests)
    python -m halos_core.train --config run.json   what `accelerate launch` runs

All settings come from run.json (a `halos_core.config.RunConfig`); nothing is read from the
environment except what `accelerate launch` itself sets (ranks, world size, device).

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

from halos_core.config import RunConfig
from halos_core.run_dir import RunDir


@dataclass
class RunResult:
    status: str  # "ok"
    run_dir: Path
    final_dir: Path | None
    step: int
    examples: int
    round_steps: int
    total_steps: int
    eval: dict[str, float]
    manifest_sha256: str | None
    reference_sha256: str | None
    result: dict[str, Any]  # result.json as written (empty on non-main ranks)


def _load_config(config: RunConfig | str | Path) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    return RunConfig.model_validate_json(Path(config).read_text())


def run(config: RunConfig | str | Path, *, stop_after: int | None = None, keep_last: int | None = None) -> RunResult:
    """Train one round described by `config` (or the path of a run.json); returns its result.

    `stop_after` (tests) raises `halos_core.trainer.Stopped` after that many round steps, as if
    the process had been killed right after the step (and its checkpoint, if one was due).
    """
    from halos_core.checkpoint import DEFAULT_KEEP_LAST
    from halos_core.trainer import Trainer

    cfg = _load_config(config)
    trainer = Trainer.from_config(cfg, keep_last=DEFAULT_KEEP_LAST if keep_last is None else keep_last)
    try:
        result = trainer.train(stop_after=stop_after)
    finally:
        _release(trainer)
    final = result.get("final_dir")
    return RunResult(
        status=result.get("status", "ok"),
        run_dir=Path(cfg.run_dir),
        final_dir=Path(final) if final else None,
        step=int(result.get("step", trainer.global_step())),
        examples=int(result.get("examples", trainer.global_examples())),
        round_steps=int(result.get("round_steps", trainer.round_step)),
        total_steps=int(result.get("total_steps", trainer.train_loader.total_steps)),
        eval=dict(result.get("eval", {})),
        manifest_sha256=result.get("manifest_sha256"),
        reference_sha256=result.get("reference_sha256"),
        result=result,
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
    except Exception:  # noqa: BLE001 - best effort, only matters for in-process reuse
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halos_core.train", description="Train one HALOs round.")
    parser.add_argument("--config", required=True, help="path of run.json (a RunConfig)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = _load_config(args.config)
        result = run(cfg)
        if result.result:  # rank 0
            print(
                f"halos_core.train: ok step={result.step} examples={result.examples} "
                f"round_steps={result.round_steps} final={result.final_dir}",
                flush=True,
            )
        if result.result and not RunDir(cfg.run_dir).result_json.is_file():
            raise RuntimeError("result.json was not written")
        return 0
    except Exception:  # noqa: BLE001 - report everything, exit non-zero (signals keep their meaning)
        traceback.print_exc()
        sys.stderr.flush()
        return 1


if __name__ == "__main__":
    sys.exit(main())
