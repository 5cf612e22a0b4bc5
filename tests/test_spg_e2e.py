"""SPG end to end: fit + predict on hand-made token sets (both directions), checkpoints, SAE reuse,
and (marked) the synthetic and realmini protocols through the runner."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from zsad_bench.backbones.base import Backbone, Features, Preprocess
from zsad_bench.data.records import Sample
from zsad_bench.detector import FitContext, create_method
from zsad_bench.errors import ZsadError
from zsad_bench.source import FeatureSource, tensor_features

GRID, DIM, PATCH = 8, 16, 4
SIZE = GRID * PATCH
FAST = {
    "sae_width": 64,
    "sae_k": 4,
    "sae_epochs": 4,
    "sae_batch_size": 8,
    "guide_epochs": 15,
    "guide_batch_size": 4,
    "sigma": 1.0,
}


class TinyBackbone(Backbone):
    """Stand-in backbone: average-pools ``PATCH x PATCH`` cells of the first DIM/3 channels' worth of pixels."""

    name = "tiny"
    source = "test"
    patch_size = PATCH
    embed_dim = DIM
    default_layers = ("last",)

    def __init__(self, weights_id: str = "random") -> None:
        super().__init__()
        self.preprocess = Preprocess(SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.weights_id = weights_id
        self.proj = torch.nn.Linear(3, DIM, bias=False)

    def forward_features(self, images: torch.Tensor, layers: Sequence[str] | None = None) -> Features:
        pooled = torch.nn.functional.avg_pool2d(images, PATCH).permute(0, 2, 3, 1)
        return Features({"last": self.proj(pooled)})


def make_set(name: str, n: int, seed: int, anomaly_dir: torch.Tensor) -> tuple[FeatureSource, torch.Tensor]:
    """Token grids whose normal patches mix set-specific directions and whose defects add ``anomaly_dir``.

    Returns the source (masks at SIZE) and the ground-truth masks ``(n, SIZE, SIZE)``.
    """
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, DIM, generator=gen)
    mix = torch.rand(n, GRID, GRID, 4, generator=gen)
    tokens = mix @ basis + 0.1 * torch.randn(n, GRID, GRID, DIM, generator=gen)
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    samples = []
    for i in range(n):
        label = int(i % 2 == 1)
        if label:
            r, c = torch.randint(0, GRID - 3, (2,), generator=gen).tolist()
            hh, ww = torch.randint(2, 4, (2,), generator=gen).tolist()
            tokens[i, r : r + hh, c : c + ww] += 3.0 * anomaly_dir
            masks[i, r * PATCH : (r + hh) * PATCH, c * PATCH : (c + ww) * PATCH] = True
        path = Path(f"/nonexistent/{name}/{i:03d}.png")
        samples.append(Sample(path, name, label, path.with_suffix(".mask.png") if label else None, "x", "test"))
    index = {s.image_path: i for i, s in enumerate(samples)}

    def mask_of(sample: Sample, size: int) -> np.ndarray:
        assert size == SIZE
        return masks[index[sample.image_path]].numpy()

    return FeatureSource(samples, SIZE, tensor_features(tokens), mask_of), masks


@pytest.fixture(scope="module")
def sets() -> dict[str, tuple[FeatureSource, torch.Tensor]]:
    anomaly_dir = torch.nn.functional.normalize(torch.randn(DIM, generator=torch.Generator().manual_seed(99)), dim=0)
    return {"textures": make_set("textures", 40, 1, anomaly_dir), "objects": make_set("objects", 40, 2, anomaly_dir)}


def ctx(tmp_path: Path, logs: list[str] | None = None) -> FitContext:
    sink = logs.append if logs is not None else (lambda _msg: None)
    return FitContext(torch.device("cpu"), seed=111, artifacts_dir=tmp_path, progress=False, log=sink)


def pixel_auroc(detector, source: FeatureSource, masks: torch.Tensor) -> float:
    maps = torch.cat([p.maps for _, p in detector.predict_source(source, 16)])
    return roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())


@pytest.mark.parametrize(("aux", "target"), [("textures", "objects"), ("objects", "textures")])
def test_spg_beats_untrained_guides(sets, tmp_path: Path, aux: str, target: str) -> None:
    logs: list[str] = []
    trained = create_method("spg", TinyBackbone(), **FAST)
    trained.fit(sets[aux][0], ctx(tmp_path, logs))
    control = create_method("spg", TinyBackbone(), **{**FAST, "guide_epochs": 0})  # same SAE, init coefficients
    control.fit(sets[aux][0], ctx(tmp_path, logs))
    assert any("reusing SAE" in line for line in logs)
    good = pixel_auroc(trained, *sets[target])
    base = pixel_auroc(control, *sets[target])
    assert good > 0.9
    assert good > base + 0.2
    summary = trained.summary()
    coef = torch.relu(trained.coef_ema[2:]) * ~trained.dead_mask
    assert summary["guide_sparsity"] == float((coef > 0).sum())
    assert summary["guide_nonzero_anomaly"] == float((coef[1] > 0).sum())


def test_topk_variant_keeps_k_per_guide(sets, tmp_path: Path) -> None:
    create_method("spg", TinyBackbone(), **{**FAST, "guide_epochs": 0}).fit(sets["textures"][0], ctx(tmp_path / "spg"))
    logs: list[str] = []
    det = create_method("spg-topk", TinyBackbone(), **{**FAST, "guide_topk": 5})
    # the runner gives every member of an artifacts family the same folder: spg-topk reuses spg's SAE
    assert type(det).artifacts_family == "spg" and det.name == "spg-topk"
    det.fit(sets["textures"][0], ctx(tmp_path / "spg", logs))
    assert any("reusing SAE" in line for line in logs)
    local = det.coefficients(det.coef_ema)[2:]
    assert ((local > 0).sum(1) <= 5).all()
    assert det.summary()["guide_sparsity"] == float((local > 0).sum())
    assert pixel_auroc(det, *sets["objects"]) > 0.85


def test_checkpoint_roundtrip_and_mismatch(sets, tmp_path: Path) -> None:
    det = create_method("spg", TinyBackbone(), **FAST)
    src, _ = sets["objects"]
    det.fit(src, ctx(tmp_path))
    state = det.state_dict()
    batch = next(iter(src.batches(6)))
    again = create_method("spg", TinyBackbone(), **FAST)
    again.load_state_dict(state)
    assert torch.equal(again.predict(batch).maps, det.predict(batch).maps)
    assert again.summary() == det.summary()
    with pytest.raises(ZsadError, match="backbone"):
        create_method("spg", TinyBackbone("other"), **FAST).load_state_dict(state)
    with pytest.raises(ZsadError, match="sae_width=64"):
        create_method("spg", TinyBackbone(), **{**FAST, "sae_width": 128}).load_state_dict(state)


def test_inference_options_change_only_scoring(sets, tmp_path: Path) -> None:
    det = create_method("spg", TinyBackbone(), **FAST)
    src, _ = sets["textures"]
    det.fit(src, ctx(tmp_path))
    batch = next(iter(src.batches(4)))
    maps = det.predict(batch).maps
    det.config.aggregation = "mean"
    pred = det.predict(batch)
    assert torch.equal(pred.maps, maps)
    assert torch.allclose(pred.scores, maps.flatten(1).mean(1))
    det.config.aggregation, det.config.agg_tau = "lse", 0.05
    lme = torch.stack([0.05 * torch.log(torch.exp(m.double().flatten() / 0.05).mean()) for m in maps]).float()
    assert torch.allclose(det.predict(batch).scores, lme, atol=1e-5)


def test_global_guides_get_the_detection_loss(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randn(8, GRID, GRID, DIM, generator=gen)
    glob = torch.randn(8, DIM, generator=gen)
    samples = [Sample(Path(f"/nonexistent/g/{i}.png"), "g", i % 2, None, "x", "test") for i in range(8)]
    src = FeatureSource(samples, SIZE, tensor_features(tokens, glob), lambda s, n: np.zeros((n, n), bool))
    with_global = create_method("spg", TinyBackbone(), **{**FAST, "guide_epochs": 1})
    with_global.fit(src, ctx(tmp_path))
    assert with_global.summary()["guide_det_loss"] > 0
    without = create_method("spg", TinyBackbone(), **{**FAST, "guide_epochs": 1, "global_guides": False})
    without.fit(src, ctx(tmp_path))
    assert without.summary()["guide_det_loss"] == 0
    # without global guides no loss term touches rows 0-1: they keep the 0.1 + 0.01 N(0, 1) init
    init = 0.1 + 0.01 * torch.randn(4, FAST["sae_width"], generator=torch.Generator().manual_seed(111))
    assert torch.equal(without.coef[:2], init[:2])
    assert not torch.equal(with_global.coef[:2], init[:2])


def test_auxk_revives_with_a_short_dead_window(sets, tmp_path: Path) -> None:
    logs: list[str] = []
    det = create_method(
        "spg", TinyBackbone(), **{**FAST, "sae_width": 256, "dead_window_tokens": 64, "guide_epochs": 1}
    )
    det.fit(sets["textures"][0], ctx(tmp_path, logs))
    assert any("dead latents" in line for line in logs)
    assert det.summary()["sae_auxk_loss"] > 0
    # the raw dictionary is renormalised after every step, the encoder is not
    assert torch.allclose(det.sae.dictionary.norm(dim=1), torch.ones(256), atol=1e-5)
    assert not torch.allclose(det.sae.encoder.norm(dim=1), torch.ones(256), atol=1e-3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"aggregation": "median"}, "aggregation"),
        ({"sae_k": 100, "sae_width": 64}, "sae_k"),
        ({"guide_topk": 0}, "guide_topk"),
        ({"l1_reduction": "max"}, "l1_reduction"),
    ],
)
def test_bad_options_raise_one_line_errors(override: dict, message: str) -> None:
    with pytest.raises(ZsadError, match=message):
        create_method("spg", TinyBackbone(), **override)


# ---------------------------------------------------------------------------------------------- through the runner
RUN_CFG = {"sae_width": 256, "sae_epochs": 3, "guide_epochs": 15}


def leg_means(result, metric: str) -> dict[str, float]:
    """Per protocol leg, the category mean of ``metric``."""
    out: dict[str, list[float]] = {}
    for rec in result.records:
        out.setdefault(rec.protocol, []).append(rec.metrics[metric])
    return {leg: sum(v) / len(v) for leg, v in out.items()}


def run_with_control(tmp_path: Path, cfg: dict, **spec_kw) -> tuple[dict[str, float], dict[str, float], object]:
    from zsad_bench.runner import RunSpec, run_experiment

    common = {"method": "spg", "backbone": "effnet-lite0", "device": "cpu", "progress": False, **spec_kw}
    trained, _ = run_experiment(RunSpec(**common, method_config=cfg, out=tmp_path / "spg.json"))
    control_cfg = {**cfg, "guide_epochs": 0}  # same (reused) SAE, untrained initial coefficients
    control, _ = run_experiment(RunSpec(**common, method_config=control_cfg, out=tmp_path / "control.json"))
    return leg_means(trained, "pixel_auroc"), leg_means(control, "pixel_auroc"), trained


@pytest.mark.slow
def test_synthetic_protocol_both_directions_beat_control(tmp_path: Path) -> None:
    good, base, result = run_with_control(tmp_path, RUN_CFG, protocol="synthetic")
    assert len(good) == 2
    for leg in good:
        assert good[leg] > base[leg] + 0.03, (leg, good[leg], base[leg])
        assert 0 < result.summary[f"guide_sparsity|{leg}|seed=111"] <= 2 * RUN_CFG["sae_width"]


@pytest.mark.slow
@pytest.mark.realmini
def test_realmini_protocol_both_directions_beat_control(realmini: Path, tmp_path: Path) -> None:
    cfg = {**RUN_CFG, "guide_epochs": 8}  # the reverse leg has 515 aux images: plenty of steps
    good, base, _ = run_with_control(tmp_path, cfg, protocol="realmini", data_root=realmini)
    assert len(good) == 2
    for leg in good:
        assert good[leg] > base[leg] + 0.03, (leg, good[leg], base[leg])


def spg_cli(argv: list[str]) -> object:
    """Parse ``argv`` with SPG's command modules (``atoms`` from the method, ``ablate``) and run it."""
    import argparse

    from zsad_bench.cli import ablate
    from zsad_bench.methods import spg_commands

    parser = argparse.ArgumentParser(prog="zsad-bench")
    sub = parser.add_subparsers(dest="command", required=True)
    spg_commands.add_parser(sub)
    ablate.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_ablation_points_encode_the_sweep() -> None:
    import argparse

    from zsad_bench.cli.ablate import ablation_points, add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    grid = ablation_points(parser.parse_args(["ablate", "sae-grid", "--widths", "1024", "2048", "--ks", "16"]))
    assert [p["label"] for p in grid] == ["SPG H=1024 k=16", "SPG H=2048 k=16"]
    assert grid[1]["config"] == {"sae_width": 2048, "sae_k": 16}
    bbs = ablation_points(parser.parse_args(["ablate", "backbone", "--backbones", "dinov2:448", "siglip"]))
    assert [(p["backbone"], p["image_size"], p["label"]) for p in bbs] == [
        ("dinov2", 448, "SPG dinov2@448"),
        ("siglip", None, "SPG siglip"),
    ]
    topk = ablation_points(parser.parse_args(["ablate", "guide-topk", "--topks", "8", "64"]))
    assert [(p["method"], p["config"]) for p in topk] == [
        ("spg", {}),
        ("spg-topk", {"guide_topk": 8}),
        ("spg-topk", {"guide_topk": 64}),
    ]
    with pytest.raises(ZsadError, match="NAME:SIZE"):
        ablation_points(parser.parse_args(["ablate", "backbone", "--backbones", "dinov2:big"]))


@pytest.mark.slow
def test_ablate_tau_then_atoms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from zsad_bench.results import RunResult

    sets = [f"{k}={v}" for k, v in RUN_CFG.items()]
    argv = ["ablate", "tau", "--taus", "0.01", "10", "--backbone", "effnet-lite0", "--aux", "synthetic:textures"]
    argv += ["--target", "synthetic:objects", "--categories", "cap,nut", "--device", "cpu", "--quiet"]
    argv += ["--out-dir", str(tmp_path / "abl")]
    assert spg_cli(argv + [x for s in sets for x in ("--set", s)]) == 0
    points = {RunResult.load(p).method_label: RunResult.load(p) for p in (tmp_path / "abl").glob("SPG*.json")}
    assert set(points) == {"SPG max", "SPG mean", "SPG lse tau=0.01", "SPG lse tau=10"}
    # aggregation only changes image scores: the maps, hence pixel AUROC, are the same at every point
    pixel = {label: leg_means(r, "pixel_auroc") for label, r in points.items()}
    assert all(v == pixel["SPG max"] for v in pixel.values())
    assert (tmp_path / "abl" / "summary.md").is_file()
    capsys.readouterr()
    from zsad_bench.cli.main import main

    assert main(["table", str(tmp_path / "abl"), "--columns", "method"]) == 0
    table = capsys.readouterr().out
    assert all(label in table for label in points)

    png = tmp_path / "atoms.png"
    assert (
        spg_cli(["atoms", str(tmp_path / "abl" / "SPG_max.json"), "--top", "2", "--patches", "3", "-o", str(png)]) == 0
    )
    out = capsys.readouterr().out
    header, listing = out.split("\natom #")[0].split("\n", 1)
    n_active = int(header.split("anomaly guide: ")[1].split(" active atoms")[0])
    listed = [float(tok.split(":")[1]) for tok in listing.split()]
    assert listed and listed == sorted(listed, reverse=True) and min(listed) > 0
    assert len(listed) == min(n_active, 40)  # the first 40 unless --list-all
    assert png.stat().st_size > 10_000
    assert out.count("atom #") == 2
