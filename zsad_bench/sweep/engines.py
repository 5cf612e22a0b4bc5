"""Sweep engines: where tasks run. Both yield ``("start", id)`` and ``("done", id, status)`` events.

* :class:`LocalEngine`: in this process one task after another (one device), or one worker process per
  device (a :class:`concurrent.futures.ProcessPoolExecutor`, each worker pinned to its device at start).
* :class:`RayEngine`: Ray core tasks with ``num_cpus = threads`` and ``num_gpus`` (fractional: small
  points share a GPU); dependencies are passed as object refs, so Ray itself orders shared stages
  before the points that need them. A task lost with its worker or node is retried once (the point
  resumes from its last finished category) and otherwise reported failed; the other points go on.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from zsad_bench.errors import ZsadError
from zsad_bench.sweep.tasks import execute_task

TaskFn = Callable[[dict[str, Any]], dict[str, Any]]
Event = tuple[Any, ...]


@dataclass
class Task:
    """One unit of work: its payload, the ids of the tasks it waits for, and its resource needs."""

    id: str
    payload: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    cpus: int = 1
    gpus: float = 0.0


def visible_devices() -> list[str]:
    """``cuda:0 .. cuda:N-1`` for the visible GPUs, else ``["cpu"]``."""
    import torch

    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]


def _ready(task: Task, finished: set[str], known: set[str]) -> bool:
    return all(d in finished or d not in known for d in task.deps)


# ---------------------------------------------------------------------------------------------- local
_WORKER_DEVICE: str | None = None


def _take_device(queue: Any) -> None:
    """Pool initializer: this worker process owns one device for its lifetime."""
    global _WORKER_DEVICE
    _WORKER_DEVICE = queue.get()


def _pool_entry(task_fn: TaskFn, payload: dict[str, Any]) -> dict[str, Any]:
    return task_fn({**payload, "device": _WORKER_DEVICE})


class LocalEngine:
    """Sequential in this process on one device, or one worker process per device."""

    name = "local"

    def __init__(self, devices: list[str], task_fn: TaskFn = execute_task) -> None:
        if not devices:
            raise ZsadError("--engine local: no device to run on")
        self.devices = devices
        self.task_fn = task_fn

    def run(self, tasks: list[Task]) -> Iterator[Event]:
        if len(self.devices) == 1:
            for t in tasks:  # plans list dependencies before dependents
                yield ("start", t.id)
                yield ("done", t.id, self.task_fn({**t.payload, "device": self.devices[0]}))
            return
        yield from self._pool(tasks)

    def _new_pool(self) -> ProcessPoolExecutor:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        for d in self.devices:
            queue.put(d)
        return ProcessPoolExecutor(len(self.devices), mp_context=ctx, initializer=_take_device, initargs=(queue,))

    def _pool(self, tasks: list[Task]) -> Iterator[Event]:
        known = {t.id for t in tasks}
        waiting, finished = list(tasks), set()
        running: dict[Future, Task] = {}
        pool = self._new_pool()
        try:
            while waiting or running:
                for t in [t for t in waiting if _ready(t, finished, known)][: len(self.devices) - len(running)]:
                    waiting.remove(t)
                    running[pool.submit(_pool_entry, self.task_fn, t.payload)] = t
                    yield ("start", t.id)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                broken = False
                for fut in done:
                    t = running.pop(fut)
                    try:
                        status = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        status = {"id": t.id, "status": "failed", "reason": "worker process died (killed or crashed)"}
                    finished.add(t.id)
                    yield ("done", t.id, status)
                if broken:  # the pool is unusable: fail what it was running, continue on a fresh one
                    for fut, t in list(running.items()):
                        running.pop(fut)
                        finished.add(t.id)
                        yield ("done", t.id, {"id": t.id, "status": "failed", "reason": "worker process died"})
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = self._new_pool()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- ray
def import_ray() -> Any:
    """Ray, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ZsadError("--engine ray needs Ray; install it with: pip install 'zsad-bench[ray]'") from None
    return ray


def _ray_entry(task_fn: TaskFn, payload: dict[str, Any], *deps: Any) -> dict[str, Any]:
    """A Ray task: Ray sets CUDA_VISIBLE_DEVICES to the task's GPUs, so ``cuda`` is the assigned one."""
    import ray

    return task_fn({**payload, "device": "cuda" if ray.get_gpu_ids() else "cpu"})


class RayEngine:
    """Ray core tasks on an existing cluster (``address``) or a local Ray started with ``num_cpus``."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, task_fn: TaskFn = execute_task):
        self.ray = import_ray()
        self.started = False
        if not self.ray.is_initialized():
            if address:
                self.ray.init(address=address, log_to_driver=False)
            else:
                self.ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            self.started = True
        self.task_fn = task_fn

    def cluster_gpus(self) -> float:
        return float(self.ray.cluster_resources().get("GPU", 0.0))

    def run(self, tasks: list[Task]) -> Iterator[Event]:
        ray = self.ray
        remote = ray.remote(_ray_entry)
        known = {t.id for t in tasks}
        refs: dict[str, Any] = {}
        by_ref: dict[Any, Task] = {}
        for t in tasks:  # submission order = priority: shared stages first
            deps = [refs[d] for d in t.deps if d in refs]
            ref = remote.options(num_cpus=t.cpus, num_gpus=t.gpus, max_retries=1).remote(self.task_fn, t.payload, *deps)
            refs[t.id], by_ref[ref] = ref, t
        finished: set[str] = set()
        started: set[str] = set()
        pending = list(by_ref)
        try:
            while pending:
                for t in tasks:
                    if t.id not in started and t.id not in finished and _ready(t, finished, known):
                        started.add(t.id)
                        yield ("start", t.id)
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    t = by_ref[ref]
                    try:
                        status = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
                        status = {"id": t.id, "status": "failed", "reason": f"Ray lost the task ({reason})"}
                    finished.add(t.id)
                    yield ("done", t.id, status)
        finally:
            for ref in pending:
                ray.cancel(ref)
            if self.started:
                ray.shutdown()
