"""Random-weight PyTorch SAM models saved exactly as the official ``.pth`` files are (a raw state_dict)."""

from __future__ import annotations

from functools import partial

import torch
from segment_anything import modeling
from segment_anything.modeling import MaskDecoder, Sam, TwoWayTransformer

# A SAM small enough for two CPU cores: 256-px input, 16x16 grid, 2 blocks (one windowed, one global).
TINY = dict(image_size=256, embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=7)


def encoder_and_prompts(modeling, image_size, embed_dim, depth, num_heads, global_attn_indexes, window_size=14):
    """``image_encoder`` and ``prompt_encoder`` as ``build_sam._build_sam`` makes them, from ``modeling``
    (``segment_anything.modeling`` or ``segment_anything_hq.modeling``), every size a parameter."""
    grid = image_size // 16
    return dict(
        image_encoder=modeling.ImageEncoderViT(
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
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size), mask_in_chans=16
        ),
    )


def perturb_(sam: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Adds noise to every norm's weight and bias and to the position tables, and sets eval mode:
    their default 1/0 and zeros would hide a mislaid scale, bias or table."""
    with torch.no_grad():
        for module in sam.modules():
            if type(module).__name__ in ("LayerNorm", "LayerNorm2d"):  # torch's, and each package's own 2d one
                module.weight.add_(scale * torch.randn_like(module.weight))
                module.bias.add_(scale * torch.randn_like(module.bias))
        for name, p in sam.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w", "pos_embed")):
                p.add_(scale * torch.randn_like(p))
    return sam.eval()


def build_torch_sam(image_size, embed_dim, depth, num_heads, global_attn_indexes, window_size=14, seed=0) -> Sam:
    """``segment_anything.build_sam._build_sam`` with every size a parameter, random weights, eval mode."""
    torch.manual_seed(seed)
    sam = Sam(
        **encoder_and_prompts(modeling, image_size, embed_dim, depth, num_heads, global_attn_indexes, window_size),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    return perturb_(sam)


def save_official(model: torch.nn.Module, path) -> None:
    """As Meta saves ``sam_vit_*.pth``: ``torch.save(model.state_dict())``."""
    torch.save(model.state_dict(), path)


# The scale given to the layer feeding a LayerNorm2d by :func:`expose_layer_norm_2d_eps_`.
LN2D_INPUT_SCALE = 0.05


def expose_layer_norm_2d_eps_(model: torch.nn.Module, scale: float = LN2D_INPUT_SCALE) -> list[str]:
    """Scales the weight and bias of every layer that feeds a LayerNorm2d inside an ``nn.Sequential`` by ``scale``,
    in place; returns their names.

    A LayerNorm undoes a scale of its input except for its epsilon, whose share grows 1/scale^2 times: with the
    unit-variance inputs of random weights, eps 1e-6 vs 1e-5 moves a LayerNorm2d's output by ~5e-6 relative,
    about fp32's own error after a few layers; with inputs 20x smaller (variance ~1e-3) by ~2e-3, far above it.
    Nothing else about the model changes, so the parity tests see the epsilon without losing anything.
    """
    scaled = []
    with torch.no_grad():
        for seq_name, seq in model.named_modules():
            if not isinstance(seq, torch.nn.Sequential):
                continue
            for i in range(1, len(seq)):
                if type(seq[i]).__name__ == "LayerNorm2d" and hasattr(seq[i - 1], "weight"):
                    seq[i - 1].weight.mul_(scale)
                    if getattr(seq[i - 1], "bias", None) is not None:
                        seq[i - 1].bias.mul_(scale)
                    scaled.append(f"{seq_name}.{i - 1}")
    return scaled
