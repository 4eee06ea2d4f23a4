"""Drift and diffusion heads: the SDE ``dZ = mu(Z, t) dt + sigma(Z, t) dW`` on a model's projected hidden path.

The networks work in increment units (they output ``mu*dt`` and ``sigma*sqrt(dt)``), which keeps the
optimisation targets O(1) (see METHOD.md); ``drift`` / ``diffusion`` convert back to time units.
The PCA projection (``Z = P^T (H - m) / s``), the time horizon and the calibration statistics travel
with the weights, so a saved folder is everything needed to observe or control a model.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..version import __version__

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
#: What ``save_pretrained`` writes.
HEADS_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
#: What a fit writes beside the heads (``hf-sde fit``): stale once other heads are saved over them.
FIT_FILES = ("fit_history.json", "trajectories.safetensors")
#: Below this spread of ``log s_k`` over the training transitions (``config.log_diffusion_std``) the diffusion head
#: is (nearly) constant: heads that kept the fit's OU start (constant diffusion) sit at the fit's floor, 1e-6, where
#: every token gets the same z-score; a trained head is at 0.1-0.3 (the shipped heads: 0.17).
MIN_LOG_DIFFUSION_STD = 1e-4


@dataclass
class SDEHeadsConfig:
    """Everything that defines a pair of heads besides their weights."""

    hidden_size: int
    proj_dim: int
    layer: int
    num_layers: int
    horizon: float
    base_model: str | None = None
    base_model_revision: str | None = None
    gguf_file: str | None = None
    model_type: str | None = None
    # Where time k = 0 is: "sequence" (k is the position in the whole text) or "prompt_end" (k = 0 at the last
    # prompt position, the state that produces the first response token; instruction data, METHOD.md).
    time_origin: str = "sequence"
    width: int = 128
    depth: int = 2
    time_frequencies: int = 4
    sigma_floor: float = 1e-3
    standardize: bool = True
    # Calibration over the training transitions: log s_k and per-dimension transition NLL.
    log_diffusion_mean: float = 0.0
    log_diffusion_std: float = 1.0
    nll_mean: float = 0.0
    nll_std: float = 1.0
    # Fit summary, filled by fit_heads (for the model card and for users).
    heldout_nll: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    library_version: str = __version__

    @property
    def dt(self) -> float:
        return 1.0 / self.horizon


def _is_partial(name: str) -> bool:
    """``.NAME.partial``: the folder an atomic write (``hf_sde.commands._output``) fills before renaming it NAME."""
    return name.startswith(".") and name.endswith(".partial") and len(name) > len("..partial")


def _mlp(inp: int, width: int, depth: int, out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = inp
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.SiLU()]
        d = width
    layers.append(nn.Linear(d, out))
    return nn.Sequential(*layers)


MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# SDE heads for `{{ base_model }}`

Drift and diagonal diffusion heads fitted with [hf-sde](https://github.com/hf-sde/hf-sde) on the hidden-state
path of `{{ base_model }}`{% if revision %} (revision `{{ revision }}`){% endif %}{% if gguf_file %}, GGUF file `{{ gguf_file }}`{% endif %},
decoder layer {{ layer }} of {{ num_layers }} (hidden size {{ hidden_size }}), PCA projection to {{ proj_dim }} dimensions,
horizon T = {{ horizon }} tokens.

The model is the Euler-Maruyama SDE `Z_(k+1) | Z_k ~ N(Z_k + mu dt, diag(sigma^2) dt)` with `t_k = k / T`,
fitted by exact Gaussian likelihood of the observed increments.

## Data

{{ data_description }}

## Held-out transition NLL (nats per dimension, lower is better)

| model | held-out NLL |
|---|---|
{{ nll_table }}

The neural SDE earns its place only where it beats both baselines (Brownian motion with constant drift,
Ornstein-Uhlenbeck with linear drift), fitted and evaluated on the same split.

## Use

```python
from transformers import AutoModelForCausalLM
from hf_sde import SDEHeads, SDEControl, enable_sde_control

heads = SDEHeads.from_pretrained("{{ repo_id }}")
enable_sde_control(model)
out = model.generate(**inputs, do_sample=True, sde_control=SDEControl(heads, mode="temperature"),
                     return_dict_in_generate=True)
out.sde_trace.diffusion
```

hf-sde version {{ library_version }}.
"""


def gaussian_nll(dz: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-dimension Gaussian NLL (nats) of increments ``dz`` under ``N(mean, std^2)`` (any model's transitions)."""
    return 0.5 * math.log(2 * math.pi) + std.log() + 0.5 * ((dz - mean) / std).pow(2)


class SDEHeads(
    nn.Module,
    ModelHubMixin,
    library_name="hf-sde",
    tags=["sde", "hf-sde", "interpretability", "decoding"],
    repo_url="https://github.com/hf-sde/hf-sde",
    paper_url="https://arxiv.org/abs/2408.11863",
    model_card_template=MODEL_CARD_TEMPLATE,
):
    """Drift ``mu(z, t)`` and diagonal diffusion ``sigma(z, t) > 0`` plus the projection they live in.

    Example:
        >>> heads = SDEHeads.from_pretrained("heads/")        # a folder or a hub repo id
        >>> z = heads.project(hidden)                          # (..., D) -> (..., d)
        >>> mu, sigma = heads.drift(z, t), heads.diffusion(z, t)
    """

    def __init__(self, config: SDEHeadsConfig):
        super().__init__()
        self.config = config
        d, D = config.proj_dim, config.hidden_size
        self.register_buffer("proj_mean", torch.zeros(D))
        self.register_buffer("proj_basis", torch.eye(D, d))
        self.register_buffer("proj_scale", torch.ones(d))
        inp = d + 1 + 2 * config.time_frequencies
        self.drift_linear = nn.Linear(d, d)
        self.drift_net = _mlp(inp, config.width, config.depth, d)
        self.diffusion_net = _mlp(inp, config.width, config.depth, d)
        self.register_buffer("frequencies", torch.arange(1, config.time_frequencies + 1, dtype=torch.float32) * math.pi)
        nn.init.zeros_(self.drift_linear.weight)
        nn.init.zeros_(self.drift_linear.bias)
        nn.init.zeros_(self.drift_net[-1].weight)
        nn.init.zeros_(self.drift_net[-1].bias)
        self.eval()

    # ----- geometry -------------------------------------------------------------------------------
    @property
    def dt(self) -> float:
        return self.config.dt

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(..., D)`` to SDE states ``(..., d)``."""
        return ((hidden.to(self.proj_basis.dtype) - self.proj_mean) @ self.proj_basis) / self.proj_scale

    def lift(self, direction: torch.Tensor) -> torch.Tensor:
        """A displacement in SDE coordinates ``(..., d)`` to the hidden-space displacement ``(..., D)``."""
        return (direction * self.proj_scale) @ self.proj_basis.T

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.frequencies.dtype).unsqueeze(-1)
        angles = t * self.frequencies
        return torch.cat([t, torch.sin(angles), torch.cos(angles)], dim=-1)

    def times(self, positions: torch.Tensor) -> torch.Tensor:
        """``t_k = k / T`` for token positions ``k``."""
        return positions.to(self.frequencies.dtype) / self.config.horizon

    # ----- the SDE ------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu*dt, sigma*sqrt(dt))``: mean and per-dimension std of the next increment, ``(..., d)`` each."""
        z = z.to(self.proj_basis.dtype)
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[:-1])
        x = torch.cat([z, self.time_features(t)], dim=-1)
        mean = self.drift_linear(z) + self.drift_net(x)
        std = nn.functional.softplus(self.diffusion_net(x)) + self.config.sigma_floor
        return mean, std

    def drift(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``mu(z, t)`` in time units."""
        return self(z, t)[0] / self.dt

    def diffusion(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``sigma(z, t)`` in time units (the diagonal of the diffusion matrix)."""
        return self(z, t)[1] / math.sqrt(self.dt)

    # torchsde's names: f is drift, g is diagonal diffusion, with (t, y) argument order.
    noise_type = "diagonal"
    sde_type = "ito"

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.drift(y, t)

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.diffusion(y, t)

    def diffusion_magnitude(self, sigma_increment: torch.Tensor) -> torch.Tensor:
        """``s_k = sqrt(mean_i sigma_i^2)`` in time units, from the increment-unit std."""
        return sigma_increment.pow(2).mean(-1).sqrt() / math.sqrt(self.dt)

    def zscore(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Calibrated z-score of ``log s_k`` against the training transitions."""
        return (magnitude.log() - self.config.log_diffusion_mean) / self.config.log_diffusion_std

    def transition_nll(self, dz: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Per-dimension Gaussian NLL (nats) of increments ``dz`` under ``N(mean, std^2)``."""
        return gaussian_nll(dz, mean, std)

    def surprise(self, dz: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Standardized NLL (per dimension) of a realized increment against the training transitions."""
        return (self.transition_nll(dz, mean, std).mean(-1) - self.config.nll_mean) / self.config.nll_std

    # ----- compatibility ------------------------------------------------------------------------------
    def check_compatible(self, model: nn.Module, layer: int | None = None) -> None:
        """Raise a clear error if these heads were not fitted for ``model`` (hidden size, depth, layer)."""
        from ..data.layers import hidden_size, num_decoder_layers, resolve_layer

        cfg = self.config
        name = cfg.base_model or "another model"
        if hidden_size(model) != cfg.hidden_size:
            raise ValueError(
                f"These SDE heads were fitted on {name} with hidden size {cfg.hidden_size}, but "
                f"{type(model).__name__} has hidden size {hidden_size(model)}. Fit heads on this model "
                "(hf-sde fit --model ...) or load the heads made for it."
            )
        if num_decoder_layers(model) != cfg.num_layers:
            raise ValueError(
                f"These SDE heads were fitted on {name} with {cfg.num_layers} decoder layers, but "
                f"{type(model).__name__} has {num_decoder_layers(model)}. They belong to another model; "
                "fit heads on this one."
            )
        if layer is not None and resolve_layer(model, layer) != cfg.layer:
            raise ValueError(
                f"These SDE heads read decoder layer {cfg.layer}, but layer {layer} was requested. "
                f"Use layer={cfg.layer} or fit heads at layer {layer}."
            )

    # ----- hub I/O ------------------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "hf-sde"})
        (save_directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True))
        # A folder written atomically is first named ".NAME.partial": the card names the folder it ends up in.
        name = save_directory.name
        if _is_partial(name):
            name = name[1: -len(".partial")]
        self.generate_model_card(repo_id=name).save(save_directory / "README.md")

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        cfg = self.config
        nll = cfg.heldout_nll or {}
        rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in nll.items()) or "| (not fitted) | |"
        desc = data_description(cfg.data or {})
        kwargs.setdefault("repo_id", "user/heads")
        card_data = copy.deepcopy(self._hub_mixin_info.model_card_data)
        if cfg.base_model and "/" in cfg.base_model and not os.path.exists(cfg.base_model):
            card_data.base_model = cfg.base_model  # a hub id: links the heads to their model on the Hub
        card = ModelCard.from_template(
            card_data=card_data,
            template_str=self._hub_mixin_info.model_card_template,
            base_model=cfg.base_model or "unknown", revision=cfg.base_model_revision, gguf_file=cfg.gguf_file,
            layer=cfg.layer, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, proj_dim=cfg.proj_dim,
            horizon=cfg.horizon, data_description=desc, nll_table=rows, library_version=cfg.library_version,
            **kwargs,
        )
        return card

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         map_location: str = "cpu", config=None, **kwargs) -> SDEHeads:
        def fetch(name: str) -> str:
            if os.path.isdir(model_id):
                path = os.path.join(model_id, name)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{model_id} has no {name}: it is not a saved SDEHeads folder.")
                return path
            try:
                return hf_hub_download(model_id, name, revision=revision, cache_dir=cache_dir,
                                       force_download=force_download, local_files_only=local_files_only, token=token)
            except EntryNotFoundError as e:
                raise FileNotFoundError(f"Hub repo {model_id} has no {name}: it holds no SDE heads.") from e

        cfg_path = fetch(CONFIG_NAME)
        try:
            raw = json.loads(Path(cfg_path).read_text())
            known = set(SDEHeadsConfig.__dataclass_fields__)
            unknown = set(raw) - known
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            config = SDEHeadsConfig(**raw)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{cfg_path} is not a valid SDEHeads config: {e}") from e
        check_calibration(config, f"Refusing to load {model_id}: ")
        check_diffusion_spread(config, f"Loading {model_id}: ", stacklevel=5)
        # Loading must not advance the global RNG (the random init is overwritten anyway), so that
        # seeding before generate(sde_control=...) gives the same tokens however the heads arrive.
        with torch.random.fork_rng(devices=[]):
            heads = cls(config)
        weights = fetch(WEIGHTS_NAME)
        try:
            state = load_file(weights, device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{weights} is corrupt or truncated (safetensors could not read it: {e}).") from e
        expected = heads.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights} does not match the config: missing keys {missing}, unexpected keys {unexpected}.")
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise ValueError(f"{weights}: {k} has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}.")
        check_finite_state(state, f"Refusing to load {model_id}: ")
        heads.load_state_dict(state, strict=True)
        return heads.to(map_location).eval()

    def save_pretrained(self, save_directory, *, overwrite: bool = False, **kwargs):
        """``ModelHubMixin.save_pretrained`` (same keywords: ``config``, ``push_to_hub``, ``repo_id``, ...), refusing
        heads whose calibration or weights are not finite, and a folder that already holds heads.

        ``overwrite=True`` replaces the heads in ``save_directory`` and removes the files of the earlier fit that
        this save does not write (``fit_history.json``, ``trajectories.safetensors``), so nothing stale is left
        beside the new heads (``hf-sde analyze`` would read it). Other files are kept. Without it, a folder holding
        any file that a save or a fit writes raises ``FileExistsError``, as ``hf-sde fit --out`` refuses a non-empty
        folder without ``--overwrite``. Heads with a (nearly) constant diffusion are saved with a ``UserWarning``
        (see :func:`check_diffusion_spread`).
        """
        check_calibration(self.config, f"Refusing to save to {save_directory}: ")
        check_finite_state(self.state_dict(), f"Refusing to save to {save_directory}: ")
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"Cannot save SDE heads to {folder}: it is a file, not a folder.")
        existing = [name for name in HEADS_FILES + FIT_FILES if (folder / name).exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"{folder} already holds saved heads or files of a fit ({', '.join(existing)}). Save to a new folder, "
                "or pass overwrite=True to replace them (the earlier fit's fit_history.json and "
                "trajectories.safetensors are removed with them).")
        # A folder written atomically (hf-sde fit) is first named ".NAME.partial": name the folder it becomes.
        shown = folder.with_name(folder.name[1:-len(".partial")]) if _is_partial(folder.name) else folder
        check_diffusion_spread(self.config, f"Saving to {shown}: ", stacklevel=3)
        if overwrite:
            for name in FIT_FILES:
                (folder / name).unlink(missing_ok=True)
        return super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> SDEHeads:
        """Load heads from a saved folder or a hub repo id (a missing folder is reported as one)."""
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
                raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a saved SDEHeads folder.")
            return super().from_pretrained(path, **kwargs)
        if os.path.exists(path):
            raise FileNotFoundError(f"{path} is a file, not a saved SDEHeads folder.")
        if looks_like_path(path):
            raise FileNotFoundError(f"No SDE heads folder at {path}: it does not exist. Pass the folder that "
                                    "`hf-sde fit --out` wrote, or a hub repo id such as user/heads.")
        try:
            return super().from_pretrained(path, **kwargs)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            if isinstance(e, FileNotFoundError) and "holds no SDE heads" in str(e):
                raise
            raise FileNotFoundError(f"{path}: there is no local folder of that name, and the hub repo could not "
                                    f"be fetched ({type(e).__name__}: {str(e).splitlines()[0]})") from e


#: The fields of ``config.data`` that say what the heads were fitted on, in the model card's first sentence.
_DATA_HEADLINE = ("corpus", "template", "max_length")


def data_description(data: dict) -> str:
    """The model card's Data section from ``config.data``: the corpus, template and max length first (what
    ``hf-sde fit`` records, and ``fit_heads(data_description=...)`` for API fits), then the other fields."""
    known = {k: data[k] for k in _DATA_HEADLINE if data.get(k) is not None}
    if known:
        parts = [f"Corpus `{known['corpus']}`" if "corpus" in known else "Corpus not recorded"]
        parts.append(f"template `{known['template']}`" if "template" in known else "no row template")
        if "max_length" in known:
            parts.append(f"paths of at most {known['max_length']} tokens")
        headline = ", ".join(parts) + "."
    else:
        headline = ("Corpus, template and max length not recorded (`hf-sde fit` records them; from Python, pass "
                    "`fit_heads(..., data_description={\"corpus\": ..., \"template\": ..., \"max_length\": ...})`).")
    rest = ", ".join(f"{k}: {len(v)} {k.split('_')[1]}s (hashed)" if k.endswith("_sha1") and isinstance(v, list)
                     else f"{k}: {v}" for k, v in data.items() if k not in _DATA_HEADLINE)
    return headline + (f"\n\n{rest}" if rest else "")


def looks_like_path(name: str) -> bool:
    """A name that can only be meant as a local path (``x/``, ``./x``, ``/x``, ``~``, ``a/b/c``, not a repo id)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.endswith(("/", os.sep)) or name.startswith((".", "/", "~", os.sep)) or os.path.isabs(name):
        return True
    if "\\" in name or name.count("/") > 1:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


_CALIBRATION = ("horizon", "log_diffusion_mean", "log_diffusion_std", "nll_mean", "nll_std", "sigma_floor")
_POSITIVE = ("horizon", "log_diffusion_std", "nll_std")


def check_calibration(config: SDEHeadsConfig, prefix: str = "") -> None:
    """Raise ``ValueError`` unless the horizon and calibration statistics are finite (and scales positive).

    Heads fitted on too little data (or a diverged fit) have NaN / inf calibration; their z-scores and
    temperatures would be garbage, so they are never saved nor loaded.
    """
    bad = []
    for name in _CALIBRATION:
        value = getattr(config, name)
        try:
            x = float(value)
        except (TypeError, ValueError):
            bad.append(f"{name}={value!r}")
            continue
        if not math.isfinite(x) or (name in _POSITIVE and x <= 0):
            bad.append(f"{name}={x}")
    if bad:
        raise ValueError(f"{prefix}these SDE heads have a non-finite or non-positive calibration ({', '.join(bad)}): "
                         "the fit diverged or had too little data. Refit on more data.")


def check_diffusion_spread(config: SDEHeadsConfig, prefix: str = "", stacklevel: int = 2) -> None:
    """Warn (``UserWarning``) when the diffusion head is (nearly) constant on the training transitions.

    ``config.log_diffusion_std`` (the spread of ``log s_k``) below ``MIN_LOG_DIFFUSION_STD`` means the diffusion
    z-score has nothing to measure: at the fit's floor (1e-6) every token gets the same z, so temperature control
    acts as a fixed temperature; just above it z magnifies rounding noise. It happens when early stopping kept
    the fit's starting point (OU, whose diffusion is constant) or the data were too few. Non-finite or
    non-positive values are errors (:func:`check_calibration`).
    """
    spread = float(config.log_diffusion_std)
    if spread < MIN_LOG_DIFFUSION_STD:
        warnings.warn(
            f"{prefix}these SDE heads' diffusion is (nearly) constant: log_diffusion_std={spread:.3g}, the spread of "
            f"log diffusion over the training transitions, is below {MIN_LOG_DIFFUSION_STD:g}. The diffusion z-score "
            "then has nothing to measure (at the fit's floor of 1e-06 it is the same on every token), so SDE "
            "temperature control acts as a fixed temperature. The fit most likely kept its OU starting point (early "
            "stopping saw no improvement) or had too little data: refit on more data, or with more epochs / a "
            "larger --patience (see fit_history.json).",
            UserWarning, stacklevel=stacklevel)


def check_finite_state(state: dict, prefix: str = "") -> None:
    """Raise ``ValueError`` if any weight or buffer holds NaN or inf."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{prefix}these SDE heads have non-finite values in {', '.join(sorted(bad))}: the fit "
                         "diverged. Refit (more data, a lower learning rate).")
