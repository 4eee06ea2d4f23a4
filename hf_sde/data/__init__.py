"""Reading models and corpora, and reaching a model's decoder blocks."""

from .corpus import CHAT_TEMPLATES, TEMPLATES, iter_documents, load_texts
from .layers import decoder_layers, resolve_layer
from .loading import DEFAULT_MODEL, SMOLLM2, STORIES260K, ModelSpec, load_model

__all__ = [
    "CHAT_TEMPLATES", "DEFAULT_MODEL", "SMOLLM2", "STORIES260K", "TEMPLATES", "ModelSpec", "decoder_layers",
    "iter_documents", "load_model", "load_texts", "resolve_layer",
]
