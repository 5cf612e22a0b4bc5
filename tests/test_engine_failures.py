"""Engines when a worker process dies: Ray retries the task once on a new worker (max_retries=1) and reports
a task lost twice as failed; the local pool reports the task whose worker died as failed and runs the rest
on a fresh pool. The task functions kill their own process with ``os._exit`` (as the OOM killer would)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from zsad_bench.sweep.engines import LocalEngine, RayEngine, Task


def die_once(payload: dict[str, Any]) -> dict[str, Any]:
    """Kill this worker on the first attempt (marked by a file), succeed on the next; record each attempt."""
    marker = Path(payload["marker"])
    with open(payload["attempts"], "a") as f:
        f.write(f"{os.getpid()}\n")
    if payload.get("always") or not marker.exists():
        marker.touch()
        os._exit(1)
    return {"id": payload["id"], "status": "ok", "pid": os.getpid()}


def _tasks(tmp_path: Path, **always: bool) -> list[Task]:
    return [
        Task(i, {"id": i, "marker": str(tmp_path / f"{i}.died"), "attempts": str(tmp_path / f"{i}.attempts"), **flag})
        for i, flag in (("a", {"always": always.get("a", False)}), ("b", {"always": always.get("b", False)}))
    ]


def _done(events: list[tuple]) -> dict[str, dict[str, Any]]:
    return {e[1]: e[2] for e in events if e[0] == "done"}


def test_local_pool_fails_the_dead_workers_task_and_goes_on(tmp_path: Path) -> None:
    tasks = _tasks(tmp_path, a=True)
    tasks[1].deps = ["a"]  # b starts after a's worker died, on the fresh pool
    (tmp_path / "b.died").touch()  # b succeeds at its first attempt
    done = _done(list(LocalEngine(["cpu", "cpu"], task_fn=die_once).run(tasks)))
    assert done["a"] == {"id": "a", "status": "failed", "reason": "worker process died (killed or crashed)"}
    assert done["b"]["status"] == "ok" and done["b"]["pid"] != os.getpid()
    assert len((tmp_path / "a.attempts").read_text().split()) == 1  # the local pool does not retry


def test_ray_retries_a_task_whose_worker_died_and_fails_one_lost_twice(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is in the test extra: pip install -e '.[test]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        engine = RayEngine(task_fn=die_once)
        done = _done(list(engine.run(_tasks(tmp_path, b=True))))
    finally:
        ray.shutdown()
    attempts_a = (tmp_path / "a.attempts").read_text().split()
    assert done["a"]["status"] == "ok" and len(attempts_a) == 2 and attempts_a[0] != attempts_a[1]
    assert done["a"]["pid"] == int(attempts_a[1])  # the retry ran on a new worker process
    assert done["b"]["status"] == "failed" and done["b"]["reason"].startswith("Ray lost the task (")
    assert len((tmp_path / "b.attempts").read_text().split()) == 2  # one retry, then reported
