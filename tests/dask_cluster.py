"""The real Dask cluster the runner tests use: a scheduler and two single-threaded worker processes
on 127.0.0.1, started by ``scripts/dask_cluster.sh``. ``run_tests.sh`` starts one for the whole
suite and exports its address as ``EPEE_DASK_ADDRESS`` (and stops it at the end, even on failure);
a test run without it starts its own here and stops it when the session ends."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "dask_cluster.sh"
WORKERS = 2


@contextlib.contextmanager
def cluster(directory: Path, workers: int = WORKERS):
    """Start a cluster whose state lives in ``directory``; yields its scheduler address."""
    env = {**os.environ, "EPEE_DASK_DIR": str(directory)}
    address = subprocess.run([str(SCRIPT), "start", str(workers)], env=env, check=True, capture_output=True,
                             text=True, timeout=180).stdout.strip()
    try:
        yield address
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, check=False, timeout=60)


def worker_pids(address: str) -> dict[str, int]:
    """Worker address -> pid of the worker process (not its nanny)."""
    from dask.distributed import Client

    with Client(address, timeout=10) as client:
        return client.run(os.getpid)
