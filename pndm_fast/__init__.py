"""pndm_fast: PNDM sampling (Liu et al., ICLR 2022), reproduced number for number and made fast."""

from .config import load_config
from .errors import UserError
from .models import build_model, load_checkpoint
from .ops import lincomb
from .adapters import Denoiser
from .grids import make_grid
from .methods import METHODS, build_plan
from .pretrained import pretrained, pretrained_names
from .sampling import sample, set_cache_limit
from .schedule import Schedule

__all__ = ["load_config", "build_model", "load_checkpoint", "Schedule", "sample", "build_plan", "lincomb",
           "UserError", "set_cache_limit", "Denoiser", "make_grid", "METHODS", "pretrained", "pretrained_names"]
