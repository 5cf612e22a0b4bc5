"""Feature extraction and the on-disk cache: hits, invalidation, corruption recovery, format, CLI."""

from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zsad_bench.backbones import Backbone, Features, Preprocess, create_backbone
from zsad_bench.cli import cache as cache_cli
from zsad_bench.data.records import Sample
from zsad_bench.errors import ZsadError
from zsad_bench.features import FeatureCache, extract_features
from zsad_bench.source import FeatureSource

SIZE = 64  # grid 8x8
DIM = 152


class PatchConv(Backbone):
    """A stand-in backbone: one strided conv (patch 8) and a mean global token; fast and deterministic."""

    name = "toy-patchconv"
    source = "test"
    patch_size = 8
    embed_dim = DIM
    default_layers = ("mid",)
    layers = ("mid", "2")
    weights_id = "seed0"

    def __init__(self) -> None:
        super().__init__()
        self.preprocess = Preprocess(SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.conv = torch.nn.Conv2d(3, DIM, 8, stride=8)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) / 14)
            self.conv.bias.copy_(torch.randn(DIM, generator=gen))

    def forward_features(self, images: torch.Tensor, layers=None) -> Features:
        grid = self.conv(images).permute(0, 2, 3, 1)
        out = {"mid": grid, "2": grid[..., :40]}
        return Features({n: out[n] for n in layers or self.default_layers}, grid.mean((1, 2)))


@pytest.fixture(scope="module")
def backbone() -> PatchConv:
    return PatchConv().eval()


def make_samples(folder: Path) -> list[Sample]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(5):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(path)
        out.append(Sample(path, "cat", i % 2, None, "good", "test"))
    return out


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    return make_samples(tmp_path_factory.mktemp("img"))


@pytest.fixture(scope="module")
def ref(backbone, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight per-image forward of the 5 images, no batching and no cache: grids and global tokens."""
    grids, globals_ = [], []
    with torch.inference_mode():
        for s in samples:
            f = backbone.forward_features(backbone.preprocess(Image.open(s.image_path).convert("RGB"))[None])
            grids.append(f.patches["mid"][0])
            globals_.append(f.global_token[0])
    return torch.stack(grids), torch.stack(globals_)


def entry_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/*.zfc"))


def test_second_run_hits_cache_and_matches_reference(backbone, samples, ref, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "c", dtype="float32")
    first = extract_features(backbone, samples, cache=cache, batch_size=2, progress=False)
    assert (first.hits, first.misses) == (0, 5)
    second = extract_features(backbone, samples, cache=cache, batch_size=2, progress=False)
    assert (second.hits, second.misses) == (5, 0) and len(second) == 5 and second.layers == ("mid",)
    grids, globals_ = ref
    feats = second.get([4, 0, 2])
    assert feats.patches["mid"].dtype == torch.float32 and feats.patches["mid"].shape == (3, 8, 8, 152)
    torch.testing.assert_close(feats.patches["mid"], grids[[4, 0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.global_token, globals_[[4, 0, 2]], atol=1e-5, rtol=1e-5)
    assert not list((tmp_path / "c").rglob(".tmp-*")), "temporary files left behind"


def test_unwritable_cache_is_one_line_naming_it(backbone, samples, tmp_path: Path) -> None:
    """ZSAD_BENCH_CACHE on a read-only or missing mount was a mkdir traceback at the first feature write."""
    (tmp_path / "afile").write_text("x")
    root = tmp_path / "afile" / "features"
    with pytest.raises(ZsadError) as info:
        extract_features(backbone, samples, cache=FeatureCache(root, "float16"), progress=False)
    message = str(info.value)
    assert message.startswith(f"{root}: cannot write the feature cache (") and "\n" not in message
    assert message.endswith("; point ZSAD_BENCH_CACHE at a writable folder")


def test_float16_entries_are_rounded_reference(backbone, samples, ref, tmp_path: Path) -> None:
    store = extract_features(backbone, samples[:2], cache=FeatureCache(tmp_path / "c", "float16"), progress=False)
    grids = ref[0][:2]
    got = store.get([0, 1]).patches["mid"]
    half = grids.to(torch.float16).float()
    assert (got - half).abs().max() <= 1e-3 * half.abs().max()


def test_entry_file_layout_is_as_documented(backbone, samples, tmp_path: Path) -> None:
    store = extract_features(backbone, samples[:1], cache=FeatureCache(tmp_path / "c", "float16"), progress=False)
    (path,) = entry_files(tmp_path / "c")
    blob = path.read_bytes()
    assert blob[:8] == b"ZSADFC01"
    (head_len,) = struct.unpack("<I", blob[8:12])
    header = json.loads(blob[12 : 12 + head_len])
    start = -(-(12 + head_len) // 64) * 64
    assert len(blob) == start + header["nbytes"]
    spec = header["tensors"]["mid"]
    arr = np.frombuffer(blob, np.float16, count=8 * 8 * 152, offset=start + spec["offset"]).reshape(spec["shape"])
    np.testing.assert_array_equal(arr.astype(np.float32), store.get([0]).patches["mid"][0].numpy())


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_entry_is_recomputed(backbone, samples, ref, tmp_path: Path, damage: str) -> None:
    cache = FeatureCache(tmp_path / "c", dtype="float32")
    extract_features(backbone, samples, cache=cache, progress=False)
    victim = entry_files(tmp_path / "c")[1]
    blob = bytearray(victim.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) - 100]
    elif damage == "flip":
        blob[-10] ^= 0xFF
    else:
        blob = bytearray(b"not a cache entry")
    victim.write_bytes(bytes(blob))
    again = extract_features(backbone, samples, cache=cache, progress=False)
    assert (again.hits, again.misses) == (4, 1)
    grids, _ = ref
    torch.testing.assert_close(again.get(range(5)).patches["mid"], grids, atol=1e-5, rtol=1e-5)
    assert cache.read(victim) is not None


def test_entry_damaged_after_build_is_recomputed_on_get(backbone, samples, ref, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "c", dtype="float32")
    store = extract_features(backbone, samples, cache=cache, progress=False)
    for f in entry_files(tmp_path / "c"):
        os.truncate(f, 64)
    grids, _ = ref
    torch.testing.assert_close(store.get([3]).patches["mid"][0], grids[3], atol=1e-5, rtol=1e-5)
    assert store.misses == 6


def test_changed_image_and_settings_change_the_key(backbone, tmp_path: Path) -> None:
    samples = make_samples(tmp_path / "img")
    cache = FeatureCache(tmp_path / "c")
    extract_features(backbone, samples, cache=cache, progress=False)
    Image.new("RGB", (30, 30), (255, 0, 0)).save(samples[0].image_path)
    st = samples[0].image_path.stat()
    os.utime(samples[0].image_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    store = extract_features(backbone, samples, cache=cache, progress=False)
    assert (store.hits, store.misses) == (4, 1)
    other_layers = extract_features(backbone, samples, layers=["mid", "2"], cache=cache, progress=False)
    assert other_layers.misses == 5 and other_layers.get([0]).patches["2"].shape == (1, 8, 8, 40)
    other_dtype = extract_features(backbone, samples, cache=FeatureCache(tmp_path / "c", "float16"), progress=False)
    assert other_dtype.misses == 5
    assert len(cache.info()["groups"]) == 3


def test_in_memory_store_feeds_a_feature_source(backbone, samples, ref) -> None:
    store = extract_features(backbone, samples, cache=None, batch_size=3, progress=False)
    assert (store.hits, store.misses) == (0, 5)
    source = FeatureSource(samples, SIZE, store.get)
    batches = list(source.batches(batch_size=2))
    assert [len(b.samples) for b in batches] == [2, 2, 1]
    grids, globals_ = ref
    torch.testing.assert_close(batches[1].features.patches["mid"], grids[2:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batches[2].features.global_token, globals_[4:], atol=1e-5, rtol=1e-5)


def test_info_clear_and_cli(backbone, samples, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "c"
    cache = FeatureCache(root)
    extract_features(backbone, samples, cache=cache, progress=False)
    (root / "keep.txt").write_text("not ours")
    (root / "other-tool").mkdir()
    (root / "other-tool" / "meta.json").write_text('{"name": "someone else"}')
    info = cache.info()
    assert info["entries"] == 5 and info["bytes"] == sum(f.stat().st_size for f in entry_files(root))
    assert info["groups"][0]["identity"] == backbone.identity and info["groups"][0]["layers"] == ["mid"]

    parser = argparse.ArgumentParser()
    cache_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cache", "info", "--dir", str(root)])
    assert args.func(args) == 0
    assert "entries: 5" in capsys.readouterr().out
    args = parser.parse_args(["cache", "clear", "--dir", str(root)])
    with pytest.raises(ZsadError, match="--yes"):  # stdin is not a terminal under pytest
        args.func(args)
    args = parser.parse_args(["cache", "clear", "--yes", "--dir", str(root)])
    assert args.func(args) == 0
    assert "deleted 5 feature entries" in capsys.readouterr().out
    assert entry_files(root) == [] and (root / "keep.txt").is_file() and (root / "other-tool" / "meta.json").is_file()
    assert cache.clear() == 0


def test_clear_all_empties_the_other_stores_but_not_locks(
    backbone, samples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZSAD_BENCH_CACHE", str(tmp_path))
    extract_features(backbone, samples, cache=FeatureCache(), progress=False)
    for rel, data in [
        ("checkpoints/spg/a.safetensors", b"12345678"),
        ("artifacts/spg/sae.pt", b"1234"),
        ("validated/v.json", b"{}"),
        ("locks/x.lock", b""),
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    parser = argparse.ArgumentParser()
    cache_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cache", "info"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"checkpoints: {tmp_path / 'checkpoints'}  1 files  8 B  (fitted detectors)" in out
    assert "artifacts:" in out and "validated:" in out and "locks" not in out
    with pytest.raises(ZsadError, match="drop --dir"):
        args = parser.parse_args(["cache", "clear", "--all", "--yes", "--dir", str(tmp_path / "features")])
        args.func(args)
    args = parser.parse_args(["cache", "clear", "--yes"])  # features only: the fits stay
    assert args.func(args) == 0
    assert entry_files(tmp_path / "features") == [] and (tmp_path / "checkpoints/spg/a.safetensors").is_file()
    args = parser.parse_args(["cache", "clear", "--all", "--yes"])
    assert args.func(args) == 0
    deleted = "0 feature entries, 1 checkpoints files, 1 artifacts files, 1 validated files (14 B)"
    assert deleted in capsys.readouterr().out
    assert {p.name for p in tmp_path.iterdir()} <= {"features", "locks"}
    assert (tmp_path / "locks" / "x.lock").is_file()


def test_bad_arguments(backbone, samples, tmp_path: Path) -> None:
    with pytest.raises(ZsadError, match="dtype"):
        FeatureCache(tmp_path, dtype="int8")
    with pytest.raises(ZsadError, match="batch-size"):
        extract_features(backbone, samples, batch_size=0)


@pytest.mark.realmini
def test_realmini_second_pass_is_all_hits(realmini: Path, tmp_path: Path) -> None:
    files = sorted((realmini / "mvtec_ad" / "bottle" / "test" / "broken_small").glob("*.png"))[:3]
    real = [Sample(f, "bottle", 1, None, "broken_small", "test") for f in files]
    backbone = create_backbone("effnet-lite0")
    cache = FeatureCache(tmp_path / "c")
    cold = extract_features(backbone, real, cache=cache, progress=False)
    warm = extract_features(backbone, real, cache=cache, progress=False)
    assert (cold.misses, warm.hits, warm.misses) == (3, 3, 0)
    assert warm.get([0, 1, 2]).patches["mid"].shape == (3, 28, 28, 152)
