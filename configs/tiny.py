"""Tiny Pi-SAM for CPU: a random 2-block SAM encoder, synthetic data, a handful of steps, in a few minutes.

The model keeps every Pi-SAM module at its real width; only the image encoder is tiny and the input is
256 px (embedding grid 16, E 64^2, output 256^2), so a step costs ~1/16 of the 1024 px one. The data are
``pisam_jax.data.synthetic`` images, generated under ``data.data_root`` on first use.

    python train.py --config=configs/tiny.py:stage1 --workdir=/tmp/tiny1
    python train.py --config=configs/tiny.py:stage2 --workdir=/tmp/tiny2 --config.init_from=/tmp/tiny1

Full 1024 px geometry (slow on CPU): add ``--config.model.image_size=1024 --config.data.synthetic_size=1024``.
"""

from configs import common


def get_config(arg: str = "stage1"):
    if arg not in ("stage1", "stage2"):
        raise ValueError(f"configs/tiny.py takes stage1 or stage2, not {arg!r}")
    c = common.get_config()
    c.stage = arg
    c.allow_random_init = True
    c.seed = 0
    c.model.model_type = "vit_b"
    c.model.image_size = 256
    c.model.encoder_embed_dim = 64
    c.model.encoder_depth = 2
    c.model.encoder_num_heads = 2
    c.model.encoder_global_attn_indexes = (1,)
    c.model.window_size = 7
    c.data.datasets = "DIS5K-TR"
    c.data.data_root = "/tmp/pisam_tiny_data"
    c.data.synthetic = 8
    c.data.synthetic_size = 384
    c.data.synthetic_detail = 4.0  # structures thick enough at 256 px for stage 2 to find errors to click
    c.data.threads = 1
    c.batch_size = 2
    c.num_epochs = 25
    c.max_steps = 100
    c.num_points = 32 * 32
    c.checkpoint.every_steps = 25
    c.checkpoint.keep = 2
    c.log_every_steps = 5
    c.log_images_every = 25
    c.log_images_count = 2
    return c
