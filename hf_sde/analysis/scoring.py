"""Sequence-level SDE statistics of any text: :func:`score_texts`.

Each text is read by the model as the heads were fitted (teacher-forced, one forward per batch); a hook at the
heads' layer reads the hidden path and the LM head sees only the path positions. Per text, over its ``n``
steps (transition ``k -> k+1`` of the projected path and, in the same step, the model's prediction of token
``k+1`` from position ``k``), with the definitions of METHOD.md:

* ``mean_surprise``: mean of :meth:`SDEHeads.surprise` (the increment's per-dimension NLL standardized by the
  training transitions' mean and std; 0 is a typical training step, positive is less likely);
* ``tube_exit_rate``: the share of steps whose increment leaves the tube, the central ``tube`` (default 99%)
  probability ellipsoid of the fitted transition ``N(mu dt, diag(sigma^2) dt)``: with the standardized
  increment ``e_i = (dz_i - mu_i dt) / (sigma_i sqrt(dt))``, a step is outside when ``sum_i e_i^2`` exceeds the
  ``tube`` quantile of chi-square with ``d`` degrees of freedom (under the fitted SDE the rate is ``1 - tube``);
* ``sde_nll`` / ``ou_nll``: mean transition NLL (nats per dimension) under the neural SDE and under an
  Ornstein-Uhlenbeck baseline (:class:`~hf_sde.baselines.OUBaseline`, fitted on the heads' training paths;
  pass it as ``ou=``, e.g. ``FitResult.baselines["ou"]``: the heads do not store it), and
  ``sde_minus_ou_nll`` their per-step difference (negative: the neural SDE explains this path better);
* ``mean_zscore``: mean calibrated diffusion z-score :meth:`SDEHeads.zscore` of the states the steps start from;
* the baselines a user tries first, from the same forward: ``token_nll`` (the model's mean NLL of the text's
  tokens), ``entropy`` (mean next-token entropy, nats) and ``num_tokens`` (the tokens scored, ``n``).

The path: with ``prompts`` (or a chat ``template``) the response read in the context of its prompt through the
tokenizer's chat template (:func:`~hf_sde.trajectories.tokenize_chats`, from the last prompt position); for
plain texts the whole text, except that heads fitted on responses (``time_origin="prompt_end"``) start at
position 1, keeping the first position (the attention sink of most models) out as the fit did. Time ``k``
counts from the path start for ``prompt_end`` heads and from the text start otherwise, as in the fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

#: Default probability mass inside the tube (the central ellipsoid of the fitted transition density).
DEFAULT_TUBE = 0.99

#: The sequence-level statistics of :class:`TextScore`, in table order (SDE first, then the model's own).
SDE_STATISTICS = ("mean_surprise", "tube_exit_rate", "sde_nll", "ou_nll", "sde_minus_ou_nll", "mean_zscore")
MODEL_STATISTICS = ("token_nll", "entropy", "num_tokens")
STATISTICS = SDE_STATISTICS + MODEL_STATISTICS


@dataclass
class TextScore:
    """Sequence-level statistics of one text (module doc); OU fields are ``None`` without an OU baseline.

    ``steps`` (with ``return_steps=True``) holds the per-step values (1-D tensors of length ``num_tokens``:
    ``surprise``, ``outside_tube``, ``sde_nll``, ``ou_nll``, ``zscore``, ``token_nll``, ``entropy``) and the
    projected path ``z`` (``num_tokens + 1`` states), from which :func:`path_statistics` recomputes the SDE
    statistics under another OU baseline without a forward pass.
    """

    index: int
    num_tokens: int
    mean_surprise: float
    tube_exit_rate: float
    sde_nll: float
    ou_nll: float | None
    sde_minus_ou_nll: float | None
    mean_zscore: float
    token_nll: float
    entropy: float
    steps: dict | None = field(default=None, repr=False)

    def as_dict(self, steps: bool = False) -> dict:
        """The scalars as a plain dict (JSON-ready), with the per-step lists too when ``steps``."""
        out = {k: v for k, v in asdict(self).items() if k != "steps"}
        if steps and self.steps is not None:
            out["steps"] = {k: v.tolist() for k, v in self.steps.items() if k != "z"}
        return out


def tube_threshold(dim: int, tube: float = DEFAULT_TUBE) -> float:
    """Squared-norm bound of the standardized increment: the ``tube`` quantile of chi-square(``dim``)."""
    from scipy.stats import chi2

    if not 0 < tube < 1:
        raise ValueError(f"tube must be a probability in (0, 1), got {tube}")
    return float(chi2.ppf(tube, dim))


@torch.no_grad()
def path_statistics(heads, z: torch.Tensor, positions: torch.Tensor | None = None, *, ou=None,
                    tube: float = DEFAULT_TUBE) -> dict[str, torch.Tensor]:
    """Per-step SDE statistics of one projected path ``z`` (``(p, d)``, ``p >= 2``): ``surprise``,
    ``outside_tube``, ``sde_nll``, ``ou_nll`` (NaN without ``ou``) and ``zscore``, each of length ``p - 1``.

    ``positions`` are the time indices ``k`` of the states (default ``0..p-1``); ``ou`` anything with
    ``predict(z, t) -> (mean, std)`` in increment units (:class:`~hf_sde.baselines.OUBaseline`).
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"path_statistics needs a path of at least 2 states, shape (p, d); got {tuple(z.shape)}")
    z = z.to(heads.proj_basis.dtype)
    if positions is None:
        positions = torch.arange(z.shape[0])
    t = heads.times(positions[:-1].to(z.device))
    dz = z[1:] - z[:-1]
    mean, std = heads(z[:-1], t)
    nll = heads.transition_nll(dz, mean, std)
    e2 = ((dz - mean) / std).pow(2).sum(-1)
    out = {"surprise": heads.surprise(dz, mean, std), "outside_tube": (e2 > tube_threshold(z.shape[1], tube)).float(),
           "sde_nll": nll.mean(-1), "zscore": heads.zscore(heads.diffusion_magnitude(std))}
    if ou is not None:
        ou_mean, ou_std = ou.predict(z[:-1], t)
        out["ou_nll"] = heads.transition_nll(dz, ou_mean.to(z.dtype), ou_std.to(z.dtype)).mean(-1)
    else:
        out["ou_nll"] = torch.full_like(out["sde_nll"], float("nan"))
    return out


def summarize(index: int, steps: dict[str, torch.Tensor], keep_steps: bool = False) -> TextScore:
    """A :class:`TextScore` from per-step values (:func:`path_statistics` plus ``token_nll`` and ``entropy``)."""
    def mean(name: str) -> float:
        return float(steps[name].double().mean())

    has_ou = bool(torch.isfinite(steps["ou_nll"]).all())
    ou = mean("ou_nll") if has_ou else None
    sde = mean("sde_nll")
    return TextScore(index=index, num_tokens=int(steps["sde_nll"].numel()), mean_surprise=mean("surprise"),
                     tube_exit_rate=mean("outside_tube"), sde_nll=sde, ou_nll=ou,
                     sde_minus_ou_nll=None if ou is None else sde - ou, mean_zscore=mean("zscore"),
                     token_nll=mean("token_nll"), entropy=mean("entropy"),
                     steps={k: v.detach().cpu() for k, v in steps.items()} if keep_steps else None)


def rescore(heads, score: TextScore, *, ou=None, tube: float = DEFAULT_TUBE) -> TextScore:
    """``score`` with its SDE statistics recomputed from its stored path (``return_steps=True``), e.g. under an
    OU baseline fitted after the forward pass; the model's statistics are kept."""
    if score.steps is None or "z" not in score.steps:
        raise ValueError("rescore needs a TextScore made with return_steps=True (it keeps the path).")
    sde = path_statistics(heads, score.steps["z"], score.steps["positions"], ou=ou, tube=tube)
    return summarize(score.index, {**score.steps, **sde}, keep_steps=True)


# ----- documents to token ids -------------------------------------------------------------------------------
def _documents(texts, prompts, template) -> list:
    from ..data.corpus import CHAT_TEMPLATES, TEMPLATES, _chat_messages, _is_blank, _row_to_document

    if isinstance(texts, (str, bytes, dict)):
        raise TypeError("score_texts takes a list of texts (or of rows with template=...), not a single "
                        f"{type(texts).__name__}; wrap it in a list.")
    texts = list(texts)
    if not texts:
        raise ValueError("score_texts got no texts: pass at least one.")
    if prompts is not None:
        if template is not None and template not in CHAT_TEMPLATES:
            raise ValueError(f"prompts= reads each text as the response to its prompt through the chat template; "
                             f"template={template!r} is not a chat template ({sorted(CHAT_TEMPLATES)}).")
        prompts = list(prompts)
        if len(prompts) != len(texts):
            raise ValueError(f"prompts has {len(prompts)} entries for {len(texts)} texts; give one prompt per text.")
        docs = [_chat_messages({"prompt": p, "response": t}) for p, t in zip(prompts, texts, strict=True)]
    elif template is not None:
        if template not in TEMPLATES:
            raise ValueError(f"Unknown template {template!r}; choose one of {sorted(TEMPLATES)}.")
        docs = []
        for i, row in enumerate(texts):
            if not isinstance(row, dict):
                raise ValueError(f"template={template!r} reads rows (dicts with its columns); text {i} is a "
                                 f"{type(row).__name__}. Pass prompts=... to score plain responses as chat.")
            docs.append(_row_to_document(row, "<texts>", template, None)[0])
    else:
        docs = []
        for i, x in enumerate(texts):
            if isinstance(x, (list, str)):
                docs.append(x)  # a text, or a conversation (list of messages, the last one the response)
            else:
                raise ValueError(f"text {i} is a {type(x).__name__}; pass strings, conversations, or rows with "
                                 "template=...")
    blank = [i for i, d in enumerate(docs) if _is_blank(d)]
    if blank:
        raise ValueError(f"text {blank[0]} is empty (blank texts: {blank[:10]}); every text needs tokens to score.")
    return docs


def _caps(model, heads, max_length: int | None, max_context: int | None) -> tuple[int, int | None]:
    """``(max_length, max_context)``: the path cap (default as the heads were fitted) and the input cap (default
    the model's ``max_position_embeddings``), as the fit's extraction read its corpus."""
    from ..trajectories.extract import DEFAULT_MAX_LENGTH

    if max_length is None:
        max_length = int((heads.config.data or {}).get("max_length") or DEFAULT_MAX_LENGTH)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1 (tokens scored per text), got {max_length}")
    if max_context is None:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        max_context = getattr(config, "max_position_embeddings", None)
    return max_length, max_context


def _token_ids(model, tokenizer, heads, docs, max_length, max_context, template):
    from ..trajectories.extract import tokenize_chats, tokenize_texts

    if all(isinstance(d, list) for d in docs):
        ids, starts = tokenize_chats(tokenizer, docs, max_length, max_context, template=template)
        return ids, starts
    if any(isinstance(d, list) for d in docs):
        raise ValueError("score_texts got a mix of texts and conversations; score them in separate calls.")
    # Response heads: position 0 (the attention sink) is context, as in the fit (module doc).
    first = 1 if heads.config.time_origin == "prompt_end" else 0
    ids = tokenize_texts(tokenizer, docs, None if max_length is None else max_length + first)
    return ids, [first] * len(ids)


# ----- the forward ------------------------------------------------------------------------------------------
def _head_inputs_on_path(model, keep: torch.Tensor):
    """A pre-hook on the LM head giving it only the path positions ``(1, n, D)``: the logits come out of the
    model's own forward (soft-capping and scaling included) without a (batch, width, vocab) tensor."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head): score_texts needs a causal LM.")

    def pre_hook(_module, args):
        hidden = args[0]
        return (hidden[keep.to(hidden.device)].unsqueeze(0), *args[1:])

    return head.register_forward_pre_hook(pre_hook)


@torch.no_grad()
def _token_stats(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL of ``targets`` and entropy (nats) of ``softmax(logits)``, in chunks of positions."""
    nll, ent = [], []
    for a in range(0, logits.shape[0], chunk):
        logp = torch.log_softmax(logits[a:a + chunk].float(), -1)
        nll.append(-logp.gather(-1, targets[a:a + chunk, None]).squeeze(-1))
        ent.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(nll), torch.cat(ent)


@torch.no_grad()
def score_texts(
    model,
    tokenizer,
    heads,
    texts: Sequence,
    *,
    prompts: Sequence[str] | None = None,
    template: str | None = None,
    ou=None,
    tube: float = DEFAULT_TUBE,
    batch_size: int = 4,
    max_length: int | None = None,
    max_context: int | None = None,
    return_steps: bool = False,
    progress: bool = False,
) -> list[TextScore]:
    """Sequence-level SDE statistics and the model's own baselines for each text (module doc), in input order.

    ``texts``: strings; or, with ``prompts`` (one per text), responses read as chat after their prompt; or, with
    a corpus ``template`` (``hf_sde.corpus.TEMPLATES``, e.g. ``"helpsteer-chat"``), rows (dicts) formatted as
    the fit read them. ``max_length`` caps the scored path (default: the heads' fit, else 256 tokens);
    ``max_context`` the whole input (default the model's ``max_position_embeddings``; the prompt is cut from
    the left). ``ou``: an :class:`~hf_sde.baselines.OUBaseline` for ``ou_nll``. ``return_steps`` keeps per-step
    values and the projected path (:class:`TextScore`). Raises ``ValueError`` on no or blank texts, heads made
    for another model (:meth:`SDEHeads.check_compatible`) and non-finite hidden states.

    Example:
        >>> scores = score_texts(model, tok, heads, ["The sky is blue."], ou=fit.baselines["ou"])
        >>> scores[0].mean_surprise, scores[0].token_nll
    """
    from tqdm.auto import tqdm

    from ..data.layers import register_block_hook
    from ..trajectories.extract import _batch, check_finite

    heads.check_compatible(model)
    tube_threshold(heads.config.proj_dim, tube)  # validate before the forward
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    docs = _documents(texts, prompts, template)
    ids, starts = _token_ids(model, tokenizer, heads, docs, *_caps(model, heads, max_length, max_context), template)
    short = [i for i, x in enumerate(ids) if len(x) - starts[i] < 2]
    if short:
        raise ValueError(f"text {short[0]} has fewer than 2 path tokens after tokenization (short texts: "
                         f"{short[:10]}); a path needs at least one transition.")

    device = next(model.parameters()).device
    heads_device = heads.proj_basis.device
    sequence_time = heads.config.time_origin != "prompt_end"
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: little padding
    captured: list[torch.Tensor] = []
    scores: dict[int, TextScore] = {}
    block = register_block_hook(model, heads.config.layer, lambda h: captured.append(h.detach()))
    try:
        bar = tqdm(total=len(order), desc="Scoring", unit="text", disable=not progress)
        for a in range(0, len(order), batch_size):
            idx = order[a:a + batch_size]
            input_ids, mask, keep, path_lengths = _batch(ids, idx, starts)
            captured.clear()
            head = _head_inputs_on_path(model, keep)
            try:
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            finally:
                head.remove()
            hidden = captured[-1][keep.to(captured[-1].device)]
            paths = hidden.to(heads_device, torch.float32).split(path_lengths)
            check_finite(paths, idx)
            for i, h, lg in zip(idx, paths, logits[0].split(path_lengths), strict=True):
                p = h.shape[0]
                positions = torch.arange(p) + (starts[i] if sequence_time else 0)
                z = heads.project(h)
                steps = path_statistics(heads, z, positions, ou=ou, tube=tube)
                targets = torch.tensor(ids[i][starts[i] + 1:], device=lg.device)
                steps["token_nll"], steps["entropy"] = (x.to(heads_device) for x in _token_stats(lg[:-1], targets))
                if return_steps:
                    steps.update(z=z, positions=positions)
                scores[i] = summarize(i, steps, keep_steps=return_steps)
            bar.update(len(idx))
        bar.close()
    finally:
        block.remove()
    out = [scores[i] for i in range(len(ids))]
    bad = [s.index for s in out if not all(math.isfinite(getattr(s, k)) for k in ("sde_nll", "token_nll"))]
    if bad:
        raise ValueError(f"Non-finite scores for texts {bad[:10]}: the heads or the model overflow on them.")
    return out


@torch.no_grad()
def fit_ou_baseline(model, tokenizer, heads, texts: Sequence, *, prompts: Sequence[str] | None = None,
                    template: str | None = None, batch_size: int = 8, max_length: int | None = None,
                    max_context: int | None = None, progress: bool = False):
    """An :class:`~hf_sde.baselines.OUBaseline` fitted on the projected paths of reference ``texts`` (read as
    :func:`score_texts` reads texts; e.g. the heads' training corpus), for ``score_texts(..., ou=...)``.

    One forward per batch that stops after the heads' layer (:func:`~hf_sde.trajectories.extract_from_ids`).
    """
    from ..trajectories.extract import extract_from_ids

    heads.check_compatible(model)
    docs = _documents(texts, prompts, template)
    ids, starts = _token_ids(model, tokenizer, heads, docs, *_caps(model, heads, max_length, max_context), template)
    traj = extract_from_ids(model, ids, heads.config.layer, batch_size=batch_size, progress=progress, starts=starts)
    return ou_baseline_from_trajectories(heads, traj)


@torch.no_grad()
def ou_baseline_from_trajectories(heads, trajectories):
    """An :class:`~hf_sde.baselines.OUBaseline` fitted on the projected paths of already extracted
    ``trajectories`` at the heads' layer (what :func:`fit_ou_baseline` does after its forward)."""
    from ..fitting.baselines import OUBaseline
    from ..fitting.fit import TRANSITIONS_PER_COEFFICIENT
    from ..fitting.transitions import make_transitions

    if trajectories.layer != heads.config.layer:
        raise ValueError(f"The trajectories are of layer {trajectories.layer}; the heads read layer "
                         f"{heads.config.layer}.")
    tr = make_transitions([heads.project(s) for s in trajectories.states], heads.config.horizon)
    need = TRANSITIONS_PER_COEFFICIENT * (heads.config.proj_dim + 1)
    if len(tr) < need:
        raise ValueError(f"Too little reference text for an OU baseline at proj_dim {heads.config.proj_dim}: "
                         f"{len(tr)} transitions, at least {need} are needed. Use more or longer texts.")
    return OUBaseline.fit(tr)


__all__ = ["DEFAULT_TUBE", "MODEL_STATISTICS", "SDE_STATISTICS", "STATISTICS", "TextScore", "fit_ou_baseline", "path_statistics",
           "rescore", "score_texts", "summarize", "tube_threshold"]
