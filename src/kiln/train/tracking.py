"""Experiment tracking: MLflow when asked (imported lazily), nothing otherwise.

The default store is SQLite under ``./mlruns`` (``sqlite:///mlruns/mlflow.db``, run files in
``./mlruns/artifacts``): MLflow 3 refuses a plain ``./mlruns`` file store unless an environment variable opts
in, and Kiln does not set environment variables for other code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from kiln.errors import ConfigError, KilnError

logger = logging.getLogger(__name__)

DEFAULT_STORE_DIR = Path("mlruns")
INSTALL_HINT = 'pip install "mlflow-skinny>=3" "sqlalchemy>=2,<2.1" alembic'


class Tracker(Protocol):
    """Where a run's parameters, metrics and outputs go."""

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_dict(self, data: dict[str, Any], name: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracking switched off."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        return None

    def set_tags(self, tags: dict[str, str]) -> None:
        return None

    def finish(self, status: str = "FINISHED") -> None:
        return None


def default_tracking_uri() -> tuple[str, str]:
    """``(tracking URI, artifact location)`` of the local default store under ``./mlruns``."""
    root = DEFAULT_STORE_DIR.resolve()
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


class MlflowTracker:
    """One MLflow run, through an explicit ``MlflowClient`` (no global active-run state is touched).

    ``run_id`` given: that run is continued (a resumed training run keeps logging into its first MLflow run).
    """

    def __init__(self, tracking_uri: str, experiment: str, *, run_name: str, run_id: str | None = None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise KilnError(
                f"tracking needs MLflow, which is not installed; {INSTALL_HINT}, or set track = false"
            ) from exc
        artifact_location: str | None = None
        if not tracking_uri:
            DEFAULT_STORE_DIR.mkdir(parents=True, exist_ok=True)
            tracking_uri, artifact_location = default_tracking_uri()
        elif tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            artifact_location = (db.parent / "artifacts").resolve().as_uri()
        self.tracking_uri = tracking_uri
        try:
            self._client = MlflowClient(tracking_uri=tracking_uri)
            found = self._client.get_experiment_by_name(experiment)
        except Exception as exc:  # MLflow's refusal of the store: a paragraph and "internal error", exit 1
            first = str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f'MLflow cannot use the tracking store "{tracking_uri}" ({first}); pass --tracking-uri a sqlite:/// '
                "database (the default: sqlite:///mlruns/mlflow.db) or an http(s):// tracking server, or set "
                "track = false (a plain directory is a file store, which MLflow 3 refuses unless "
                "MLFLOW_ALLOW_FILE_STORE=true is set)",
                tracking_uri=tracking_uri,
            ) from exc
        experiment_id = (
            found.experiment_id
            if found is not None
            else self._client.create_experiment(experiment, artifact_location=artifact_location)
        )
        if run_id:
            try:
                self._client.update_run(run_id, status="RUNNING")
            except Exception as exc:  # the store is not the one the checkpoint's run lives in
                raise ConfigError(
                    f'MLflow run {run_id} (from the checkpoint) is not in the store "{tracking_uri}"; resume with '
                    "the tracking_uri of the first run, or set track = false",
                    run_id=run_id,
                ) from exc
            self.run_id: str | None = run_id
        else:
            self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        logger.info("MLflow run %s in %s", self.run_id, tracking_uri)

    def _run(self) -> str:
        assert self.run_id is not None
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._client.log_batch(self._run(), params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run(), metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self._client.log_dict(self._run(), data, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self._run(), key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self._run(), status=status)


def make_tracker(enabled: bool, tracking_uri: str, experiment: str, *, run_name: str, run_id: str | None) -> Tracker:
    if not enabled:
        return NullTracker()
    return MlflowTracker(tracking_uri, experiment, run_name=run_name, run_id=run_id)
