"""MLflow: one MLflow run per server run (created once, its id stored on the TrackingLink, then
resumed by id), metrics `train/<name>` and `eval/<name>` at the run's cumulative step, the run's
lineage ids as tags. Uses `MlflowClient` (explicit run ids, safe in a thread)."""

from __future__ import annotations

from typing import Any

from server.models import Run, TrackingLink
from server.settings import Settings
from server.tracking.exporter import Point

BATCH = 1000  # MLflow's log_batch limit on metrics per call


class MlflowBackend:
    def __init__(self) -> None:
        self.client: Any = None
        self.run_id = ""
        self.logged: set[tuple[str, int]] = set()  # (key, step) the run already has

    def open(self, link: TrackingLink, run: Run, settings: Settings) -> str:
        from mlflow.tracking import MlflowClient

        config = link.config or {}
        # default: a SQLite store under the data dir (MLflow 3 keeps its ./mlruns file store only behind
        # MLFLOW_ALLOW_FILE_STORE=true)
        uri = (
            config.get("tracking_uri")
            or settings.mlflow_tracking_uri
            or f"sqlite:///{(settings.data_dir / 'mlflow.db').resolve()}"
        )
        self.client = MlflowClient(tracking_uri=uri)
        if link.tracking_run_id:
            self.run_id = link.tracking_run_id
            self.client.update_run(self.run_id, status="RUNNING")
            # read back what the run has (a crash may have come between logging and the watermark's commit)
            for key in self.client.get_run(self.run_id).data.metrics:
                self.logged |= {(key, m.step) for m in self.client.get_metric_history(self.run_id, key)}
            return self.run_id
        name = config.get("experiment") or "halos"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        created = self.client.create_run(
            experiment_id, run_name=run.name or run.id, tags={"halos.run_id": run.id, "halos.model_id": run.model_id}
        )
        self.run_id = created.info.run_id
        params = {
            "loss": (run.loss or {}).get("name"),
            **{f"loss.{k}": v for k, v in (run.loss or {}).items()},
            **{f"hyperparams.{k}": v for k, v in (run.hyperparams or {}).items()},
        }
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items() if v is not None])
        return self.run_id

    def log(self, points: list[Point]) -> None:
        from mlflow.entities import Metric

        metrics = []
        for p in points:
            for name, value in p.values.items():
                key = f"{p.split}/{name}"
                if (key, p.step) not in self.logged:
                    metrics.append(Metric(key, value, p.timestamp_ms, p.step))
                    self.logged.add((key, p.step))
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH])

    def set_lineage(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def close(self) -> None:
        if self.client is not None and self.run_id:
            self.client.set_terminated(self.run_id, status="FINISHED")
