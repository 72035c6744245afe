"""The model: backbone -> pooling -> embedding neck -> cosine-softmax head.

Reads: a `config.ModelConfig` (and optional offline ImageNet weights).
Writes: nothing; `model.build_models` returns the train model (logits) and the embedding model
(float32 [B, D], L2-normalised). `backbones` (EfficientNet B0-B7, ConvNeXt), `pooling` (GAP, GeM,
neck), `heads` (CosFace, ArcFace, AdaCos, sub-center), `losses`; `model` also restores
checkpoints for later stages.
"""
