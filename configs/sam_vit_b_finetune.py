"""SAM ViT-B fine-tuned in JAX with SAM's own prompts and losses (the SAM paper, appendix A).

Boxes or points from the ground truth, then 8 rounds of corrective clicks on the errors and 2 with the previous mask
alone; focal + Dice at 20:1 and an MSE on the predicted IoU (pisam_jax/training/stages/sam.py). By default only the
mask decoder trains; ``--config.train_modules=image_encoder,prompt_encoder,mask_decoder`` trains all of SAM (with the
encoder frozen, ``--config.cache_embeddings=True --config.data.augment=False`` encodes each image once). SAM's
optimiser: AdamW 8e-4, weight decay 0.1, 250 warm-up steps, the rate x0.1 at epoch 10 of 12; global batch 32.

    python -m convert.sam --checkpoint sam_vit_b_01ec64.pth --out checkpoints/sam_vit_b
    python train.py --config=configs/sam_vit_b_finetune.py --workdir=workdirs/sam_vit_b_ft \
        --config.init_from=checkpoints/sam_vit_b --config.data.data_root=data
"""

from configs import common


def get_config():
    c = common.get_config()
    c.stage = "sam"
    c.train_modules = "mask_decoder"
    c.model.model_type = "vit_b"
    c.init_from = "checkpoints/sam_vit_b"
    c.learning_rate = 8e-4
    c.weight_decay = 0.1
    c.warmup_steps = 250
    c.num_epochs = 12
    c.lr_drop_epoch = 10
    return c
