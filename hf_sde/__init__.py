"""hf-sde: text generation as an SDE on a transformers model's hidden-state path.

Fit drift and diffusion heads on a model's hidden trajectories, analyse them, and use them to
observe and control decoding. The main entry points, in the order of the data path:

- :mod:`hf_sde.data`: models (:func:`load_model`, :class:`ModelSpec`: ``DEFAULT_MODEL``, ``SMOLLM2``,
  ``STORIES260K``), corpora (:func:`load_texts`, :func:`iter_documents`: ``TEMPLATES``, ``CHAT_TEMPLATES``) and
  decoder blocks (:func:`decoder_layers`, :func:`resolve_layer`);
- :mod:`hf_sde.trajectories`: :func:`extract_trajectories`, :func:`extract_from_ids`, :func:`self_generate`,
  :class:`Trajectories`; sharded: :func:`extract_to_shards`, :func:`load_shards`;
- :mod:`hf_sde.fitting`: :func:`fit_heads`, :func:`fit_heads_distributed` -> :class:`FitResult` with
  :class:`SDEHeads` (:class:`SDEHeadsConfig`) and the :class:`OUBaseline` / :class:`BrownianBaseline` baselines;
  shipped heads: ``DEFAULT_HEADS`` (:mod:`hf_sde.pretrained`);
- :mod:`hf_sde.control`: :class:`SDEControl` with :func:`sde_generate` or :func:`enable_sde_control` (then
  ``model.generate(..., sde_control=...)``), giving :class:`SDEGenerateOutput` and an :class:`SDETrace`;
- :mod:`hf_sde.analysis`: :func:`score_texts` -> :class:`TextScore` per text (mean surprise, tube exits, path
  NLL vs OU, diffusion z, and the model's token NLL / entropy / length), :func:`fit_ou_baseline` for its OU
  column; :func:`simulate`, :func:`build_report`; display: :func:`token_pieces`;
- serving: :mod:`hf_sde.vllm` (a vLLM logits processor and server) and :mod:`hf_sde.serving` (a Hub
  ``custom_generate`` folder).

The ``hf-sde`` command line (:mod:`hf_sde.commands`) sits on top of these; the library never imports it.
"""

from .analysis import (
    BaselineSDE,
    TextScore,
    build_report,
    fit_ou_baseline,
    score_texts,
    simulate,
    token_pieces,
)
from .control import (
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
from .control.vectors import load_control_vector, mean_difference_vectors, save_control_vector
from .data import (
    CHAT_TEMPLATES,
    DEFAULT_MODEL,
    SMOLLM2,
    STORIES260K,
    TEMPLATES,
    ModelSpec,
    decoder_layers,
    iter_documents,
    load_model,
    load_texts,
    resolve_layer,
)
from .fitting import (
    BrownianBaseline,
    FitResult,
    OUBaseline,
    SDEHeads,
    SDEHeadsConfig,
    fit_heads,
    fit_heads_distributed,
    fit_projection,
)
from .pretrained import DEFAULT_HEADS
from .trajectories import (
    Trajectories,
    extract_from_ids,
    extract_to_shards,
    extract_trajectories,
    load_shards,
    self_generate,
)
from .version import __version__

__all__ = [
    # models and corpora
    "DEFAULT_MODEL", "SMOLLM2", "STORIES260K", "ModelSpec", "load_model",
    "CHAT_TEMPLATES", "TEMPLATES", "iter_documents", "load_texts",
    # trajectories
    "Trajectories", "decoder_layers", "extract_from_ids", "extract_to_shards", "extract_trajectories",
    "load_shards", "resolve_layer", "self_generate",
    # fitting and heads
    "BrownianBaseline", "DEFAULT_HEADS", "FitResult", "OUBaseline", "SDEHeads", "SDEHeadsConfig",
    "fit_heads", "fit_heads_distributed", "fit_projection",
    # decoding-time control
    "SDEControl", "SDEGenerateOutput", "SDEGenerationMixin", "SDEStep", "SDETemperatureLogitsProcessor", "SDETrace",
    "disable_sde_control", "enable_sde_control", "sde_generate", "sde_hooks",
    # steering vectors in llama.cpp / repeng's GGUF format
    "load_control_vector", "mean_difference_vectors", "save_control_vector",
    # detection: sequence-level statistics of any text
    "TextScore", "fit_ou_baseline", "score_texts",
    # analysis and display
    "BaselineSDE", "build_report", "simulate", "token_pieces",
    "__version__",
]
