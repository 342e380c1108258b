"""The paper's DDIM UNet (pndm_fast/models/ddim.py) in diffusers' `UNet2DModel` layout and back.

They are the same network (the DDPM UNet; diffusers' google/ddpm-* models are it), named and stored differently:

| paper (ddim.py)                  | diffusers UNet2DModel                              |
|----------------------------------|----------------------------------------------------|
| temb.dense.0 / .1                | time_embedding.linear_1 / linear_2                 |
| down.i.block.j (temb_proj, nin_shortcut) | down_blocks.i.resnets.j (time_emb_proj, conv_shortcut) |
| down.i.attn.j (norm, q, k, v, proj_out)  | down_blocks.i.attentions.j (group_norm, to_q, to_k, to_v, to_out.0) |
| down.i.downsample.conv           | down_blocks.i.downsamplers.0.conv                  |
| mid.block_1, mid.attn_1, mid.block_2 | mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1 |
| up.i.* (up[i] at resolution S / 2**i) | up_blocks.(L-1-i).* (listed from the lowest resolution up) |
| up.i.upsample.conv               | up_blocks.(L-1-i).upsamplers.0.conv                |
| norm_out, conv_out, conv_in      | conv_norm_out, conv_out, conv_in                   |
| class_emb (num_classes + 1 rows, the last the null class) | class_embedding (num_class_embeds rows) |

The attention projections are 1x1 convolutions in the paper, weights (C, C, 1, 1), and Linear layers in
diffusers, weights (C, C): the same matrix. Older diffusers files name them query, key, value and proj_attn;
those are read too. Everything else matches without change once diffusers is configured as below: the time
embedding is [sin | cos] (flip_sin_to_cos false) with frequencies exp(-k ln 1e4 / (half - 1)) (freq_shift 1),
the downsampling pads right and bottom by one before its stride-2 conv (downsample_padding 0), GroupNorm has 32
groups and eps 1e-6, one attention head of all C channels (attention_head_dim null), and the up path concatenates
[h, skip] with the skips taken last-in first-out in both. Every DDIM Model section of the paper's configs (cifar10,
celeba, church, bedroom) has this form; what diffusers' UNet2DModel cannot express is refused with one line:
`resamp_with_conv: false` (diffusers' UNet2DModel always resamples with a conv) and `type: bayesian` (a learned
per-step variance, `logvar`, that it has no place for). The iDDPM UNet is another network (multi-head attention
over a fused qkv, scale-shift norm), not mapped here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping

import torch

from ..atomic import atomic_file
from ..errors import UserError
from .diffusers_folder import CONFIG, WEIGHTS, modern_attention_names, read_diffusers_folder
from .checkpoint import (
    check_state_dict,
    read_state_dict,
    strip_data_parallel_prefix,
    write_new_checkpoint,
    write_state_dict,
)

CLASS_NAME = "UNet2DModel"
# diffusers' UNet2DModel settings that make it the paper's network; from_diffusers_config refuses others
FIXED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
}
RESNET = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut"}
ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
TOP_LEVEL = {"norm_out": "conv_norm_out", "class_emb": "class_embedding"}
PROJECTIONS = ("q", "k", "v", "proj_out")  # 1x1 convs in the paper, Linear in diffusers


def _rename(part: str, table: dict[str, str]) -> str:
    head, _, tail = part.partition(".")
    return f"{table.get(head, head)}.{tail}"


def diffusers_key(key: str, levels: int) -> str:
    """The diffusers name of the paper's state-dict key `key`, in a UNet of `levels` resolutions."""
    m = re.fullmatch(r"temb\.dense\.([01])\.(\w+)", key)
    if m:
        return f"time_embedding.linear_{int(m[1]) + 1}.{m[2]}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key)
    if m:
        side, level, kind, index, rest = m.groups()
        block = f"down_blocks.{level}" if side == "down" else f"up_blocks.{levels - 1 - int(level)}"
        if kind == "block":
            return f"{block}.resnets.{index}.{_rename(rest, RESNET)}"
        return f"{block}.attentions.{index}.{_rename(rest, ATTENTION)}"
    m = re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(\w+)", key)
    if m:
        return f"down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    m = re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(\w+)", key)
    if m:
        return f"up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    m = re.fullmatch(r"mid\.(block_1|attn_1|block_2)\.(.+)", key)
    if m:
        where = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}[m[1]]
        return f"mid_block.{where}.{_rename(m[2], ATTENTION if m[1] == 'attn_1' else RESNET)}"
    m = re.fullmatch(r"(norm_out|conv_out|conv_in|class_emb)\.(\w+)", key)
    if m:
        return f"{TOP_LEVEL.get(m[1], m[1])}.{m[2]}"
    raise UserError(f"the paper's key {key!r} has no counterpart in diffusers' UNet2DModel "
                    "(a bayesian model's logvar has none)")


def _is_projection_weight(paper_key: str) -> bool:
    return re.fullmatch(rf".*\.(attn\.\d+|attn_1)\.({'|'.join(PROJECTIONS)})\.weight", paper_key) is not None


def _model_section(model: Mapping) -> dict:
    """The Model keys the layout depends on, checked for what diffusers can express."""
    if model.get("struc") != "DDIM":
        raise UserError(f"only the DDIM UNet has a diffusers UNet2DModel layout; Model.struc is "
                        f"{model.get('struc')!r} (the iDDPM UNet is another network)")
    if not model.get("resamp_with_conv", True):
        raise UserError("Model.resamp_with_conv is false (average-pool down, plain nearest up): diffusers' "
                        "UNet2DModel always resamples with a conv, so this model has no diffusers layout")
    if model.get("type") == "bayesian":
        raise UserError("Model.type is bayesian: its learned per-step variance (logvar) has no place in "
                        "diffusers' UNet2DModel")
    return model


def to_diffusers_config(model: Mapping) -> dict:
    """The UNet2DModel config (as its config.json holds it) of the paper's DDIM `Model` section."""
    model = _model_section(model)
    size, mults = int(model["image_size"]), list(model["ch_mult"])
    attn = [size // 2**i in model["attn_resolutions"] for i in range(len(mults))]
    num_classes = int(model.get("num_classes") or 0)
    return {
        "_class_name": CLASS_NAME,
        "sample_size": size,
        "in_channels": int(model["in_channels"]),
        "out_channels": int(model["out_ch"]),
        "block_out_channels": [int(model["ch"]) * m for m in mults],
        "layers_per_block": int(model["num_res_blocks"]),
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2D",
        "dropout": float(model.get("dropout", 0.0)),
        "attention_head_dim": None,  # one head of all channels at every level
        "attn_norm_num_groups": None,
        "time_embedding_dim": None,  # 4 x block_out_channels[0], the paper's 4 ch
        "class_embed_type": None,
        "num_class_embeds": num_classes + 1 if num_classes else None,
        "num_train_timesteps": None,
        **FIXED,
    }


def from_diffusers_config(config: Mapping, where: str = "diffusers config") -> dict:
    """The paper's DDIM Model section of a UNet2DModel config, or a one-line UserError naming the setting that
    makes it another network. A num_class_embeds of N becomes num_classes N - 1: the last class is the null one."""
    if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise UserError(f"{where} describes a {config.get('_class_name')}, not a {CLASS_NAME}: only diffusers' "
                        f"{CLASS_NAME} has the paper's DDIM layout")
    for key, value in FIXED.items():
        if key in config and config[key] != value:
            raise UserError(f"{where} has {key}: {config[key]!r}; the paper's DDIM UNet needs {value!r}, so this "
                            "model has no DDIM layout")
    missing = [k for k in ("freq_shift", "flip_sin_to_cos", "downsample_padding", "norm_eps") if k not in config]
    if missing:  # diffusers' own defaults for these (0, true, 1, 1e-5) are not the paper's
        raise UserError(f"{where} does not set {', '.join(missing)}; diffusers' defaults differ from the paper's "
                        f"DDIM UNet ({', '.join(f'{k}: {FIXED[k]!r}' for k in missing)})")
    channels = [int(c) for c in config["block_out_channels"]]
    ch = channels[0]
    if any(c % ch for c in channels):
        raise UserError(f"{where} has block_out_channels {channels}: the paper's ch_mult needs multiples of the "
                        f"first, {ch}")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    kinds = {"DownBlock2D": False, "AttnDownBlock2D": True}
    up_kinds = {"UpBlock2D": False, "AttnUpBlock2D": True}
    if any(d not in kinds for d in down) or any(u not in up_kinds for u in up) or len(up) != len(down):
        raise UserError(f"{where} has down_block_types {down} and up_block_types {up}: the paper's DDIM UNet has "
                        "only (Attn)DownBlock2D / (Attn)UpBlock2D, as many up as down")
    attn = [kinds[d] for d in down]
    if [up_kinds[u] for u in reversed(up)] != attn:
        raise UserError(f"{where} has attention at other levels on the way up ({up}) than down ({down}); the "
                        "paper's DDIM UNet has it at the same resolutions both ways")
    heads = config.get("attention_head_dim")
    attention_channels = {c for c, a in zip(channels, attn) if a} | {channels[-1]}  # the middle block has one
    if heads is not None and attention_channels != {heads}:
        raise UserError(f"{where} has attention_head_dim: {heads!r}, so more than one attention head; the paper's "
                        f"DDIM UNet has one head of all channels ({sorted(attention_channels)})")
    for key, allowed in (("attn_norm_num_groups", (None, 32)), ("time_embedding_dim", (None, 4 * ch)),
                         ("class_embed_type", (None,)), ("mid_block_type", ("UNetMidBlock2D",))):
        if config.get(key, allowed[0]) not in allowed:
            raise UserError(f"{where} has {key}: {config[key]!r}; the paper's DDIM UNet needs "
                            f"{' or '.join(repr(a) for a in allowed)}")
    size = config["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise UserError(f"{where} has sample_size {size}: the paper's DDIM UNet takes square images")
        size = size[0]
    num_class_embeds = config.get("num_class_embeds")
    model = {
        "struc": "DDIM",
        "type": "simple",
        "image_size": int(size),
        "in_channels": int(config["in_channels"]),
        "out_ch": int(config["out_channels"]),
        "ch": ch,
        "ch_mult": [c // ch for c in channels],
        "num_res_blocks": int(config["layers_per_block"]),
        "attn_resolutions": [int(size) // 2**i for i, a in enumerate(attn) if a],
        "dropout": float(config.get("dropout", 0.0)),
        "var_type": "fixedlarge",
        "resamp_with_conv": True,
    }
    if num_class_embeds:
        model["num_classes"] = int(num_class_embeds) - 1
    return model


def _expected_paper_state(model: Mapping) -> dict[str, torch.Tensor]:
    from . import build_model  # late: models/__init__ imports this package's modules

    with torch.device("meta"):  # names and shapes only, no memory, even for the 256x256 UNets
        return build_model({"Model": dict(model)}).state_dict()


def to_diffusers(state: Mapping[str, torch.Tensor], model: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """(diffusers state dict, UNet2DModel config) of a paper-layout DDIM state dict and its Model section.
    Tensors keep their dtype and values; the attention projections lose their trailing 1x1."""
    model = _model_section(model)
    config = to_diffusers_config(model)
    expected = _expected_paper_state(model)
    _check(state, expected, "the paper's checkpoint")
    levels = len(model["ch_mult"])
    out = {}
    for key in expected:
        value = state[key]
        out[diffusers_key(key, levels)] = value[:, :, 0, 0] if _is_projection_weight(key) else value
    return out, config


def to_paper(state: Mapping[str, torch.Tensor], config: Mapping,
             where: str = "diffusers checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """(paper-layout state dict, Model section) of a UNet2DModel state dict and its config; legacy attention
    names (query, key, value, proj_attn) are accepted. Keys come in the paper model's own order."""
    model = from_diffusers_config(config, where)
    levels = len(model["ch_mult"])
    renamed = modern_attention_names(state)
    expected = _expected_paper_state(model)
    names = {k: diffusers_key(k, levels) for k in expected}
    wanted = {names[k]: (expected[k].shape[:2] if _is_projection_weight(k) else expected[k].shape)
              for k in expected}
    _check(renamed, {k: torch.empty(s, device="meta") for k, s in wanted.items()}, where)
    out = {}
    for key, name in names.items():
        value = renamed[name]
        out[key] = value[:, :, None, None] if _is_projection_weight(key) else value
    return out, model


def _check(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str) -> None:
    check_state_dict(state, expected, where)


def is_folder_path(path: str | None) -> bool:
    """A --model_path / --out_path that names a diffusers model folder rather than a checkpoint file: an
    existing folder, or a name without any suffix (a name with another suffix is refused as a checkpoint)."""
    return bool(path) and (os.path.isdir(path) or os.path.splitext(path)[1] == "")


def write_diffusers_folder(state: Mapping[str, torch.Tensor], config: Mapping, out_path: str) -> None:
    """A diffusers model folder as save_pretrained writes it: diffusion_pytorch_model.safetensors, then
    config.json (last, so that a folder with a config.json is complete). out_path must not exist; it is created
    here (os.mkdir fails if another process made it meanwhile) and removed again if a write fails."""
    try:
        os.mkdir(out_path)
    except FileExistsError:
        raise UserError(f"--out_path {out_path} exists and is not overwritten: remove it or choose another "
                        "name") from None
    except OSError as err:
        raise UserError(f"--out_path {out_path} could not be created ({err.strerror})") from None
    try:
        with atomic_file(os.path.join(out_path, WEIGHTS[0]), exclusive=True) as file:
            write_state_dict(state, file, safetensors=True)
        with atomic_file(os.path.join(out_path, CONFIG), exclusive=True) as file:
            file.write((json.dumps(dict(config), indent=2, sort_keys=True) + "\n").encode("utf-8"))
    except BaseException:
        shutil.rmtree(out_path, ignore_errors=True)
        raise


def convert_layout(model_path: str, out_path: str, model_config: dict | None) -> dict:
    """--runner convert between layouts: a diffusers model folder (model_path) to a paper-layout checkpoint
    (out_path .safetensors/.ckpt/.pt/.pth), or a paper-layout checkpoint with its config (model_config, needed:
    the keys alone do not tell attn_resolutions) to a diffusers model folder (out_path). Returns the summary
    convert() returns, plus "model" (the Model section of the paper-layout side)."""
    if os.path.lexists(out_path) and not (os.path.isdir(model_path) and os.path.isdir(out_path)
                                          and os.path.samefile(model_path, out_path)):
        raise UserError(f"--out_path {out_path} exists and is not overwritten: remove it or choose another name")
    if os.path.isdir(model_path):
        if is_folder_path(out_path):
            raise UserError(f"--model_path {model_path} is a diffusers folder, so --out_path must be a "
                            f"checkpoint file (.safetensors, .ckpt, .pt or .pth), not {out_path}")
        config, state = read_diffusers_folder(model_path)
        paper, model = to_paper(state, config, f"diffusers model {model_path}")
        if model_config is not None:  # the result must then load into that config's model
            expected = _expected_paper_state(model_config["Model"])
            check_state_dict(paper, expected, f"diffusers model {model_path}")
        write_new_checkpoint(paper, out_path)
        bytes_in = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(model_path) for n in ns)
        bytes_out = os.path.getsize(out_path)
    else:
        if model_config is None:
            raise UserError(f"writing the diffusers model folder {out_path} needs the checkpoint's --config (its "
                            "Model section says where the attention blocks are)")
        model = model_config["Model"]
        state = read_state_dict(model_path)
        paper = strip_data_parallel_prefix(state, _expected_paper_state(_model_section(model)))
        converted, config = to_diffusers(paper, model)
        write_diffusers_folder(converted, config, out_path)
        bytes_in = os.path.getsize(model_path)
        bytes_out = sum(os.path.getsize(os.path.join(out_path, n)) for n in os.listdir(out_path))
    return {"keys": len(paper), "parameters": sum(v.numel() for v in paper.values()), "bytes_in": bytes_in,
            "bytes_out": bytes_out, "model": model}
