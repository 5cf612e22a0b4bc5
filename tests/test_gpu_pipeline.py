"""The GPU-speed pipeline, checked on the CPU: no host sync in the SPG steps, one cache read per entry per
fit, one device-to-host copy per extraction batch, one-line worker errors, key parts, SAE artifact recovery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import zsad_bench.features as features_mod
from tests.test_features_cache import PatchConv, make_samples
from tests.test_spg_e2e import FAST, TinyBackbone, make_set
from zsad_bench.data.records import Sample
from zsad_bench.detector import FitContext, create_method
from zsad_bench.errors import DataError
from zsad_bench.features import FeatureCache, extract_features, feature_key_parts
from zsad_bench.methods._spg_sae import EMA, DeadLatentTracker, decode_dense, decode_sparse
from zsad_bench.methods.spg import AuxTokens
from zsad_bench.source import FeatureSource

SYNCING = ("_local_scalar_dense", "nonzero", "is_nonzero", "item")


class OpRecorder(TorchDispatchMode):
    """Records the name of every ATen op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def syncing(ops: list[str]) -> list[str]:
    return [op for op in ops if op.split(".")[0] in SYNCING]


def test_sae_and_guide_steps_have_no_host_sync(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src, _ = make_set("a", 8, 1, torch.randn(16))
    det = create_method("spg", TinyBackbone(), **{**FAST, "dead_window_tokens": 64, "auxk": 8})
    tokens = AuxTokens(src, torch.device("cpu"), masks=True)
    sae_mod = __import__("zsad_bench.methods._spg_sae", fromlist=["TopKSAE"])
    sae = sae_mod.TopKSAE(16, 64, 4, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)  # what a CUDA fit uses (spg._adam)
    tracker = DeadLatentTracker(64, 64, 1e-3)
    batches = list(tokens.batches(4, seed=0))
    det._sae_step(sae, opt, tracker, batches[0][0], False)  # warm-up: optimizer state exists
    for dense in (False, True):
        # dead latents are possible from now on (window 64 tokens < 4 x 64 tokens): AuxK is computed
        assert tracker.may_have_dead(batches[0][0].numel() // 16)
        with OpRecorder() as rec:
            rec_loss, aux_loss, dead = det._sae_step(sae, opt, tracker, batches[1][0], dense)
        assert syncing(rec.ops) == [] and "topk" in " ".join(rec.ops)
        assert rec_loss.shape == aux_loss.shape == () and dead.dtype == torch.bool
    sae.eval()
    det.sae, det.dead_mask = sae, torch.zeros(64, dtype=torch.bool)
    raw = torch.full((4, 64), 0.1, requires_grad=True)
    gopt = torch.optim.Adam([raw], lr=0.01, fused=True)
    ema = EMA(0.999)
    alive = torch.ones(64, dtype=torch.bool)
    atoms = sae.atoms().detach()
    det._guide_step(raw, gopt, ema, atoms, alive, batches[0], tokens.h, tokens.w)
    with OpRecorder() as rec:
        parts = det._guide_step(raw, gopt, ema, atoms, alive, batches[1], tokens.h, tokens.w)
    assert syncing(rec.ops) == [] and parts.shape == (3,)
    # the recorder does see a sync when there is one
    with OpRecorder() as rec:
        float(parts[0])
    assert syncing(rec.ops) == ["_local_scalar_dense.default"]


def test_dead_tracker_on_device_matches_the_boolean_index_rule() -> None:
    gen = torch.Generator().manual_seed(3)
    tracker = DeadLatentTracker(width=10, window_tokens=8, threshold=0.5)
    steps = np.zeros(10, dtype=np.int64)
    for _ in range(6):
        vals = torch.rand(4, 3, generator=gen)
        idx = torch.randint(0, 10, (4, 3), generator=gen)
        fired = np.zeros(10, dtype=bool)
        fired[idx.numpy()[vals.numpy() > 0.5]] = True  # the release's rule, written out
        steps = steps * (~fired) + 1
        dead = tracker.update(vals, idx)
        np.testing.assert_array_equal(dead.numpy(), steps > max(1, 8 // 4))
        np.testing.assert_array_equal(tracker.steps.numpy(), steps)


def test_dense_and_sparse_decode_agree() -> None:
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(12, 5, generator=gen)
    vals, idx = torch.rand(7, 4, generator=gen), torch.stack([torch.randperm(12, generator=gen)[:4] for _ in range(7)])
    by_hand = torch.stack([sum(vals[t, i] * atoms[idx[t, i]] for i in range(4)) for t in range(7)])
    torch.testing.assert_close(decode_dense(vals, idx, atoms), by_hand)
    torch.testing.assert_close(decode_sparse(vals, idx, atoms), by_hand)


class CountingCache(FeatureCache):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.paths: list[Path] = []

    def read(self, path, dtype=None, native=False):
        self.paths.append(path)
        return super().read(path, dtype, native)


def test_fit_reads_each_cache_entry_once(tmp_path: Path) -> None:
    backbone = PatchConv().eval()
    samples = make_samples(tmp_path / "img")
    samples = [Sample(s.image_path, s.category, 0, None, "good", "test") for s in samples]
    cache = CountingCache(tmp_path / "c")
    store = extract_features(backbone, samples, cache=cache, batch_size=2, progress=False)
    assert cache.paths == []  # building verifies entries; it does not read them into tensors
    source = FeatureSource(samples, 64, store.get, lambda s, size: np.zeros((size, size), bool))
    det = create_method("spg", backbone, **{**FAST, "sae_epochs": 2, "guide_epochs": 2, "global_guides": False})
    det.fit(source, FitContext(torch.device("cpu"), seed=1, progress=False, log=lambda m: None))
    assert sorted(map(str, cache.paths)) == sorted(str(p) for p in store._paths)  # once each, over 6 epochs


def test_extraction_copies_to_host_once_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = PatchConv().eval()
    samples = make_samples(tmp_path / "img")
    calls: list[tuple[int, ...]] = []
    real = features_mod.to_host

    def counting(flat: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(flat.shape))
        return real(flat)

    monkeypatch.setattr(features_mod, "to_host", counting)
    store = extract_features(backbone, samples, cache=FeatureCache(tmp_path / "c"), batch_size=2, progress=False)
    per_image = 8 * 8 * 152 + 152  # grid of layer "mid" + the global token, packed in one row
    assert calls == [(2, per_image), (2, per_image), (1, per_image)]
    assert store.misses == 5


def test_corrupt_image_in_a_worker_is_one_line(tmp_path: Path) -> None:
    samples = make_samples(tmp_path / "img")
    samples[3].image_path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError) as err:
        extract_features(PatchConv().eval(), samples, cache=None, batch_size=2, num_workers=2, progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{samples[3].image_path}: unreadable")


def test_image_batches_through_workers_match_inline(tmp_path: Path) -> None:
    samples = make_samples(tmp_path / "img")
    pre = PatchConv().preprocess

    def getter(s: Sample) -> torch.Tensor:
        return pre(Image.open(s.image_path).convert("RGB"))

    inline = [b.images for b in FeatureSource(samples, 64, None, images=getter).batches(2, shuffle=True, seed=4)]
    pooled = FeatureSource(samples, 64, None, images=getter, num_workers=2).batches(2, shuffle=True, seed=4)
    for a, b in zip(inline, [b.images for b in pooled], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_key_parts_separate_precisions_and_devices(tmp_path: Path) -> None:
    backbone = PatchConv().eval()
    cpu32 = feature_key_parts(backbone, "fp32", "cpu")
    assert cpu32["precision"] == "fp32" and cpu32["device_class"] == "cpu"
    assert cpu32["torch"] == ".".join(torch.__version__.split(".")[:2])
    assert feature_key_parts(backbone, "fp32", "cuda:1")["device_class"] == "cuda"
    cache = FeatureCache(tmp_path / "c")
    dirs = {
        cache.group_dir(backbone, ["mid"], "float32", feature_key_parts(backbone, p, d))
        for p in ("fp32", "bf16")
        for d in ("cpu", "cuda")
    }
    assert len(dirs) == 4
    samples = make_samples(tmp_path / "img")[:2]
    a = extract_features(backbone, samples, cache=cache, progress=False)
    b = extract_features(backbone, samples, cache=cache, progress=False, precision="bf16")
    assert (a.dtype, b.dtype) == ("float32", "float16") and b.misses == 2
    ref = a.get([0, 1]).patches["mid"]
    got = b.get([0, 1]).patches["mid"]
    assert 0 < (got - ref).abs().max() <= 0.05 * ref.abs().max()  # bf16 weights: close, not equal


def test_truncated_sae_artifact_is_refitted(tmp_path: Path) -> None:
    src, _ = make_set("a", 8, 1, torch.randn(16))
    logs: list[str] = []
    ctx = FitContext(torch.device("cpu"), seed=2, artifacts_dir=tmp_path, progress=False, log=logs.append)
    det = create_method("spg", TinyBackbone(), **{**FAST, "sae_epochs": 2, "guide_epochs": 1})
    det.fit(src, ctx)
    (artifact,) = tmp_path.glob("spg-sae-*.pt")
    good = artifact.read_bytes()
    artifact.write_bytes(good[: len(good) // 2])
    logs.clear()
    again = create_method("spg", TinyBackbone(), **{**FAST, "sae_epochs": 2, "guide_epochs": 1})
    again.fit(src, ctx)
    assert any("unreadable SAE artifact" in m and "refitting" in m for m in logs)
    torch.testing.assert_close(again.sae.dictionary, det.sae.dictionary)  # the refit is the same SAE
    assert artifact.read_bytes() == good or len(artifact.read_bytes()) > len(good) // 2
    logs.clear()
    create_method("spg", TinyBackbone(), **{**FAST, "sae_epochs": 2, "guide_epochs": 1}).fit(src, ctx)
    assert any("reusing SAE" in m for m in logs)


def test_gpu_check_smoke_runs_on_cpu() -> None:
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in res.stdout.splitlines()[2:] if "|" in line}
    assert rows["SPG SAE step (tiny sizes), fp32"][1].strip() == "<= 8 ms"
    assert rows["SPG guide step (tiny sizes), fp32"][1].strip() == "<= 2 ms"
    assert rows["protocol stand-in, both directions, cold cache"][0].strip().endswith(" s")
    assert "stand-in data written" in rows and "zsad-bench backbone, bf16, batch 2" in rows


def test_gpu_check_reports_a_failed_section_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A section that raises becomes a FAILED row (exit 1) and the sections after it still run."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def broken(device: object, smoke: bool) -> list:
        raise RuntimeError("no fused kernel here")

    monkeypatch.setattr(mod, "fit_rows", broken)
    monkeypatch.setenv("ZSAD_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "rows.json"
    rc = mod.main(["--smoke", "--only", "fit", "backbone", "--json", str(out), "--root", str(tmp_path / "data")])
    doc = json.loads(out.read_text())
    whats = [r["what"] for r in doc["rows"]]
    assert rc == 1 and doc["failed"] == ["fit"]
    failed = next(r for r in doc["rows"] if r["what"] == "fit section FAILED")
    assert failed["measured"] == "RuntimeError: no fused kernel here"
    # backbone runs before fit (section order, not --only order); extraction and protocol were not asked for
    assert whats.index("zsad-bench backbone, bf16, batch 2") < whats.index("fit section FAILED")
    assert not any(w.startswith(("extraction", "protocol")) for w in whats)
    assert whats[-1] == "gpu_check wall time"


def test_fit_figures_time_both_auxk_decodes_and_report_the_fits_choice() -> None:
    from zsad_bench.bench import spg_fit_figures

    fig = spg_fit_figures(torch.device("cpu"), "tiny", warmup=1, iters=2)
    assert set(fig) == {"sae_step_ms", "sae_step_ms_auxk_sparse", "sae_step_ms_auxk_dense", "guide_step_ms"}
    assert fig["sae_step_ms"] == fig["sae_step_ms_auxk_sparse"]  # a CPU fit decodes AuxK sparsely
    assert all(v > 0 for v in fig.values())
