"""A run never loses or overwrites what it did not create, and every bad input or plugin fault ends in one line."""

from __future__ import annotations

import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from zsad_bench import locks
from zsad_bench.cli.main import main
from zsad_bench.detector import Batch, Detector, LearningType, Prediction, get_method_class, register_method
from zsad_bench.errors import ZsadError
from zsad_bench.results import RunResult
from zsad_bench.runner import RunSpec, load_checkpoint, run_experiment
from zsad_bench.runner.checkpoints import read_checkpoint

CHEAP = ["--method", "toy-zeroshot", "--image-size", "64", "--categories", "cap", "--quiet"]


@register_method
class _FailsToFit(Detector):
    name = "test-fails-fit"
    learning_type = LearningType.ZERO_SHOT

    @dataclass
    class Config:
        fail: bool = True

    def fit(self, data, ctx) -> None:
        if self.config.fail:
            raise RuntimeError("boom in the plugin")  # line reported below
        self.ok = True

    def predict(self, batch: Batch) -> Prediction:
        import torch

        n, s = len(batch.samples), self.backbone.image_size
        return Prediction(torch.zeros(n, s, s), torch.arange(n, dtype=torch.float32))


FAIL_LINE = _FailsToFit.fit.__code__.co_firstlineno + 2


def _cheap_spec(out: Path, **kw) -> RunSpec:
    return RunSpec("toy-zeroshot", image_size=64, categories=["cap"], out=out, progress=False, **kw)


def test_unrelated_csv_beside_out_is_never_overwritten(tmp_path: Path, capsys) -> None:
    csv = tmp_path / "x.csv"
    csv.write_text("mine, not zsad-bench's\n")
    assert main(["run", *CHEAP, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.csv: exists and was not written by this run" in err[0]
    assert csv.read_text() == "mine, not zsad-bench's\n" and not (tmp_path / "x.json").exists()


def test_failed_run_leaves_nothing_and_rerun_works(tmp_path: Path, capsys) -> None:
    out = tmp_path / "new" / "deeper" / "f.json"
    assert (
        main(
            ["run", "--method", "test-fails-fit", "--image-size", "64", "--categories", "cap", "-q", "--out", str(out)]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("zsad-bench: error: method 'test-fails-fit' failed in fit() at ")
    assert f"test_run_safety.py:{FAIL_LINE}: RuntimeError: boom in the plugin" in err[0]
    assert not (tmp_path / "new").exists(), "nothing may be left behind by a run that recorded nothing"
    cmd = ["run", "--method", "test-fails-fit", "--set", "fail=no", "--image-size", "64", "--categories", "cap", "-q"]
    assert main([*cmd, "--out", str(out)]) == 0
    assert RunResult.load(out).complete


def test_debug_prints_the_plugins_traceback(tmp_path: Path, capsys) -> None:
    cmd = ["--debug", "run", "--method", "test-fails-fit", "--image-size", "64", "--categories", "cap", "-q"]
    assert main([*cmd, "--out", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f'test_run_safety.py", line {FAIL_LINE}, in fit' in err


@pytest.mark.parametrize("make", ["file-parent", "readonly"])
def test_unwritable_out_is_one_line(tmp_path: Path, capsys, make: str) -> None:
    if make == "file-parent":
        (tmp_path / "afile").write_text("x")
        out, expect = tmp_path / "afile" / "r.json", "afile is a file, not a directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out, expect = ro / "r.json", "ro is not writable"
    assert main(["run", *CHEAP, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0]


OUTPUT_OPTIONS = [
    ("table", ["table", "r.json", "--out"], "x.md"),
    ("show", ["show", "r.json", "-c", "cap", "--out"], "x.png"),
    ("plot", ["plot", "r.json", "--out"], "figs"),
    ("report", ["report", "r.json", "--out"], "r.html"),
    ("bench", ["bench", "-m", "toy-zeroshot", "--out"], "b.json"),
    ("sweep", ["sweep", "grid.toml", "--out-dir"], "sweep"),
    ("ablate", ["ablate", "tau", "--out-dir"], "ablation"),
    ("atoms", ["atoms", "r.json", "--out"], "a.png"),
]


@pytest.mark.parametrize(("command", "argv", "name"), OUTPUT_OPTIONS, ids=[c for c, _, _ in OUTPUT_OPTIONS])
def test_output_under_a_file_is_refused_before_any_work(
    tmp_path: Path, capsys, command: str, argv: list[str], name: str
) -> None:
    """An --out/--out-dir below an existing file: one usage line naming the file, not a mkdir traceback."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / name
    with pytest.raises(SystemExit) as exc:
        main([*argv, str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("zsad-bench: error: argument --out") and f"{out}: {tmp_path / 'afile'} is a file" in err[0]
    assert "choose another path" in err[0]


@pytest.mark.parametrize(("argv", "name"), [(["table", "r.json", "--out"], "t"), (["bench", "-m", "x", "-o"], "b")])
def test_output_file_that_is_a_folder_is_refused(tmp_path: Path, capsys, argv: list[str], name: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    with pytest.raises(SystemExit):
        main([*argv, str(folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{folder}: {folder} is a folder; give a file name" in err[0]


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["bench", "-m", "x", "--batch-sizes", "0"], "--batch-sizes"),
        (["bench", "-m", "x", "--iters", "0"], "--iters"),
        (["bench", "-m", "x", "--warmup", "-1"], "--warmup"),
        (["bench", "-m", "x", "--extraction-images", "-1"], "--extraction-images"),
        (["bench", "-m", "x", "--device", "gpu"], "--device"),
        (["report", "r.json", "--overlays", "-1"], "--overlays"),
        (["sweep", "grid.toml", "--threads", "0"], "--threads"),
        (["sweep", "grid.toml", "--devices", "cuda:0,bogus"], "--devices"),
    ],
)
def test_bad_numbers_and_devices_are_usage_errors(capsys, argv: list[str], option: str) -> None:
    """Before: bench --batch-sizes 0 / --iters 0 were tracebacks, report --overlays -1, sweep --threads 0
    were silently replaced, a bad --devices entry failed every point with a torch RuntimeError."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"zsad-bench: error: argument {option}"), err


def test_resume_without_out_is_refused(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, it started a new run under results/runs/ (a fresh id never exists), so nothing was resumed."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", *CHEAP, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "zsad-bench: error: --resume needs --out FILE.json, the results file of the interrupted run to continue"
    )
    assert not (tmp_path / "results").exists()


def test_foreign_lock_file_is_refused_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    marker = locks.lock_path(out)
    marker.write_text("my notes\n")
    with pytest.raises(ZsadError, match=r"r.json.lock: exists and is not a zsad-bench lock .* left in place"):
        run_experiment(_cheap_spec(out))
    assert marker.read_text() == "my notes\n"


def test_lock_holders_live_dead_and_remote(tmp_path: Path) -> None:
    target = tmp_path / "t.json"
    marker = locks.lock_path(target)
    host = socket.gethostname()
    marker.write_text(f"{os.getppid()}\n{host}\n")  # a live process on this host
    with pytest.raises(ZsadError, match=rf"pid {os.getppid()} is writing this file"), locks.exclusive(target):
        pass
    assert marker.exists()
    marker.write_text(f"{2**22 + 12345}\n{host}\n")  # no such process: stale, taken over
    with locks.exclusive(target):
        assert marker.read_text().splitlines()[:2] == [str(os.getpid()), host]
    assert not marker.exists()
    marker.write_text("")  # a holder between creating its marker and writing it: held, not foreign
    with pytest.raises(ZsadError, match=r"another process is writing this file"), locks.exclusive(target):
        pass
    assert marker.read_text() == ""
    marker.write_text("4242\nother-machine\n")  # cannot be probed from here: never broken
    with pytest.raises(ZsadError, match=r"pid 4242 on host other-machine is writing"), locks.exclusive(target):
        pass
    assert marker.read_text() == "4242\nother-machine\n"


def test_run_records_every_image_and_safe_checkpoints(tmp_path: Path) -> None:
    result, _ = run_experiment(_cheap_spec(tmp_path / "r.json"))
    (cap,) = result.records
    imgs = [i for i in result.images if i.leg == cap.protocol]
    assert len(imgs) == cap.n_images == 25
    from zsad_bench.data import open_dataset

    truth = {
        str(s.image_path): (s.defect_type, s.label) for s in open_dataset("synthetic:objects").select(["cap"], "test")
    }
    assert {i.path: (i.defect, i.label) for i in imgs} == truth
    assert sum(i.label for i in imgs) > 0 and len({i.score for i in imgs}) > 1
    (fit,) = result.fits
    ckpt = Path(fit.checkpoint)
    assert ckpt.suffix == ".safetensors"
    (n,) = struct.unpack("<Q", ckpt.read_bytes()[:8])  # safetensors: u64 header length, then a JSON header
    header = json.loads(ckpt.read_bytes()[8 : 8 + n])
    assert json.loads(header["__metadata__"]["zsad"])["method"] == "toy-zeroshot"
    assert read_checkpoint(ckpt)["state"]["center"].shape == (152,)


def test_pickled_checkpoint_is_refused_with_one_line(tmp_path: Path) -> None:
    old = tmp_path / "0123456789abcdef.pt"
    old.write_bytes(b"\x80\x04not-to-be-unpickled")
    from zsad_bench.backbones import create_backbone
    from zsad_bench.detector import create_method

    det = create_method("toy-zeroshot", create_backbone("effnet-lite0", image_size=64))
    with pytest.raises(ZsadError, match=r"pickled checkpoint of an older zsad-bench; it is not loaded \(unsafe\)"):
        load_checkpoint(det, old)


def test_inference_option_reuses_checkpoint_and_bounds_are_checked(tmp_path: Path) -> None:
    cls = get_method_class("toy-zeroshot")
    run_experiment(_cheap_spec(tmp_path / "a.json"))
    fits = cls.fits
    run_experiment(_cheap_spec(tmp_path / "b.json", method_config={"sleep": "0.001"}))
    assert cls.fits == fits, "sleep is marked inference-only: the fitted checkpoint must be reused"
    with pytest.raises(ZsadError, match=r"option toy-zeroshot.sleep=-1.0: must be >= 0.0; fix --set sleep=..."):
        run_experiment(_cheap_spec(tmp_path / "c.json", method_config={"sleep": "-1"}))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["records"][0]["metrics"].update(image_auroc=11.69), "is not a fraction in [0, 1]"),
        (
            lambda d: d["records"][0].update(protocol="visa-to-mvtec"),
            "leg 'visa-to-mvtec', seed 111) is not part of this run",
        ),
        (lambda d: d.update(method="spg"), "--resume with a different method"),
        (lambda d: d.pop("records"), None),
        (lambda d: d["records"][0].pop("category"), "records[0] lacks 'category'"),
    ],
)
def test_resume_of_hand_edited_file(tmp_path: Path, capsys, edit, message: str | None) -> None:
    out = tmp_path / "r.json"
    run_experiment(_cheap_spec(out, seeds=[111]))
    data = json.loads(out.read_text())
    edit(data)
    out.write_text(json.dumps(data))
    code = main(["run", *CHEAP, "--out", str(out), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    if message is None:  # no records at all: resume redoes the category
        assert code == 0 and RunResult.load(out).complete
        return
    assert code == 2 and len(err) == 1 and message in err[0], err
