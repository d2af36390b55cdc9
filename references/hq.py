"""Random-weight PyTorch HQ-SAM models (``segment_anything_hq==0.3``), saved as the official ``sam_hq_vit_*.pth``."""

from __future__ import annotations

import torch
from segment_anything_hq import modeling
from segment_anything_hq.modeling import MaskDecoderHQ, Sam, TwoWayTransformer

from references.sam import TINY, encoder_and_prompts, perturb_, save_official  # noqa: F401  (TINY, save_official re-exported)


def build_torch_hq_decoder(transformer_dim=256, vit_dim=1024, mlp_dim=2048) -> MaskDecoderHQ:
    """``MaskDecoderHQ`` as HQ-SAM builds it, every size a parameter, norms perturbed, eval mode."""
    return perturb_(
        MaskDecoderHQ(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=transformer_dim, mlp_dim=mlp_dim, num_heads=8),
            transformer_dim=transformer_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            vit_dim=vit_dim,
        )
    )


def build_torch_hq_sam(image_size, embed_dim, depth, num_heads, global_attn_indexes, window_size=14, seed=0) -> Sam:
    """``segment_anything_hq.build_sam._build_sam`` with every size a parameter, random weights, eval mode.

    Every LayerNorm (the decoder's LayerNorm2d included) and the position tables are perturbed.
    """
    torch.manual_seed(seed)
    sam = Sam(
        **encoder_and_prompts(modeling, image_size, embed_dim, depth, num_heads, global_attn_indexes, window_size),
        mask_decoder=build_torch_hq_decoder(256, embed_dim),
    )
    return perturb_(sam)
