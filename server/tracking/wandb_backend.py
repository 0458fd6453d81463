"""Weights & Biases: one W&B run per server run (id stored on the TrackingLink; later rounds and
processes `resume="allow"` it), `train/<name>` and `eval/<name>` logged at the run's cumulative
step (W&B's `step`), the run's lineage ids in its config. Offline mode writes run files under
`wandb_dir` (default `<data_dir>/wandb`) for a later `wandb sync`."""

from __future__ import annotations

from typing import Any

from server.models import Run, TrackingLink
from server.settings import Settings
from server.tracking.exporter import Point


class WandbBackend:
    def __init__(self) -> None:
        self.run: Any = None

    def open(self, link: TrackingLink, run: Run, settings: Settings) -> str:
        import wandb

        config = link.config or {}
        directory = settings.wandb_dir or settings.data_dir / "wandb"
        directory.mkdir(parents=True, exist_ok=True)
        run_id = link.tracking_run_id or run.id.replace("_", "-")
        self.run = wandb.init(
            project=config.get("project") or "halos",
            entity=config.get("entity"),
            id=run_id,
            resume="allow",
            mode=config.get("mode") or "online",
            dir=str(directory),
            name=run.name or run.id,
            config={"halos_run_id": run.id, "model_id": run.model_id, "loss": run.loss, "hyperparams": run.hyperparams},
            settings=wandb.Settings(reinit="create_new", console="off", x_disable_stats=True, silent=True),
        )
        return run_id

    def log(self, points: list[Point]) -> None:
        for p in points:
            self.run.log({f"{p.split}/{k}": v for k, v in p.values.items()}, step=p.step)

    def set_lineage(self, tags: dict[str, str]) -> None:
        self.run.config.update({"lineage": tags}, allow_val_change=True)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
