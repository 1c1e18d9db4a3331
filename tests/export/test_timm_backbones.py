"""The timm backbones (DINOv2 ViT-S/14, OpenAI CLIP ViT-B/16), with random weights only: these test the
export machinery (ONNX export, parity, dims, preprocessing taken from timm, --weights FILE), never the
quality of the embeddings. No download: the hub is not reachable here."""

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("timm")

import timm  # noqa: E402
from timm.data import create_transform  # noqa: E402

from lookalike.indexing.repository import Repository, copy_repository  # noqa: E402
from lookalike.serving.embedding import OnnxEmbedder  # noqa: E402
from lookalike.serving.images import encode  # noqa: E402
from lookalike.serving.preprocessing import Preprocessor  # noqa: E402
from lookalike_export.backbones import BACKBONES, get_backbone  # noqa: E402
from lookalike_export.onnx_export import export_embedder  # noqa: E402
from lookalike_export.parity import MIN_COSINE  # noqa: E402
from tests.conftest import REPOSITORY  # noqa: E402

# backbone -> (timm pretrained tag, embedding dim, input size)
TIMM = {
    "dinov2_vits14": ("vit_small_patch14_dinov2.lvd142m", 384, 224),
    "clip_vit_b16": ("vit_base_patch16_clip_quickgelu_224.openai", 512, 224),
}


@pytest.fixture(scope="module")
def images(photos):
    return [encode(image) for _, image in photos[:4]]


@pytest.fixture(scope="module", params=list(TIMM))
def repo(request, tmp_path_factory, images) -> Repository:
    repo = copy_repository(REPOSITORY, tmp_path_factory.mktemp(request.param) / "model_repository")
    shutil.rmtree(repo.embedder_dir / "1")
    (repo.embedder_dir / "1").mkdir()
    for leftover in ("config.pbtxt", "manifest.json", "preprocessing.json"):
        (repo.embedder_dir / leftover).unlink(missing_ok=True)
    export_embedder(get_backbone(request.param), repo.root, images, weights=None, max_batch_size=8)
    return repo


def test_export_passes_parity_with_the_right_dim(repo, images):
    manifest = repo.manifest()
    name = manifest.model
    _, dim, size = TIMM[name]
    parity = manifest.parity_onnx_vs_torch
    assert manifest.random_weights is True and manifest.weights_source == "random init"
    assert parity["mean_cosine"] >= MIN_COSINE["fp32"] and parity["min_cosine"] >= 0.999
    assert manifest.dim == parity["dim"] == BACKBONES[name].dim == dim
    assert manifest.input == (3, size, size)
    assert repo.preprocessing() == BACKBONES[name].preprocessing
    # the ONNX file serves any batch up to the maximum, the embedding width pinned
    embedder = OnnxEmbedder(repo.embedder_dir / "1" / "model.onnx")
    pixels = Preprocessor(repo.preprocessing()).batch(images * 2)
    together = embedder(pixels)
    assert together.shape == (8, dim)
    np.testing.assert_allclose(embedder(pixels[:3]), together[:3], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    print(f"\n{name} (random weights): ONNX {(repo.embedder_dir / '1' / 'model.onnx').stat().st_size / 1e6:.1f} MB, "
          f"mean cosine {parity['mean_cosine']:.7f}, max abs diff {parity['max_abs_diff']:.2e}, "
          f"{manifest.export_seconds} s")


@pytest.mark.parametrize("name", list(TIMM))
def test_preprocessing_is_timms_pretrained_config(name, photo):
    tag, _, size = TIMM[name]
    cfg = timm.create_model(tag, pretrained=False).pretrained_cfg  # the built model's config, no download
    pre = BACKBONES[name].preprocessing
    assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])
    assert pre.interpolation == cfg["interpolation"] == "bicubic"
    assert pre.resize_mode == "crop" and cfg["crop_mode"] == "center"
    assert (pre.height, pre.width) == (size, size)
    assert pre.resize_size == int(size / cfg["crop_pct"])
    # and the pixels are those of timm's own eval transform for that config (PNG: no JPEG draft decode)
    transform = create_transform(input_size=(3, size, size), interpolation=cfg["interpolation"], mean=cfg["mean"],
                                 std=cfg["std"], crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"])
    expected = transform(photo.convert("RGB")).numpy()
    np.testing.assert_allclose(Preprocessor(pre)(encode(photo, "PNG")), expected, atol=1e-5)


def test_dinov2_input_size_is_a_deliberate_224():
    pre = BACKBONES["dinov2_vits14"].preprocessing
    assert timm.create_model(TIMM["dinov2_vits14"][0], pretrained=False).pretrained_cfg["input_size"] == (3, 518, 518)
    assert (pre.height, pre.resize_size) == (224, 224)  # crop_pct 1.0
    assert "518" in pre.notes["input_size"]  # the reason is written down
    net = get_backbone("dinov2_vits14").build(None)
    assert tuple(net.patch_embed.img_size) == (224, 224) and tuple(net.patch_embed.grid_size) == (16, 16)
    assert net.pos_embed.shape == (1, 1 + 16 * 16, 384)


def test_clip_embedding_is_after_the_projection():
    net = get_backbone("clip_vit_b16").build(None)
    assert isinstance(net.head, torch.nn.Linear) and (net.head.in_features, net.head.out_features) == (768, 512)
    assert type(net.blocks[0].mlp.act).__name__ == "QuickGELU"  # as OpenAI trained it
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = net(x)
        tokens = net.forward_features(x)  # ends with the final LayerNorm (ln_post)
        torch.testing.assert_close(out, net.head(tokens[:, 0]))
    assert out.shape == (2, 512)


def test_dinov2_embedding_is_the_class_token():
    net = get_backbone("dinov2_vits14").build(None)
    assert isinstance(net.head, torch.nn.Identity)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.forward_features(x)[:, 0])
        assert net(x).shape == (2, 384)


@pytest.mark.parametrize("name", list(TIMM))
def test_weights_file_round_trip(name, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    reference = get_backbone(name).build(None)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(tmp_path / "weights.safetensors"))
    torch.save(state, tmp_path / "weights.pth")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "checkpoint.pth")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(x)
        for file in ("weights.safetensors", "weights.pth", "checkpoint.pth"):
            torch.manual_seed(2)  # a different random init underneath: the file must replace all of it
            loaded = get_backbone(name).build(str(tmp_path / file))
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_dinov2_weights_file_at_the_518_grid_is_resampled(tmp_path):
    """The released checkpoints (the hub's timm model.safetensors; Meta's dinov2_vits14_pretrain.pth, the
    same keys plus mask_token) hold the 37x37 position embedding of the 518 model; loading one into the
    224 model resamples it to 16x16, as pretrained=True does."""
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    tag = TIMM["dinov2_vits14"][0]
    full = timm.create_model(tag, pretrained=False, num_classes=0)
    assert full.pos_embed.shape == (1, 1 + 37 * 37, 384)
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.save({**state, "mask_token": torch.zeros(1, 384)}, tmp_path / "dinov2_vits14_pretrain.pth")
    expected = resample_abs_pos_embed(full.pos_embed.detach(), (16, 16), num_prefix_tokens=1)
    for file in ("model.safetensors", "dinov2_vits14_pretrain.pth"):
        loaded = get_backbone("dinov2_vits14").build(str(tmp_path / file))
        torch.testing.assert_close(loaded.pos_embed.detach(), expected)
        torch.testing.assert_close(loaded.blocks[3].mlp.fc1.weight, full.blocks[3].mlp.fc1.weight)


def test_weights_of_another_model_are_refused(tmp_path):
    torch.save(get_backbone("dinov2_vits14").build(None).state_dict(), tmp_path / "dino.pth")
    with pytest.raises(RuntimeError, match="not a state_dict of timm vit_base_patch16_clip"):
        get_backbone("clip_vit_b16").build(str(tmp_path / "dino.pth"))


def test_default_weights_offline_is_a_clear_error(monkeypatch):
    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        raise AssertionError("DEFAULT must ask for the pretrained weights")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"--weights FILE.*timm/vit_small_patch14_dinov2\.lvd142m"):
        get_backbone("dinov2_vits14").build("DEFAULT")


@pytest.mark.parametrize("name", list(TIMM))
def test_registry_entry(name):
    backbone = BACKBONES[name]
    assert backbone.pooling == "token"  # the class token after the final norm
    assert backbone.license == {"dinov2_vits14": "Apache-2.0", "clip_vit_b16": "MIT"}[name]
    assert TIMM[name][0] in backbone.weights_source and backbone.license in backbone.weights_source
