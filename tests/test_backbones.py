"""ViT backbones on tiny random configs: grids, prefix stripping, interpolation and parity with upstream."""

from __future__ import annotations

import copy
import hashlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from zsad_bench.backbones import create_backbone, list_backbones
from zsad_bench.backbones.openclip import load_clip_weights
from zsad_bench.backbones.testing import tiny_config
from zsad_bench.errors import ZsadError

TOL = {"atol": 1e-5, "rtol": 1e-5}


def images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


@pytest.fixture(scope="module")
def tiny() -> dict:
    torch.manual_seed(0)
    return {
        name: create_backbone(name, config=tiny_config(name)) for name in ("dinov2", "dinov3", "siglip", "openclip")
    }


def test_all_registered_with_size_and_source() -> None:
    specs = {s.name: s for s in list_backbones()}
    assert {n: s.image_size for n, s in specs.items()} == {
        "dinov3": 448,
        "dinov2": 448,
        "dinov2-vits14": 448,
        "dinov2-vitb14": 448,
        "openclip": 518,
        "openclip-vitb16plus": 240,
        "siglip": 448,
        "effnet-lite0": 224,
    }
    assert "dinov3-vitl16-pretrain-lvd1689m" in specs["dinov3"].source and "openai" in specs["openclip"].source
    assert "ViT-B-16-plus-240" in specs["openclip-vitb16plus"].source
    assert "laion400m_e31" in specs["openclip-vitb16plus"].source
    assert specs["dinov2-vits14"].source.endswith("facebook/dinov2-small")
    assert specs["dinov2-vitb14"].source.endswith("facebook/dinov2-base")
    assert [n for n, s in specs.items() if s.has_text] == ["openclip", "openclip-vitb16plus"]
    blocks = {n: s.capabilities.num_blocks for n, s in specs.items()}
    assert blocks == {
        n: 12 if n in ("dinov2-vits14", "dinov2-vitb14", "openclip-vitb16plus") else 24 for n in specs
    } | {"effnet-lite0": None}


def test_dinov2_raw_last_block_without_cls(tiny) -> None:
    b = tiny["dinov2"]
    x = images(448)
    feats = b.forward_features(x, ["2", "1"])
    assert feats.patches["2"].shape == (2, 32, 32, 32) and b.grid_size == 32  # 37x37 table -> 32x32
    out = b.model(pixel_values=x, output_hidden_states=True)
    assert out.hidden_states[2].shape[1] == 1 + 32 * 32
    for layer in ("1", "2"):
        expected = out.hidden_states[int(layer)][:, 1:].reshape(2, 32, 32, -1)
        torch.testing.assert_close(feats.patches[layer], expected, **TOL)
    # independent manual forward: embeddings then the blocks one by one, no final LayerNorm
    h = b.model.embeddings(x)
    for block in b.model.encoder.layer:
        h = block(h)
    torch.testing.assert_close(feats.patches["2"], h[:, 1:].reshape(2, 32, 32, -1), **TOL)
    torch.testing.assert_close(feats.global_token, b.model.layernorm(h)[:, 0], **TOL)


def test_dinov3_post_norm_tokens_registers_removed(tiny) -> None:
    b = tiny["dinov3"]
    x = images(448)
    feats = b.forward_features(x, ["2:norm", "1"])
    assert b.default_layers == ("2:norm",)  # SPG's final-normed tokens (the release's last_hidden_state)
    assert torch.equal(b.forward_features(x).layer(), feats.patches["2:norm"])
    feats.patches["2"] = feats.patches.pop("2:norm")
    assert feats.patches["2"].shape == (2, 28, 28, 32)
    out = b.model(pixel_values=x, output_hidden_states=True)
    assert out.last_hidden_state.shape[1] == 1 + 4 + 28 * 28
    torch.testing.assert_close(feats.patches["2"], out.last_hidden_state[:, 5:].reshape(2, 28, 28, -1), **TOL)
    torch.testing.assert_close(feats.patches["1"], out.hidden_states[1][:, 5:].reshape(2, 28, 28, -1), **TOL)
    one_norm = b.forward_features(x, ["1:norm"]).patches["1:norm"]
    torch.testing.assert_close(one_norm, b.model.norm(out.hidden_states[1])[:, 5:].reshape(2, 28, 28, -1), **TOL)
    torch.testing.assert_close(feats.global_token, out.last_hidden_state[:, 0], **TOL)
    # manual forward: final LayerNorm over the raw last block, then drop CLS + 4 registers
    h = b.model.embeddings(x)
    rope = b.model.rope_embeddings(x)
    for block in b.model.model.layer:
        h = block(h, position_embeddings=rope)
    torch.testing.assert_close(feats.patches["2"], b.model.norm(h)[:, 5:].reshape(2, 28, 28, -1), **TOL)
    assert not torch.allclose(feats.patches["2"], h[:, 5:].reshape(2, 28, 28, -1), atol=1e-3)


def test_siglip_post_layernorm_interpolated(tiny) -> None:
    b = tiny["siglip"]
    x = images(448)
    feats = b.forward_features(x, ["2:norm", "1", "1:norm"])
    feats.patches["2"] = feats.patches.pop("2:norm")
    assert feats.patches["2"].shape == (2, 28, 28, 32)  # 24x24 table -> 28x28
    out = b.model(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)
    assert out.hidden_states[2].shape[1] == 28 * 28  # no CLS in SigLIP
    torch.testing.assert_close(
        feats.patches["2"], b.model.post_layernorm(out.hidden_states[2]).reshape(2, 28, 28, -1), **TOL
    )
    torch.testing.assert_close(feats.patches["1"], out.hidden_states[1].reshape(2, 28, 28, -1), **TOL)
    torch.testing.assert_close(
        feats.patches["1:norm"], b.model.post_layernorm(out.hidden_states[1]).reshape(2, 28, 28, -1), **TOL
    )
    torch.testing.assert_close(feats.global_token, out.pooler_output, **TOL)


def bilinear_reference(table: np.ndarray, new: int) -> np.ndarray:
    """Half-pixel-centre bilinear resampling of a (g, g, C) grid, written out per output cell."""
    g = table.shape[0]
    out = np.empty((new, new, table.shape[2]))
    for i in range(new):
        for j in range(new):
            y = min(max((i + 0.5) * g / new - 0.5, 0.0), g - 1)
            x = min(max((j + 0.5) * g / new - 0.5, 0.0), g - 1)
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, g - 1), min(x0 + 1, g - 1)
            wy, wx = y - y0, x - x0
            out[i, j] = (
                table[y0, x0] * (1 - wy) * (1 - wx)
                + table[y0, x1] * (1 - wy) * wx
                + table[y1, x0] * wy * (1 - wx)
                + table[y1, x1] * wy * wx
            )
    return out


def test_openclip_projected_tokens_match_open_clip(tiny) -> None:
    b = tiny["openclip"]
    x = images(518)
    feats = b.forward_features(x, ["2:proj", "1:proj", "1:norm", "1"])
    assert feats.patches["2:proj"].shape == (2, 37, 37, 16) and b.embed_dim == 16 and b.grid_size == 37
    assert b.default_layers == ("2:proj",)
    v = b.model.visual
    out = v.forward_intermediates(x, indices=[0, 1], output_fmt="NLC")
    for layer, tokens in zip(("1:proj", "2:proj"), out["image_intermediates"], strict=True):
        torch.testing.assert_close(feats.patches[layer], (v.ln_post(tokens) @ v.proj).reshape(2, 37, 37, -1), **TOL)
    raw = out["image_intermediates"][0].reshape(2, 37, 37, -1)
    torch.testing.assert_close(feats.patches["1"], raw, **TOL)
    torch.testing.assert_close(feats.patches["1:norm"], v.ln_post(raw), **TOL)
    torch.testing.assert_close(feats.global_token, out["image_features"], **TOL)
    torch.testing.assert_close(feats.global_token, b.model.encode_image(x), **TOL)


def test_openclip_position_table_resampled_bilinearly() -> None:
    """The 24x24 table is bilinearly resampled to 37x37 (half-pixel centres), the CLS entry untouched."""
    torch.manual_seed(3)
    b = create_backbone("openclip", config=tiny_config("openclip"))
    torch.manual_seed(3)
    original = open_clip.CLIP(**copy.deepcopy(tiny_config("openclip"))).visual.positional_embedding.detach()
    table = b.model.visual.positional_embedding.detach()
    assert table.shape == (1 + 37 * 37, 64) and original.shape == (1 + 24 * 24, 64)
    torch.testing.assert_close(table[0], original[0])
    expected = bilinear_reference(original[1:].reshape(24, 24, -1).double().numpy(), 37).reshape(37 * 37, -1)
    np.testing.assert_allclose(table[1:].double().numpy(), expected, atol=1e-5)


def test_openclip_text_tower(tiny) -> None:
    b = tiny["openclip"]
    texts = ["a photo of a flawless bottle", "a photo of a damaged bottle"]
    emb = b.encode_text(texts)
    assert emb.shape == (2, 16) and b.has_text
    torch.testing.assert_close(emb, b.model.encode_text(open_clip.tokenize(texts)), **TOL)
    assert not torch.allclose(emb[0], emb[1])


def test_openclip_checkpoint_files_load_strictly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = open_clip.CLIP(**copy.deepcopy(tiny_config("openclip"))).eval()
    target = open_clip.CLIP(**copy.deepcopy(tiny_config("openclip"))).eval()
    torch.save(src.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    load_clip_weights(target, tmp_path / "open_clip_pytorch_model.bin")
    assert all(torch.equal(p, q) for p, q in zip(src.state_dict().values(), target.state_dict().values(), strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(src), str(tmp_path / "openai.pt"))  # OpenAI-style TorchScript archive
    other = open_clip.CLIP(**copy.deepcopy(tiny_config("openclip"))).eval()
    load_clip_weights(other, tmp_path / "openai.pt")
    torch.testing.assert_close(other.visual.proj, src.visual.proj)
    partial = {k: v for k, v in src.state_dict().items() if k != "visual.proj"}
    torch.save(partial, tmp_path / "partial.bin")
    with pytest.raises(ZsadError, match=r"partial\.bin.*Missing key.*visual\.proj"):
        load_clip_weights(other, tmp_path / "partial.bin")


def fake_hub_snapshot(hf_home: Path, repo: str, model: torch.nn.Module) -> str:
    """Write ``model`` in the Hugging Face cache layout (blobs named by SHA-256, symlinked snapshot)."""
    repo_dir = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    staging = hf_home / "staging"
    model.save_pretrained(staging)
    commit = "0" * 40
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "blobs").mkdir()
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    digest = ""
    for f in staging.iterdir():
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(repo_dir / "blobs" / sha)
        (snap / f.name).symlink_to(repo_dir / "blobs" / sha)
        digest = sha if f.suffix == ".safetensors" else digest
    return digest


def test_loads_from_user_hf_cache_offline(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    digest = fake_hub_snapshot(tmp_path, "facebook/dinov2-large", tiny["dinov2"].model)
    loaded = create_backbone("dinov2")
    assert loaded.identity == f"dinov2@448:{digest[:16]}"
    x = images(448, 1)
    torch.testing.assert_close(loaded.forward_features(x).layer(), tiny["dinov2"].forward_features(x).layer(), **TOL)


def test_siglip_vision_tower_from_full_checkpoint_folder(tmp_path: Path) -> None:
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(2)
    vision = tiny_config("siglip").to_dict()
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    full = SiglipModel(SiglipConfig(text_config={**text, "vocab_size": 64}, vision_config=vision)).eval()
    full.save_pretrained(tmp_path / "siglip")
    b = create_backbone("siglip", weights=str(tmp_path / "siglip"))
    expected = hashlib.sha256((tmp_path / "siglip" / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert b.weights_id == expected
    x = images(448, 1)
    ref = full.vision_model(pixel_values=x, interpolate_pos_encoding=True)
    torch.testing.assert_close(b.forward_features(x).global_token, ref.pooler_output, **TOL)
    torch.testing.assert_close(b.forward_features(x).layer(), ref.last_hidden_state.reshape(1, 28, 28, -1), **TOL)


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("dinov3", "facebook/dinov3-vitl16-pretrain-lvd1689m"),
        ("dinov2", "facebook/dinov2-large"),
        ("siglip", "google/siglip-large-patch16-384"),
        ("openclip", "timm/vit_large_patch14_clip_336.openai"),
    ],
)
def test_missing_weights_fail_fast_offline(name, needle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    start = time.perf_counter()
    with pytest.raises(ZsadError) as err:
        create_backbone(name)
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    assert "\n" not in msg and needle in msg and str(tmp_path / "hf" / "hub") in msg and "--weights" in msg
    if name == "dinov3":
        assert "licence" in msg
    with pytest.raises(ZsadError, match="--weights"):
        create_backbone(name, weights=str(tmp_path / "nowhere"))


def test_bad_sizes_and_layers(tiny) -> None:
    with pytest.raises(ZsadError, match="multiple of the patch size 14"):
        create_backbone("dinov2", config=tiny_config("dinov2"), image_size=450)
    with pytest.raises(ZsadError, match=r"block indices 1\.\.2"):
        tiny["siglip"].forward_features(images(448, 1), ["24"])
    with pytest.raises(ZsadError, match=r'block indices 1\.\.2 as "N", "N:norm"$'):
        tiny["dinov2"].forward_features(images(448, 1), ["2:proj"])
    with pytest.raises(ZsadError, match="518px"):
        tiny["openclip"].forward_features(images(224, 1))
    with pytest.raises(ZsadError, match="no tiny config"):
        tiny_config("effnet-lite0")
    assert json.dumps(tiny_config("openclip"))  # plain dict, safe to copy into other configs


@pytest.mark.parametrize(("name", "blocks"), [("dinov2-vits14", 12), ("dinov2-vitb14", 12)])
def test_dinov2_variants_match_hf_forward_with_norm_layers(name, blocks) -> None:
    """Same code path as ``dinov2`` (upstream Dinov2Model); ``"N:norm"`` = final LayerNorm of block N's output."""
    torch.manual_seed(4)
    b = create_backbone(name, config=tiny_config(name), image_size=56)
    assert b.name == name and b.identity.startswith(f"{name}@56:random-")
    assert b.capabilities.num_blocks == 2 and b.default_layers == ("2",)  # declared 12, tiny config has 2
    assert list_backbones(name)[0].capabilities.num_blocks == blocks
    x = images(56)
    feats = b.forward_features(x, ["1", "1:norm", "2:norm"])
    out = b.model(pixel_values=x, output_hidden_states=True)
    raw1 = out.hidden_states[1][:, 1:].reshape(2, 4, 4, -1)
    torch.testing.assert_close(feats.patches["1"], raw1, **TOL)
    torch.testing.assert_close(feats.patches["1:norm"], b.model.layernorm(raw1), **TOL)
    torch.testing.assert_close(feats.patches["2:norm"], out.last_hidden_state[:, 1:].reshape(2, 4, 4, -1), **TOL)


def test_openclip_vitb16plus_matches_open_clip_forward() -> None:
    """ViT-B-16-plus-240 architecture (patch 16, plain GELU, 15x15 native grid): tokens and text as open_clip's."""
    torch.manual_seed(5)
    b = create_backbone("openclip-vitb16plus", config=tiny_config("openclip-vitb16plus"))
    assert b.image_size == 240 and b.grid_size == 15 and b.default_layers == ("2:proj",)
    x = images(240)
    feats = b.forward_features(x, ["2:proj", "1"])
    v = b.model.visual
    out = v.forward_intermediates(x, indices=[0, 1], output_fmt="NLC")
    torch.testing.assert_close(feats.patches["1"], out["image_intermediates"][0].reshape(2, 15, 15, -1), **TOL)
    last = out["image_intermediates"][1]
    torch.testing.assert_close(feats.patches["2:proj"], (v.ln_post(last) @ v.proj).reshape(2, 15, 15, -1), **TOL)
    torch.testing.assert_close(feats.global_token, b.model.encode_image(x), **TOL)
    texts = ["a photo of a damaged screw"]
    torch.testing.assert_close(b.encode_text(texts), b.model.encode_text(open_clip.tokenize(texts)), **TOL)


def test_openclip_variant_weights_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ZsadError) as err:
        create_backbone("openclip-vitb16plus")
    msg = str(err.value)
    assert "timm/vit_base_patch16_plus_clip_240.laion400m_e31" in msg and "laion400m_e31" in msg and "\n" not in msg
    clip_cache = tmp_path / "home" / ".cache" / "clip"
    clip_cache.mkdir(parents=True)
    (clip_cache / "ViT-L-14-336px.pt").write_bytes(b"not this one")
    with pytest.raises(ZsadError, match=r"vit_b_16_plus_240-laion400m_e31-8fb26589\.pt"):
        create_backbone("openclip-vitb16plus")
    torch.manual_seed(6)
    src = open_clip.CLIP(**copy.deepcopy(tiny_config("openclip-vitb16plus"))).eval()
    torch.save(src.state_dict(), clip_cache / "vit_b_16_plus_240-laion400m_e31-8fb26589.pt")
    from zsad_bench.backbones.openclip import find_checkpoint

    assert find_checkpoint(None, "openclip-vitb16plus") == clip_cache / "vit_b_16_plus_240-laion400m_e31-8fb26589.pt"


def test_registered_names_are_file_and_ablation_safe() -> None:
    """Names go into run ids and cache folders and precede ':' in NAME:SIZE ablations."""
    import re

    from zsad_bench.backbones import register_backbone
    from zsad_bench.backbones.base import NAME_PATTERN

    for spec in list_backbones():
        assert NAME_PATTERN.fullmatch(spec.name) and ":" not in spec.name and "/" not in spec.name
        name, _, size = f"{spec.name}:336".partition(":")
        assert name == spec.name and size == "336"
    for bad in ("open:clip", "ViT/B", ""):
        with pytest.raises(ZsadError, match="file names"):
            register_backbone(bad, 224, "x", list_backbones("effnet-lite0")[0].capabilities)
    assert re.fullmatch(NAME_PATTERN, "dinov2-vits14")
