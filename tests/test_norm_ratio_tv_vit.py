"""Norm ratios of torchvision ViT encoder blocks, against the block's forward written out by hand."""

from __future__ import annotations

import torch
import torchvision

from lightning_cka.capture import HookSet
from lightning_cka.norm_ratio import NormRatioCapture, find_residual_units


def test_torchvision_vit_units_match_a_hand_written_forward():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    units = find_residual_units(vit)
    assert [(u.block, u.unit) for u in units] == [
        (f"encoder.layers.encoder_layer_{i}", unit) for i in range(2) for unit in ("attn", "mlp")
    ]
    x = torch.randn(6, 3, 32, 32)
    capture = NormRatioCapture(vit, units)
    with HookSet() as hooks, torch.no_grad():
        capture.attach(hooks)
        vit(x)
    got = capture.compute()

    # the same quantities from the block's arithmetic
    with torch.no_grad():
        tokens = vit._process_input(x)
        tokens = torch.cat([vit.class_token.expand(len(x), -1, -1), tokens], dim=1)
        z = vit.encoder.dropout(tokens + vit.encoder.pos_embedding)
        for i, block in enumerate(vit.encoder.layers):
            a = block.ln_1(z)
            attn = block.dropout(block.self_attention(a, a, a, need_weights=False)[0])
            mid = z + attn
            mlp = block.mlp(block.ln_2(mid))
            for unit, (zz, ff) in {"attn": (z, attn), "mlp": (mid, mlp)}.items():
                ratio = zz.norm(dim=-1) / ff.norm(dim=-1)
                name = f"encoder.layers.encoder_layer_{i}/{unit}"
                assert abs(got[f"{name}/cls"] - ratio[:, 0].mean().item()) < 1e-4 * ratio[:, 0].mean().item()
                assert abs(got[f"{name}/spatial"] - ratio[:, 1:].mean().item()) < 1e-4 * ratio[:, 1:].mean().item()
            z = mid + mlp
