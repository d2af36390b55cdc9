"""Random-weight PyTorch HQ-SAM models (``segment_anything_hq==0.3``), saved as the official ``sam_hq_vit_*.pth``."""

from __future__ import annotations

from functools import partial

import torch
from segment_anything_hq.modeling import ImageEncoderViT, MaskDecoderHQ, PromptEncoder, Sam, TwoWayTransformer
from segment_anything_hq.modeling.common import LayerNorm2d

from tests.sam_reference import TINY, save_official  # noqa: F401  (re-exported: same tiny sizes, same file format)


def perturb_norms(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Adds noise to every LayerNorm / LayerNorm2d weight and bias (their 1/0 defaults would hide a mislaid one)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, LayerNorm2d)):
                m.weight.add_(scale * torch.randn_like(m.weight))
                m.bias.add_(scale * torch.randn_like(m.bias))
    return module


def build_torch_hq_decoder(transformer_dim=256, vit_dim=1024, mlp_dim=2048) -> MaskDecoderHQ:
    """``MaskDecoderHQ`` as HQ-SAM builds it, every size a parameter, norms perturbed, eval mode."""
    return perturb_norms(
        MaskDecoderHQ(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=transformer_dim, mlp_dim=mlp_dim, num_heads=8),
            transformer_dim=transformer_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            vit_dim=vit_dim,
        )
    ).eval()


def build_torch_hq_sam(image_size, embed_dim, depth, num_heads, global_attn_indexes, window_size=14, seed=0) -> Sam:
    """``segment_anything_hq.build_sam._build_sam`` with every size a parameter, random weights, eval mode.

    Every LayerNorm (the decoder's LayerNorm2d included) and the position tables are perturbed.
    """
    torch.manual_seed(seed)
    grid = image_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth,
            embed_dim=embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=num_heads,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=global_attn_indexes,
            window_size=window_size,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=build_torch_hq_decoder(256, embed_dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    perturb_norms(sam)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w", "pos_embed")):
                p.add_(0.1 * torch.randn_like(p))
    return sam.eval()
