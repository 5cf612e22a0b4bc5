"""The executor: runs work items of a :class:`~zsad_bench.runner.plan.Plan` in this process.

``execute(plan, out, items)`` runs any subset of the plan's items (by index) and merges their
records into the results file ``out`` through a :class:`~zsad_bench.runner.store.RecordStore`; other
processes may run other subsets of the same plan into the same file at the same time. Nodes an item
depends on are executed on demand, once per process (their results live in content-keyed caches
shared by all processes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from zsad_bench.data import Dataset, check_aux_supervision, open_dataset, validate
from zsad_bench.detector import LearningType
from zsad_bench.errors import ZsadError
from zsad_bench.results import CategoryRecord, FitRecord, RunResult
from zsad_bench.runner.plan import Node, Plan, WorkItem, open_datasets
from zsad_bench.runner.session import Log, Session, image_records, summary_of
from zsad_bench.runner.store import RecordStore
from zsad_bench.viz.maps import MapWriter


class Executor:
    """Executes items and their nodes with one :class:`Session` (one backbone, one detector)."""

    def __init__(self, plan: Plan, store: RecordStore, session: Session | None = None) -> None:
        self.plan = plan
        self.store = store
        self.session = session or Session(plan.spec)
        self.log = self.session.log
        self._datasets: dict[str, Dataset] = {}
        self._aux: dict[str, Dataset] = {}
        self._done_nodes: set[str] = set()
        self._fitted: str | None = None  # the fit node whose state the detector holds

    def dataset(self, spec: str) -> Dataset:
        """A target dataset (all splits: few-shot references come from train), validated as `data check` does."""
        if spec not in self._datasets:
            ds = open_dataset(spec)
            for problem in validate(ds, role="target", progress=self.plan.spec.progress).warnings:
                self.log(f"warning: {problem.path}: {problem.message}")
            self._datasets[spec] = ds
        return self._datasets[spec]

    def aux_set(self, leg_name: str) -> Dataset:
        """The leg's auxiliary set (opened and checked once), refused when the method could not learn from it."""
        if leg_name not in self._aux:
            spec = self.plan.spec
            aux = open_datasets(self.plan.leg(leg_name).aux, spec.aux_categories, spec.aux_split, "auxiliary")
            check_aux_supervision(aux, needs_masks=self.session.cls.needs_aux_masks)
            self._aux[leg_name] = aux
        return self._aux[leg_name]

    # ---------------------------------------------------------------- nodes
    def ensure(self, node_id: str) -> None:
        """Execute ``node_id`` (after its own dependencies) unless this process already did."""
        node = self.plan.nodes[node_id]
        if node.kind == "fit":
            if self.session.use_leg(node.leg):
                self._fitted = None
            if self._fitted != node_id:
                for dep in node.deps:
                    self.ensure(dep)
                self._fit(node)
                self._fitted = node_id
            return
        if node_id in self._done_nodes:
            return
        for dep in node.deps:
            self.ensure(dep)
        if node.kind == "features" and self.session.cache is not None and not self.session.cls.needs_images:
            # warm the shared feature cache; without a cache the item extracts its features itself
            self.session.source(self._node_samples(node))
        # "shared" nodes are fitted inside the first fit that needs them (the method keys and caches
        # them in its artifacts family); Session.fit holds the family's lock while fitting.
        self._done_nodes.add(node_id)

    def _node_samples(self, node: Node) -> list:
        if node.category:
            return self.dataset(node.dataset).select([node.category], "test").samples
        return self.aux_set(node.leg).samples

    def _fit(self, node: Node) -> None:
        assert node.seed is not None
        if node.dataset:  # few-shot: k normal references of the category, or of every category run (dataset)
            ds = self.dataset(node.dataset)
            categories = [node.category] if node.category else self.plan.categories_of(node.dataset)
            samples = [s for c in categories for s in self.session.reference_samples(ds.select([c]), node.seed)]
            self.session.fit(samples, node.seed)
            return
        aux = self.aux_set(node.leg)
        self.log(
            f"[{node.leg} seed {node.seed}] fitting {self.session.cls.name} on {len(aux)} auxiliary images ({aux.name})"
        )
        path, seconds = self.session.fit(aux.samples, node.seed)
        self.store.add_fit(FitRecord(node.seed, node.leg, str(path), seconds, summary_of(self.session.detector)))

    # ---------------------------------------------------------------- items
    def run_item(self, item: WorkItem) -> None:
        """Fit what the item needs, score its category, merge the records."""
        t0 = time.perf_counter()
        if self.session.use_leg(item.leg):  # per-dataset options of this leg's targets
            self._fitted = None
        for dep in item.deps:
            node = self.plan.nodes[dep]
            if node.kind == "fit" and node.category and self.session.cls.learning_type is LearningType.FEW_SHOT:
                self._fitted = None  # a per-category few-shot fit serves its own item only
            self.ensure(dep)
        ds = self.dataset(item.target)
        test = ds.select([item.category], "test").samples
        if not test:
            raise ZsadError(f"{ds.root}: category '{item.category}' has no test images")
        metrics, scored = self.session.evaluate(test, item.category, (item.seed, item.leg, item.category))
        record = CategoryRecord(
            item.seed, item.target, item.category, len(test), metrics, time.perf_counter() - t0, item.leg
        )
        self.store.add([record], image_records(item.seed, item.leg, item.target, scored))

    def run(self, items: Sequence[WorkItem]) -> None:
        todo = list(items)
        for target in dict.fromkeys(i.target for i in todo):  # bad target data fails before any fit
            self.dataset(target)
        size = self.plan.spec.save_maps
        if size and todo and self.session.map_writer is None:
            n_images = sum(len(self.dataset(i.target).select([i.category], "test")) for i in todo)
            self.session.map_writer = MapWriter.open(self.store.path, size, n_images, Log(True))  # even with -q
        if self.plan.spec.progress and todo:
            from tqdm.auto import tqdm

            todo = tqdm(todo, desc=self.plan.header.method, unit="category", leave=False)
        for item in todo:
            self.run_item(item)


def execute(plan: Plan, out: Path, items: Sequence[int] | None = None, session: Session | None = None) -> RunResult:
    """Run the plan's items ``items`` (indices; default: all not yet recorded) into the results file ``out``.

    Safe to call from several processes with disjoint (or overlapping) subsets of one plan.
    """
    store = RecordStore(out, plan)
    done = store.done()
    chosen = range(len(plan.items)) if items is None else items
    for i in chosen:
        if not 0 <= i < len(plan.items):
            raise ZsadError(f"plan item {i} does not exist; the plan has items 0..{len(plan.items) - 1}")
    todo = [plan.items[i] for i in chosen if plan.items[i].key not in done]
    if todo:
        Executor(plan, store, session).run(todo)
    return RunResult.load(out) if store.exists() else plan.header
