"""adoptim: the ADOPT optimizer (Taniguchi et al., NeurIPS 2024) for PyTorch."""

from . import reference
from .functional import adopt
from .optimizer import ADOPT, ADOPTW

__version__ = "0.1.0"
__all__ = ["ADOPT", "ADOPTW", "adopt", "reference", "__version__"]
