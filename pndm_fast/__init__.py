"""pndm_fast: PNDM sampling (Liu et al., ICLR 2022), reproduced number for number and made fast."""

from .config import load_config
from .errors import UserError
from .schedule import Schedule

__all__ = ["load_config", "Schedule", "UserError"]
