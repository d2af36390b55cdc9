"""Pi-SAM ViT-B, stage 1 (HR Mask Decoder + RGB embedding) on a frozen SAM ViT-B (PISAM_SPEC.md 5).

Adam 1e-3, cosine per epoch over 100 epochs, global batch 32, the paper's four training sets (D8).

    python -m convert.sam --checkpoint sam_vit_b_*.pth --out checkpoints/sam_vit_b
    python train.py --config=configs/pisam_vit_b_stage1.py --workdir=workdirs/pisam_vit_b_stage1 \
        --config.init_from=checkpoints/sam_vit_b --config.data.data_root=data

Multi-host: add --config.distributed=True (coordinator, process count and id from the environment or
--config.coordinator_address/num_processes/process_id); batch_size stays global.
"""

from configs import common


def get_config():
    c = common.get_config()
    c.stage = "stage1"
    c.model.model_type = "vit_b"
    c.init_from = "checkpoints/sam_vit_b"
    return c
