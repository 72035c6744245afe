"""DOLG vs GAP/GeM necks on EfficientNet-B0, a keras-hub backbone vs keras.applications, and
ConvNeXt-Tiny, at equal steps on landmark-synth, with seed spread (one table).

  PYTHONPATH=. nice -n 10 .venv/bin/python bench/architectures_train.py --out /tmp/arch \
      [--seeds 0,1] [--steps 150] [--rows gap,gem,dolg,hub_b0]

Per synth seed (difficulty 0.7, the demo's set; not bench/levers.py's PHENOMENA):
landmark-tfrecords, then `--steps` SGD steps (lr 0.1, cosine, 20 warm-up, batch 32, 64 px,
random init, CPU float32), every row with the same head: CosFace m 0.15 with the auto scale
(the random-init levers baseline; dynamic_arcface at the released s = 45 did not train from
scratch in so few steps) and a 128-d descriptor; scored by test->index mAP@100 and test GAP
(kNN vs train).
  gap     keras.applications EfficientNet-B0 -> GAP -> Dense -> BN
  gem     ... -> GeM (p 3, trainable) -> Dense -> BN
  dolg    --neck=dolg: local branch on stage 5 (4x4 at 64 px, hence dilations 1,2,3: the
          released 3,6,9 would reach only padding), GeM global branch on stage 7, orthogonal
          fusion -> Dense -> BN -> PReLU
  hub_b0  keras-hub's EfficientNetBackbone with timm's B0 configuration (what keras-hub's
          efficientnet_b0_ra_imagenet preset converts to), written here as a random-weight
          preset folder and trained as --backbone=hub:FOLDER -> GAP -> Dense -> BN. Compare
          with `gap`: same architecture, other library; its random init keeps gamma = 1 in
          the BatchNorm ending each residual branch, and timm's B0 has no drop-connect here
  hub_b0_zg  the same preset with those gammas 0, as backbones.py initialises
          keras.applications' EfficientNets (zero-gamma): the init rule of `gap`
  convnext_t  --backbone=convnext-tiny (keras.applications, 27.8M parameters vs B0's 4.0M;
          LayerScale 1e-6 starts its blocks near the identity) -> GAP -> Dense -> BN
hub_b0 needs keras-hub (pip install '.[hub]'). Results go to OUT/results.json after each row
(a rerun skips rows already there); a markdown table with the spread (max - min) is printed.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import runs

from landmark_tf.config import ModelConfig, TrainConfig
from landmark_tf.synth import plan as synth_plan
from landmark_tf.training import train

ROWS = ("gap", "gem", "dolg", "hub_b0", "hub_b0_zg", "convnext_t")
HEAD = {"head": "cosface", "margin": 0.15}
MODELS = {
    "gap": {"pooling": "gap"},
    "gem": {"pooling": "gem"},
    "dolg": {"pooling": "gem", "neck": "dolg", "dolg_dilations": [1, 2, 3]},
    "hub_b0": {"pooling": "gap"},
    "hub_b0_zg": {"pooling": "gap"},
    "convnext_t": {"pooling": "gap"},
}
BACKBONES = {"convnext_t": "convnext-tiny"}  # the rest: EfficientNet-B0 (hub_b0*: keras-hub's)


def hub_b0_preset(path: str, zero_gamma: bool) -> str:
    """A keras-hub preset folder of EfficientNet-B0 (timm's configuration, random weights) with
    the ImageNet scaling of keras-hub's EfficientNet image converter."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import keras_hub
    from keras_hub.src.utils.timm import convert_efficientnet

    from landmark_tf.modeling import backbones

    config = convert_efficientnet.convert_backbone_config(
        {"architecture": "efficientnet_b0"})
    net = keras_hub.models.EfficientNetBackbone(**config)
    if zero_gamma:  # keras-hub names its layers as keras.applications does (blockNx_add)
        backbones._zero_init_residual_gammas(net)
    net.save_to_preset(path)
    from landmark_tf.modeling import hub_backbones

    keras_hub.layers.EfficientNetImageConverter(
        image_size=(runs.SIZE, runs.SIZE), scale=hub_backbones.IMAGENET_SCALE,
        offset=hub_backbones.IMAGENET_OFFSET).save_to_preset(path)
    return path


def fit(row: str, data_dir: str, workdir: str, steps: int, seed: int, out: str) -> dict:
    backbone = BACKBONES.get(row, "efficientnet-b0")
    if row.startswith("hub_b0"):
        backbone = "hub:" + hub_b0_preset(os.path.join(out, f"{row}_preset"), row == "hub_b0_zg")
    cfg = ModelConfig(backbone=backbone, image_size=runs.SIZE, embedding_dim=runs.DIM,
                      **HEAD, **MODELS[row])
    tcfg = TrainConfig(data_dir=data_dir, workdir=workdir, train_steps=steps,
                       batch_size=runs.BATCH, learning_rate=0.1, schedule="cosine",
                       warmup_steps=20, val_split="", checkpoint_every=steps, seed=seed)
    return train.train(cfg, tcfg)


def run_seed(out: str, seed: int, steps: int, rows: list[str]) -> dict:
    root = os.path.join(out, f"seed{seed}")
    plan = synth_plan.make_plan(runs.synth(root, seed))
    data = runs.train_records(root)

    def run_row(row: str) -> dict:
        workdir = os.path.join(root, "runs", row)
        r = fit(row, data, workdir, steps, seed, out)
        s = runs.score(workdir, root, plan, row)
        return {"map@100": s["map@100"], "gap": s["gap"], "loss": r["loss"],
                "images_per_second": r["images_per_second"]}

    return runs.run_rows(os.path.join(out, "results.json"), seed, rows, run_row)


def table(results: dict, rows: list[str]) -> str:
    lines = ["| row | mAP@100 mean | spread | GAP mean | spread | train img/s | seeds |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        got = [results[s][row] for s in sorted(results) if row in results[s]]
        if not got:
            continue
        m, g = [r["map@100"] for r in got], [r["gap"] for r in got]
        ips = np.mean([r["images_per_second"] for r in got])
        lines.append(f"| {row} | {np.mean(m):.3f} | {max(m) - min(m):.3f} | {np.mean(g):.3f} "
                     f"| {max(g) - min(g):.3f} | {ips:.0f} | {len(got)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rows", default=",".join(ROWS))
    a = p.parse_args()
    rows = [r for r in a.rows.split(",") if r]
    results = {}
    for seed in [int(s) for s in a.seeds.split(",")]:
        results = run_seed(a.out, seed, a.steps, rows)
    print(table(results, rows))


if __name__ == "__main__":
    main()
