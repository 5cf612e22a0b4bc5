"""Method registry, config overrides and third-party plugin discovery through entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from tests.conftest import TOY_PLUGIN_DIR
from zsad_bench.cli.main import main
from zsad_bench.detector import (
    Batch,
    Detector,
    LearningType,
    Prediction,
    create_method,
    get_method_class,
    inference_options,
    list_methods,
    option_help,
    parse_overrides,
    register_method,
)
from zsad_bench.errors import ZsadError
from zsad_bench.registry import Registry


class _FakeBackbone(torch.nn.Module):
    name = "fake"
    identity = "fake@8:random"
    image_size = 8


@register_method
class _Const(Detector):
    name = "test-const"
    learning_type = LearningType.TRAINING_FREE

    @dataclass
    class Config:
        value: float = 0.5
        layers: tuple[int, ...] = (1, 2)
        flag: bool = False
        tag: str | None = None

    def predict(self, batch: Batch) -> Prediction:
        n = len(batch.samples)
        return Prediction(torch.full((n, 8, 8), self.config.value), torch.full((n,), self.config.value))


def test_register_and_create_with_typed_overrides() -> None:
    det = create_method("test-const", _FakeBackbone(), value="0.25", layers="3,4", flag="yes", tag="none")
    assert det.config.value == 0.25
    assert det.config.layers == (3, 4)
    assert det.config.flag is True
    assert det.config.tag is None
    assert "test-const" in list_methods("test-*")
    assert "test-const" in list_methods(learning_type="training-free")
    assert "test-const" not in list_methods(learning_type=LearningType.ZERO_SHOT)


def test_unknown_method_lists_known_names() -> None:
    with pytest.raises(ZsadError, match=r"unknown method 'nope'.*known: .*test-const"):
        get_method_class("nope")


def test_unknown_option_and_bad_value() -> None:
    with pytest.raises(ZsadError, match=r"method 'test-const' has no option 'valu'; options: value, layers, flag, tag"):
        parse_overrides(_Const, {"valu": "1"})
    with pytest.raises(ZsadError, match=r"option test-const.flag: cannot read 'maybe' as bool"):
        parse_overrides(_Const, {"flag": "maybe"})


def test_duplicate_registration_is_an_error() -> None:
    reg: Registry[int] = Registry("thing", "zsad_bench.test-none")
    reg.register("a", 1)
    with pytest.raises(ZsadError, match="registered twice"):
        reg.register("a", 2)


def test_entry_point_plugin_is_discovered() -> None:
    # conftest put tests/toy_plugin (a fake installed distribution) on sys.path
    cls = get_method_class("toy-zeroshot")
    assert cls.learning_type is LearningType.ZERO_SHOT
    assert cls.__module__ == "zsad_toy_plugin"


def test_shipped_plugins_register_through_entry_points() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="zsad_bench.methods")}
    assert {"spg", "anomalydino", "toy-zeroshot"} <= names
    assert get_method_class("spg").__module__ == "zsad_bench.methods.spg"


@pytest.mark.parametrize("what", ["backbones", "datasets"])
def test_list_learning_type_of_non_methods_is_refused(capsys: pytest.CaptureFixture, what: str) -> None:
    """It was silently ignored: the full, unfiltered list looked like the filtered one."""
    assert main(["list", what, "--learning-type", "zero-shot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "zsad-bench: error: --learning-type applies to 'list methods'; "
        "use zsad-bench list methods --learning-type zero-shot"
    )


@pytest.mark.parametrize("what", ["methods", "backbones", "datasets"])
def test_a_pattern_that_matches_nothing_is_an_error(capsys: pytest.CaptureFixture, what: str) -> None:
    """It printed an empty table with exit 0, as if nothing were registered."""
    assert main(["list", what, "zzz*"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"zsad-bench: error: no {what} match 'zzz*'; see zsad-bench list {what}\n"


def test_cli_lists_entry_point_plugin_in_a_fresh_process() -> None:
    env = {**os.environ, "PYTHONPATH": str(TOY_PLUGIN_DIR)}
    out = subprocess.run(
        [sys.executable, "-m", "zsad_bench.cli.main", "list", "methods", "toy*"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "toy-zeroshot" in out.stdout and "zero-shot" in out.stdout


@register_method
class _Bounded(Detector):
    name = "test-bounded"
    learning_type = LearningType.TRAINING_FREE

    @dataclass
    class Config:
        lr: float = field(default=0.1, metadata={"gt": 0.0})
        betas: tuple[float, float] = field(default=(0.5, 0.9), metadata={"ge": 0.0, "lt": 1.0})
        mode: str = field(default="max", metadata={"choices": ("max", "mean"), "inference": True, "help": "how"})
        legacy: int = 0
        sizes: tuple[int, ...] = (1, 2)

    def predict(self, batch: Batch) -> Prediction:
        raise AssertionError


def test_option_metadata_bounds_choices_and_tuple_length() -> None:
    cfg = parse_overrides(_Bounded, {"lr": "0.5", "betas": "0.1,0.2", "mode": "mean", "sizes": "3,4,5"})
    assert (cfg.lr, cfg.betas, cfg.mode, cfg.sizes) == (0.5, (0.1, 0.2), "mean", (3, 4, 5))
    with pytest.raises(ZsadError, match=r"option test-bounded.lr=-1.0: must be > 0.0; fix --set lr=..."):
        parse_overrides(_Bounded, {"lr": "-1"})
    with pytest.raises(ZsadError, match=r"option test-bounded.betas=\(0.5, 1.0\): must be < 1.0"):
        parse_overrides(_Bounded, {"betas": "0.5,1.0"})
    with pytest.raises(ZsadError, match=r"option test-bounded.betas: expected 2 comma-separated values, got '0.9'"):
        parse_overrides(_Bounded, {"betas": "0.9"})
    with pytest.raises(ZsadError, match=r"option test-bounded.mode='lse': choose one of max, mean"):
        parse_overrides(_Bounded, {"mode": "lse"})
    assert inference_options(_Bounded) == {"mode"}
    assert option_help(_Bounded) == {"mode": "how"}


def test_spg_atoms_command_comes_from_an_entry_point() -> None:
    from importlib.metadata import entry_points

    from zsad_bench.cli.main import COMMAND_MODULES, build_parser

    eps = {ep.name: ep.value for ep in entry_points(group="zsad_bench.commands")}
    assert eps["atoms"] == "zsad_bench.methods.spg_commands"
    assert not any("atoms" in m for m in COMMAND_MODULES)
    parser = build_parser()
    args = parser.parse_args(["atoms", "run.json"])
    assert args.func.__module__ == "zsad_bench.methods.spg_commands"
    run = parser.parse_args(["run", "-m", "spg", "--aggregation", "lse", "--tau", "0.5", "--set", "sigma=2"])
    assert run.set == ["aggregation=lse", "agg_tau=0.5", "sigma=2"]
