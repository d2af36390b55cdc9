"""HQ-SAM ViT-B trained in JAX on a frozen SAM ViT-B, as HQ-SAM's own ``train/train.py`` trains it.

The HQ output token, its MLP and the feature-fusion layers train (pisam_jax/training/stages/hq.py); each sample is
prompted by its box, 10 foreground points or a noisy mask; BCE + Dice of the HQ token's mask. Adam 1e-3, 12 epochs
with the rate x0.1 at epoch 10, global batch 32 (HQ-SAM: 8 GPUs x 4), on HQSeg-44K.

    python -m convert.sam --checkpoint sam_vit_b_01ec64.pth --out checkpoints/sam_vit_b
    python train.py --config=configs/hq_vit_b.py --workdir=workdirs/hq_vit_b \
        --config.init_from=checkpoints/sam_vit_b --config.data.data_root=data

The export is an HQ-SAM model directory: evaluate it beside SAM and Pi-SAM with eval.py, or fine-tune from it.
"""

from configs import common


def get_config():
    c = common.get_config()
    c.stage = "hq"
    c.model.model_type = "vit_b"
    c.init_from = "checkpoints/sam_vit_b"
    c.data.datasets = "hqseg-train"
    c.num_epochs = 12
    c.lr_drop_epoch = 10
    return c
