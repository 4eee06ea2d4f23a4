"""hf-sde: text generation as an SDE on a transformers model's hidden-state path.

Fit drift and diffusion heads on a model's hidden trajectories, analyse them, and use them to
observe and control decoding.
"""

from .baselines import BrownianBaseline, OUBaseline  # noqa: E402
from .control import (  # noqa: E402
    SDEControl,
    SDEGenerateOutput,
    SDEGenerationMixin,
    SDEStep,
    SDETemperatureLogitsProcessor,
    SDETrace,
    disable_sde_control,
    enable_sde_control,
    sde_generate,
    sde_hooks,
)
from .corpus import TEMPLATES, load_texts  # noqa: E402
from .fitting import FitResult, fit_heads, fit_projection  # noqa: E402
from .heads import SDEHeads, SDEHeadsConfig  # noqa: E402
from .layers import decoder_layers, resolve_layer  # noqa: E402
from .loading import load_model  # noqa: E402
from .report import build_report  # noqa: E402
from .simulate import BaselineSDE, simulate  # noqa: E402
from .trajectories import Trajectories, extract_from_ids, extract_trajectories, self_generate  # noqa: E402
from .version import __version__

__all__ = [
    "BaselineSDE", "build_report", "simulate",
    "SDEControl", "SDEGenerateOutput", "SDEGenerationMixin", "SDEStep", "SDETemperatureLogitsProcessor", "SDETrace",
    "disable_sde_control", "enable_sde_control", "sde_generate", "sde_hooks",
    "BrownianBaseline", "FitResult", "OUBaseline", "SDEHeads", "SDEHeadsConfig", "TEMPLATES", "Trajectories",
    "__version__", "decoder_layers", "extract_from_ids", "extract_trajectories", "fit_heads", "fit_projection",
    "load_model", "load_texts", "resolve_layer", "self_generate",
]
