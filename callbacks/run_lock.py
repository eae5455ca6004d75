"""One run per root directory: train.py holds `<default_root_dir>/run.lock` while it runs.

Two runs into one root would interleave their metrics.csv rows and replace each other's checkpoints and
export. The lock file holds the holder's pid, host and process start time; it is created with O_EXCL, so
of two runs started at once exactly one gets it. A second run finds a live holder and stops before
building anything, naming its pid; a lock whose process is gone (a SIGKILL, a crash, a reboot) is stale
and is taken over, saying so. A lock held from another host cannot be checked and is respected.

`python train.py` checks the lock before its slow imports (`refuse_if_locked`, from the command line's
--trainer.default_root_dir or its --config files), so a second run stops within a second; the lock itself is
taken once the config is parsed (train.py: DisCaCLI.before_instantiate_classes) and released when fit ends.

Only the process of global rank 0 takes the lock (decided from the launcher's environment, before any
process group exists): the other ranks of the same run neither take nor wait for it.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = "run.lock"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
"""set by torchrun, Lightning's launcher, SLURM or LSF for each process; all absent or 0 on global rank 0"""


class RootDirInUse(RuntimeError):
    """Another live run holds the root directory's lock."""


def is_launch_rank_zero() -> bool:
    return all(int(os.environ.get(v) or 0) == 0 for v in RANK_VARIABLES)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    started = _start_time(pid)
    return holder.get("started") is None or started is None or started == holder["started"]


def root_from_command_line(argv: list[str]) -> str | None:
    """--trainer.default_root_dir of a train.py command line: the option, else the last --config file that
    sets it literally (None when it is interpolated or unset: the check after parsing covers those)."""
    import yaml

    root = None
    for i, arg in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith(("--config=", "--trainer.default_root_dir=")):
            arg, value = arg.split("=", 1)
        if arg == "--trainer.default_root_dir":
            root = ("option", value)
        elif arg == "--config" and value and os.path.isfile(value) and (root is None or root[0] == "config"):
            try:
                with open(value) as f:
                    found = ((yaml.safe_load(f) or {}).get("trainer") or {}).get("default_root_dir")
            except (yaml.YAMLError, OSError, AttributeError):
                continue  # reported by the parser
            if found is not None:
                root = ("config", found)
    if root is None or not isinstance(root[1], str) or "${" in root[1]:
        return None
    return root[1]


def refuse_if_locked(argv: list[str]) -> None:
    """Exit (status 1) when the root directory of this command line is locked by another live run."""
    root = root_from_command_line(argv)
    if root is not None and is_launch_rank_zero():
        lock = RunLock(root)
        holder = lock._read() if lock.path.exists() else None
        if holder and (holder.get("pid"), holder.get("host")) != (os.getpid(), socket.gethostname()) and _alive(holder):
            raise SystemExit(f"error: {lock.in_use_message(holder)}")


class RunLock:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.held = False

    def _read(self) -> dict | None:
        for _ in range(20):  # a lock created a moment ago may not hold its JSON yet
            try:
                return json.loads(self.path.read_text())
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                time.sleep(0.1)
        return {}  # unreadable: left by a process killed between creating and writing it

    def acquire(self) -> RunLock:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(f"--trainer.default_root_dir {str(self.root)!r} cannot be created ({err})") from err
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
              "command": sys.argv}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released meanwhile
                if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    self.held = True  # this process's own earlier run (train.main called again)
                    atexit.register(self.release)
                    return self
                if holder and _alive(holder):
                    raise RootDirInUse(self.in_use_message(holder))
                what = f"pid {holder['pid']} on {holder.get('host')}" if holder else "an unreadable lock"
                print(f"{self.path}: taking over a stale lock ({what} no longer runs)", file=sys.stderr, flush=True)
                self.path.unlink(missing_ok=True)
                continue
            except OSError as err:
                raise PermissionError(f"--trainer.default_root_dir {str(self.root)!r} is not writable: cannot create "
                                      f"{self.path} ({err.strerror or err}); fix its permissions or choose another "
                                      f"root") from err
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            atexit.register(self.release)
            return self
        raise RootDirInUse(f"could not take {self.path}: other runs keep taking it")

    def in_use_message(self, holder: dict) -> str:
        return (f"{self.root} is in use by another run: pid {holder['pid']} on host {holder.get('host')} holds "
                f"{self.path}. Wait for it to finish or stop it, or set another --trainer.default_root_dir (if that "
                f"run is gone, e.g. its machine rebooted, delete {self.path}).")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
