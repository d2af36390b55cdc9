"""Pi-SAM ViT-L, stage 2 (Precise Interactor only) from the stage-1 run (PISAM_SPEC.md 5).

Adam 1e-3, cosine per epoch over 100 epochs, global batch 32, the paper's four training sets (D8).

    (run configs/pisam_vit_l_stage1.py first)
    python train.py --config=configs/pisam_vit_l_stage2.py --workdir=workdirs/pisam_vit_l_stage2 \
        --config.init_from=workdirs/pisam_vit_l_stage1 --config.data.data_root=data

Multi-host: add --config.distributed=True (coordinator, process count and id from the environment or
--config.coordinator_address/num_processes/process_id); batch_size stays global.
"""

from configs import common


def get_config():
    c = common.get_config()
    c.stage = "stage2"
    c.model.model_type = "vit_l"
    c.init_from = "workdirs/pisam_vit_l_stage1"
    return c
