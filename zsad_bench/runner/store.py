"""The record store: merges records from any number of processes into one results file, under a lock.

Each :meth:`RecordStore.add` re-reads the file, adds the records it does not hold yet (category
records by (seed, leg, target, category), image records by (seed, leg, target, path), fit records by
(seed, leg)), marks the run complete once every item of the plan is present, and rewrites JSON + CSV
atomically. Nothing is written before the first category record: a run that fails earlier leaves no
file behind (fit records wait in memory until then).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from zsad_bench import locks
from zsad_bench.errors import ZsadError
from zsad_bench.results import CategoryRecord, FitRecord, ImageRecord, RunResult, csv_path
from zsad_bench.runner.plan import Plan


class RecordStore:
    """The results file of one plan; safe to share between processes and machines (lock + atomic writes)."""

    def __init__(self, path: Path, plan: Plan) -> None:
        self.path = Path(path)
        self.plan = plan
        self.expected = {item.key for item in plan.items}
        self._pending_fits: list[FitRecord] = []

    def _merge_lock(self) -> Path:
        return self.path.with_name(self.path.name + ".merge")

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> RunResult:
        """The current file, checked against the plan: the same run and only records of its items."""
        result = RunResult.load(self.path)
        fresh = self.plan.header
        for attr in ("method", "backbone", "protocol", "config", "seeds"):
            if _canonical(getattr(result, attr)) != _canonical(getattr(fresh, attr)):
                raise ZsadError(f"{self.path}: --resume with a different {attr} than the saved run; use another --out")
        legs = {leg.name for leg in self.plan.legs}
        for i, rec in enumerate(result.records):
            if rec.protocol not in legs or rec.seed not in fresh.seeds:
                raise ZsadError(
                    f"{self.path}: records[{i}] (leg '{rec.protocol}', seed {rec.seed}) is not part of this run; "
                    "restore the file or use another --out"
                )
        return result

    def done(self) -> set[tuple[int, str, str, str]]:
        """Keys of the items already recorded."""
        if not self.exists():
            return set()
        return {(r.seed, r.protocol, r.target, r.category) for r in self.load().records}

    def add_fit(self, fit: FitRecord) -> None:
        """Record a fit: written with the next category record (or now, when the file exists)."""
        self._pending_fits.append(fit)
        if self.exists():
            self.add()

    def add(
        self,
        records: Sequence[CategoryRecord] = (),
        images: Sequence[ImageRecord] = (),
        timings: dict[str, float] | None = None,
    ) -> RunResult:
        """Merge records into the file (created on the first category record); returns the merged result."""
        with locks.waiting(self._merge_lock()):
            if not self.exists():
                if not records:
                    return self.plan.header
                result = RunResult.from_json(self.plan.header.to_json())  # a copy: the plan stays as it is
            else:
                result = self.load()
            have = {(r.seed, r.protocol, r.target, r.category) for r in result.records}
            result.records += [r for r in records if (r.seed, r.protocol, r.target, r.category) not in have]
            seen = {(i.seed, i.leg, i.target, i.path) for i in result.images}
            result.images += [i for i in images if (i.seed, i.leg, i.target, i.path) not in seen]
            for fit in self._pending_fits:
                old = result.fit_for(fit.leg, fit.seed)
                if old is None:
                    result.fits.append(fit)
                elif old.seconds == 0.0 and fit.seconds > 0.0:  # keep the record of the process that fitted
                    result.fits[result.fits.index(old)] = fit
            self._pending_fits = []
            for key, seconds in (timings or {}).items():
                result.timings[key] = result.timings.get(key, 0.0) + seconds
            result.complete = self.expected <= {(r.seed, r.protocol, r.target, r.category) for r in result.records}
            result.save(self.path, overwrite=True)
            return result


def check_new_out(path: Path) -> None:
    """A new results file must not overwrite anything: neither the JSON nor an unrelated CSV beside it."""
    if path.exists():
        raise ZsadError(f"{path}: results file exists; pass --resume to continue it or choose another --out")
    csv = csv_path(path)
    if csv.exists():
        raise ZsadError(
            f"{csv}: exists and was not written by this run (its results JSON is missing); move it or choose "
            "another --out"
        )


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)
