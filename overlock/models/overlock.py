"""OverLoCK: an Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels (CVPR 2025).

The network reads like the paper's figure:

- **Base-Net**: ``patch_embed1`` (stem, stride 4), ``blocks1``; ``patch_embed2``, ``blocks2`` (stride 8);
  ``patch_embed3``, ``blocks3`` (stride 16). All ``RepConvBlock``.
- **Overview-Net**: ``patch_embed4``, ``blocks4`` (stride 32). Its output is the *context prior*; it feeds the
  auxiliary head (deep supervision) and, through ``high_level_proj``, the Focus-Net.
- **Focus-Net**: ``sub_blocks3`` (``DynamicConvBlock`` at stride 16), ``patch_embedx`` (joint downsampling of
  features and context), ``sub_blocks4`` (stride 32).
- **Head**: 1x1 conv to ``projection`` channels, BN, SiLU, global pool, classifier (``head.4``).

Module names and shapes equal the official ones, so official checkpoints load without remapping.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import ConvNorm, LayerNorm2d, PointwiseConv, downsample, stem
from .blocks import DynamicConvBlock, RepConvBlock

__all__ = ["OverLoCK", "CTXDownsample", "MODEL_CONFIGS"]

# Official configurations (models/overlock.py). Parameter counts in the docs are computed, not typed.
MODEL_CONFIGS = {
    "overlock_xt": dict(depth=(2, 2, 3, 2), sub_depth=(6, 2), embed_dim=(56, 112, 256, 336),
                        sub_num_heads=(4, 6)),
    "overlock_t": dict(depth=(4, 4, 6, 2), sub_depth=(12, 2), embed_dim=(64, 128, 256, 512),
                       sub_num_heads=(4, 8)),
    "overlock_s": dict(depth=(6, 6, 8, 3), sub_depth=(16, 3), embed_dim=(64, 128, 320, 512),
                       sub_num_heads=(8, 16)),
    "overlock_b": dict(depth=(8, 8, 10, 4), sub_depth=(20, 4), embed_dim=(80, 160, 384, 576),
                       sub_num_heads=(6, 9)),
}
for _cfg in MODEL_CONFIGS.values():
    _cfg.update(kernel_size=(17, 15, 13, 7), mlp_ratio=(4, 4, 4, 4), sub_mlp_ratio=(3, 3))


class CTXDownsample(nn.Module):
    """Joint stride-2 downsampling of the Focus-Net features and their context channels."""

    def __init__(self, dim: int, h_dim: int):
        super().__init__()
        self.x_proj = downsample(dim, h_dim)
        self.h_proj = downsample(h_dim // 4, h_dim // 4)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor):
        return self.x_proj(x), self.h_proj(ctx)


def _take_indices(n: int, indices) -> Tuple[List[int], int]:
    """timm's rule: ``None`` all maps, an int the last ``indices`` maps, a list those (negative from the end)."""
    if indices is None:
        take = list(range(n))
    elif isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices={indices}: OverLoCK has {n} feature maps")
        take = list(range(n - indices, n))
    else:
        take = [i % n for i in indices]
    return take, max(take)


def _as_list(value, n: int, name: str) -> list:
    if isinstance(value, (int, float)) or value is None:
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} needs {n} entries, got {value}")
    return value


class OverLoCK(nn.Module):
    """OverLoCK classification model, timm-compatible.

    ``forward(x)`` returns logits in train and eval mode. With ``use_ds=True`` (deep supervision) the model
    also has the auxiliary Overview-Net head; ``forward(x, return_aux=True)`` then returns
    ``(logits, aux_logits)`` in one pass (what the training loss and DDP need).

    Args mirror the official constructor; ``use_gemm`` is accepted and ignored, ``use_checkpoint`` gives the
    number of gradient-checkpointed blocks per stage (the official ``--ckpt-stg``).
    """

    def __init__(self, depth=(2, 2, 2, 2), sub_depth=(4, 2), in_chans: int = 3, embed_dim=(96, 192, 384, 768),
                 kernel_size=(7, 7, 7, 7), mlp_ratio=(4, 4, 4, 4), sub_mlp_ratio=(4, 4), sub_num_heads=(4, 8),
                 ls_init_value=(None, None, 1, 1), res_scale: bool = True, smk_size: int = 5,
                 deploy: bool = False, use_gemm: bool = False, use_ds: bool = False, drop_rate: float = 0.,
                 drop_path_rate: float = 0., norm_layer=LayerNorm2d, projection: int = 1024,
                 num_classes: int = 1000, use_checkpoint=(0, 0, 0, 0), global_pool: str = "avg", **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"OverLoCK got unexpected arguments: {sorted(kwargs)}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' for OverLoCK, got {global_pool!r}")
        depth, embed_dim = list(depth), list(embed_dim)
        kernel_size = _as_list(kernel_size, 4, "kernel_size")
        mlp_ratio = _as_list(mlp_ratio, 4, "mlp_ratio")
        ls_init_value = _as_list(ls_init_value, 4, "ls_init_value")
        self.use_checkpoint = _as_list(use_checkpoint, 4, "use_checkpoint")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.embed_dim = embed_dim
        self.global_pool = global_pool
        self.deploy = deploy
        ctx_dim = embed_dim[-1] // 4
        fusion_dim = embed_dim[-1] + ctx_dim
        self.num_features = fusion_dim
        self.head_hidden_size = projection
        self.grad_checkpointing = False

        # Base-Net and Overview-Net
        self.patch_embed1 = stem(in_chans, embed_dim[0])
        self.patch_embed2 = downsample(embed_dim[0], embed_dim[1])
        self.patch_embed3 = downsample(embed_dim[1], embed_dim[2])
        self.patch_embed4 = downsample(embed_dim[2], embed_dim[3])
        self.high_level_proj = PointwiseConv(embed_dim[-1], ctx_dim)
        self.patch_embedx = CTXDownsample(embed_dim[2], embed_dim[3])

        n_blocks = sum(depth) + sum(sub_depth)  # linear drop-path schedule over all blocks (pure Python: meta-safe)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        offsets = [sum(depth[:i]) for i in range(4)]
        for s in range(4):
            blocks = nn.ModuleList(
                RepConvBlock(embed_dim[s], kernel_size[s], mlp_ratio[s], ls_init_value[s], res_scale,
                             dpr[offsets[s] + i], norm_layer, deploy)
                for i in range(depth[s]))
            self.add_module(f"blocks{s + 1}", blocks)

        # Focus-Net
        base = sum(depth)
        self.sub_blocks3 = nn.ModuleList(
            DynamicConvBlock(embed_dim[2], embed_dim[-1], kernel_size[2], smk_size, sub_num_heads[0],
                             sub_mlp_ratio[0], ls_init_value[2], res_scale, dpr[base + i], norm_layer,
                             is_first=(i == 0), deploy=deploy)
            for i in range(sub_depth[0]))
        base += sub_depth[0]
        self.sub_blocks4 = nn.ModuleList(
            DynamicConvBlock(embed_dim[3], embed_dim[-1], kernel_size[-1], smk_size, sub_num_heads[1],
                             sub_mlp_ratio[1], ls_init_value[3], res_scale, dpr[base + i], norm_layer,
                             is_last=(i == sub_depth[1] - 1), deploy=deploy)
            for i in range(sub_depth[1]))

        # heads
        if use_ds:
            self.aux_head = nn.Sequential(
                nn.BatchNorm2d(embed_dim[-1]), nn.AdaptiveAvgPool2d(1),
                PointwiseConv(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity())
        self.head = ConvNorm(
            PointwiseConv(fusion_dim, projection, bias=False), nn.BatchNorm2d(projection), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity(),
            PointwiseConv(projection, num_classes) if num_classes > 0 else nn.Identity())

        self.feature_info = [
            dict(num_chs=embed_dim[0], reduction=4, module="blocks1"),
            dict(num_chs=embed_dim[1], reduction=8, module="blocks2"),
            dict(num_chs=embed_dim[2] + ctx_dim, reduction=16, module="sub_blocks3"),
            dict(num_chs=fusion_dim, reduction=32, module="sub_blocks4"),
        ]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------------- timm API
    @property
    def has_aux_head(self) -> bool:
        return hasattr(self, "aux_head")

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^patch_embed1",
            blocks=[(r"^blocks(\d+)\.(\d+)" if not coarse else r"^blocks(\d+)", None),
                    (r"^patch_embed(\d+)", (0,)),
                    (r"^(?:high_level_proj|patch_embedx)", (99,)),
                    (r"^sub_blocks(\d+)\.(\d+)" if not coarse else r"^sub_blocks(\d+)", (100,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (same gradients, less memory); per-stage control via ``use_checkpoint``."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head[4]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Fresh main (and auxiliary) classifier for ``num_classes`` classes (0 removes them)."""
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '' for OverLoCK, got {global_pool!r}")
            self.global_pool = global_pool
            self.head[3] = nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()
        device = self.head[0].weight.device
        self.head[4] = self._classifier(self.head_hidden_size, num_classes).to(device)
        if self.has_aux_head:
            self.aux_head[2] = self._classifier(self.embed_dim[-1], num_classes).to(device)

    def _classifier(self, dim: int, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        conv = PointwiseConv(dim, num_classes)
        self._init_weights(conv)
        return conv

    # ----------------------------------------------------------------------------------------------- forward
    def _run(self, block, *args, stage: int, index: int):
        if (self.grad_checkpointing or index < self.use_checkpoint[stage]) and torch.is_grad_enabled() \
                and not torch.jit.is_scripting():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward_pre(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Base-Net stages 1 and 2 (strides 4 and 8)."""
        x = self.patch_embed1(x)
        for i, blk in enumerate(self.blocks1):
            x = self._run(blk, x, stage=0, index=i)
        s1 = x
        x = self.patch_embed2(x)
        for i, blk in enumerate(self.blocks2):
            x = self._run(blk, x, stage=1, index=i)
        return s1, x

    def forward_overview(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Base-Net stage 3 (stride 16) and the Overview-Net (stride 32): features and the context prior."""
        x = self.patch_embed3(x)
        for i, blk in enumerate(self.blocks3):
            x = self._run(blk, x, stage=2, index=i)
        ctx = self.patch_embed4(x)
        for i, blk in enumerate(self.blocks4):
            ctx = self._run(blk, ctx, stage=3, index=i)
        return x, ctx

    def forward_base(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Base-Net and Overview-Net: stage-1, stage-2 and stage-3 features, and the context prior."""
        s1, s2 = self.forward_pre(x)
        x, ctx = self.forward_overview(s2)
        return s1, s2, x, ctx

    def forward_focus(self, x: torch.Tensor, ctx_prior: torch.Tensor, stop_after_stride16: bool = False):
        """Focus-Net guided by the context prior: stride-16 output (features and context) and final features
        (only the former with ``stop_after_stride16``)."""
        ctx_ori = self.high_level_proj(ctx_prior)
        ctx_up = F.interpolate(ctx_ori, size=x.shape[2:], mode="bilinear", align_corners=False)
        ctx = ctx_up
        for i, blk in enumerate(self.sub_blocks3):
            x, ctx = self._run(blk, x, ctx, ctx_up, stage=2, index=i)
        s3 = torch.cat([x, ctx], dim=1)
        if stop_after_stride16:
            return (s3,)
        x, ctx = self.patch_embedx(x, ctx)
        for i, blk in enumerate(self.sub_blocks4):
            x, ctx = self._run(blk, x, ctx, ctx_ori, stage=3, index=i)
        return s3, x

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """The four feature maps (strides 4, 8, 16, 32) for ``features_only`` and dense tasks.

        ``indices``: the last ``n`` maps (int) or a list of indices. ``stop_early`` runs the network only as far
        as the last requested map (stride 4/8: Base-Net stages 1-2; stride 16: the Focus-Net's first half, which
        needs the Overview-Net's context prior). OverLoCK has no final norm layer, so ``norm=True`` is refused
        (the dense backbones, ``create_dense_backbone``, give the normalised maps of the official dense code).
        """
        if output_fmt != "NCHW":
            raise ValueError("OverLoCK intermediates are NCHW only")
        if norm:
            raise ValueError("OverLoCK has no final norm layer to apply (norm=True); the official dense backbones "
                             "normalise each map: overlock.create_dense_backbone(name, kind=...)")
        take, last = _take_indices(4, indices)
        stop = last if stop_early or intermediates_only else 3
        s1, s2 = self.forward_pre(x)
        feats = [s1, s2]
        if stop >= 2:
            x3, ctx = self.forward_overview(s2)
            feats += list(self.forward_focus(x3, ctx, stop_after_stride16=stop == 2))
        intermediates = [feats[i] for i in take]
        if intermediates_only:
            return intermediates
        return feats[-1], intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """Drop the heads (``prune_head``); returns the feature indices ``indices`` selects."""
        if prune_head:
            self.reset_classifier(0, "")
            if self.has_aux_head:
                del self.aux_head
        return _take_indices(4, indices)[0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final Focus-Net features (with context channels), before the head: ``(B, num_features, H/32, W/32)``."""
        return self.forward_features_and_context(x)[0]

    def forward_features_and_context(self, x: torch.Tensor):
        """Final features and the Overview-Net context prior (the auxiliary head's input)."""
        _, _, x, ctx = self.forward_base(x)
        _, x = self.forward_focus(x, ctx)
        return x, ctx

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head[:4](x)  # 1x1, BN, SiLU, pool
        if self.drop_rate > 0.:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        if pre_logits:
            return x.flatten(1) if self.global_pool else x
        x = self.head[4](x)
        return x.flatten(1) if self.global_pool else x

    def forward_aux_head(self, ctx: torch.Tensor) -> torch.Tensor:
        """Auxiliary (deep-supervision) logits from the context prior; needs ``use_ds=True``."""
        if not self.has_aux_head:
            raise RuntimeError("this model has no auxiliary head: create it with use_ds=True "
                               "(timm.create_model(name, use_ds=True)) to train with deep supervision")
        return self.aux_head(ctx).flatten(1)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        x, ctx = self.forward_features_and_context(x)
        logits = self.forward_head(x)
        if return_aux:
            return logits, self.forward_aux_head(ctx)
        return logits
