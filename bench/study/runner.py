"""Configurations as Dask tasks: a local cluster (one single-threaded worker by default, so that
no two configurations share the CPUs) or an existing one (--scheduler tcp://HOST:PORT).

A task is ``run_task(spec)``: it starts ``python -m bench.study.child`` (in its own session, so
its racing processes stay together on this machine), feeds it the spec, waits up to the spec's
timeout and returns the child's plain result. The worker's ledger is swept before and after
(see ledger.py). A worker that dies mid-task is replaced by its nanny and the scheduler runs
the task again once (distributed.scheduler.allowed-failures = 1 on the local cluster; the
runner hands out no more tasks than the workers have threads, so a worker holds only the task
it runs and its death counts against that task alone); a second death reports the task
failed. An external cluster (--scheduler) applies its own scheduler's settings: start it with
DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=1 for the same behaviour, and its workers with
--nthreads 1 (a configuration's processes need the machine's cores to themselves).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import ledger

REPO = Path(__file__).resolve().parents[2]
ALLOWED_FAILURES = 1  # a task whose worker died is run again once


def run_task(spec: dict) -> dict:
    """Run one configuration in a subprocess on this machine; never raises for its failures."""
    ledger.sweep()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evtchn-study-task-") as tmp:
        out = Path(tmp) / "result.json"
        err_path = Path(tmp) / "stderr.txt"
        with open(err_path, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.study.child", str(out)],
                stdin=subprocess.PIPE,
                stdout=err,
                stderr=err,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
            reason = None
            try:
                proc.communicate(json.dumps(spec).encode(), timeout=spec["timeout"])
            except subprocess.TimeoutExpired:
                reason = f"timed out after {spec['timeout']:.0f} s (killed)"
            finally:
                _kill_group(proc)
        doc = _read(out)
        if doc is None:
            tail = err_path.read_text(errors="replace").strip().splitlines()[-6:]
            code = proc.returncode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
            doc = {
                "status": "failed",
                "reason": reason or f"the configuration's process died ({how})",
                "stderr": "\n".join(tail),
            }
    swept = ledger.sweep()
    doc["host"] = socket.gethostname()
    doc["wall_s"] = round(time.perf_counter() - t0, 3)
    if swept:
        doc["swept_segments"] = len(swept)
    return doc


def _kill_group(proc) -> None:
    """The child and every racing process it started (one session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Cluster:
    """A Dask client on a local cluster (parallel single-threaded workers) or on `scheduler`."""

    def __init__(self, scheduler: str | None = None, parallel: int = 1):
        import dask
        from distributed import Client, LocalCluster

        self.cluster = None
        if scheduler:
            self.client = Client(scheduler, timeout="30s")
            self.where = f"Dask scheduler {scheduler}"
        else:
            dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES})
            self.cluster = LocalCluster(
                n_workers=parallel,
                threads_per_worker=1,
                processes=True,
                memory_limit=0,
                dashboard_address=":0",  # any free port: never clash with another cluster
                silence_logs=50,
            )
            self.client = Client(self.cluster)
            self.where = f"local Dask cluster: {parallel} worker process(es), 1 thread each" + (
                " (configurations one at a time)" if parallel == 1 else ""
            )

    def capacity(self) -> int:
        """Configurations that can run at once: the workers' threads."""
        workers = self.client.scheduler_info().get("workers", {}).values()
        return max(1, sum(int(w.get("nthreads", 1)) for w in workers))

    def run_all(self, specs: list[dict]):
        """Yield (spec, record) as configurations finish, in any order. At most capacity()
        tasks are on the cluster at once, handed out in spec order: a worker then holds only
        the task it runs, so its death counts against that task alone (Dask counts a death
        against every task assigned to the worker, queued or not)."""
        from distributed import as_completed

        todo = list(specs)
        by_key = {s["task_key"]: s for s in specs}
        ac = as_completed(
            [self._submit(todo.pop(0)) for _ in range(min(self.capacity(), len(todo)))]
        )
        for fut in ac:
            rec = outcome(fut)
            # Let go of the result at once: a future still held keeps it on its worker, and
            # Dask would run a finished configuration again if that worker died later.
            fut.release()
            if todo:
                ac.add(self._submit(todo.pop(0)))
            yield by_key[fut.key], rec

    def _submit(self, spec):
        return self.client.submit(run_task, spec, key=spec["task_key"], pure=False)

    def sweep_workers(self) -> int:
        """Sweep the ledger on every worker's machine (and this one); segments removed."""
        n = len(ledger.sweep())
        try:
            for removed in self.client.run(ledger.sweep).values():
                n += len(removed)
        except Exception:  # a worker gone at the very end: its machine sweeps next time
            pass
        return n

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


def outcome(future) -> dict:
    """The task's result, or a failure record for a task Dask gave up on."""
    try:
        return future.result()
    except Exception as exc:
        name = type(exc).__name__
        if name == "KilledWorker":
            reason = (
                f"its worker died twice while running it (run again once, then given up): {exc}"
            )
        else:
            reason = f"{name}: {exc}"
        return {"status": "failed", "reason": reason}
