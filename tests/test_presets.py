"""Presets: paper vs matched settings, per-dataset defaults from the target, precedence of explicit choices."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from zsad_bench import presets
from zsad_bench.cli.listing import method_details
from zsad_bench.detector import get_method_class
from zsad_bench.errors import ZsadError
from zsad_bench.presets import MATCHED_BACKBONE, dataset_kind, resolve


@pytest.mark.parametrize(
    ("spec", "kind"),
    [("mvtec:/data/mvtec", "mvtec"), ("mvtec", "mvtec"), ("VisA:/d", "visa"), ("folder:/d", None), ("meta:x", None)],
)
def test_dataset_kind_from_the_spec(spec: str, kind: str | None) -> None:
    assert dataset_kind(spec) == kind


def test_paper_preset_per_method() -> None:
    want = {
        "musc": ("openclip", 518),
        "foundad": ("dinov3", 512),
        "anomalydino": ("dinov2-vits14", 448),
    }
    for name, (backbone, size) in want.items():
        got = resolve(get_method_class(name))
        assert (got.preset, got.backbone, got.image_size) == ("paper", backbone, size), name


def test_explicit_choices_win() -> None:
    foundad = get_method_class("foundad")
    got = resolve(
        foundad, "paper", "visa", backbone="effnet-lite0", overrides={"top_k": 3, "projector_scope": "category"}
    )
    # another backbone drops the paper's size (it belongs to the paper's backbone); --set beats every default
    assert (got.backbone, got.image_size) == ("effnet-lite0", None)
    assert got.config_overrides == {"projector_scope": "category", "top_k": 3}
    assert any("replaces the paper's dinov3" in n for n in got.notes)
    assert resolve(foundad, "paper", image_size=224).image_size == 224


def test_matched_preset_shares_backbone_and_keeps_method_options() -> None:
    musc, foundad = get_method_class("musc"), get_method_class("foundad")
    for cls in (musc, foundad):
        got = resolve(cls, "matched", "mvtec")
        assert (got.backbone, got.image_size) == (MATCHED_BACKBONE, None)
    assert resolve(foundad, "matched", "mvtec").config_overrides == {"projector_scope": "dataset", "top_k": 10}
    assert resolve(musc, "matched", "visa", backbone="dinov2", image_size=336).image_size == 336
    # a text method cannot run on a vision-only backbone: matched keeps its own
    assert resolve(get_method_class("winclip"), "matched").backbone == "openclip"


def test_layers_follow_the_backbone_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    caps = {"dinov2": SimpleNamespace(num_blocks=24, normed_layers=True, text=False)}
    monkeypatch.setattr(presets, "backbone_capabilities", lambda name: caps.get(name))
    musc = get_method_class("musc")
    assert resolve(musc, "matched", backbone="dinov2").layers == ("6:norm", "12:norm", "18:norm", "24:norm")
    assert resolve(musc, "matched", backbone="effnet-lite0").layers is None


def test_bad_preset_and_kind_are_user_errors() -> None:
    musc = get_method_class("musc")
    with pytest.raises(ZsadError, match="unknown preset 'best'"):
        resolve(musc, "best")
    with pytest.raises(ZsadError, match="unknown dataset kind"):
        resolve(musc, "paper", "btad")


def test_record_is_json_and_details_print_both_presets() -> None:
    got = resolve(get_method_class("musc"), "paper", "visa", overrides={"r_list": (1, 3)})
    record = json.loads(json.dumps(got.record()))
    assert record["name"] == "paper" and record["config_overrides"] == {"rscin_k": [1, 8, 9], "r_list": [1, 3]}
    text = method_details("musc")
    assert "paper preset: backbone openclip, 518 px" in text and "matched preset:" in text
    assert "target visa: rscin_k=1,8,9" in text
