"""Shared defaults of every training recipe (PISAM_SPEC.md 5; decisions D2, D4, D8).

Not a recipe itself: each ``configs/<recipe>.py`` calls ``get_config()`` here and changes what differs.
Fields (override any with ``--config.<field>=value``):

  stage                 what trains (pisam_jax/training/stages): "sam" (SAM itself), "hq" (HQ-SAM on a frozen SAM),
                        "stage1" (Pi-SAM's HR Mask Decoder + RGB embedding, D2), "stage2" (the Precise
                        Interactor only, D4)
  train_modules         comma-separated module paths that train, overriding the stage's default (e.g. SAM
                        fine-tuning: "mask_decoder"; from scratch: "image_encoder,prompt_encoder,mask_decoder")
  init_from             a converted SAM / HQ-SAM / Pi-SAM model directory, or a training workdir (stage 2: the
                        stage-1 one); empty only when ``allow_random_init`` (SAM from scratch, tiny recipes)
  model.*               ModelConfig fields: model_type plus any size override (tiny recipes); with init_from,
                        the encoder sizes come from the checkpoint and must agree with these; pi_rgb_embedding,
                        pi_deformable, pi_high_res: Pi-SAM's ablations (False removes the module)
  data.*                datasets (names or groups, D8: paper-train), data_root, augmentation, reader threads/workers,
                        synthetic (generate that many synthetic images under data_root when the data is absent;
                        synthetic_size their long side, synthetic_detail their structure widths, see data.synthetic),
                        source: "folders" (the folder layouts under data_root) or "tfds" (the prepared TFDS datasets
                        in tfds_data_dir, '' = TFDS's default; with synthetic, prepared from data_root's folders;
                        datasets may then also name BUILDER[/CONFIG]:SPLIT; see pisam_jax.data.tfds)
  dtype                 compute dtype: "float32" (the reference's) or "bfloat16" (matmuls and convs in bf16, float32
                        weights, statistics, softmax and logits; pisam_jax/modeling/precision.py)
  batch_size            global batch over all devices and hosts (spec: 32 = 8 GPUs x 4)
  num_epochs            cosine schedule length in epochs, stepped once per epoch (spec: 100)
  steps_per_epoch       0: len(dataset) // batch_size (drop_last, as the reference)
  max_steps             stop after this many steps (0: num_epochs * steps_per_epoch)
  learning_rate         Adam 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay
  lr_drop_epoch         > 0: the rate drops x0.1 every this many epochs instead of the cosine (HQ-SAM's recipe)
  warmup_steps          linear warm-up of the rate over this many steps (0: none, as the Pi-SAM reference)
  weight_decay          > 0: AdamW with this decoupled decay (0: Adam, as the Pi-SAM reference)
  num_points            points per mask at which the mask losses are taken (spec 5.1: 112^2)
  click_grid            stage2: the grid clicks are simulated on (spec 6: the reference's 256^2; the low-res
                        logits are resized to it, the identity at 1024 input)
  sam.*                 stage "sam" only (SAM paper, appendix A): box_prob (first prompt a box, else a point),
                        box_noise / box_noise_max (std as a fraction of the side, cap in px), click_rounds and
                        mask_rounds (iterations adding a click / adding nothing), focal/dice/iou weights
  cache_embeddings      reuse the frozen encoder's outputs per image (needs data.augment=False)
  checkpoint.*          every_steps, keep (latest N), async
  log_every_steps       JSONL + TensorBoard + progress bar postfix
  log_images_every      every this many steps, TensorBoard panels image | ground truth | prediction of a fixed set
                        of training images (training/samples.py); 0 off
  log_images_count      how many (the first images of data.datasets)
  log_images_size       each tile at most this many px on its long side
  distributed           call jax.distributed.initialize (coordinator from the fields below or the environment)
  debug.nan_at_step     inject a NaN loss at this step (tests the NaN guard); -1 off
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "stage1"
    c.train_modules = ""
    c.init_from = ""
    c.allow_random_init = False
    c.seed = 42

    c.model = ml_collections.ConfigDict()
    c.model.model_type = "vit_b"
    # Pi-SAM's ablations (paper Table 5; pisam_jax.models.ModelConfig): each False removes one module
    c.model.pi_rgb_embedding = True
    c.model.pi_deformable = True
    c.model.pi_high_res = True

    c.data = ml_collections.ConfigDict()
    c.data.datasets = "paper-train"
    c.data.data_root = "data"
    c.data.source = "folders"
    c.data.tfds_data_dir = ""
    c.data.augment = True
    c.data.threads = 2
    c.data.prefetch = 4
    c.data.workers = 0
    c.data.skip_bad = False
    c.data.synthetic = 0
    c.data.synthetic_size = 1024
    c.data.synthetic_detail = 1.0

    c.dtype = "float32"
    c.batch_size = 32
    c.num_epochs = 100
    c.steps_per_epoch = 0
    c.max_steps = 0
    c.learning_rate = 1e-3
    c.lr_drop_epoch = 0
    c.warmup_steps = 0
    c.weight_decay = 0.0
    c.num_points = 112 * 112
    c.cache_embeddings = False
    c.click_grid = 256

    c.sam = ml_collections.ConfigDict()
    c.sam.box_prob = 0.5
    c.sam.box_noise = 0.1
    c.sam.box_noise_max = 20.0
    c.sam.click_rounds = 8
    c.sam.mask_rounds = 2
    c.sam.focal_weight = 20.0
    c.sam.dice_weight = 1.0
    c.sam.iou_weight = 1.0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log_every_steps = 20
    c.log_images_every = 1000
    c.log_images_count = 4
    c.log_images_size = 256
    c.progress = True

    c.distributed = False
    c.coordinator_address = ""
    c.num_processes = 0
    c.process_id = -1

    c.debug = ml_collections.ConfigDict()
    c.debug.nan_at_step = -1
    return c
