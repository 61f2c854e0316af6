"""PyTorch reference of the original FGD `FeatureLoss` (yzd-v/FGD, mmdet 2.11), NCHW.

A line-by-line re-statement of the original's semantics, used by `tests/test_fgd.py` (parity)
and `benchmarks/fgd_loss.py` (timing): the same per-image, per-box Python loops with the same
slicing `[hmin:hmax+1, wmin:wmax+1]` (negative starts included), the same operation order,
the same sqrt-weighted MSE sums and the same initialization (mmcv's `kaiming_init(mode=
'fan_in')`, `constant_init(val=0)` written out here, so mmcv is not needed). The only change:
`forward` returns the unweighted parts beside the weighted total, for the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mmcv_kaiming_fan_in(module: nn.Conv2d) -> None:
    # mmcv.cnn.kaiming_init(module, mode='fan_in'): a=0, nonlinearity='relu', normal, bias=0.
    nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in", nonlinearity="relu")
    nn.init.constant_(module.bias, 0)


def _mmcv_constant_zero(module: nn.Conv2d) -> None:
    # mmcv.cnn.constant_init(module, val=0): weight and bias 0.
    nn.init.constant_(module.weight, 0)
    nn.init.constant_(module.bias, 0)


def _channel_add_branch(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels // 2, kernel_size=1),
        nn.LayerNorm([channels // 2, 1, 1]),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels // 2, channels, kernel_size=1),
    )


class FeatureLossReference(nn.Module):
    """The original FGD loss of one level. `forward(preds_S, preds_T, gt_bboxes, img_metas)`:
    preds [N, C, H, W]; gt_bboxes a list of [n_i, 4] xyxy tensors; img_metas a list of dicts
    with 'img_shape' (h, w, ...). Returns dict(loss, fg, bg, mask, relation)."""

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        temp: float = 0.5,
        alpha_fgd: float = 0.001,
        beta_fgd: float = 0.0005,
        gamma_fgd: float = 0.001,
        lambda_fgd: float = 0.000005,
    ):
        super().__init__()
        self.temp = temp
        self.alpha_fgd = alpha_fgd
        self.beta_fgd = beta_fgd
        self.gamma_fgd = gamma_fgd
        self.lambda_fgd = lambda_fgd
        self.align = (
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1, padding=0)
            if student_channels != teacher_channels
            else None
        )
        self.conv_mask_s = nn.Conv2d(teacher_channels, 1, kernel_size=1)
        self.conv_mask_t = nn.Conv2d(teacher_channels, 1, kernel_size=1)
        self.channel_add_conv_s = _channel_add_branch(teacher_channels)
        self.channel_add_conv_t = _channel_add_branch(teacher_channels)
        _mmcv_kaiming_fan_in(self.conv_mask_s)
        _mmcv_kaiming_fan_in(self.conv_mask_t)
        _mmcv_constant_zero(self.channel_add_conv_s[-1])
        _mmcv_constant_zero(self.channel_add_conv_t[-1])

    # ------------------------------------------------------------------------------ masks
    @staticmethod
    def masks(
        gt_bboxes: list[torch.Tensor], img_metas: list[dict], like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask_fg, Mask_bg [N, H, W] with the original's loops; `like` is S_attention_t."""
        n, h, w = like.shape
        mask_fg = torch.zeros_like(like)
        mask_bg = torch.ones_like(like)
        for i in range(n):
            img_h, img_w = img_metas[i]["img_shape"][0], img_metas[i]["img_shape"][1]
            scaled = torch.ones_like(gt_bboxes[i])
            scaled[:, 0] = gt_bboxes[i][:, 0] / img_w * w
            scaled[:, 2] = gt_bboxes[i][:, 2] / img_w * w
            scaled[:, 1] = gt_bboxes[i][:, 1] / img_h * h
            scaled[:, 3] = gt_bboxes[i][:, 3] / img_h * h
            wmin = torch.floor(scaled[:, 0]).int()
            wmax = torch.ceil(scaled[:, 2]).int()
            hmin = torch.floor(scaled[:, 1]).int()
            hmax = torch.ceil(scaled[:, 3]).int()
            area = (
                1.0
                / (hmax.view(1, -1) + 1 - hmin.view(1, -1))
                / (wmax.view(1, -1) + 1 - wmin.view(1, -1))
            )
            for j in range(len(gt_bboxes[i])):
                rows = slice(int(hmin[j]), int(hmax[j]) + 1)
                cols = slice(int(wmin[j]), int(wmax[j]) + 1)
                mask_fg[i][rows, cols] = torch.maximum(mask_fg[i][rows, cols], area[0][j])
            mask_bg[i] = torch.where(mask_fg[i] > 0, 0, 1)
            if torch.sum(mask_bg[i]):
                mask_bg[i] /= torch.sum(mask_bg[i])
        return mask_fg, mask_bg

    # -------------------------------------------------------------------------- forward
    def forward(self, preds_S, preds_T, gt_bboxes, img_metas) -> dict[str, torch.Tensor]:
        assert preds_S.shape[-2:] == preds_T.shape[-2:]
        if self.align is not None:
            preds_S = self.align(preds_S)
        S_t, C_t = self.get_attention(preds_T, self.temp)
        S_s, C_s = self.get_attention(preds_S, self.temp)
        mask_fg, mask_bg = self.masks(gt_bboxes, img_metas, S_t)
        fg_loss, bg_loss = self.get_fea_loss(preds_S, preds_T, mask_fg, mask_bg, C_t, S_t)
        mask_loss = self.get_mask_loss(C_s, C_t, S_s, S_t)
        rela_loss = self.get_rela_loss(preds_S, preds_T)
        loss = (
            self.alpha_fgd * fg_loss
            + self.beta_fgd * bg_loss
            + self.gamma_fgd * mask_loss
            + self.lambda_fgd * rela_loss
        )
        return dict(loss=loss, fg=fg_loss, bg=bg_loss, mask=mask_loss, relation=rela_loss)

    @staticmethod
    def get_attention(preds, temp):
        N, C, H, W = preds.shape
        value = torch.abs(preds)
        fea_map = value.mean(axis=1, keepdim=True)
        S_attention = (H * W * F.softmax((fea_map / temp).view(N, -1), dim=1)).view(N, H, W)
        channel_map = value.mean(axis=2, keepdim=False).mean(axis=2, keepdim=False)
        C_attention = C * F.softmax(channel_map / temp, dim=1)
        return S_attention, C_attention

    @staticmethod
    def get_fea_loss(preds_S, preds_T, Mask_fg, Mask_bg, C_t, S_t):
        mse = nn.MSELoss(reduction="sum")
        Mask_fg = Mask_fg.unsqueeze(dim=1)
        Mask_bg = Mask_bg.unsqueeze(dim=1)
        C_t = C_t.unsqueeze(dim=-1).unsqueeze(dim=-1)
        S_t = S_t.unsqueeze(dim=1)
        fea_t = torch.mul(torch.mul(preds_T, torch.sqrt(S_t)), torch.sqrt(C_t))
        fg_fea_t = torch.mul(fea_t, torch.sqrt(Mask_fg))
        bg_fea_t = torch.mul(fea_t, torch.sqrt(Mask_bg))
        fea_s = torch.mul(torch.mul(preds_S, torch.sqrt(S_t)), torch.sqrt(C_t))
        fg_fea_s = torch.mul(fea_s, torch.sqrt(Mask_fg))
        bg_fea_s = torch.mul(fea_s, torch.sqrt(Mask_bg))
        fg_loss = mse(fg_fea_s, fg_fea_t) / len(Mask_fg)
        bg_loss = mse(bg_fea_s, bg_fea_t) / len(Mask_bg)
        return fg_loss, bg_loss

    @staticmethod
    def get_mask_loss(C_s, C_t, S_s, S_t):
        return torch.sum(torch.abs(C_s - C_t)) / len(C_s) + torch.sum(torch.abs(S_s - S_t)) / len(
            S_s
        )

    def spatial_pool(self, x, in_type):
        batch, channel, height, width = x.size()
        input_x = x.view(batch, channel, height * width).unsqueeze(1)  # [N, 1, C, HW]
        conv = self.conv_mask_s if in_type == 0 else self.conv_mask_t
        context_mask = conv(x).view(batch, 1, height * width)
        context_mask = F.softmax(context_mask, dim=2).unsqueeze(-1)  # [N, 1, HW, 1]
        context = torch.matmul(input_x, context_mask)  # [N, 1, C, 1]
        return context.view(batch, channel, 1, 1)

    def get_rela_loss(self, preds_S, preds_T):
        mse = nn.MSELoss(reduction="sum")
        out_s = preds_S + self.channel_add_conv_s(self.spatial_pool(preds_S, 0))
        out_t = preds_T + self.channel_add_conv_t(self.spatial_pool(preds_T, 1))
        return mse(out_s, out_t) / len(out_s)
