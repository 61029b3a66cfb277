"""One metrics.csv per output directory, continued across interruptions and resumes.

Lightning's CSVLogger starts a new `version_N/` directory per process and flushes every 100 steps, so after a kill
and a resume a run's history is split over files and the last steps before the kill are lost. `MetricsCSV` writes
`OUT/logs/metrics.csv` itself: every row is flushed when logged (a killed process loses nothing the OS has), and a
resumed run first drops the rows of the steps after the checkpoint it resumes from (they are about to be trained
again), so the file holds every step once. New columns (validation loss, DropBP's rates) rewrite the file with the
wider header; rewrites go through a temporary file and a rename, so the file is never half-written.
"""

from __future__ import annotations

import csv
import os
from argparse import Namespace
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from lightning.fabric.loggers import Logger
from lightning.fabric.utilities.rank_zero import rank_zero_only

METRICS_FILE = "metrics.csv"


class MetricsCSV(Logger):
    """A Fabric logger writing `root/metrics.csv` on global rank 0 (Fabric calls every rank's loggers).

    Nothing touches the disk until `begin` (or the first row, which begins a fresh file).
    """

    def __init__(self, root: Union[str, Path]) -> None:
        super().__init__()
        self.root = Path(root)
        self.path = self.root / METRICS_FILE
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.begun = False

    @rank_zero_only
    def begin(self, resume_step: Optional[int] = None) -> None:
        """Start the file: fresh (None; an earlier file is replaced, since a fresh run into a used directory is
        refused before this, see lit_model.train.run), or continued after `resume_step`, dropping later rows."""
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                self.rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resume_step]
        self._rewrite()
        self.begun = True

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> Union[int, str]:
        return 0

    @property
    def root_dir(self) -> str:
        return str(self.root)

    @property
    def log_dir(self) -> str:
        return str(self.root)

    def log_hyperparams(self, params: Union[dict[str, Any], Namespace], *args: Any, **kwargs: Any) -> None:
        """Hyper-parameters live in the checkpoints' hyperparameters.yaml, not in the metrics file."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        if not self.begun:
            self.begin(None)
        row = {"step": step if step is not None else len(self.rows)}
        for key, value in metrics.items():
            row[key] = value.item() if hasattr(value, "item") else value
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def _rewrite(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{METRICS_FILE}.tmp-{os.getpid()}")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns or ["step"])
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def finalize(self, status: str) -> None:
        """Every row is on disk already."""
