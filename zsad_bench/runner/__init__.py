"""The protocol runner: plan -> execute -> record.

A run is planned (:func:`plan_run` -> :class:`Plan`: typed work items, one per seed x leg x target
category, and the nodes they depend on: features, shared sub-fits, fitted checkpoints), its items are
executed (:func:`execute` / :class:`Executor`, one backbone and one detector per process:
:class:`Session`, built by :func:`build_detector`), and their records are merged into one results
file (:class:`RecordStore`, under a lock, atomic writes).

Sharding a run across processes or machines (what a sweep does)::

    plan, _ = plan_run(spec)            # once, anywhere; builds the detector to resolve its config
    plan.save("plan.json")              # JSON: spec, results header, nodes, items
    # in each worker (another process or machine sharing the cache and results folders):
    execute(Plan.load("plan.json"), out, items=[0, 2, ...])
    # or: python -m zsad_bench.runner plan.json --out OUT --items 0,2

Items may run in any order and subset, concurrently: nodes write content-keyed caches under locks
(a fit is done once, the others load its checkpoint) and the store deduplicates records. The results
file says ``complete`` once every item of the plan is in it. :func:`run_experiment` is the
sequential case (all items in this process, the results file owned by one run).
"""

from zsad_bench.runner.checkpoints import load_checkpoint, save_checkpoint
from zsad_bench.runner.execute import Executor, execute
from zsad_bench.runner.plan import Node, Plan, WorkItem, make_plan, open_datasets
from zsad_bench.runner.run import load_fitted, plan_run, rebuild, run_experiment
from zsad_bench.runner.session import Session, build_detector
from zsad_bench.runner.spec import RunSpec, resolve_device, seed_everything
from zsad_bench.runner.store import RecordStore

__all__ = [
    "Executor",
    "Node",
    "Plan",
    "RecordStore",
    "RunSpec",
    "Session",
    "WorkItem",
    "build_detector",
    "execute",
    "load_checkpoint",
    "load_fitted",
    "make_plan",
    "open_datasets",
    "plan_run",
    "rebuild",
    "resolve_device",
    "run_experiment",
    "save_checkpoint",
    "seed_everything",
]
