"""A ConvNeXt of depth 1 per stage and widths 8-64, built by the same Keras function as
`--backbone=convnext-*` (keras.applications' ConvNeXt: prestem normalisation, grouped 7x7
convolutions, LayerNorm, gelu, LayerScale, the no-top LayerNorm): the same layer types and ops,
saved and traced in a second instead of convnext-tiny's ten. Same signature as
`backbones.build_backbone`."""

from __future__ import annotations

from keras.src.applications import convnext


def tiny_convnext(name: str = "convnext-tiny", weights_path: str | None = None):
    del name, weights_path
    # The arguments of keras.applications.ConvNeXtTiny but depths and widths.
    return convnext.ConvNeXt(
        depths=[1, 1, 1, 1], projection_dims=[8, 16, 32, 64], drop_path_rate=0.0,
        layer_scale_init_value=1e-6, default_size=224, name="convnext_tiny",
        include_top=False, include_preprocessing=True, weights=None,
        input_shape=(None, None, 3))
