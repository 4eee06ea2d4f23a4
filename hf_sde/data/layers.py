"""Finding a model's decoder blocks and reading / editing their output with forward hooks.

One hook at one block replaces ``output_hidden_states=True`` (which materialises every layer).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

# model -> (its config, that config's text config); keyed weakly by the model (configs are not hashable).
_TEXT_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def text_config(model: nn.Module):
    """The model's decoder config (``config.get_text_config()``, which costs ~10 us), looked up once per model and
    config object; its values are read live."""
    config = model.config
    hit = _TEXT_CONFIGS.get(model)
    if hit is not None and hit[0] is config:
        return hit[1]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    _TEXT_CONFIGS[model] = (config, text)
    return text


def num_decoder_layers(model: nn.Module) -> int:
    return int(text_config(model).num_hidden_layers)


def hidden_size(model: nn.Module) -> int:
    return int(text_config(model).hidden_size)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks (Llama/Mistral/Qwen ``model.layers``, GPT-2 ``transformer.h``...)."""
    n = num_decoder_layers(model)
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers",
                 "model.language_model.layers"):
        module: object = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    candidates = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not candidates:
        raise ValueError(
            f"Could not find the decoder blocks of {type(model).__name__}: no nn.ModuleList of length "
            f"num_hidden_layers={n}. hf-sde reads the hidden state at the output of a decoder block and finds the "
            "blocks as that list (model.layers, transformer.h, ...); this architecture keeps them elsewhere, so "
            "it is not supported."
        )
    return candidates[0]


def resolve_layer(model: nn.Module, layer: int) -> int:
    """Turn a possibly negative layer index into ``0..n-1``; raise with the valid range otherwise."""
    n = num_decoder_layers(model)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"layer must be an int in [-{n}, {n - 1}], got {layer!r}")
    if not -n <= layer < n:
        raise ValueError(
            f"layer={layer} is out of range for {type(model).__name__} with {n} decoder layers: "
            f"valid layers are {-n}..{n - 1} (negative counts from the end; -1 is the last block)."
        )
    return layer % n


def block_output(output) -> torch.Tensor:
    """The hidden-state tensor of a decoder block's output (a tensor, or a tuple whose first item is one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_block_output(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


def register_block_hook(
    model: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn(hidden)`` on the output of decoder block ``layer``; a returned tensor replaces it.

    Returns the removable handle (the caller owns it).
    """
    block = decoder_layers(model)[resolve_layer(model, layer)]

    def hook(_module, _inputs, output):
        new = fn(block_output(output))
        if new is None:
            return None
        return replace_block_output(output, new)

    return block.register_forward_hook(hook)
