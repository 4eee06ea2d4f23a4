"""Fitting SDE heads by the exact Euler-Maruyama Gaussian likelihood, against Brownian and OU baselines.

One fitting core, run in a process-group environment (:mod:`hf_sde.process_group`): the split and
early-stopping plan, the PCA and both baselines from summed statistics, one evaluation, one training loop
and the calibration all-reduce their sums, which are no-ops in one process. :func:`fit_heads` is the
one-process case; :func:`fit_heads_distributed` runs the same functions over trajectory shards on every
rank of ``torch.distributed``. Held-out sequences never choose anything (early stopping watches held-back
training data), and every fit refuses data too small to estimate what it fits.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..trajectories.extract import Trajectories, check_finite
from .baselines import BrownianBaseline, OUBaseline, TransitionStats
from .compare import heldout_comparison
from .heads import SDEHeads, SDEHeadsConfig
from .process_group import DistEnv, SingleProcess
from .training import HeadsOnInputs, train_heads
from .transitions import (
    MIN_GROUPS_FOR_SEQUENCE_STOPPING,
    Chunk,
    ExactData,
    FitPlan,
    MemorySource,
    ShardSource,
    StreamData,
    Transitions,
    make_transitions,
    split_sequences,
)

__all__ = ["BrownianBaseline", "FitResult", "MIN_GROUPS_FOR_SEQUENCE_STOPPING", "OUBaseline", "Transitions",
           "evaluate", "fit_heads", "fit_heads_distributed", "fit_projection", "gaussian_nll_parts",
           "make_transitions", "split_sequences"]

logger = logging.getLogger(__name__)

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
#: Training transitions needed per coefficient of one dimension's linear (OU) drift ``A z + b`` (d + 1 of
#: them; d (d + 1) in all, each transition observing d increments): below this the least squares fit and
#: its residual std are noise (two sentences gave OU held-out NLL 6.4e24).
TRANSITIONS_PER_COEFFICIENT = 10
#: Held-out transitions needed per drift coefficient of one dimension: the held-out NLL is a mean over n d
#: increments, with a standard error of about (2 n d)^-1/2 nats/dim; at n = 2 (d + 1) that is ~0.03 for
#: d = 16, the size of the gaps between the heads and the baselines it has to resolve.
HELDOUT_PER_COEFFICIENT = 2
#: Training batch size of ``fit_heads`` / ``fit_heads_distributed`` / ``hf-sde fit --fit-batch-size``.
#: Larger batches run an epoch faster (fewer, larger products) but need more epochs: on stories260K HelpSteer
#: trajectories (400 sequences, 1 thread, early stopping) batch 1024 with lr x sqrt(2) ended within 0.001
#: nats/dim of batch 512 in 5-8 % less wall time (one seed; within the machine's noise), batch 2048 with
#: lr x 2 needed 41-59 epochs against 29-37 and more wall time, and 4096 lost 0.002-0.01 nats/dim. So 512.
DEFAULT_BATCH_SIZE = 512
#: ``torch.set_float32_matmul_precision``'s levels, for ``fit_heads(matmul_precision=...)``.
MATMUL_PRECISIONS = ("highest", "high", "medium")


def _precision_settings() -> list[tuple[object, str]]:
    """torch's per-backend float32 precision settings (``torch.backends...fp32_precision``) where they exist."""
    b = torch.backends
    places = [b, getattr(b, "mkldnn", None), getattr(b, "cuda", None), getattr(b, "cudnn", None)]
    places += [getattr(p, name, None) for p in places[1:] for name in ("matmul", "conv", "rnn")]
    return [(p, p.fp32_precision) for p in places if p is not None and isinstance(getattr(p, "fp32_precision", None), str)]


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where ``bf16=True`` pays."""
    cpu = torch.cpu
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


@contextlib.contextmanager
def float32_matmul_precision(precision: str | None) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` inside the block only, restored on exit (also on an
    error): a fit's speed setting must not leak into the caller's later matmuls. Both of torch's interfaces are
    restored exactly, the legacy global level and the per-backend ``fp32_precision`` settings (which the legacy
    setter overwrites, and which a caller may use instead). ``None`` changes nothing."""
    if precision is None:
        yield
        return
    backends, legacy = _precision_settings(), None
    try:
        # With every per-backend setting unset the legacy getter reads the legacy level itself (with some set,
        # it refuses when they disagree); the settings are put back, in the same order, on exit.
        for place, _ in backends:
            place.fp32_precision = "none"
        legacy = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for place, value in backends:
            place.fp32_precision = value


def gaussian_nll_parts(dz: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> dict[str, torch.Tensor]:
    """NLL per dimension split into its drift part (standardized squared error) and diffusion part (log-std)."""
    drift = 0.5 * ((dz - mean) / std).pow(2).mean()
    diffusion = std.log().mean() + HALF_LOG_2PI
    return {"total": drift + diffusion, "drift": drift, "diffusion": diffusion,
            "drift_mse": (dz - mean).pow(2).mean()}


# ----- projection -------------------------------------------------------------------------------------
def projection_from_sequences(sequences: Callable[[], Iterable[torch.Tensor]], hidden: int, proj_dim: int | None,
                              standardize: bool = True, env=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA from all-reduced first and centred second moments (two passes over ``sequences()``), so one
    process and N processes give the same basis; signs fixed so the basis is deterministic."""
    env = env or SingleProcess()
    d = hidden if proj_dim is None or proj_dim <= 0 else proj_dim
    if d > hidden:
        raise ValueError(f"proj_dim={d} exceeds the hidden size {hidden}; use proj_dim <= {hidden} "
                         "(or 0 for no projection).")
    first = torch.zeros(hidden + 1, dtype=torch.float64)
    for x in sequences():
        first[:hidden] += x.double().sum(0)
        first[hidden] += x.shape[0]
    env.all_reduce_(first)
    n = float(first[hidden])
    if n <= d:
        raise ValueError(f"The PCA to {d} dimensions needs more than {d} training states, got {int(n)}. "
                         "Use more text or a smaller proj_dim (--proj-dim).")
    mean = first[:hidden] / n
    scatter = torch.zeros(hidden, hidden, dtype=torch.float64)
    for x in sequences():
        xc = x.double() - mean
        scatter += xc.T @ xc
    cov = env.all_reduce_(scatter) / (n - 1)
    if d == hidden:
        basis = torch.eye(hidden, dtype=torch.float64)
    else:
        evals, evecs = torch.linalg.eigh(cov)
        basis = evecs[:, torch.argsort(evals, descending=True)[:d]]
        basis = basis * torch.sign(basis[basis.abs().argmax(0), torch.arange(d)])
    scale = (torch.einsum("ij,jk,ki->i", basis.T, cov, basis).clamp_min(0).sqrt().clamp_min(1e-8)
             if standardize else torch.ones(d, dtype=torch.float64))
    return basis.float(), mean.float(), scale.float()


def fit_projection(states: torch.Tensor, proj_dim: int | None, standardize: bool = True,
                   max_rows: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA basis ``P`` (D, d), mean ``m`` (D,) and per-component scale ``s`` (d,) of hidden states ``(n, D)``.

    All rows are used (the moments are summed in chunks, memory ``D^2``); ``max_rows`` subsamples (seeded).
    """
    if max_rows is not None and states.shape[0] > max_rows:
        states = states[torch.randperm(states.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]]
    return projection_from_sequences(lambda: torch.split(states, 65536), states.shape[1], proj_dim, standardize)


# ----- evaluation ---------------------------------------------------------------------------------------
def evaluate(fn: Callable, chunks: Iterable[Chunk], env=None) -> dict[str, float]:
    """Per-dimension NLL parts of ``fn(x) -> (mean, std)`` over all processes' chunks, summed in float64."""
    acc = torch.zeros(5, dtype=torch.float64)
    with torch.no_grad():
        for c in chunks:
            mean, std = fn(c.x)
            err = c.dz - mean
            acc += torch.stack([(0.5 * (err / std).pow(2)).double().sum(), std.log().double().sum(),
                                err.pow(2).double().sum(), torch.tensor(float(c.dz.numel()), dtype=torch.float64),
                                torch.tensor(float(len(c)), dtype=torch.float64)])
    (env or SingleProcess()).all_reduce_(acc)
    m = max(float(acc[3]), 1.0)
    drift, diffusion = float(acc[0]) / m, float(acc[1]) / m + HALF_LOG_2PI
    return {"total": drift + diffusion, "drift": drift, "diffusion": diffusion, "drift_mse": float(acc[2]) / m,
            "count": float(acc[4])}


def _evaluate(fn: Callable, tr: Transitions, batch: int = 65536) -> dict[str, float]:
    """:func:`evaluate` of ``fn(z, t)`` on :class:`Transitions` (the report's signature)."""
    d = tr.z.shape[1]
    chunks = (Chunk(torch.cat([tr.z[a:a + batch], tr.t[a:a + batch, None]], 1), tr.dz[a:a + batch])
              for a in range(0, len(tr), batch))
    out = evaluate(lambda x: fn(x[:, :d], x[:, d]), chunks)
    out.pop("count")
    return out


def _baselines(data, env) -> tuple[BrownianBaseline, OUBaseline]:
    """Both baselines from the training transitions' statistics, summed over chunks and processes."""
    stats = TransitionStats.zeros(data.d)
    for c in data.chunks("train"):
        stats = stats + TransitionStats.of(c.x[:, :data.d], c.dz)
    stats = stats.all_reduce(env)
    return BrownianBaseline.from_stats(stats), OUBaseline.from_stats(stats)


def _calibrate(heads: SDEHeads, model: HeadsOnInputs, data, env) -> None:
    """Mean and (unbiased) std of ``log s_k`` and of the transition NLL over the training transitions; the fit
    fails rather than save heads whose z-scores would be meaningless."""
    def pass_(center: torch.Tensor | None) -> torch.Tensor:
        acc = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for c in data.chunks("train"):
                mean, std = model(c.x)
                v = torch.stack([heads.diffusion_magnitude(std).log(),
                                 heads.transition_nll(c.dz, mean, std).mean(-1)]).double()
                if center is None:
                    acc += torch.cat([v.sum(1), torch.tensor([float(len(c))], dtype=torch.float64)])
                else:
                    acc[:2] += (v - center[:, None]).pow(2).sum(1)
        return env.all_reduce_(acc)

    first = pass_(None)
    n = float(first[2])
    centers = first[:2] / n
    stds = (pass_(centers)[:2] / max(n - 1, 1.0)).sqrt()
    values = [float(centers[0]), float(stds[0]), float(centers[1]), float(stds[1])]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"The fitted heads' calibration is not finite (log-diffusion mean/std, NLL mean/std = "
                         f"{values}); the data are degenerate (constant or overflowing states). Heads not saved.")
    cfg = heads.config
    cfg.log_diffusion_mean, cfg.log_diffusion_std = values[0], max(values[1], 1e-6)
    cfg.nll_mean, cfg.nll_std = values[2], max(values[3], 1e-6)


def check_data_size(plan: FitPlan, d: int) -> None:
    """Refuse data too small to estimate what the fit estimates, saying how much is needed and the fix."""
    need = TRANSITIONS_PER_COEFFICIENT * (d + 1)
    fix = ("Add more text (more or longer documents, a larger max_length) or lower the projection "
           f"(proj_dim / --proj-dim; proj_dim k needs {TRANSITIONS_PER_COEFFICIENT} (k + 1) transitions).")
    got = plan.num_train_transitions
    if got < need:
        raise ValueError(f"Too little data to fit SDE heads at proj_dim {d}: the linear (OU) drift has d (d + 1) = "
                         f"{d * (d + 1)} coefficients, which needs at least {need} training transitions "
                         f"({TRANSITIONS_PER_COEFFICIENT} per coefficient of each dimension), but the "
                         f"{len(plan.train_idx)} training sequences have {got}. {fix}")
    held, need_held = plan.num_heldout_transitions, HELDOUT_PER_COEFFICIENT * (d + 1)
    if held < need_held:
        raise ValueError(f"Too little held-out data to compare the heads with the baselines at proj_dim {d}: "
                         f"the {len(plan.val_idx)} held-out sequences have {held} transitions, at least {need_held} "
                         f"are needed. {fix}")


# ----- the fit ------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """What ``fit_heads`` returns: the heads, per-epoch history and the held-out comparison."""

    heads: SDEHeads
    history: dict[str, list[float]]
    heldout_nll: dict[str, float]
    heldout_parts: dict[str, dict[str, float]]
    train_indices: list[int]
    heldout_indices: list[int]
    baselines: dict[str, object] = field(default_factory=dict)
    best_epoch: int = 0
    seed: int = 0
    heldout_fraction: float = 0.2
    #: neural - OU / Brownian held-out NLL with paired bootstrap intervals (:mod:`hf_sde.fitting.compare`);
    #: ``None`` for a distributed fit, whose held-out sequences are spread over the processes.
    comparison: dict | None = None

    @property
    def neural_beats_baselines(self) -> bool | None:
        """Both paired intervals below 0 by at least ``MIN_NLL_GAIN`` (``None``: no comparison was made)."""
        return None if self.comparison is None else bool(self.comparison["neural_beats_baselines"])

    def summary(self) -> dict:
        cfg = self.heads.config
        return {
            "heldout_nll": self.heldout_nll,
            "heldout_parts": self.heldout_parts,
            "neural_beats_baselines": self.neural_beats_baselines,
            "heldout_comparison": self.comparison,
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.history["train_total"]),
            "seed": self.seed,
            "heldout_fraction": self.heldout_fraction,
            "train_indices": list(self.train_indices),
            "heldout_indices": list(self.heldout_indices),
            "num_train_sequences": len(self.train_indices),
            "num_heldout_sequences": len(self.heldout_indices),
            "layer": cfg.layer, "proj_dim": cfg.proj_dim, "hidden_size": cfg.hidden_size,
            "horizon": cfg.horizon, "base_model": cfg.base_model, "time_origin": cfg.time_origin,
            "calibration": {"log_diffusion_mean": cfg.log_diffusion_mean, "log_diffusion_std": cfg.log_diffusion_std,
                            "nll_mean": cfg.nll_mean, "nll_std": cfg.nll_std},
        }


@dataclass
class _Options:
    proj_dim: int | None = 16
    standardize: bool = True
    horizon: float | None = None
    width: int = 128
    depth: int = 2
    time_frequencies: int = 4
    epochs: int = 60
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10
    heldout_fraction: float = 0.2
    early_stopping_fraction: float = 0.1
    early_stopping: str = "auto"
    seed: int = 0
    progress: bool = True
    config: dict = field(default_factory=dict)  # SDEHeadsConfig fields from the data and the caller
    compile: bool = False
    matmul_precision: str | None = None
    bf16: bool = False

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        for name in ("compile", "bf16"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.matmul_precision is not None and self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)} (or None: torch's "
                             f"current setting), got {self.matmul_precision!r}")


def init_at_ou(heads: SDEHeads, ou: OUBaseline) -> None:
    """Start the heads exactly at the OU fit: linear drift from least squares, constant diffusion at its
    residual std (the MLPs' last layers output zero / a constant).

    The neural SDE contains OU, and early stopping keeps this starting point when training does not improve
    on it, so a small corpus cannot leave it worse than OU on the early-stopping data.
    """
    with torch.no_grad():
        heads.drift_linear.weight.copy_(ou.weight[:-1].T)
        heads.drift_linear.bias.copy_(ou.weight[-1])
        heads.drift_net[-1].bias.zero_()
        heads.diffusion_net[-1].weight.zero_()
        target = (ou.std - heads.config.sigma_floor).clamp_min(1e-4)
        heads.diffusion_net[-1].bias.copy_(target + torch.log(-torch.expm1(-target)))


def _fit(source, env, mode: str, opts: _Options) -> FitResult:
    """The fit, whatever the process count and data holding: plan, PCA, baselines, train, calibrate, evaluate."""
    plan = FitPlan(source, opts.heldout_fraction, opts.seed, opts.horizon, opts.early_stopping,
                   opts.early_stopping_fraction)
    hidden = source.hidden_size
    d = hidden if opts.proj_dim is None or opts.proj_dim <= 0 else opts.proj_dim
    if d > hidden:
        raise ValueError(f"proj_dim={d} exceeds the hidden size {hidden}; use proj_dim <= {hidden} "
                         "(or 0 for no projection).")
    check_data_size(plan, d)

    def train_states() -> Iterator[torch.Tensor]:
        return (s.float() for g, s in source.local_sequences() if plan.is_train[g])

    basis, mean, scale = projection_from_sequences(train_states, hidden, opts.proj_dim, opts.standardize, env)
    config = SDEHeadsConfig(hidden_size=hidden, proj_dim=d, horizon=plan.horizon, width=opts.width, depth=opts.depth,
                            time_frequencies=opts.time_frequencies, standardize=opts.standardize, **opts.config)
    torch.manual_seed(opts.seed)  # the same initial weights on every rank
    heads = SDEHeads(config)
    heads.proj_basis.copy_(basis)
    heads.proj_mean.copy_(mean)
    heads.proj_scale.copy_(scale)

    def project(s: torch.Tensor) -> torch.Tensor:
        return ((s.float() - mean) @ basis) / scale

    if mode == "exact":
        data = ExactData(plan, project, heads.time_features, d, opts.batch_size)
    else:
        data = StreamData(plan, project, heads.time_features, d, opts.batch_size, env.world_size, env.rank)
    brownian, ou = _baselines(data, env)
    init_at_ou(heads, ou)
    model = HeadsOnInputs(heads)
    if opts.bf16 and not native_bf16():
        logger.warning("bf16=True on a CPU without native bfloat16 (no AVX512-BF16 or AMX): its products are "
                       "emulated, so this fit runs several times slower than in float32. Fit without bf16 / --bf16.")
    desc = "Fitting SDE heads" if env.world_size == 1 else f"Fitting SDE heads ({env.world_size} proc, {mode})"
    bar = tqdm(range(opts.epochs), desc=desc, disable=not opts.progress or not env.is_main, unit="epoch")
    # Only the training (and its early-stopping evaluations) at the requested precision: the calibration and the
    # reported held-out NLLs below use torch's setting of the caller, so they are exact for the trained weights.
    with float32_matmul_precision(opts.matmul_precision):
        history, best_epoch = train_heads(model, data, env, plan.has_es, bar, lr=opts.lr,
                                          weight_decay=opts.weight_decay, patience=opts.patience,
                                          evaluate=evaluate, compile=opts.compile, bf16=opts.bf16)
    _calibrate(heads, model, data, env)
    parts = {"neural": evaluate(model, data.chunks("heldout"), env),
             "ou": evaluate(_on_inputs(ou.predict, d), data.chunks("heldout"), env),
             "brownian": evaluate(_on_inputs(brownian.predict, d), data.chunks("heldout"), env)}
    for v in parts.values():
        v.pop("count")
    heldout_nll = {k: v["total"] for k, v in parts.items()}
    config.heldout_nll = dict(heldout_nll)
    config.data = {**config.data, "train_sequences": len(plan.train_idx), "heldout_sequences": len(plan.val_idx),
                   "train_transitions": plan.num_train_transitions,
                   "heldout_transitions": plan.num_heldout_transitions, "early_stopping": plan.early_stopping}
    if opts.matmul_precision is not None:
        config.data["matmul_precision"] = opts.matmul_precision
    if opts.bf16:
        config.data["bf16"] = True
    if plan.source.groups is not None:
        # Which groups (prompts) were held out, as short hashes: an evaluation of these heads can then stay on
        # unseen prompts without the texts travelling in the config.
        config.data["heldout_prompt_sha1"] = sorted({group_hash(plan.source.groups[i]) for i in plan.val_idx})
    return FitResult(heads, history, heldout_nll, parts, plan.train_idx, plan.val_idx,
                     {"ou": ou, "brownian": brownian}, best_epoch, opts.seed, opts.heldout_fraction)


def group_hash(group) -> str:
    """Short stable hash of a split group (a HelpSteer prompt, say): ``sha1(str(group).strip())[:12]``."""
    return hashlib.sha1(str(group).strip().encode()).hexdigest()[:12]


def _on_inputs(predict: Callable, d: int) -> Callable:
    return lambda x: predict(x[:, :d], x[:, d])


def _config_fields(meta: dict, layer: int, num_layers: int | None, model_id: str | None, base_model, revision,
                   gguf_file, model_type, data_description) -> dict:
    """The SDEHeadsConfig fields that come from the data (and the caller's overrides)."""
    source = meta.get("source") or {}  # where load_model got the weights
    return dict(layer=layer, num_layers=num_layers or -1, base_model=base_model or model_id,
                base_model_revision=revision or source.get("revision"), gguf_file=gguf_file or source.get("gguf_file"),
                model_type=model_type, time_origin=meta.get("time_origin", "sequence"),
                data=dict(data_description or {}))


def fit_heads(
    trajectories: Trajectories,
    *,
    proj_dim: int | None = 16,
    standardize: bool = True,
    horizon: float | None = None,
    width: int = 128,
    depth: int = 2,
    time_frequencies: int = 4,
    epochs: int = 60,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    patience: int = 10,
    heldout_fraction: float = 0.2,
    early_stopping_fraction: float = 0.1,
    early_stopping: str = "auto",
    seed: int = 0,
    progress: bool = True,
    base_model: str | None = None,
    base_model_revision: str | None = None,
    gguf_file: str | None = None,
    model_type: str | None = None,
    data_description: dict | None = None,
    compile: bool = False,
    matmul_precision: str | None = None,
    bf16: bool = False,
) -> FitResult:
    """Fit drift and diffusion heads on hidden-state trajectories by Gaussian likelihood (one process).

    Sequences are split into training and held-out sets (``heldout_fraction``); early stopping watches a
    ``early_stopping_fraction`` of the training sequences (whole groups; ``early_stopping="sequences"``, the
    ``"auto"`` choice from 10 training groups up) or, for smaller corpora, of the training transitions
    (``"transitions"``). The held-out sequences never choose anything. Seeded and deterministic on CPU.
    Raises ``ValueError`` when the data are too small for ``proj_dim`` (the message says how much is needed).

    ``compile=True`` runs the per-batch loss through ``torch.compile`` (full batches; the last partial batch
    of an epoch runs eagerly): the same fit up to float rounding, after a one-off compilation of ~10-20 s on
    CPU; it pays for long fits at large batches (see ``benchmarks/results/bench_fit.md``).

    ``matmul_precision`` (``"highest"`` / ``"high"`` / ``"medium"``): ``torch.set_float32_matmul_precision`` for
    the training only (restored after). ``"medium"`` lets float32 products run with bfloat16 inputs and float32
    accumulation where the hardware has it (CPUs with AMX / AVX512-BF16 through oneDNN; TF32 on CUDA):
    a faster epoch, a fit that differs from the float32 one by about bfloat16 rounding. The calibration and the
    reported held-out NLLs are computed at the caller's precision. ``None``: torch's current setting.

    ``bf16=True``: mixed-precision training, as ``transformers.TrainingArguments(bf16=True)``: each training
    batch's forward runs under bfloat16 autocast (the activations stored in bfloat16), while the weights,
    gradients, optimizer state and loss stay float32; the early-stopping and held-out evaluations, the
    calibration and the reported NLLs run in float32 (the evaluations at ``matmul_precision``, outside
    autocast). It pays only where the CPU has native bfloat16 (AMX / AVX512-BF16; the fit runs on the CPU):
    without it bfloat16 products are emulated and an epoch is several times *slower* (a warning says so).
    With ``matmul_precision="medium"`` at batch 4096 it is the fastest CPU epoch in
    ``benchmarks/results/bench_fit.md``, with the held-out NLL that table shows beside the float32 rows'; at
    the default batch 512 (activations small enough to stay in cache) it made a SmolLM2 fit slower.

    Example:
        >>> result = fit_heads(traj, proj_dim=16, epochs=60)
        >>> result.heldout_nll   # {'neural': ..., 'ou': ..., 'brownian': ...}
        >>> result.heads.save_pretrained("heads/")
    """
    if len(trajectories) == 0:
        raise ValueError("fit_heads got no trajectories: the corpus is empty.")
    check_finite(trajectories.states)
    t = trajectories
    cfg = _config_fields(t.meta, t.layer, t.num_layers, t.model_id, base_model, base_model_revision, gguf_file,
                         model_type, data_description)
    opts = _Options(proj_dim, standardize, horizon, width, depth, time_frequencies, epochs, batch_size, lr,
                    weight_decay, patience, heldout_fraction, early_stopping_fraction, early_stopping, seed,
                    progress, cfg, compile, matmul_precision, bf16)
    result = _fit(MemorySource(trajectories), SingleProcess(), "exact", opts)
    result.comparison = heldout_comparison(result, trajectories)
    return result


def fit_heads_distributed(
    shards,
    *,
    mode: str = "exact",
    env: DistEnv | None = None,
    **kwargs,
) -> FitResult:
    """:func:`fit_heads` on trajectory shards, data-parallel over the current process group.

    ``shards``: a folder, glob or list of shard files, or a ``ShardedCorpus``. Call it on every rank (the
    result is the same on all; save it on rank 0). ``mode="exact"`` equals ``fit_heads(load_shards(shards),
    ...)`` up to float rounding (same plan, PCA, baselines, batches and early stopping); ``mode="stream"``
    keeps one shard in memory with its own batch order. ``batch_size`` is the *global* batch size; the other
    keyword arguments (``proj_dim``, ``epochs``, ..., ``base_model``, ``data_description``) are :func:`fit_heads`'s.

    Example (under ``accelerate launch --num_processes N``):
        >>> with DistEnv.init() as env:
        ...     result = fit_heads_distributed("shards/", proj_dim=16, epochs=60, env=env)
        ...     if env.is_main: result.heads.save_pretrained("heads/")
    """
    if mode not in ("exact", "stream"):
        raise ValueError(f"mode must be 'exact' or 'stream', got {mode!r}")
    corpus = _sharded_corpus(shards)
    if len(corpus) == 0:
        raise ValueError("fit_heads_distributed got no trajectories: the shards are empty.")
    env = env or DistEnv()
    meta = dict(corpus.infos[0].header.get("meta") or {})
    meta["source"] = corpus.source
    provenance = [kwargs.pop(k, None) for k in ("base_model", "base_model_revision", "gguf_file", "model_type",
                                                "data_description")]
    cfg = _config_fields(meta, corpus.layer, corpus.num_layers, corpus.model_id, *provenance)
    opts = _Options(config=cfg, **kwargs)
    result = _fit(ShardSource(corpus, env), env, mode, opts)
    result.heads.config.data["fit"] = {"processes": env.world_size, "mode": mode, "shards": corpus.num_shards}
    return result


def _sharded_corpus(shards: str | Sequence[str]):
    from ..trajectories.shards import ShardedCorpus

    return shards if isinstance(shards, ShardedCorpus) else ShardedCorpus(shards)
