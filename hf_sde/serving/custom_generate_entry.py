"""``custom_generate`` entry point: SDE control from the Hub without installing hf-sde.

``hf-sde export-generate DIR`` copies this file to ``DIR/custom_generate/generate.py`` beside the modules
it imports; push ``DIR`` to a Hub repo and anyone can run

    model.generate(**inputs, custom_generate="user/sde-generate", trust_remote_code=True,
                   sde_control={"heads": "user/gpt2-sde-helpsteer", "mode": "temperature"},
                   return_dict_in_generate=True)

``sde_control`` may be a dict of :class:`SDEControl` arguments or an ``SDEControl`` (from hf_sde or from
this folder).
"""

from dataclasses import fields, is_dataclass

from transformers import GenerationMixin

from ..control import SDEControl, sde_generate


def _as_control(obj):
    if obj is None or isinstance(obj, SDEControl):
        return obj
    if isinstance(obj, dict):
        return SDEControl(**obj)
    if is_dataclass(obj):
        return SDEControl(**{f.name: getattr(obj, f.name) for f in fields(obj) if f.init})
    raise TypeError(f"sde_control must be an SDEControl or a dict of its arguments, got {type(obj).__name__}")


def generate(model, *args, sde_control=None, **kwargs):
    """Stock ``generate`` with ``sde_control=`` (see hf_sde.SDEControl)."""
    kwargs = {k: v for k, v in kwargs.items() if not (v is None and k in _DROP_IF_NONE)}
    stock = GenerationMixin.generate.__get__(model)
    return sde_generate(model, *args, sde_control=_as_control(sde_control), _generate=stock, **kwargs)


# transformers passes every generate() argument to a custom generate, defaults included.
_DROP_IF_NONE = {"generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
                 "synced_gpus", "assistant_model", "streamer", "negative_prompt_ids",
                 "negative_prompt_attention_mask", "use_model_defaults"}
