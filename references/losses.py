"""PyTorch reference of Pi-SAM's mask losses (PISAM_SPEC.md 5.1), written from the spec.

Mask2Former's ``point_sample``, ``calculate_uncertainty``, ``get_uncertain_point_coords_with_randomness``,
``sigmoid_ce_loss`` and ``dice_loss``, and HQ-SAM/Pi-SAM's ``loss_masks`` with the ``valid_mask`` weighting. The
``rand`` arguments take the place of ``torch.rand``, so a test can give both sides the same draws.
"""

import torch
import torch.nn.functional as F


def ref_point_sample(input, point_coords, **kwargs):
    add_dim = False
    if point_coords.dim() == 3:
        add_dim = True
        point_coords = point_coords.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * point_coords - 1.0, **kwargs)
    if add_dim:
        output = output.squeeze(3)
    return output


def ref_calculate_uncertainty(logits):
    assert logits.shape[1] == 1
    gt_class_logits = logits.clone()
    return -(torch.abs(gt_class_logits))


def ref_get_uncertain_point_coords_with_randomness(
    coarse_logits, uncertainty_func, num_points, oversample_ratio, importance_sample_ratio, rand=torch.rand
):
    assert oversample_ratio >= 1
    assert 0 <= importance_sample_ratio <= 1
    num_boxes = coarse_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    point_coords = rand(num_boxes, num_sampled, 2)
    point_logits = ref_point_sample(coarse_logits, point_coords, align_corners=False)
    point_uncertainties = uncertainty_func(point_logits)
    num_uncertain_points = int(importance_sample_ratio * num_points)
    num_random_points = num_points - num_uncertain_points
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain_points, dim=1)[1]
    shift = num_sampled * torch.arange(num_boxes, dtype=torch.long, device=coarse_logits.device)
    idx += shift[:, None]
    point_coords = point_coords.view(-1, 2)[idx.view(-1), :].view(num_boxes, num_uncertain_points, 2)
    if num_random_points > 0:
        point_coords = torch.cat([point_coords, rand(num_boxes, num_random_points, 2)], dim=1)
    return point_coords


def ref_sigmoid_ce_loss(inputs, targets, num_masks, valid=None):
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1)
    if valid is None:
        return loss.sum() / num_masks
    total = valid.sum()
    return (loss * valid).sum() / (total if total > 0 else 1.0)


def ref_dice_loss(inputs, targets, num_masks, valid=None):
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    if valid is None:
        return loss.sum() / num_masks
    total = valid.sum()
    return (loss * valid).sum() / (total if total > 0 else 1.0)


def ref_loss_masks(
    src_masks, target_masks, num_masks, num_points, rand, valid=None, oversample_ratio=3.0, point_coords=None
):
    """src_masks (B, 1, h, w) logits, target_masks (B, 1, H, W) in [0, 1]; ``point_coords`` skips the selection."""
    with torch.no_grad():
        if point_coords is None:
            point_coords = ref_get_uncertain_point_coords_with_randomness(
                src_masks, ref_calculate_uncertainty, num_points, oversample_ratio, 0.75, rand=rand
            )
        point_labels = ref_point_sample(target_masks, point_coords, align_corners=False).squeeze(1)
    point_logits = ref_point_sample(src_masks, point_coords, align_corners=False).squeeze(1)
    return (
        ref_sigmoid_ce_loss(point_logits, point_labels, num_masks, valid),
        ref_dice_loss(point_logits, point_labels, num_masks, valid),
        point_coords,
    )
