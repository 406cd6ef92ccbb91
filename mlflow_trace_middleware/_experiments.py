"""The process's own experiment: an id from the settings, or a name resolved (created if
missing) once, in the background, through MLflow's client.

Kept out of the exporter: the exporter posts to an experiment id; outgoing calls tell callees
the id (`_client`), so whoever needs it asks here, without I/O.
"""

from __future__ import annotations

import threading

from . import _log
from ._config import DEFAULT_EXPERIMENT, Settings


class Experiment:
    """`id()` is the experiment id, or None while a configured name is being resolved."""

    def __init__(self, settings: Settings) -> None:
        self._name = None if settings.experiment_id else settings.experiment_name
        self._id = settings.experiment_id or (None if self._name else DEFAULT_EXPERIMENT)
        self._tracking_uri = settings.tracking_uri
        self._lock = threading.Lock()
        self._resolving = False

    def id(self) -> str | None:
        """The id if known; otherwise start resolving the name (once) and return None."""
        if self._id is None:
            with self._lock:
                start, self._resolving = not self._resolving, True
            if start:
                threading.Thread(
                    target=self.resolve, name="mlflow-trace-experiment", daemon=True
                ).start()
        return self._id

    def resolve(self) -> None:
        """Look the name up, creating the experiment if missing (I/O: never on a request)."""
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self._tracking_uri)
            found = client.get_experiment_by_name(self._name or "")
            self._id = found.experiment_id if found else client.create_experiment(self._name or "")
        except Exception:
            _log.warn_limited(
                "experiment_unresolved",
                "mlflow-trace-middleware: cannot resolve experiment %r yet; spans stay queued",
                self._name,
            )
        finally:
            with self._lock:
                self._resolving = False
