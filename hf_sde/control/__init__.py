"""Decoding-time SDE control: ``model.generate(..., sde_control=SDEControl(heads, ...))``.

Per decoding step, a forward hook at the heads' layer reads the hidden state of the newest position and runs
the fused step (:mod:`.fused`): one matmul for the projection, then only the nets the step reads (the diffusion
net for the temperature or a gate, the drift net for drift steering, both for a live callback), each as a few
dense calls with its time features looked up in a table. Statistics are saved into buffers preallocated per
call; the nets no step reads run once over all steps when the trace is built. Nothing in the step reads a
tensor value on the host. The temperature divides the LM head's input where that equals dividing the logits,
else a logits processor divides the logits; steering adds a vector to the newest position only, so positions
already in the KV cache are never steered twice. Everything is installed for one ``generate`` call and removed
afterwards, even when generation raises.

The files: :mod:`.settings` (what users set and get back), :mod:`.laws` (temperature, gate, steering
direction), :mod:`.fused` (the heads as dense calls), :mod:`.setup` (the per-call setup), :mod:`.step` (what
runs inside the forward), :mod:`.compiled` (the same step inside ``generate``'s compiled forward: static cache
and ``compile_config``), :mod:`.generate` (``generate`` integration). Only this package (plus heads.py,
layers.py, version.py) is copied by the custom_generate export, so it imports nothing else from hf_sde.
"""

from .generate import SDEGenerationMixin, disable_sde_control, enable_sde_control, sde_generate, sde_hooks
from .settings import GATES, MODES, TIME_ORIGINS, SDEControl, SDEGenerateOutput, SDEStep, SDETrace
from .setup import _WARNED  # noqa: F401  (the warn-once registry; tests reset it)
from .step import SDETemperatureLogitsProcessor

__all__ = [
    "GATES", "MODES", "TIME_ORIGINS", "SDEControl", "SDEGenerateOutput", "SDEGenerationMixin", "SDEStep",
    "SDETemperatureLogitsProcessor", "SDETrace", "disable_sde_control", "enable_sde_control", "sde_generate",
    "sde_hooks",
]
