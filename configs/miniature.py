"""The paper in miniature, on a CPU: a small SAM trained from scratch on synthetic thin-structure data, then HQ-SAM
and Pi-SAM (stage 1, stage 2) trained on it, frozen, with the same modules, loops and recipes as the full ones.

Only sizes and step counts differ: a 4-block ViT of width 128 at 128 px input (an 8^2 embedding grid, SAM's
masks at 32^2, Pi-SAM's head at 128^2: the paper's 256 -> 1024 in miniature), trained on 256 px synthetic images
whose structures are drawn 12x thicker than at 2K (``--detail 12``: 1-6 px at the model's input, as at 1024 on
DIS5K), so that most of an object survives SAM's low resolution and its thin parts do not. SAM from scratch
follows the SAM paper's optimiser (AdamW, weight decay 0.1, linear warm-up); the other stages keep the reference's
Adam. One argument per stage:

    python -m pisam_jax.data.synthetic --out data/mini/DIS5K/DIS-TR --n 400 --size 256 --detail 12 --seed 0
    python train.py --config=configs/miniature.py:sam --workdir=runs/mini/sam --config.data.data_root=data/mini
    python train.py --config=configs/miniature.py:hq --workdir=runs/mini/hq --config.data.data_root=data/mini \\
        --config.init_from=runs/mini/sam
    python train.py --config=configs/miniature.py:stage1 --workdir=runs/mini/stage1 \\
        --config.data.data_root=data/mini --config.init_from=runs/mini/sam
    python train.py --config=configs/miniature.py:stage2 --workdir=runs/mini/stage2 \\
        --config.data.data_root=data/mini --config.init_from=runs/mini/stage1

``python quickstart.py`` runs all of it, then evaluates the three models on held-out images.
"""

from configs import common

STAGES = ("sam", "hq", "stage1", "stage2")
# Steps of each stage (the quickstart's budget: about 10 minutes on two CPU cores, all stages and evaluation).
STEPS = {"sam": 1000, "hq": 300, "stage1": 400, "stage2": 400}


def get_config(arg: str = "sam"):
    if arg not in STAGES:
        raise ValueError(f"configs/miniature.py takes one of {', '.join(STAGES)}, not {arg!r}")
    c = common.get_config()
    c.stage = arg
    c.seed = 0
    c.allow_random_init = arg == "sam"  # SAM from scratch; the others start from it
    c.init_from = ""

    c.model.model_type = "vit_b"
    c.model.image_size = 128
    c.model.encoder_embed_dim = 128
    c.model.encoder_depth = 4
    c.model.encoder_num_heads = 4
    c.model.encoder_global_attn_indexes = (1, 3)
    c.model.window_size = 4

    c.data.datasets = "DIS5K-TR"
    c.data.data_root = "data/mini"
    c.data.threads = 1
    c.data.prefetch = 4
    # The stages on a frozen encoder reuse its outputs: un-augmented images, encoded once (the SAM stage augments).
    c.data.augment = arg == "sam"
    c.cache_embeddings = arg != "sam"

    c.batch_size = 8
    c.max_steps = STEPS[arg]
    c.num_epochs = 10  # the reference's cosine, stepped per "epoch": here a tenth of the run
    c.steps_per_epoch = STEPS[arg] // c.num_epochs
    c.learning_rate = 1e-3
    if arg == "sam":  # SAM's own optimiser (the SAM paper: AdamW, weight decay 0.1, linear warm-up)
        c.warmup_steps = 100
        c.weight_decay = 0.1
    c.num_points = 32 * 32
    c.sam.click_rounds = 1
    c.sam.mask_rounds = 1

    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 1
    c.log_every_steps = 10
    c.log_images_every = 0
    return c
