"""The plan of a run: typed work items and the nodes they depend on, serialisable to JSON.

A work item is one target category scored for one seed and protocol leg. Its dependencies are nodes:

* ``features``: backbone features of a dataset (the auxiliary set of a leg, or one target category),
  kept in the feature cache so any process reuses them;
* ``shared``: a sub-fit a method family shares across configurations (SPG's SAE, declared through
  ``Detector.artifacts_family``), kept in the family's artifact directory;
* ``fit``: the fitted detector of a (seed, leg) (zero-shot) or of a (seed, leg, category) (few-shot),
  kept as a checkpoint keyed by everything that changes the fit.

Every node writes to a content-keyed cache under a lock, so items can run in any order, in any subset
and in several processes; the :mod:`~zsad_bench.runner.store` merges their records.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zsad_bench.data import Dataset, check_categories, open_dataset, validate
from zsad_bench.detector import LearningType
from zsad_bench.errors import ZsadError
from zsad_bench.protocols import Leg
from zsad_bench.results import RunResult, atomic_write_text
from zsad_bench.runner.spec import RunSpec

PLAN_SCHEMA = "zsad-bench/plan/v1"


@dataclass(frozen=True)
class Node:
    """A shared dependency of work items (see the module docstring for the kinds)."""

    id: str
    kind: str
    seed: int | None = None
    leg: str = ""
    dataset: str = ""
    category: str = ""
    deps: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkItem:
    """One target category of one seed and leg: the unit a shard executes."""

    seed: int
    leg: str
    target: str
    category: str
    deps: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[int, str, str, str]:
        return (self.seed, self.leg, self.target, self.category)


@dataclass
class Plan:
    """Spec, results header, nodes and items of a run; ``Plan.load(Plan.save(...))`` round-trips."""

    spec: RunSpec
    header: RunResult
    legs: list[Leg]
    nodes: dict[str, Node] = field(default_factory=dict)
    items: list[WorkItem] = field(default_factory=list)

    def categories_of(self, target: str) -> list[str]:
        """The categories of ``target`` this plan evaluates (in plan order)."""
        return list(dict.fromkeys(i.category for i in self.items if i.target == target))

    def leg(self, name: str) -> Leg:
        return next(leg for leg in self.legs if leg.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "spec": self.spec.to_json(),
            "header": self.header.to_json(),
            "legs": [asdict(leg) for leg in self.legs],
            "nodes": [asdict(n) for n in self.nodes.values()],
            "items": [asdict(i) for i in self.items],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path | str = "<memory>") -> Plan:
        if not isinstance(data, dict) or data.get("schema") != PLAN_SCHEMA:
            raise ZsadError(f"{source}: not a zsad-bench plan (want schema {PLAN_SCHEMA}); write one with Plan.save")
        try:
            nodes = [Node(**{**n, "deps": tuple(n["deps"])}) for n in data["nodes"]]
            return cls(
                spec=RunSpec.from_json(data["spec"]),
                header=RunResult.from_json(data["header"], source),
                legs=[Leg(d["name"], tuple(d["aux"]), tuple(d["targets"])) for d in data["legs"]],
                nodes={n.id: n for n in nodes},
                items=[WorkItem(**{**i, "deps": tuple(i["deps"])}) for i in data["items"]],
            )
        except (KeyError, TypeError) as exc:
            raise ZsadError(f"{source}: malformed plan ({type(exc).__name__}: {exc}); write it again") from None

    def save(self, path: Path) -> Path:
        """Write the plan as JSON (atomically); a spec with non-JSON values (objects in backbone_kwargs) is refused."""
        try:
            text = json.dumps(self.to_json(), indent=1)
        except TypeError as exc:
            raise ZsadError(
                f"{path}: this run's spec holds a value that is not JSON ({exc}); it cannot be sharded"
            ) from None
        atomic_write_text(Path(path), text + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ZsadError(f"{path}: unreadable plan ({type(exc).__name__}); write it again") from None
        return cls.from_json(data, path)


def open_datasets(specs: tuple[str, ...], categories: list[str] | None, split: str, role: str) -> Dataset:
    """Open and concatenate datasets, keep ``categories`` (each must exist in one of them) and ``split``."""
    datasets = [open_dataset(s) for s in specs]
    check_categories(datasets, categories, " + ".join(specs), role)
    samples = []
    for ds in datasets:  # each dataset validated on its own (sample keys may collide across datasets)
        part = ds.select(_kept(ds, categories), split)
        validate(part, role="auxiliary" if role == "auxiliary" else "target")  # exactly what `data check` checks
        samples += part.samples
    if not samples:
        raise ZsadError(f"{' + '.join(specs)}: no {split} images for the {role} set")
    first = datasets[0]
    return Dataset("+".join(d.name for d in datasets), first.root, samples, first.kind)


def _kept(ds: Dataset, categories: list[str] | None) -> list[str]:
    return [c for c in ds.categories if not categories or c in categories]


def make_plan(
    spec: RunSpec,
    header: RunResult,
    legs: list[Leg],
    learning_type: LearningType,
    family: str,
    fit_scope: str = "category",
) -> Plan:
    """Nodes and items of every (seed, leg, target, category) the spec asks for, in run order.

    ``family`` is the method's artifacts family (its shared sub-fits). ``fit_scope`` of a few-shot method:
    ``category`` (one fit on the k shots of each category) or ``dataset`` (one fit per target dataset on
    the k shots of every category run, as FoundAD's paper trains one projector across categories).
    """
    if fit_scope not in ("category", "dataset"):
        raise ZsadError(f"fit scope '{fit_scope}': a method fits per 'category' or per 'dataset'")
    targets = {t: open_dataset(t) for leg in legs for t in leg.targets}
    # every --categories entry must be a category of some target (legs may have disjoint ones)
    check_categories(list(targets.values()), spec.categories, " + ".join(sorted(targets)), "target")
    plan = Plan(spec, header, legs)
    for seed in spec.seeds:
        for leg in legs:
            leg_deps: tuple[str, ...] = ()
            if learning_type is LearningType.ZERO_SHOT:
                aux = _add(plan, Node(f"features:aux:{leg.name}", "features", leg=leg.name, dataset="+".join(leg.aux)))
                shared = _add(plan, Node(f"shared:{family}:{leg.name}", "shared", leg=leg.name, deps=(aux,)))
                fit = _add(plan, Node(f"fit:{leg.name}:seed={seed}", "fit", seed, leg.name, deps=(aux, shared)))
                leg_deps = (fit,)
            for target in leg.targets:
                for category in _kept(targets[target], spec.categories):
                    feats = _add(
                        plan, Node(f"features:{target}#{category}", "features", dataset=target, category=category)
                    )
                    deps = (*leg_deps, feats)
                    if learning_type is LearningType.FEW_SHOT and fit_scope == "dataset":
                        node = Node(f"fit:{leg.name}:{target}:seed={seed}", "fit", seed, leg.name, target)
                        deps = (_add(plan, node), feats)
                    elif learning_type is LearningType.FEW_SHOT:
                        node = Node(
                            f"fit:{leg.name}:{target}#{category}:seed={seed}", "fit", seed, leg.name, target, category
                        )
                        deps = (_add(plan, node), feats)
                    plan.items.append(WorkItem(seed, leg.name, target, category, deps))
    return plan


def _add(plan: Plan, node: Node) -> str:
    plan.nodes.setdefault(node.id, node)
    return node.id
