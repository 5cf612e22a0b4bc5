"""How a person names datasets, legs and target sets (``visa-to-mvtec`` -> ``VisA -> MVTec AD``)."""

from __future__ import annotations

from pathlib import Path

# How a person names the datasets (scheme of a dataset spec, or a protocol token).
DATASET_NAMES = {"mvtec": "MVTec AD", "visa": "VisA", "mtd": "MTD", "mpdd": "MPDD", "ksdd": "KolektorSDD"}
# Folder names that are just the dataset's own root (so ``mvtec:/data/mvtec_ad`` reads "MVTec AD").
ROOT_FOLDERS = {
    "mvtec": {"mvtec_ad", "mvtec", "mvtec_anomaly_detection", "mvtec-ad"},
    "visa": {"visa", "visa_20220922"},
}


def canonical_protocol(name: str) -> str:
    """Protocol names compare with ``_`` and ``-`` alike (``visa_to_mvtec`` == ``visa-to-mvtec``)."""
    return str(name).strip().replace("_", "-")


def dataset_name(token: str) -> str:
    """Readable name of one dataset spec or protocol token: ``visa`` -> ``VisA``, ``mvtec:/x/bottle`` ->
    ``MVTec AD (bottle)``, ``folder:/x/magnetic_tile`` -> ``magnetic_tile``, ``synthetic:objects`` ->
    ``synthetic objects``."""
    scheme, sep, rest = token.partition(":")
    if not sep:
        return DATASET_NAMES.get(scheme, scheme)
    if scheme == "synthetic":
        return f"synthetic {rest}"
    name = Path(rest).name or rest
    if scheme in DATASET_NAMES:
        known = name.lower() in ROOT_FOLDERS.get(scheme, set()) or name.lower() == scheme or not name
        return DATASET_NAMES[scheme] if known else f"{DATASET_NAMES[scheme]} ({name})"
    return name


def dataset_names(part: str) -> str:
    return " + ".join(dataset_name(t) for t in part.split("+"))


def leg_setting(protocol: str, learning_type: str = "") -> str:
    """How a person writes a leg: ``visa-to-mvtec`` -> ``VisA -> MVTec AD``; ``mvtec@1-shot`` -> ``1-shot``;
    a leg without an auxiliary set -> its learning type (``training-free``)."""
    base, _, shots = canonical_protocol(protocol).partition("@")
    prefix = ""
    if base.startswith("realmini:"):  # the named protocol over the realmini subsets
        base, prefix = base.removeprefix("realmini:"), " (realmini)"
    if "-to-" in base:
        aux, _, target = base.partition("-to-")
        if aux.startswith("synthetic:") and ":" not in target:  # the named leg synthetic:textures-to-objects
            target = f"synthetic:{target}"
        return f"{dataset_names(aux)} -> {dataset_names(target)}{prefix}"
    if shots:
        return shots
    return str(learning_type or "no auxiliary set")


def reported_target(protocol: str) -> tuple[str, str]:
    """(target kinds, shots) of a reported protocol: ``visa-to-mvtec`` -> (``mvtec``, ``""``)."""
    base, _, shots = canonical_protocol(protocol).partition("@")
    target = base.partition("-to-")[2] if "-to-" in base else base
    kinds = "+".join(sorted(t.partition(":")[0] for t in target.split("+")))
    return kinds, shots


def reported_kind(table_key: str) -> str:
    """The ``reported:KINDS[@k-shot]`` key under which reported rows match a measured table key."""
    targets, _, shots = table_key.rpartition("@") if table_key.endswith("-shot") else (table_key, "", "")
    kinds = "+".join(sorted(t.partition(":")[0] for t in targets.split("+")))
    return f"reported:{kinds}" + (f"@{shots}" if shots else "")
