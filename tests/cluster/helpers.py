"""Driving `python -m dmlsys.cluster` from tests: the CLI in a temporary directory, pids, waits."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Cli:
    """Runs `python -m dmlsys.cluster` in a temporary working directory, and cleans up after."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "DMLSYS_LOG": "INFO"}

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "dmlsys.cluster", *args], cwd=self.cwd, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def status(self) -> dict:
        return json.loads(self("status", "--json", check=False).stdout)

    def pids(self) -> list[int]:
        try:
            state = json.loads((self.cwd / ".dmlsys" / "state.json").read_text())
        except OSError:
            return []
        return [state["supervisor"]["pid"], *(n["pid"] for n in state["nodes"] if n.get("pid"))]

    def write_spec(self, text: str, name: str = "spec.toml") -> str:
        (self.cwd / name).write_text(text)
        return name


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
