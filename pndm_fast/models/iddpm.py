"""The improved-DDPM UNet (openai/improved-diffusion `unet.py`, as vendored by the PNDM reference), used by
the paper's iDDPM cifar10 config.

Module names follow the reference (`time_embed.{0,2}`, `input_blocks.*`, `middle_block.*`,
`output_blocks.*`, `out.{0,2}`), including the Sequential indices that hold no parameters (SiLU, Dropout),
so that the published checkpoint loads with strict keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ddim import lowest_level_problem


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) in float32, [cos | sin] with freq_k = exp(-ln(1e4) k / half).

    Float32 whatever t's dtype, as the reference computes it; built in forward rather than kept as a buffer
    because `model.to(bfloat16)` would cast a buffer.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000) / half))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in at least float32, then cast back: the reference's GroupNorm32 for fp32 and
    half types; a float64 model keeps float64 (float32 there would throw away the precision it was cast for)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.group_norm(x.to(dtype), 32, self.weight.to(dtype), self.bias.to(dtype), self.eps).to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters at init (the reference does this for every last conv of a residual branch)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class ResBlock(nn.Module):
    """in_layers (norm, SiLU, conv 3x3); + emb_layers(emb), as scale-shift of the second norm when
    use_scale_shift_norm: h = norm(h) (1 + scale) + shift; out_layers (norm, SiLU, dropout, zero conv 3x3);
    skip: identity, or 1x1 conv when the channel count changes. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int, use_scale_shift_norm: bool):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm, *rest = self.out_layers  # unpacked rather than sliced: a slice builds a new Sequential per call
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = norm(h) * (1 + scale) + shift
        else:
            h = norm(h + emb_out)
        for layer in rest:
            h = layer(h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual. (B, C, H, W) -> (B, C, H, W).

    qkv is a Conv1d(C, 3C, 1) whose 3C output channels are grouped per head as [q | k | v] blocks of C/heads
    channels each (the reference's "legacy" order); head outputs are concatenated head-major.
    """

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        # Work on tokens (B, T, C): a view of channels_last activations, and the 1x1 Conv1d become matmuls.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)
        qkv = qkv.unflatten(2, (self.num_heads, 3, c // self.num_heads)).permute(3, 0, 2, 1, 4)
        # The reference scales q and k by ch^-1/4 each: the same as SDPA's default 1/sqrt(ch).
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, T, C/heads)
        out = F.linear(out.transpose(1, 2).flatten(2), self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(b, c, height, width)


class Downsample(nn.Module):
    """Halve H and W: conv 3x3 stride 2 pad 1 (`op`), or 2x2 average pool without conv."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W by nearest neighbour, then an optional conv 3x3."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class IDDPMUNet(nn.Module):
    """forward(x (B, in_channels, H, W), t (B,) float) -> (B, out_channels, H, W); with learned sigma
    out_channels = 2 in_channels and the first `out_channels_eps` channels are eps.
    H and W must be divisible by 2 ** (len(channel_mult) - 1).

    forward(x, t, eps_only=True) -> (B, out_channels_eps, H, W): the eps channels alone, computed by the last
    conv with the first out_channels_eps rows of its weight and bias, so a sampler gets a dense eps without
    computing (half of the last conv) or copying (a strided slice) the sigma half.
    """

    eps_only_supported = True

    # The blocks torch.compile compiles one by one (see pndm_fast.compilation.compiled): compiling the whole UNet
    # let inductor fuse across blocks and drift to 2.5x the float32 reference's error over a sampling run.
    compile_regions = (ResBlock, AttentionBlock, Downsample, Upsample)

    def __init__(
        self,
        *,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions,
        dropout: float,
        channel_mult,
        conv_resample: bool,
        use_scale_shift_norm: bool,
        num_heads: int,
        num_heads_upsample: int,
        image_size: int | None = None,
    ):
        super().__init__()
        self.model_channels = model_channels
        self.out_channels_eps = in_channels
        self.image_size = image_size
        self.num_downsamples = len(channel_mult) - 1
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res_block(ch_in, ch_out):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm)

        # ds is the downsampling rate of the current level; attention_resolutions lists rates, not sizes.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), AttentionBlock(ch, num_heads), res_block(ch, ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    # num_heads_upsample as written: the reference drops its "-1 means num_heads" rule
                    layers.append(AttentionBlock(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )

    def time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B,) float timesteps -> (B, 4 C): sinusoid in float32, cast, then Linear -> SiLU -> Linear."""
        return self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor, eps_only: bool = False) -> torch.Tensor:
        factor = 2**self.num_downsamples
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"iDDPM model expects H and W divisible by {factor}, got {x.shape[2]}x{x.shape[3]}")
        # The reference casts x to float32 here; casting to the parameters' dtype is the same for fp32
        # and lets the model run in float64 or bf16.
        dtype = self.out[2].weight.dtype
        emb = self.time_embedding(t, dtype)
        h = x.to(dtype)
        hs = []
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        norm, act, conv = self.out
        if not eps_only or conv.out_channels == self.out_channels_eps:
            return conv(act(norm(h)))
        c = self.out_channels_eps
        # Slices of the parameters are views: nothing is copied, and a loaded checkpoint is seen as it is.
        return F.conv2d(act(norm(h)), conv.weight[:c], conv.bias[:c], padding=conv.padding)

    def input_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why this network cannot take a (B, C, H, W) input of `shape`, or None: C = in_channels and H, W divisible
        by 2 ** levels, any size, since each level halves them and the up path must meet its skips."""
        batch, channels, height, width = shape
        if channels != self.out_channels_eps:
            return (f"the model takes {self.out_channels_eps} channels (Model.in_channels), the noise has "
                    f"{channels}; draw noise of shape (batch, {self.out_channels_eps}, H, W)")
        return lowest_level_problem(batch, height, width, self.num_downsamples)
