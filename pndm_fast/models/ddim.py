"""The DDPM UNet as ported to PyTorch for DDIM (ermongroup/ddim `models/diffusion.py`), used by the paper's
DDIM configs (cifar10, celeba, church, bedroom).

Module names and nesting follow the reference exactly, so that the published checkpoints load with strict
keys (`temb.dense.{0,1}`, `down.{i}.block.{j}`, `mid.attn_1`, `up.{i}.upsample.conv`, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) in float32, [sin | cos] with freq_k = exp(-k ln(1e4) / (half - 1)).

    Always float32, whatever t's dtype, because the reference computes it so (`timesteps.float()`); the f64
    golden runs depend on it. The frequencies are built here rather than kept as a buffer, because
    `model.to(bfloat16)` would cast a buffer and the embedding must stay float32.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm1, swish, conv1, + temb_proj(swish(temb)), norm2, swish, dropout, conv2, plus a 1x1 shortcut
    (`nin_shortcut`) when the channel count changes. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = h + self.temb_proj(swish(temb))[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, softmax(q.k / sqrt(C)), with a residual.
    (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(y):  # (B, C, H, W) -> (B, 1, H*W, C): one head; a view when the input is channels_last
            return y.flatten(2).transpose(1, 2).unsqueeze(1)

        # SDPA's default scale is 1/sqrt(C), the reference's; it picks a fused kernel on GPU.
        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: pad right and bottom by one then a stride-2 3x3 conv (the TF port's asymmetric
    padding), or a 2x2 average pool without conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W by nearest neighbour, then an optional 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class DDIMUNet(nn.Module):
    """forward(x (B, in_channels, S, S), t (B,) float) -> (B, out_ch, S, S), S = Model.image_size."""

    # The blocks torch.compile compiles one by one (see pndm_fast.compilation.compiled): compiling the whole UNet
    # let inductor fuse across blocks and drift to 2.5x the float32 reference's error over a sampling run.
    compile_regions = (ResnetBlock, AttnBlock, Downsample, Upsample)

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult,
        num_res_blocks: int,
        attn_resolutions,
        dropout: float,
        in_channels: int,
        image_size: int,
        resamp_with_conv: bool,
        bayesian: bool = False,
        num_classes: int = 0,
    ):
        super().__init__()
        ch_mult = tuple(ch_mult)
        self.ch = ch
        self.image_size = image_size
        self.out_channels_eps = in_channels
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        temb_ch = 4 * ch
        if bayesian:  # the reference's `type: bayesian` learns a per-step log variance
            self.logvar = nn.Parameter(torch.zeros(1000))

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        # Model.num_classes > 0: one learned vector per class plus a last one, index num_classes, for "no class"
        # (the null label that classifier-free guidance needs), added to the time embedding. 0 adds no key.
        self.num_classes = num_classes
        if num_classes:
            self.class_emb = nn.Embedding(num_classes + 1, temb_ch)

        def level(blocks, attn_channels):
            module = nn.Module()
            module.block = nn.ModuleList(blocks)
            module.attn = nn.ModuleList(AttnBlock(c) for c in attn_channels)
            return module

        res = image_size
        in_ch_mult = (1,) + ch_mult
        block_in = ch
        self.down = nn.ModuleList()
        for i in range(self.num_resolutions):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i], temb_ch, dropout))
                block_in = ch * ch_mult[i]
            down = level(blocks, [block_in] * num_res_blocks if res in attn_resolutions else [])
            if i != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, dropout)

        up_levels = []
        for i in reversed(range(self.num_resolutions)):
            blocks = []
            for j in range(num_res_blocks + 1):
                # the last block of a level takes the skip that entered the level (before its first block)
                skip_in = ch * (in_ch_mult[i] if j == num_res_blocks else ch_mult[i])
                blocks.append(ResnetBlock(block_in + skip_in, ch * ch_mult[i], temb_ch, dropout))
                block_in = ch * ch_mult[i]
            up = level(blocks, [block_in] * (num_res_blocks + 1) if res in attn_resolutions else [])
            if i != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            up_levels.insert(0, up)  # up[i] is the level at resolution image_size / 2**i, like down[i]
        self.up = nn.ModuleList(up_levels)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B,) float timesteps -> (B, 4 ch): sinusoid in float32, cast, then dense0 -> swish -> dense1."""
        temb = timestep_embedding(t, self.ch).to(dtype)
        return self.temb.dense[1](swish(self.temb.dense[0](temb)))

    def class_embedding(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) labels in [0, num_classes], num_classes (or y=None) being the null class -> (B, 4 ch)."""
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if y.dtype != torch.long or y.shape != (batch,):
            raise ValueError(f"class labels must be a LongTensor of shape ({batch},), got {y.dtype} "
                             f"{tuple(y.shape)}")
        # no range check here: it would read the labels back from the device on every call (a CUDA graph
        # cannot); nn.Embedding itself refuses an index outside [0, num_classes]
        return self.class_emb(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """y: class labels (B,) for a model with Model.num_classes, None for the null class; None otherwise."""
        if x.shape[2] != self.image_size or x.shape[3] != self.image_size:
            raise ValueError(
                f"DDIM model expects {self.image_size}x{self.image_size} inputs (Model.image_size), "
                f"got {x.shape[2]}x{x.shape[3]}"
            )
        dtype = self.conv_in.weight.dtype
        temb = self.time_embedding(t, dtype)
        if self.num_classes:
            temb = temb + self.class_embedding(y, x.shape[0], x.device).to(dtype)
        elif y is not None:
            raise ValueError("this model has no class embedding (Model.num_classes is 0): call it without labels")

        hs = [self.conv_in(x.to(dtype))]
        for i, down in enumerate(self.down):
            for j, block in enumerate(down.block):
                h = block(hs[-1], temb)
                if len(down.attn) > 0:
                    h = down.attn[j](h)
                hs.append(h)
            if i != self.num_resolutions - 1:
                hs.append(down.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for i in reversed(range(self.num_resolutions)):
            up = self.up[i]
            for j, block in enumerate(up.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(up.attn) > 0:
                    h = up.attn[j](h)
            if i != 0:
                h = up.upsample(h)

        return self.conv_out(swish(self.norm_out(h)))

    def input_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why this network cannot take a (B, C, H, W) input of `shape`, or None: C = Model.in_channels and
        H = W = Model.image_size exactly (the attention levels are placed by resolution at build time)."""
        batch, channels, height, width = shape
        if channels != self.out_channels_eps:
            return (f"the model takes {self.out_channels_eps} channels (Model.in_channels), the noise has "
                    f"{channels}; draw noise of shape (batch, {self.out_channels_eps}, H, W)")
        if (height, width) != (self.image_size, self.image_size):
            size = self.image_size
            return (f"the DDIM model takes {size}x{size} images (Model.image_size), the noise is {height}x{width}; "
                    f"draw noise of shape (batch, {channels}, {size}, {size})")
        return lowest_level_problem(batch, height, width, self.num_resolutions - 1)


def lowest_level_problem(batch: int, height: int, width: int, halvings: int) -> str | None:
    """H and W must halve `halvings` times exactly, and one image alone must not shrink to 1x1: torch's group_norm
    refuses a batch whose every channel holds a single value (batch x H x W == 1)."""
    factor = 2**halvings
    if height % factor or width % factor:
        return (f"the model halves H and W {halvings} times, so both must be multiples of {factor}; the noise is "
                f"{height}x{width}")
    if batch * (height // factor) * (width // factor) == 1:
        return (f"one {height}x{width} image reaches 1x1 at the model's lowest level, where GroupNorm needs more "
                "than one value per channel; sample at least 2 images at once")
    return None
