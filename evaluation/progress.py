"""How far the training run behind an export got: completed steps against its budget.

Every stage exports to `<root>/export` with callbacks.checkpointing.ExportOnTrainEnd, which also
writes `training_state.json` there (the run's `global_step` and `max_steps` at every checkpoint and
when fit ends; Lightning's last.ckpt is not rewritten when a run ends between checkpoints, so it can
lag). LightningCLI saves the config the run started with as `<root>/<logger>/config.yaml`; its
`trainer.max_time` is the time cap. A run that ended below `max_steps` (a `max_time` cap, a crash)
stopped early, and the comparisons that involve it are not at equal budget; the report says so in
its first lines.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from callbacks.checkpointing import TRAINING_STATE


def code_version(root: str | Path) -> dict:
    """The git commit of the code at `root` and whether tracked files differ from it (a run's provenance:
    report.md names it, so a committed result can be traced to the code that produced it). Outside a git
    checkout both are None."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "uncommitted_changes": None if status is None else bool(status)}


def run_time_cap(stage_dir: Path) -> str | None:
    """`trainer.max_time` of the newest saved run config under `stage_dir` (None: no cap or no config)."""
    configs = sorted(stage_dir.glob("*/config.yaml"), key=lambda p: p.stat().st_mtime)
    if not configs:
        return None
    max_time = ((yaml.safe_load(configs[-1].read_text()) or {}).get("trainer") or {}).get("max_time")
    return str(max_time) if max_time else None


def stage_progress(export_dir: str | Path) -> dict | None:
    """{stage_dir, completed_steps, max_steps, max_time, stopped_early} of the run that wrote
    `export_dir`, or None when it has no training state (the shipped teacher, a random model)."""
    state_file = Path(export_dir) / TRAINING_STATE
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    steps, max_steps = int(state["global_step"]), int(state["max_steps"])
    stage_dir = Path(export_dir).parent
    budget = max_steps if max_steps >= 0 else None  # -1: no step limit
    return {"stage_dir": str(stage_dir), "completed_steps": steps, "max_steps": budget,
            "max_time": run_time_cap(stage_dir), "stopped_early": budget is not None and steps < budget}
