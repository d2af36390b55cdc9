"""PyTorch reference of Pi-SAM's decoder (``MaskDecoderAE``), written from PISAM_SPEC.md section 3.

Its ``state_dict()`` has exactly the keys of the official decoder checkpoints (spec appendix): 188 without
the interactor (stage 1), 270 with it (stage 2). Also the seed-42 reconstruction of the encoder-side RGB
embedding (spec 2.2, decision D2) with its published fingerprints.
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from torch import nn
from torchvision.ops import deform_conv2d

# Spec 2.1: depth, heads and global blocks of the official ViTs.
VIT_CONFIGS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}

# Spec 2.2: sums of the seed-42 rgb_embed tensors.
RGB_FINGERPRINTS = {
    "vit_b": {"0.weight": 0.674056, "0.bias": 2.389177, "1.weight": -2.245842, "1.bias": 0.032592},
    "vit_l": {"0.weight": -1.715251, "0.bias": 0.353545, "1.weight": -1.616709, "1.bias": -0.057180},
    "vit_h": {"0.weight": -0.709881, "0.bias": -0.014582, "1.weight": -2.830590, "1.bias": -0.085113},
}


class DeformableConv2d(nn.Module):
    """Modulated DCN v2: offsets and 2*sigmoid modulation predicted by zero-initialised convs."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=False):
        super().__init__()
        k = kernel_size
        self.stride, self.padding = stride, padding
        self.offset_conv = nn.Conv2d(in_channels, 2 * k * k, k, stride=stride, padding=padding, bias=True)
        nn.init.constant_(self.offset_conv.weight, 0.0)
        nn.init.constant_(self.offset_conv.bias, 0.0)
        self.modulator_conv = nn.Conv2d(in_channels, k * k, k, stride=stride, padding=padding, bias=True)
        nn.init.constant_(self.modulator_conv.weight, 0.0)
        nn.init.constant_(self.modulator_conv.bias, 0.0)
        self.regular_conv = nn.Conv2d(in_channels, out_channels, k, stride=stride, padding=padding, bias=bias)

    def forward(self, x):
        offset = self.offset_conv(x)
        modulator = 2.0 * torch.sigmoid(self.modulator_conv(x))
        return deform_conv2d(
            x, offset, self.regular_conv.weight, self.regular_conv.bias,
            stride=self.stride, padding=self.padding, mask=modulator,
        )


class ASPPModule(nn.Module):
    def __init__(self, dim, kernel_size, padding):
        super().__init__()
        self.atrous_conv = nn.Sequential(
            DeformableConv2d(dim, dim, kernel_size, stride=1, padding=padding, bias=False), LayerNorm2d(dim), nn.GELU()
        )

    def forward(self, x):
        return self.atrous_conv(x)


class MaskASPPDeformable(nn.Module):
    """The Object Embedder: [M, logits] -> skip + 3x3 DCN + 7x7 DCN branches -> 1x1 fuse (spec 3.1 step D)."""

    def __init__(self, dim=32):
        super().__init__()
        self.mask_embedding = nn.Sequential(
            nn.Conv2d(dim + 1, dim, 1), LayerNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, padding=1), LayerNorm2d(dim), nn.GELU(),
        )
        self.aspp1 = ASPPModule(dim, 3, 1)
        self.aspp2 = ASPPModule(dim, 7, 3)
        self.conv_out = nn.Sequential(nn.Conv2d(3 * dim, dim, 1, bias=False), LayerNorm2d(dim), nn.GELU())

    def forward(self, x):
        x = self.mask_embedding(x)
        return self.conv_out(torch.cat([x, self.aspp1(x), self.aspp2(x)], dim=1))


class MaskDecoderAE(MaskDecoder):
    """Pi-SAM's decoder. ``vit_dim``: the ViT width (768/1024/1280); ``interact``: stage 2 (adds ``interact_2``)."""

    def __init__(self, vit_dim: int = 768, interact: bool = False):
        super().__init__(
            transformer_dim=256,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            num_multimask_outputs=3,
            activation=nn.GELU,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )
        d = 256
        self.hf_token = nn.Embedding(1, d)
        self.hf_mlp = MLP(d, d, d // 8, 3)
        self.num_mask_tokens = self.num_mask_tokens + 1
        self.compress_vit_feat = nn.Sequential(
            nn.ConvTranspose2d(vit_dim, d, 2, 2), LayerNorm2d(d), nn.GELU(), nn.ConvTranspose2d(d, d // 8, 2, 2)
        )
        self.embedding_encoder = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, 2, 2), LayerNorm2d(d // 4), nn.GELU(), nn.ConvTranspose2d(d // 4, d // 8, 2, 2)
        )
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(d // 8, d // 4, 3, 1, 1), LayerNorm2d(d // 4), nn.GELU(), nn.Conv2d(d // 4, d // 8, 3, 1, 1)
        )
        self.embedding_act = nn.Sequential(LayerNorm2d(d // 8), nn.Conv2d(d // 8, d // 8, 3, 1, 1), nn.GELU())
        self.mask_aspp = MaskASPPDeformable(d // 8)
        self.output_upscaling_2 = nn.Sequential(
            nn.ConvTranspose2d(d // 8, d // 16, 2, 2), LayerNorm2d(d // 16), nn.GELU(),
            nn.ConvTranspose2d(d // 16, d // 32, 2, 2),
        )
        self.out_act = nn.Sequential(
            LayerNorm2d(d // 32), nn.Conv2d(d // 32, d // 32, 3, 1, 1), LayerNorm2d(d // 32), nn.GELU(),
            nn.Conv2d(d // 32, 1, 3, 1, 1),
        )
        if interact:
            from references.pisam_interactor import PointInteract

            self.interact_2 = PointInteract()
        else:
            self.interact_2 = None

    def base(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, vit_features):
        """Steps A-D: (E, hyper_in, pred_masks_s). image_embeddings (B,256,64,64), vit_features (B,64,64,C)."""
        b = image_embeddings.shape[0]
        vit = vit_features.permute(0, 3, 1, 2)
        hq_features = self.embedding_encoder(image_embeddings) + self.compress_vit_feat(vit)

        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight, self.hf_token.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        pos = torch.repeat_interleave(image_pe, b, dim=0) if image_pe.shape[0] == 1 else image_pe
        hs, src = self.transformer(src, pos, tokens)
        mask_token = hs[:, 5:6]

        src = src.transpose(1, 2).reshape(image_embeddings.shape)
        upscaled_sam = self.output_upscaling(src)
        mask_feature = self.embedding_act(self.embedding_maskfeature(upscaled_sam) + hq_features)
        hyper_in = self.hf_mlp(mask_token)  # (B, 1, 32)
        _, c, h, w = mask_feature.shape
        pred_masks_s = (hyper_in @ mask_feature.view(b, c, h * w)).view(b, 1, h, w)
        e = self.mask_aspp(torch.cat([mask_feature, pred_masks_s], dim=1))
        return e, hyper_in, pred_masks_s

    def head(self, e, rgb):
        """Step F: E (B,32,256,256) + RGB embedding (B,8,1024,1024) -> logits (B,1,1024,1024)."""
        return self.out_act(self.output_upscaling_2(e) + rgb)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                interm_embeddings, fg=None, bg=None):
        """interm_embeddings: [g0, ..., rgb]; fg/bg: (1, N, 2) (x, y) in [0, 1] or None (no interactor).

        Returns (pred_masks (B,1,256,256), pred_masks_large (B,1,1024,1024)).
        """
        e, hyper_in, pred_masks_s = self.base(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, interm_embeddings[0]
        )
        if fg is not None or bg is not None:
            if self.interact_2 is None:
                raise ValueError("clicks given to a decoder without interact_2")
            e = interact(self.interact_2, e, hyper_in, fg, bg)
        return pred_masks_s, self.head(e, interm_embeddings[-1])


def interact(interactor, e, hyper_in, fg, bg):
    """Runs the reference interactor on user clicks (spec 3.2, interactive=True): returns E'.

    fg (1, Nf, 2), bg (1, Nb, 2) (x, y) in [0, 1], either may be None; flags 1 for fg then 0 for bg; no kv mask.
    """
    fg = e.new_zeros(1, 0, 2) if fg is None else fg
    bg = e.new_zeros(1, 0, 2) if bg is None else bg
    points = torch.cat([fg, bg], dim=1)
    long = dict(dtype=torch.long, device=e.device)
    flags = torch.cat([torch.ones(1, fg.shape[1], **long), torch.zeros(1, bg.shape[1], **long)], 1)
    return interactor(e, hyper_in, points, flags, None)


@torch.no_grad()
def torch_encode(image_encoder: ImageEncoderViT, x: torch.Tensor):
    """segment_anything's ViT forward that also returns every global block's output (B, H, W, C) (spec 2.1)."""
    x = image_encoder.patch_embed(x)
    if image_encoder.pos_embed is not None:
        x = x + image_encoder.pos_embed
    interm = []
    for blk in image_encoder.blocks:
        x = blk(x)
        if blk.window_size == 0:
            interm.append(x)
    return image_encoder.neck(x.permute(0, 3, 1, 2)), interm


def sam_encoder(config: dict) -> ImageEncoderViT:
    """``ImageEncoderViT`` exactly as ``build_sam_encoder.py`` builds it (1024 input, patch 16, window 14)."""
    return ImageEncoderViT(
        depth=config["depth"],
        embed_dim=config["embed_dim"],
        img_size=config.get("image_size", 1024),
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=config["num_heads"],
        patch_size=config.get("patch_size", 16),
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(config["global_attn_indexes"]),
        window_size=config.get("window_size", 14),
        out_chans=256,
    )


@torch.no_grad()
def seed42_rgb_embed(config: dict, seed: int = 42) -> nn.Sequential:
    """The reference's (untrained, unsaved) ``rgb_embed``: seed, ViT, PromptEncoder, then the two convs.

    config: ``embed_dim``, ``depth``, ``num_heads``, ``global_attn_indexes`` (and optionally image_size,
    patch_size, window_size) of the SAM encoder. Building the ViT only consumes the RNG as the reference did.
    """
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        vit = sam_encoder(config)
        del vit
        PromptEncoder(256, (64, 64), (1024, 1024), 16)
        return nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1))
    finally:
        torch.random.set_rng_state(state)


def perturb_(module: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Makes every weight that starts trivial non-trivial: LN scales/biases, the zero-initialised DCN offset and
    modulator convs and the interactor's ``out_cov`` (so a wrong offset layout or a skipped branch shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad and "laplacian" in name:
                continue
            if ("norm" in name or isinstance(_owner(module, name), (nn.LayerNorm, LayerNorm2d))
                    or "offset_conv" in name or "modulator_conv" in name or "out_cov" in name):
                s = 0.05 if "offset_conv" in name else scale
                p.add_(s * torch.randn(p.shape, generator=g))
    return module


def _owner(module, name):
    return module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module


def count(module: nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix))
