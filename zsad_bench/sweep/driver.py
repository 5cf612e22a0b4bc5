"""Run a sweep: plan -> tasks on an engine -> manifest, progress line and failure list.

A sweep directory holds one results file per point (``<name>.json`` + ``.csv``, so ``zsad-bench table
DIR`` renders it) and ``_sweep/``: ``manifest.json`` (every point's options, resolved config, status,
device, threads; every stage's status) and ``logs/<task>.log``. Re-running the sweep skips complete
points and resumes incomplete ones from their last finished category (the runner's ``--resume``).

Points of an earlier version of the grid that the current one no longer has are *retired*: their files
move to ``_sweep/retired/`` (out of what ``table DIR`` renders, never deleted) and their manifest entry
to ``retired``; a grid that brings a point back restores its files and entry.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from zsad_bench.errors import ZsadError
from zsad_bench.results import atomic_write_text
from zsad_bench.sweep.engines import Task
from zsad_bench.sweep.plan import Plan, Point

SCHEMA = "zsad-bench/sweep/v1"


@dataclass
class Options:
    """How to run: threads per point, GPUs per task (Ray), the shared cache dir (default: this one)."""

    threads: int
    gpus: float = 0.0
    cache_dir: Path | None = None


@dataclass
class Outcome:
    """What a sweep did."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def sweep_paths(out_dir: Path) -> tuple[Path, Path]:
    meta = Path(out_dir) / "_sweep"
    return meta / "manifest.json", meta / "logs"


def retired_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "_sweep" / "retired"


def _point_files(folder: Path, results_name: str) -> list[Path]:
    """A point's files in ``folder``: ``<name>.json``, ``.csv``, ``.maps/``, ``.html`` ... (``<name>.*``)."""
    stem = results_name.removesuffix(".json")
    return sorted(folder.glob(f"{stem}.*")) if folder.is_dir() else []


def stale_points(plan: Plan, manifest: dict[str, Any]) -> list[str]:
    """Ids of the manifest's points that ``plan`` (the grid as it is now) no longer has."""
    current = {p.id for p in plan.points}
    return [pid for pid in manifest.get("points", {}) if pid not in current]


def _move(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        if (dest / f.name).exists():
            raise ZsadError(f"{dest / f.name} already exists; move one of the two copies of {f.name} away")
        f.rename(dest / f.name)


def retire_and_restore(out_dir: Path, plan: Plan, manifest: dict[str, Any], stream: TextIO) -> None:
    """Move the files of points no longer in the grid to ``_sweep/retired/``; bring back those it has again."""
    out_dir, shelf = Path(out_dir), retired_dir(out_dir)
    retired = manifest.setdefault("retired", {})
    restored = 0
    for point in plan.points:
        if point.id in retired and not _point_files(out_dir, point.results_name):
            _move(_point_files(shelf, point.results_name), out_dir)
            manifest["points"][point.id] = retired.pop(point.id)
            restored += 1
    stale = stale_points(plan, manifest)
    for pid in stale:
        entry = manifest["points"].pop(pid)
        _move(_point_files(out_dir, entry["results"]), shelf)
        retired[pid] = entry
    if restored:
        stream.write(f"[sweep] {restored} point(s) back in the grid: files restored from {shelf}\n")
    if stale:
        stream.write(
            f"[sweep] {len(stale)} point(s) of an earlier grid are not in this one: their files moved to {shelf} "
            "(not rendered by table; restored if the grid has them again)\n"
        )


def load_manifest(out_dir: Path) -> dict[str, Any]:
    path, _ = sweep_paths(out_dir)
    if not path.is_file():
        return {"schema": SCHEMA, "points": {}, "stages": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ZsadError(f"{path}: unreadable sweep manifest ({exc}); delete it to rebuild it from the grid") from None
    if data.get("schema") != SCHEMA:
        raise ZsadError(f"{path}: not a zsad-bench sweep manifest (schema {data.get('schema')!r})")
    return data


def point_state(out_dir: Path, point: Point, plan: Plan, manifest: dict[str, Any]) -> str:
    """``done``, ``resume (n categories done)``, ``cached`` (its shared stages are done) or ``to run``."""
    from zsad_bench.results import RunResult

    path = Path(out_dir) / point.results_name
    if path.is_file():
        result = RunResult.load(path)
        if result.complete:
            return "done"
        return f"resume ({len(result.records)} categories done)"
    stages = manifest.get("stages", {})
    fills_done = all(stages.get(s, {}).get("status") == "done" for s in plan.deps.get(point.id, []))
    leader = plan.leaders.get(point.id)
    fit_done = leader is None or (leader != point.id and point_done(out_dir, plan, leader))
    return "cached" if fills_done and fit_done else "to run"


def point_done(out_dir: Path, plan: Plan, pid: str) -> bool:
    from zsad_bench.results import RunResult

    point = next(p for p in plan.points if p.id == pid)
    path = Path(out_dir) / point.results_name
    return path.is_file() and RunResult.load(path).complete


def describe(out_dir: Path, plan: Plan) -> str:
    """The ``--dry-run`` listing: every stage and point with its state."""
    manifest = load_manifest(out_dir)
    lines = [f"sweep {out_dir}: {len(plan.points)} points, {len(plan.fills)} feature-cache shards"]
    for s in plan.fills:
        state = manifest.get("stages", {}).get(s.id, {}).get("status", "to run")
        p = s.payload
        lines.append(
            f"  stage {s.id}  {state:<8}  cache fill {p['dataset']} with {p['backbone']}@{p['image_size'] or 'default'}"
            f" ({sum(map(len, p['blocks']))} images)"
        )
    groups: dict[str, int] = {}
    for leader in plan.leaders.values():
        groups[leader] = groups.get(leader, 0) + 1
    for point in plan.points:
        state = point_state(out_dir, point, plan, manifest)
        lead = " [shared fit: runs first]" if groups.get(point.id, 0) > 1 else ""
        lines.append(f"  point {point.id}  {state:<10}  {point.label}{lead}")
    for pid in stale_points(plan, manifest):
        label = manifest["points"][pid].get("label", "")
        lines.append(f"  point {pid}  retire      {label} [not in this grid: its files move to {retired_dir(out_dir)}]")
    return "\n".join(lines)


class Progress:
    """One overall line (rewritten on a terminal, one line per change otherwise)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream = total, stream
        self.done = self.failed = self.running = 0
        self.t0 = time.perf_counter()
        self.tty = stream.isatty()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        finished = self.done + self.failed
        left = self.total - finished
        eta = "?" if not finished else _hms(elapsed / finished * left)
        return (
            f"[sweep] points {self.done}/{self.total} done, {self.running} running, {self.failed} failed"
            f" | elapsed {_hms(elapsed)}, ETA {eta}"
        )

    def show(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def run_sweep(
    out_dir: Path, plan: Plan, engine: Any, opts: Options, source: str = "", stream: TextIO | None = None
) -> Outcome:
    """Run every unfinished point of ``plan`` on ``engine``; the manifest is rewritten after each event."""
    from filelock import FileLock, Timeout

    from zsad_bench.paths import cache_dir

    stream = stream or sys.stderr
    out_dir = Path(out_dir)
    manifest_path, logs = sweep_paths(out_dir)
    logs.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(manifest_path.with_name("sweep.lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ZsadError(
            f"{out_dir}: another sweep is running in this directory; wait for it or use another one"
        ) from None
    try:
        return _run(out_dir, plan, engine, opts, source, stream, opts.cache_dir or cache_dir(), manifest_path, logs)
    finally:
        lock.release()


def _run(
    out_dir: Path,
    plan: Plan,
    engine: Any,
    opts: Options,
    source: str,
    stream: TextIO,
    cache: Path,
    manifest_path: Path,
    logs: Path,
) -> Outcome:
    manifest = load_manifest(out_dir)
    manifest.update(
        schema=SCHEMA,
        grid=source,
        engine=engine.name,
        threads=opts.threads,
        cache_dir=str(cache),
        updated=_now(),
    )
    stages, points = manifest.setdefault("stages", {}), manifest.setdefault("points", {})
    retire_and_restore(out_dir, plan, manifest, stream)
    outcome = Outcome()
    common = {"threads": opts.threads, "cache_dir": str(cache)}
    tasks: list[Task] = []
    todo_fills = {s.id for s in plan.fills if stages.get(s.id, {}).get("status") != "done"}
    for s in plan.fills:
        p = s.payload
        stages[s.id] = {
            **stages.get(s.id, {}),
            "kind": "fill",
            "dataset": p["dataset"],
            "backbone": p["backbone"],
            "image_size": p["image_size"],
            "layers": p["layers"],
            "shard": p["shard"],
            "images": sum(map(len, p["blocks"])),
            "status": stages.get(s.id, {}).get("status", "to run"),
        }
        if s.id in todo_fills:
            payload = {**p, **common, "kind": "fill", "id": s.id, "log": str(logs / f"{s.id}.log")}
            tasks.append(Task(s.id, payload, [], opts.threads, opts.gpus))
    todo_points = []
    for point in plan.points:
        entry = points.setdefault(point.id, {})
        entry.update(
            label=point.label,
            results=point.results_name,
            log=f"_sweep/logs/{point.id}.log",
            axes=point.axes,
            options=json.loads(json.dumps(point.options, default=str)),
            resolved=point.resolved,
            leader=plan.leaders.get(point.id),
        )
        if point_done(out_dir, plan, point.id):
            entry["status"] = "done"
            outcome.skipped.append(point.id)
            continue
        entry["status"] = "to run"
        todo_points.append(point)
    leaders = {plan.leaders[p.id] for p in todo_points if p.id in plan.leaders}
    ordered = [p for p in todo_points if p.id in leaders] + [p for p in todo_points if p.id not in leaders]
    for point in ordered:
        deps = [d for d in plan.deps.get(point.id, []) if d in todo_fills]
        leader = plan.leaders.get(point.id)
        if leader and leader != point.id and leader in leaders:
            deps.append(leader)
        payload = {
            **common,
            "kind": "point",
            "id": point.id,
            "options": point.options,
            "out": str(out_dir / point.results_name),
            "log": str(logs / f"{point.id}.log"),
            "lock": f"fit-{point.id}" if point.id in leaders else None,
        }
        tasks.append(Task(point.id, payload, deps, opts.threads, opts.gpus))
    _save(manifest_path, manifest)
    if outcome.skipped:
        stream.write(f"[sweep] {len(outcome.skipped)} of {len(plan.points)} points already complete, skipped\n")
    progress = Progress(len(ordered), stream)
    progress.done = 0
    kinds = {t.id: t.payload["kind"] for t in tasks}
    for event in engine.run(tasks):
        kind, tid = event[0], event[1]
        record = stages[tid] if kinds[tid] == "fill" else points[tid]
        if kind == "start":
            record["status"] = "running"
            progress.running += kinds[tid] == "point"
        else:
            status = event[2]
            record.update({k: v for k, v in status.items() if k not in ("id", "kind")}, finished=_now())
            if kinds[tid] == "point":
                progress.running -= 1
                if status["status"] == "done":
                    progress.done += 1
                    outcome.done.append(tid)
                else:
                    progress.failed += 1
                    outcome.failed[tid] = status.get("reason", "unknown failure")
            elif status["status"] != "done":
                stream.write(
                    f"[sweep] cache fill {tid} failed: {status.get('reason')} (its points extract themselves)\n"
                )
        manifest["updated"] = _now()
        _save(manifest_path, manifest)
        if kinds[tid] == "point" or kind == "done":
            progress.show()
    progress.close()
    if outcome.failed:
        stream.write(f"[sweep] {len(outcome.failed)} point(s) failed:\n")
        for pid, reason in outcome.failed.items():
            stream.write(f"  {pid} {points[pid]['label']}: {reason} (log: {out_dir / points[pid]['log']})\n")
    return outcome


def _save(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
