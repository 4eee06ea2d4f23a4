"""``generate`` integration: :func:`sde_generate`, :func:`enable_sde_control` and :class:`SDEGenerationMixin`."""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from transformers import LogitsProcessorList

from .compiled import _CompiledRuntime
from .settings import SDEControl, SDEGenerateOutput
from .setup import _call_setup, _CallSetup
from .step import SDETemperatureLogitsProcessor, _Runtime


@contextlib.contextmanager
def sde_hooks(model, control: SDEControl, setup: _CallSetup | None = None, *, prompt_width: int = 1,
              max_new_tokens: int = 256, base_temperature: float = 1.0):
    """Install the SDE hooks for one generation; always removes them. Yields the runtime.

    ``sde_generate`` passes its resolved ``setup``; direct users give the prompt width and step budget.
    """
    setup = setup or _CallSetup(prompt_width, prompt_width, max_new_tokens + 1, base_temperature, [])
    runtime = (_CompiledRuntime if setup.compiled else _Runtime)(control, model, setup)
    try:  # a failed install removes what it installed
        runtime.install(setup.head)
        yield runtime
    finally:
        runtime.remove()


def sde_generate(model, *args, sde_control: SDEControl | None = None, _generate=None, **kwargs):
    """``model.generate`` with optional SDE control (see :class:`SDEControl`).

    With ``sde_control=None`` this is exactly the stock ``generate``. With ``return_dict_in_generate=True``
    the output has ``sde_trace``; otherwise ``SDEControl(on_trace=...)`` receives it.
    """
    generate = _generate or functools.partial(type(model).generate, model)
    if sde_control is None:
        return generate(*args, **kwargs)
    if not isinstance(sde_control, SDEControl):
        raise TypeError(f"sde_control must be an SDEControl, got {type(sde_control).__name__}")
    ctl = sde_control
    ctl.heads.check_compatible(model)
    setup = _call_setup(model, args, kwargs, ctl)
    with sde_hooks(model, ctl, setup) as runtime:
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        if ctl.controls_temperature and not setup.scale_head_input:
            # (transformers inspects every processor's signature at every step: none is added where the head
            # takes the temperature)
            processors.append(SDETemperatureLogitsProcessor(runtime))
        out = generate(*args, logits_processor=processors, **kwargs)
    return_dict = not isinstance(out, torch.Tensor)
    trace = runtime.trace(out.sequences if return_dict else out)
    runtime.release()
    if ctl.on_trace is not None:
        ctl.on_trace(trace)
    if return_dict:
        return SDEGenerateOutput(**dict(out.items()), sde_trace=trace)
    return out


def enable_sde_control(model):
    """Let ``model.generate`` accept ``sde_control=``. Returns the model; undo with :func:`disable_sde_control`.

    Only this model object changes (its ``generate`` attribute); no global state is touched.
    """
    if getattr(model, "_hf_sde_enabled", False):
        return model
    original = model.generate
    # Keep the unbound function and bind it to ``self`` at call time: a deep copy of the model (a reference
    # model, say) must generate with its own weights, not with those of the object that was enabled.
    original_func = original.__func__ if getattr(original, "__self__", None) is model else None

    def generate(self, *args, sde_control: SDEControl | None = None, **kwargs):
        base = types.MethodType(original_func, self) if original_func is not None else original
        return sde_generate(self, *args, sde_control=sde_control, _generate=base, **kwargs)

    generate.__doc__ = (original.__doc__ or "") + "\n\nhf-sde: also accepts ``sde_control=SDEControl(...)``."
    model.generate = types.MethodType(generate, model)
    model._hf_sde_enabled = True
    return model


def disable_sde_control(model):
    """Undo :func:`enable_sde_control`."""
    if getattr(model, "_hf_sde_enabled", False):
        del model.generate
        del model._hf_sde_enabled
    return model


class SDEGenerationMixin:
    """Mix into a ``PreTrainedModel`` subclass (before it) so that ``generate`` accepts ``sde_control=``.

    Example:
        >>> class MyLlama(SDEGenerationMixin, LlamaForCausalLM):
        ...     pass
    """

    def generate(self, *args, sde_control: SDEControl | None = None, **kwargs):
        return sde_generate(self, *args, sde_control=sde_control,
                            _generate=functools.partial(super().generate), **kwargs)
