"""Fitting drift and diffusion heads on paths, against the OU and Brownian baselines."""

from .baselines import BrownianBaseline, OUBaseline
from .fit import FitResult, fit_heads, fit_heads_distributed, fit_projection
from .heads import SDEHeads, SDEHeadsConfig

__all__ = ["BrownianBaseline", "FitResult", "OUBaseline", "SDEHeads", "SDEHeadsConfig", "fit_heads",
           "fit_heads_distributed", "fit_projection"]
