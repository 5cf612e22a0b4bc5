"""Tables keyed by target set, structural mean row, escaping, incomplete runs, mask-less categories, controls."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from tests.test_tables import run_cli  # the `zsad-bench table` parser, as the CLI builds it
from zsad_bench.errors import ZsadError
from zsad_bench.results import CategoryRecord, RunResult
from zsad_bench.tables import leg_setting, load_reported, load_results, render, render_summary


def write(
    path: Path,
    label: str,
    cats: dict[str, dict[str, float]],
    leg: str,
    *,
    method: str | None = None,
    learning_type: str = "zero-shot",
    target: str = "mvtec:/data",
    backbone: str = "dinov3",
    complete: bool = True,
    seed: int = 0,
) -> Path:
    """A results file: one seed, ``cats`` = {category: {metric: fraction}} on leg ``leg``."""
    records = [
        CategoryRecord(seed=seed, target=target, category=c, n_images=4, metrics=m, protocol=leg)
        for c, m in cats.items()
    ]
    run = RunResult(
        run_id=path.stem, method=method or label.lower(), method_label=label, backbone=backbone, protocol=leg,
        aux=[], targets=[target], config={}, seeds=[seed], learning_type=learning_type, metric_variants={},
        records=records, complete=complete,
    )  # fmt: skip
    run.save(path)
    return path


def md_block(text: str, title_start: str) -> list[str]:
    """Lines of the pipe table after the title starting with ``title_start``, and the notes after it."""
    return text.split(f"**{title_start}", 1)[1].split("\n\n")[1:3]


def md_rows(text: str, title_start: str) -> list[list[str]]:
    """Cells of the table (split on unescaped pipes)."""
    block = md_block(text, title_start)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|") and not ln.startswith("|:")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln.strip()[1:-1])] for ln in lines]


def test_category_named_mean_is_data(tmp_path: Path) -> None:
    write(tmp_path / "a.json", "SPG", {"Mean": {"image_auroc": 0.9}, "bottle": {"image_auroc": 0.6}}, "visa-to-mvtec")
    text = render(load_results([tmp_path]), "md")
    rows = md_rows(text, "visa-to-mvtec - image_auroc")
    # the category "Mean" is a row of its own; the mean over both categories is (0.9 + 0.6) / 2 = 75.0
    assert rows[1:] == [["bottle", "**60.0**"], ["Mean", "**90.0**"], ["Mean over categories", "**75.0**"]]
    assert md_rows(text, "Main table")[1] == ["SPG", "**75.0**"]
    with pytest.raises(ZsadError, match="category 'Mean' would read as the CSV's mean row"):
        render(load_results([tmp_path]), "csv")


def test_markdown_and_latex_escaping(tmp_path: Path) -> None:
    write(tmp_path / "a.json", "A|B *x*", {"left|right": {"image_auroc": 0.5}}, "visa-to-mvtec")
    text = render(load_results([tmp_path]), "md")
    rows = md_rows(text, "visa-to-mvtec - image_auroc")
    assert rows[0] == ["Category", r"A\|B \*x\*"]
    assert rows[1] == [r"left\|right", "**50.0**"]
    latex = render(load_results([tmp_path]), "latex")
    assert r"left\textbar{}right & \textbf{50.0}" in latex
    assert r"A\textbar{}B *x*" in latex


def test_incomplete_runs_are_marked_and_refused_in_latex(tmp_path: Path) -> None:
    path = write(tmp_path / "a.json", "SPG", {"bottle": {"image_auroc": 0.8}}, "visa-to-mvtec", complete=False)
    write(
        tmp_path / "b.json", "WinCLIP", {"bottle": {"image_auroc": 0.7}, "cable": {"image_auroc": 0.9}}, "visa-to-mvtec"
    )
    df = load_results([tmp_path])
    text = render(df, "md")
    rows = md_rows(text, "visa-to-mvtec - image_auroc")
    assert rows[0] == ["Category", "SPG†", "WinCLIP"]
    notes = md_block(text, "visa-to-mvtec - image_auroc")[1]
    assert f"† interrupted run ({path})" in notes
    for fmt in ("latex", "csv"):
        with pytest.raises(ZsadError, match=rf"{re.escape(str(path))}: run is incomplete.*--allow-incomplete"):
            render(df, fmt)
    with pytest.raises(ZsadError, match="run is incomplete"):
        run_cli(str(tmp_path), "--format", "latex")
    latex = render(df, "latex", allow_incomplete=True)
    assert r"SPG$^\dagger$ & WinCLIP" in latex


def test_mask_less_category_pixel_metrics_absent(tmp_path: Path) -> None:
    cats = {
        "bottle": {"image_auroc": 0.9, "pixel_auroc": 0.8},
        "tiles": {"image_auroc": 0.7},  # no masks: the accumulator leaves pixel metrics out
        "wood": {"image_auroc": 0.5, "pixel_auroc": 0.6},
    }
    write(tmp_path / "a.json", "SPG", cats, "visa-to-mvtec")
    write(tmp_path / "b.json", "Mask-free", {"tiles": {"image_auroc": 0.6}}, "visa-to-mvtec")
    text = render(load_results([tmp_path]), "md")
    rows = md_rows(text, "visa-to-mvtec - pixel_auroc")
    assert rows[0] == ["Category", "Mask-free", "SPG"]
    body = {r[0]: r[1:] for r in rows[1:]}
    assert body["tiles"] == ["n/a (no masks)", "n/a (no masks)"]
    assert body["bottle"] == ["–", "**80.0**"]
    assert body["Mean"] == ["n/a (no masks)", "**70.0**‡"]  # (0.8 + 0.6) / 2: the mask-less category is left out
    notes = md_block(text, "visa-to-mvtec - pixel_auroc")[1]
    assert "n/a (no masks): the category has no ground-truth masks" in notes and "‡ mean over the categories" in notes
    image = {r[0]: r[1:] for r in md_rows(text, "visa-to-mvtec - image_auroc")[1:]}
    assert image["Mean"] == ["60.0§", "**70.0**"]  # (0.9 + 0.7 + 0.5) / 3; Mask-free ran 1 of the 3 categories
    assert "§ mean over the categories this run evaluated" in md_block(text, "visa-to-mvtec - image_auroc")[1]
    # a target set without any masks: image tables only, and they say why
    only = render(load_results([tmp_path / "b.json"]), "md")
    assert "pixel_auroc" not in only.split("Columns:")[0]
    assert (
        "No pixel metrics: none of these targets has ground-truth masks" in md_block(only, "visa-to-mvtec - image")[1]
    )


def test_learning_types_side_by_side(tmp_path: Path) -> None:
    """A training-free run (leg named after its target) and a zero-shot run on the same targets share one table."""
    write(tmp_path / "musc.json", "MuSc", {"bottle": {"image_auroc": 0.851}}, "mvtec:data",
          learning_type="training-free", backbone="effnet-lite0")  # fmt: skip
    write(tmp_path / "spg.json", "SPG", {"bottle": {"image_auroc": 0.714}}, "visa:visa-to-mvtec:data")
    write(tmp_path / "other.json", "SPG", {"wood": {"image_auroc": 0.5}}, "visa-to-mvtec", target="mvtec:/elsewhere")
    df = load_results([tmp_path])
    text = render(df[df["file"] != str(tmp_path / "other.json")], "md")
    assert text.count("- image_auroc (%)") == 1
    rows = md_rows(text, "MVTec AD (data) - image_auroc")
    assert rows[0] == ["Category", "MuSc (effnet-lite0)", "SPG (dinov3)"]
    assert rows[1] == ["bottle", "**85.1**", "71.4"]
    notes = md_block(text, "MVTec AD (data) - image_auroc")[1]
    assert "MuSc (effnet-lite0): training-free, backbone effnet-lite0, seed 0" in notes
    assert "SPG (dinov3): zero-shot, VisA -> MVTec AD (data), backbone dinov3, seed 0" in notes
    # another target folder is another target set: its own table
    assert render(df, "md").count("- image_auroc (%)") == 2
    write(tmp_path / "more.json", "SPG", {"wood": {"image_auroc": 0.6}}, "visa-to-mvtec")
    text = render(load_results([tmp_path / "other.json", tmp_path / "more.json"]), "md")
    # two target sets on the same named protocol: the titles say which is which
    assert "**visa-to-mvtec on MVTec AD (elsewhere) - image_auroc" in text
    assert "**visa-to-mvtec on MVTec AD (data) - image_auroc" in text


def test_same_method_two_settings_get_their_setting(tmp_path: Path) -> None:
    write(tmp_path / "a.json", "SPG", {"bottle": {"image_auroc": 0.9}}, "visa:visa-to-mvtec:data")
    write(tmp_path / "b.json", "SPG", {"bottle": {"image_auroc": 0.8}}, "folder:mtd-to-mvtec:data")
    rows = md_rows(render(load_results([tmp_path]), "md"), "MVTec AD (data) - image_auroc")
    assert rows[0] == ["Category", r"SPG \[VisA -> MVTec AD (data)\]", r"SPG \[mtd -> MVTec AD (data)\]"]


@pytest.mark.parametrize(
    ("leg", "readable"),
    [
        ("visa-to-mvtec", "VisA -> MVTec AD"),
        ("visa_to_mvtec", "VisA -> MVTec AD"),
        ("mvtec-to-visa", "MVTec AD -> VisA"),
        ("visa:visa-to-mvtec:bottle", "VisA -> MVTec AD (bottle)"),
        ("realmini:visa-to-mvtec+mtd", "VisA -> MVTec AD + MTD (realmini)"),
        ("mvtec@2-shot", "2-shot"),
    ],
)
def test_leg_names_read_as_written(leg: str, readable: str) -> None:
    assert leg_setting(leg) == readable
    assert leg_setting("mvtec:bottle", "training-free") == "training-free"


def test_reported_rows_join_by_target_and_keep_their_setting(tmp_path: Path) -> None:
    reported = tmp_path / "reported"
    reported.mkdir()
    (reported / "musc_paper.csv").write_text(
        "protocol,metric,category,method,value,source,aupro_definition,backbone,learning_type\n"
        "mvtec,image_auroc,bottle,MuSc,99.6,Table 1 arXiv v2,mvtec,ViT-L/14-336,training-free\n"
        "mvtec,image_auroc,mean,MuSc,97.8,Table 1 arXiv v2,mvtec,ViT-L/14-336,training-free\n"
        "visa,image_auroc,mean,MuSc,92.8,Table 1 arXiv v2,mvtec,ViT-L/14-336,training-free\n"
    )
    (reported / "zs_paper.csv").write_text(
        "protocol,metric,category,method,value\nvisa_to_mvtec,image_auroc,bottle,WinCLIP,99.2\n"
    )
    rep = load_reported(reported)
    assert set(rep["setting"]) == {"training-free", "VisA -> MVTec AD"}
    runs = tmp_path / "runs"
    runs.mkdir()
    write(runs / "spg.json", "SPG", {"bottle": {"image_auroc": 0.714}, "cable": {"image_auroc": 0.5}}, "visa-to-mvtec")
    text = render(pd.concat([load_results([runs]), rep], ignore_index=True), "md")
    rows = md_rows(text, "visa-to-mvtec - image_auroc")
    assert rows[0] == ["Category", "SPG", "MuSc (reported)", "WinCLIP (reported)"]
    body = {r[0]: r[1:] for r in rows[1:]}
    assert body["bottle"] == ["71.4", "**99.6**", "99.2"]
    assert body["Mean"] == ["60.7", "**97.8**", "–"]
    notes = md_block(text, "visa-to-mvtec - image_auroc")[1]
    assert (
        "MuSc (reported): training-free, backbone ViT-L/14-336" in notes
        and "WinCLIP (reported): VisA -> MVTec AD" in notes
    )
    assert "92.8" not in text  # VisA figures: no VisA target measured


def test_controls_hidden_listed_apart_never_best(tmp_path: Path) -> None:
    write(
        tmp_path / "spg.json", "SPG", {"bottle": {"image_auroc": 0.7}, "cable": {"image_auroc": 0.9}}, "visa-to-mvtec"
    )
    write(tmp_path / "r.json", "Random", {"bottle": {"image_auroc": 0.5}, "cable": {"image_auroc": 0.5}},
          "visa-to-mvtec", method="control-random", learning_type="training-free")  # fmt: skip
    write(tmp_path / "n.json", "Norm", {"bottle": {"image_auroc": 0.95}, "cable": {"image_auroc": 0.45}},
          "visa-to-mvtec", method="norm", learning_type="control")  # fmt: skip
    df = load_results([tmp_path])
    hidden = render(df, "md")
    assert md_rows(hidden, "visa-to-mvtec - image_auroc")[0] == ["Category", "SPG"]
    assert "2 control run(s) hidden; show them with --controls" in hidden
    text = render(df, "md", controls=True)
    rows = md_rows(text, "visa-to-mvtec - image_auroc")
    assert rows[0] == ["Category", "SPG", "Norm", "Random"]  # controls after the methods
    assert rows[1] == ["bottle", "**70.0**", "95.0", "50.0"]  # the control's 95.0 is not marked best
    notes = md_block(text, "visa-to-mvtec - image_auroc")[1]
    # SPG mean 80.0, best control mean max(70.0, 50.0) = 70.0 -> +10.0 points
    assert "Best measured method minus best control on the mean image_auroc: +10.0 points." in notes
    assert "Controls (floors, never marked best): Norm, Random." in notes
    assert md_rows(text, "Main table")[1:] == [["SPG", "**80.0**"], ["Norm", "70.0"], ["Random", "50.0"]]
    latex = render(df, "latex", controls=True)
    main = latex.split("Main table")[1]
    assert main.index(r"\midrule" + "\nNorm") > 0  # a rule sets the controls apart
    with pytest.raises(ZsadError, match="only control runs given; pass --controls"):
        render(df[df["method"] != "SPG"], "md")


def test_render_summary_per_run(tmp_path: Path) -> None:
    cats = {"bottle": {"image_auroc": 0.9, "pixel_auroc": 0.8}, "tiles": {"image_auroc": 0.6}}
    write(tmp_path / "a.json", "SPG", cats, "visa-to-mvtec")
    text = render_summary(load_results([tmp_path]))
    rows = md_rows(text, "SPG on visa-to-mvtec (%)")
    assert rows == [
        ["Category", "image_auroc", "pixel_auroc"],
        ["bottle", "90.0", "80.0"],
        ["tiles", "60.0", "n/a (no masks)"],
        ["Mean", "75.0", "80.0‡"],
    ]


def test_v2_files_load(tmp_path: Path) -> None:
    path = write(tmp_path / "a.json", "SPG", {"bottle": {"image_auroc": 0.9}}, "visa-to-mvtec")
    data = json.loads(path.read_text())
    data["schema"] = "zsad-bench/results/v2"
    data["images"] = [
        {"seed": 0, "leg": "visa-to-mvtec", "target": "mvtec:/data", "category": "bottle", "path": "x.png",
         "defect": "good", "label": 0, "score": 0.1}
    ]  # fmt: skip
    path.write_text(json.dumps(data))
    assert load_results([path])["value"].tolist() == [0.9]
    data["images"][0]["label"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(ZsadError, match=rf"{re.escape(str(path))}: images\[0\].label = 3 is not 0 \(good\) or 1"):
        load_results([path])


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["records"][0].pop("metrics"),
        lambda d: d["records"][0].update(metrics={"image_auroc": "high"}),
        lambda d: d.update(records=[5]),
        lambda d: d["records"][0].update(metrics=[0.5]),
    ],
)
def test_hand_edited_results_are_one_line_errors(tmp_path: Path, edit) -> None:
    path = write(tmp_path / "a.json", "SPG", {"bottle": {"image_auroc": 0.9}}, "visa-to-mvtec")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ZsadError, match=rf"^{re.escape(str(path))}: .*(re-run|restore|remove)") as info:
        load_results([path])
    assert "\n" not in str(info.value)


def test_titles_read_as_written(tmp_path: Path) -> None:
    cases = [
        ("visa:visa-to-mvtec:bottle", "mvtec:/x/bottle", "zero-shot", "VisA -> MVTec AD (bottle)"),
        ("mvtec:data", "mvtec:/data", "training-free", "MVTec AD (data)"),
        ("synthetic:textures-to-objects", "synthetic:objects", "zero-shot", "synthetic textures -> synthetic objects"),
        ("mvtec-to-visa", "visa:/v/VisA", "zero-shot", "mvtec-to-visa"),  # the papers' own name
    ]
    for i, (leg, target, lt, title) in enumerate(cases):
        path = write(tmp_path / f"{i}.json", "M", {"c": {"image_auroc": 0.5}}, leg, target=target, learning_type=lt)
        text = render(load_results([path]), "md")
        assert text.startswith(f"**{title} - image_auroc (%)"), text.splitlines()[0]
        assert render_summary(load_results([path])).startswith(f"**M on {title} (%)**")
