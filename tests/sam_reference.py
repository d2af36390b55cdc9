"""Random-weight PyTorch SAM models saved exactly as the official ``.pth`` files are (a raw state_dict)."""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

# A SAM small enough for two CPU cores: 256-px input, 16x16 grid, 2 blocks (one windowed, one global).
TINY = dict(image_size=256, embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=7)


def build_torch_sam(image_size, embed_dim, depth, num_heads, global_attn_indexes, window_size=14, seed=0) -> Sam:
    """``segment_anything.build_sam._build_sam`` with every size a parameter, random weights, eval mode.

    LayerNorm weights and biases are perturbed: their default 1/0 would hide a mislaid scale or bias.
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
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "norm" in name or name.endswith(("rel_pos_h", "rel_pos_w", "pos_embed")):
                p.add_(0.1 * torch.randn_like(p))
    return sam.eval()


def save_official(model: torch.nn.Module, path) -> None:
    """As Meta saves ``sam_vit_*.pth``: ``torch.save(model.state_dict())``."""
    torch.save(model.state_dict(), path)
