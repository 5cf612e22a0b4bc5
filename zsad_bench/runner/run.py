"""``run_experiment``: plan a spec, execute every item in this process, record into one results file.

The results file is written atomically after each target category (so ``--resume`` redoes at most
the category in progress); fitted checkpoints and cached features are reused across runs.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import secrets
import time
from pathlib import Path
from typing import Any

from zsad_bench import locks
from zsad_bench.data import DECODING
from zsad_bench.detector import Detector
from zsad_bench.errors import ZsadError
from zsad_bench.features import feature_key_parts
from zsad_bench.metrics import METRICS
from zsad_bench.protocols import Leg
from zsad_bench.provenance import device_description, git_commit, package_versions
from zsad_bench.results import RunResult, csv_path
from zsad_bench.runner.checkpoints import load_checkpoint
from zsad_bench.runner.execute import Executor
from zsad_bench.runner.plan import Plan, make_plan, open_datasets
from zsad_bench.runner.session import Session
from zsad_bench.runner.spec import RunSpec, check_out_path
from zsad_bench.runner.store import RecordStore, check_new_out
from zsad_bench.source import FeatureSource


def run_header(session: Session, run_id: str) -> RunResult:
    """The results file's header (everything but records) for ``session``'s spec."""
    spec, cls, r = session.spec, session.cls, session.resolved
    protocol = spec.protocol or "+".join(leg.name for leg in r.legs)
    if r.shots is not None:
        protocol = f"{protocol}@{r.shots}-shot"
    return RunResult(
        run_id=run_id,
        method=cls.name,
        method_label=spec.label or cls.display_name or cls.name,
        backbone=r.backbone_name,
        protocol=protocol,
        aux=sorted({a for leg in r.legs for a in leg.aux}),
        targets=sorted({t for leg in r.legs for t in leg.targets}),
        config={
            "method": session.method_config,
            "run": run_options(session),
            "preset": {**r.settings.record(), "leg_options": _plain(r.leg_options)},
        },
        seeds=list(spec.seeds),
        learning_type=str(cls.learning_type),
        metric_variants=dict(METRICS),
        versions=package_versions(),
        git_commit=git_commit(),
        device=device_description(session.device),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )


def _plain(obj: Any) -> Any:
    """Tuples as lists, recursively (the JSON form, so a resumed run's config compares equal)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    return obj


def run_options(session: Session) -> dict[str, Any]:
    """The run-level settings recorded in ``config["run"]``."""
    spec, r = session.spec, session.resolved
    return {
        "backbone": r.backbone_name,
        "backbone_identity": session.backbone.identity,
        "backbone_kwargs": {k: repr(v) for k, v in spec.backbone_kwargs.items()},
        "weights": spec.weights,
        "image_size": session.image_size,
        "eval_size": session.eval_size,
        "aux_split": spec.aux_split,
        "aux_categories": spec.aux_categories,
        "categories": spec.categories,
        "shots": r.shots,
        "batch_size": spec.batch_size,
        "decoding": dict(DECODING),
        "precision": spec.precision,
        "deterministic": spec.deterministic,
        "feature_key": feature_key_parts(session.backbone, spec.precision, session.device),
        "layers": None if session.layers is None else list(session.layers),
        "legs": [dataclasses.asdict(leg) for leg in r.legs],
    }


def plan_run(spec: RunSpec, session: Session | None = None, run_id: str | None = None) -> tuple[Plan, Session]:
    """The plan of ``spec`` (and the session it built to resolve the backbone and config)."""
    session = session or Session(spec)
    cls = session.cls
    run_id = (
        run_id
        or f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{cls.name}-{session.resolved.backbone_name}-{secrets.token_hex(3)}"
    )
    header = run_header(session, run_id)
    family = cls.artifacts_family or cls.name
    fit_scope = session.detector.fit_scope
    return make_plan(spec, header, session.resolved.legs, cls.learning_type, family, fit_scope), session


def run_experiment(spec: RunSpec) -> tuple[RunResult, Path]:
    """Run ``spec`` end to end; returns the result and the path of its JSON file."""
    if spec.resume and not spec.out:  # a new run's default path never exists: there would be nothing to resume
        raise ZsadError("--resume needs --out FILE.json, the results file of the interrupted run to continue")
    plan, session = plan_run(spec)
    out = Path(spec.out) if spec.out else Path("results") / "runs" / f"{plan.header.run_id}.json"
    check_out_path(out)
    created_dirs = _missing_parents(out)
    try:
        with locks.exclusive(out, "results file"):
            store = RecordStore(out, plan)
            if store.exists() and spec.resume:
                done = len(store.load().records)
                session.log(f"resuming {out}: {done} categor{'y' if done == 1 else 'ies'} already done")
            elif spec.resume:
                session.log(f"--resume: {out} does not exist yet; starting a new run")
                check_new_out(out)
            else:
                check_new_out(out)
            done_keys = store.done()
            t_run = time.perf_counter()
            Executor(plan, store, session).run([i for i in plan.items if i.key not in done_keys])
            result = store.add(timings={"total_s": time.perf_counter() - t_run}) if store.exists() else None
    finally:
        for d in created_dirs:  # a run that wrote nothing leaves no empty folders behind
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    if result is None:
        raise ZsadError(f"{out}: the run has no target category to evaluate; check --categories and the targets")
    session.log(f"results: {out} (+ {csv_path(out).name})")
    return result, out


def _missing_parents(path: Path) -> list[Path]:
    """Folders above ``path`` that do not exist yet, deepest first."""
    out = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        out.append(parent)
        parent = parent.parent
    return out


def load_fitted(
    result_path: Path,
    seed: int | None = None,
    leg_index: int = 0,
    backbone_kwargs: dict[str, Any] | None = None,
    device: str = "cpu",
) -> tuple[Session, Leg]:
    """A session (one backbone, one detector) holding the fitted checkpoint of a finished zero-shot run."""
    result = RunResult.load(Path(result_path))
    run = result.config.get("run", {})
    legs = [Leg(d["name"], tuple(d["aux"]), tuple(d["targets"])) for d in run.get("legs", [])]
    if not legs or leg_index >= len(legs):
        raise ZsadError(f"{result_path}: run has no protocol leg #{leg_index}")
    leg = legs[leg_index]
    seed = result.seeds[0] if seed is None else seed
    preset = result.config.get("preset", {})
    fit = result.fit_for(leg.name, seed)
    if fit is None:
        raise ZsadError(f"{result_path}: no fitted checkpoint for leg '{leg.name}' seed {seed} (not a zero-shot run?)")
    spec = RunSpec(
        method=result.method,
        backbone=result.backbone,
        protocol=None,
        aux=list(leg.aux),
        targets=list(leg.targets),
        aux_categories=run.get("aux_categories"),
        aux_split=run.get("aux_split", "test"),
        # the header holds the first leg's options; a leg of another dataset kind recorded its own
        method_config={**result.config.get("method", {}), **preset.get("leg_options", {}).get(leg.name, {})},
        preset=preset.get("name", "paper"),
        backbone_kwargs=backbone_kwargs or {},
        weights=run.get("weights"),
        image_size=run.get("image_size"),
        precision=run.get("precision", "fp32"),
        device=device,
        progress=False,
    )
    session = Session(spec)
    load_checkpoint(session.detector, Path(fit.checkpoint))
    return session, leg


def rebuild(
    result_path: Path,
    seed: int | None = None,
    leg_index: int = 0,
    backbone_kwargs: dict[str, Any] | None = None,
    device: str = "cpu",
) -> tuple[Detector, FeatureSource]:
    """The fitted detector of a finished zero-shot run (from its checkpoint) and its auxiliary DataSource."""
    session, leg = load_fitted(result_path, seed, leg_index, backbone_kwargs, device)
    spec = session.spec
    aux = open_datasets(leg.aux, spec.aux_categories, spec.aux_split, "auxiliary")
    return session.detector, session.source(aux.samples)
