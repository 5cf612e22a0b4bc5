"""Evaluation protocols: which auxiliary set a method learns from and which targets it is scored on.

A protocol is a list of legs. Named protocols:

* ``synthetic``: the embedded default, both directions between the two synthetic sets
  (``synthetic:textures`` -> ``synthetic:objects`` and back); runs offline.
* ``visa-to-mvtec`` / ``mvtec-to-visa``: the literature's cross-dataset protocols; ``--data-root DIR``
  must hold the MVTec AD and VisA roots (see :data:`ROOT_NAMES`).
* ``realmini``: the small real subsets shipped beside the project (VisA capsules+macaroni1 <->
  MVTec bottle + Magnetic Tile), both directions; ``--data-root`` is the ``realmini`` folder.

Free-form: ``--aux SPEC [--aux SPEC] --target SPEC [--target SPEC]``. Few-shot methods ignore the
auxiliary set and take k normal images of each target category from its train split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zsad_bench.errors import ZsadError

NAMED = ("synthetic", "visa-to-mvtec", "mvtec-to-visa", "realmini")

# Folder names accepted under --data-root for each dataset, in the order they are tried.
ROOT_NAMES = {
    "mvtec": ("mvtec_ad", "mvtec", "mvtec_anomaly_detection", "MVTec-AD", "mvtec-ad"),
    "visa": ("visa", "VisA", "VisA_20220922"),
    "mtd": ("mtd/magnetic_tile", "magnetic_tile", "mtd"),
}


@dataclass(frozen=True)
class Leg:
    """One direction of a protocol: learn on ``aux`` (dataset specs), evaluate on ``targets``."""

    name: str
    aux: tuple[str, ...]
    targets: tuple[str, ...]


def _find_root(data_root: Path, key: str, protocol: str) -> Path:
    for name in ROOT_NAMES[key]:
        if (data_root / name).is_dir():
            return data_root / name
    tried = ", ".join(str(data_root / n) for n in ROOT_NAMES[key])
    raise ZsadError(f"protocol '{protocol}': no {key} dataset under --data-root (tried {tried})")


def resolve_protocol(
    protocol: str | None,
    aux: list[str] | tuple[str, ...] = (),
    targets: list[str] | tuple[str, ...] = (),
    data_root: Path | str | None = None,
) -> list[Leg]:
    """Legs of a named protocol, or of the free-form ``aux``/``targets`` specs."""
    if protocol is None:
        if not targets:
            raise ZsadError("no protocol: pass --protocol NAME or --target DATASET (and --aux DATASET)")
        name = f"{_spec_name(aux)}-to-{_spec_name(targets)}" if aux else _spec_name(targets)
        return [Leg(name, tuple(aux), tuple(targets))]
    if aux or targets:
        raise ZsadError(f"--protocol {protocol} fixes the datasets; drop --aux/--target or drop --protocol")
    if protocol == "synthetic":
        return [
            Leg("synthetic:textures-to-objects", ("synthetic:textures",), ("synthetic:objects",)),
            Leg("synthetic:objects-to-textures", ("synthetic:objects",), ("synthetic:textures",)),
        ]
    if protocol not in NAMED:
        raise ZsadError(f"unknown protocol '{protocol}'; known: {', '.join(NAMED)} (or use --aux/--target)")
    if data_root is None:
        raise ZsadError(f"protocol '{protocol}' needs --data-root DIR holding the datasets")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise ZsadError(f"{root}: --data-root does not exist")
    if protocol == "realmini":
        visa = f"visa:{_find_root(root, 'visa', protocol)}"
        mvtec = f"mvtec:{_find_root(root, 'mvtec', protocol)}"
        mtd = f"folder:{_find_root(root, 'mtd', protocol)}"
        return [
            Leg("realmini:visa-to-mvtec+mtd", (visa,), (mvtec, mtd)),
            Leg("realmini:mvtec+mtd-to-visa", (mvtec, mtd), (visa,)),
        ]
    mvtec = f"mvtec:{_find_root(root, 'mvtec', protocol)}"
    visa = f"visa:{_find_root(root, 'visa', protocol)}"
    if protocol == "visa-to-mvtec":
        return [Leg(protocol, (visa,), (mvtec,))]
    return [Leg(protocol, (mvtec,), (visa,))]


def target_kind(protocol: str | None, targets: list[str] | tuple[str, ...] = ()) -> str | None:
    """The dataset kind (``mvtec``/``visa``) every target of a run shares, from names alone (no disk access).

    Named protocols: ``visa-to-mvtec`` -> mvtec, ``mvtec-to-visa`` -> visa; the others mix kinds or have
    none. Free-form targets: the kind of their scheme when all agree (``zsad_bench.presets.dataset_kind``).
    """
    from zsad_bench.presets import dataset_kind

    if protocol is not None:
        return {"visa-to-mvtec": "mvtec", "mvtec-to-visa": "visa"}.get(protocol)
    kinds = {dataset_kind(t) for t in targets}
    return kinds.pop() if len(kinds) == 1 else None


def few_shot_legs(legs: list[Leg]) -> list[Leg]:
    """Few-shot methods ignore the auxiliary set: one leg per distinct target set, named after it.

    MVTec AD and VisA targets are named ``mvtec`` / ``visa`` (the tables add ``@k-shot``, matching the
    few-shot papers' reported figures); other targets keep their spec name.
    """
    out: dict[tuple[str, ...], Leg] = {}
    for leg in legs:
        names = [
            s.partition(":")[0] if s.partition(":")[0] in ("mvtec", "visa") else _spec_name([s]) for s in leg.targets
        ]
        out.setdefault(leg.targets, Leg("+".join(names), (), leg.targets))
    return list(out.values())


def _spec_name(specs: list[str] | tuple[str, ...]) -> str:
    names = []
    for spec in specs:
        scheme, _, path = spec.partition(":")
        names.append(f"{scheme}:{Path(path).name}" if path and scheme != "synthetic" else spec)
    return "+".join(names)
