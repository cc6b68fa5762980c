"""A run's log: metrics.jsonl (one record per logged step and per epoch end) and summary.csv."""

from __future__ import annotations

import csv
import io
import json

from lcdistill.checkpoint import atomic_write_text
from lcdistill.runfolder import RunFolder


class RunLog:
    def __init__(self, folder: RunFolder, main: bool):
        self.folder, self.main = folder, main  # only the main process writes

    def record(self, record: dict) -> None:
        if self.main:
            with open(self.folder.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def trim(self, global_step: int, epoch: int) -> None:
        """Drop records logged after a checkpoint: the resumed run logs those steps again."""
        path = self.folder.metrics
        if not self.main or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= global_step and record.get("epoch_end", 0) <= epoch:
                kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))

    def summary(self, rows: list[dict]) -> None:
        """summary.csv: one row per epoch, columns in order of first appearance."""
        if not self.main:
            return
        header: list[str] = []
        for row in rows:
            header += [k for k in row if k not in header]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.folder.summary, out.getvalue())
