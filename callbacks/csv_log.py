"""A CSV logger whose `metrics.csv` survives a resume.

Lightning's CSVLogger deletes an existing `metrics.csv` when its writer is created
(lightning/fabric/loggers/csv_logs.py, `_ExperimentWriter._check_log_dir_exists`), so with the fixed
`version: ""` of this project's configs every `--ckpt_path last` resume threw away the training log of
the steps before it. `ResumableCSVLogger` keeps the file: at its first save it drops the rows at or after
the first step this run logs (the interrupted run logged them after its last checkpoint; this run redoes
those steps) and appends, widening the header when new columns appear. A fresh run in an empty directory
writes as Lightning's does. Used by every config in place of `lightning.pytorch.loggers.CSVLogger`.
"""
from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _KeepingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        self._merged = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        pass

    def save(self) -> None:
        if self.metrics and not self._merged:
            self._merged = True
            self._drop_redone_rows(min(int(m["step"]) for m in self.metrics))
        super().save()

    def _drop_redone_rows(self, first_step: int) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            old_keys, rows = list(reader.fieldnames or []), list(reader)
        kept = [r for r in rows if r.get("step") in (None, "") or int(float(r["step"])) < first_step]
        self.metrics_keys = sorted(set(self.metrics_keys) | set(old_keys))
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)


class ResumableCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` that continues `metrics.csv` across resumes (module docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment
