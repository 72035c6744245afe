"""keras-hub backbones (`--backbone=hub:SOURCE`): EfficientNet(V2), ViT, DINOv2, ... presets.

SOURCE is a keras-hub preset folder, local or gs:// (config.json + model.weights.h5 +
image_converter.json, what `keras_hub.models.Backbone.save_to_preset` or a downloaded Kaggle
preset holds), a hub handle (`kaggle://keras/dinov2/keras/dinov2_small`, `hf://...`: only where
the machine is online; nothing downloads at run time otherwise), or one of TINY_CONFIGS: small
random-init architectures for tests and smoke runs, no file at all.

The result has the contract of `backbones.build_backbone`: float32 [B, S, S, 3] in 0..255 ->
features [B, h, w, F]:
- Input scaling inside the model: the preset's image converter's `scale` and `offset`
  (x * scale + offset per channel, e.g. ImageNet mean/std for DINOv2), so the Kaggle export's
  uint8 input stays right. Its resizing is left out: our pipeline resizes to --image_size.
- Token-sequence backbones (ViT, DINOv2: [B, T, D]) give their class token as a [B, 1, 1, D]
  map, so the neck's GAP passes it through. Why the class token and not the mean of the patch
  tokens: it is the token these models are trained to summarise the image with (ViT's
  classifier, DINOv2's image-level DINO loss reads it), and DINOv2's instance-retrieval results
  (Oxford/Paris, Oquab et al. 2023, sec. 7) use it. GeM would clamp its signed values: use
  --pooling=gap (checked). Their position embeddings fix the input to S x S (built at
  --image_size; DINOv2 interpolates them from the preset's, ViT needs the preset's size).
- Feature-map backbones (EfficientNet, EfficientNetV2 in keras-hub) keep the map; our pooling.

Weights: the preset's weights load when a training run starts (`load_weights=True`); every
restore (export, embed, later stages) builds the architecture from the preset's config.json and
reads the checkpoint, so the preset folder must stay readable. keras-hub has EfficientNet
presets up to B5 only: B6/B7 come from keras.applications (--backbone=efficientnet-b6/b7).
keras-hub is an optional dependency (`pip install landmark-tf[hub]`).
"""

from __future__ import annotations

import keras

from landmark_tf.errors import UserError

PREFIX = "hub:"
# ImageNet mean/std on 0..255 inputs as scale/offset: what keras-hub's DINOv2, ViT and
# EfficientNet image converters hold; the tiny configs use it too.
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_SCALE = [1.0 / (255.0 * s) for s in _STD]
IMAGENET_OFFSET = [-m / s for m, s in zip(_MEAN, _STD, strict=True)]
TINY_CONFIGS = ("tiny_vit", "tiny_dinov2", "tiny_efficientnetv2")


def is_hub(backbone: str) -> bool:
    return backbone.startswith(PREFIX)


def is_token_backbone(backbone: str) -> bool | None:
    """True/False for the tiny configs; None (known only once built) for presets."""
    source = backbone[len(PREFIX):]
    return source in ("tiny_vit", "tiny_dinov2") if source in TINY_CONFIGS else None


def _keras_hub():
    try:
        import keras_hub
    except ImportError:
        raise UserError("--backbone=hub:... needs keras-hub: pip install 'landmark-tf[hub]' "
                        "(or keras-hub>=0.32)") from None
    return keras_hub


def build(backbone: str, image_size: int, load_weights: bool = False) -> keras.Model:
    """float32 [B, S, S, 3] 0..255 -> [B, h, w, F] (feature map) or [B, 1, 1, D] (class token).

    The input is [B, None, None, 3] for feature-map backbones, [B, S, S, 3] for token ones.
    """
    source = backbone[len(PREFIX):]
    if source in TINY_CONFIGS:
        net = _tiny(_keras_hub(), source, image_size)
        scale, offset = IMAGENET_SCALE, IMAGENET_OFFSET
    else:
        net, scale, offset = _from_preset(_keras_hub(), source, image_size, load_weights)
    _freeze_mask_tokens(net)
    tokens = len(net.output.shape) == 3
    shape = (image_size, image_size, 3) if tokens else (None, None, 3)
    image = keras.Input(shape, dtype="float32", name="image")
    x = keras.layers.Rescaling(scale, offset, name="input_scaling")(image)
    x = net({"images": x} if isinstance(net.input, dict) else x)
    if tokens:
        x = ClassToken(name="class_token")(x)
    return keras.Model(image, x, name=f"hub_{net.name}")


def _freeze_mask_tokens(net: keras.Model) -> None:
    """DINOv2's mask token replaces masked patches in its masked-image pre-training only: no
    gradient reaches it here, and TF's zero-filling of unconnected gradients fails on it."""
    for layer in net._flatten_layers():
        token = getattr(layer, "mask_token", None)
        if isinstance(token, keras.Variable):
            token.trainable = False


def _from_preset(keras_hub, source: str, image_size: int, load_weights: bool):
    kwargs = {}
    config = _preset_backbone_config(source)
    if "image_shape" in config.get("config", {}):  # token backbones fix their input size
        kwargs["image_shape"] = (image_size, image_size, 3)
    try:
        net = keras_hub.models.Backbone.from_preset(source, load_weights=load_weights, **kwargs)
        converter = keras_hub.layers.ImageConverter.from_preset(source)
    except (ValueError, OSError, KeyError, FileNotFoundError) as e:
        raise UserError(f"--backbone=hub:{source}: not a loadable keras-hub image preset at "
                        f"image size {image_size}: {e}") from None
    if converter.scale is None and converter.offset is None:
        raise UserError(f"--backbone=hub:{source}: its image converter has no scale/offset; "
                        "the input scaling the backbone expects is unknown")
    scale = 1.0 if converter.scale is None else converter.scale
    offset = 0.0 if converter.offset is None else converter.offset
    return net, _floats(scale), _floats(offset)


def _preset_backbone_config(source: str) -> dict:
    from keras_hub.src.utils import preset_utils

    try:
        return preset_utils.load_json(source, preset_utils.CONFIG_FILE)
    except (ValueError, OSError, FileNotFoundError) as e:
        raise UserError(f"--backbone=hub:{source}: no keras-hub preset there ({e})") from None


def _floats(value):
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)


def _tiny(keras_hub, name: str, image_size: int) -> keras.Model:
    """Small random-init architectures (a few hundred k parameters) of each family."""
    if name == "tiny_vit":
        return keras_hub.models.ViTBackbone(
            image_shape=(image_size, image_size, 3), patch_size=8, num_layers=2, num_heads=2,
            hidden_dim=32, mlp_dim=64, name="tiny_vit")
    if name == "tiny_dinov2":
        return keras_hub.models.DINOV2Backbone(
            patch_size=8, num_layers=2, hidden_dim=32, num_heads=2, intermediate_dim=64,
            image_shape=(image_size, image_size, 3),
            position_embedding_shape=(image_size, image_size, 3), name="tiny_dinov2")
    return keras_hub.models.EfficientNetBackbone(  # EfficientNetV2: fused, then MBConv stages
        stackwise_kernel_sizes=[3, 3, 3, 3], stackwise_num_repeats=[1, 1, 1, 1],
        stackwise_input_filters=[16, 16, 24, 32], stackwise_output_filters=[16, 24, 32, 48],
        stackwise_expansion_ratios=[1, 4, 4, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25, 0.25],
        stackwise_strides=[1, 2, 2, 2], stackwise_block_types=["fused", "fused", "unfused",
                                                               "unfused"],
        width_coefficient=1.0, depth_coefficient=1.0, num_features=64,
        name="tiny_efficientnetv2")


@keras.saving.register_keras_serializable(package="landmark_tf")
class ClassToken(keras.layers.Layer):
    """[B, T, D] token sequence -> its first (class) token as a [B, 1, 1, D] map, float32."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, tokens):
        first = keras.ops.cast(tokens[:, 0, :], "float32")
        return keras.ops.expand_dims(keras.ops.expand_dims(first, 1), 1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1, 1, input_shape[-1])

