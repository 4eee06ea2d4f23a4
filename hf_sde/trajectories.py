"""Hidden-state trajectories: the path ``H_0, H_1, ...`` of one text at one decoder layer.

Extraction reads the block output with a single forward hook, batches texts of similar length with
right padding (causal attention makes every real position independent of the padding, so each row
equals its unbatched extraction), and stores everything as safetensors.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .layers import hidden_size, num_decoder_layers, register_block_hook, resolve_layer

logger = logging.getLogger(__name__)


@dataclass
class Trajectories:
    """A list of per-sequence hidden paths ``(L_i, D)`` plus where they came from."""

    states: list[torch.Tensor]
    layer: int
    hidden_size: int
    num_layers: int | None = None
    model_id: str | None = None
    skipped: int = 0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.states)

    @property
    def lengths(self) -> list[int]:
        return [int(s.shape[0]) for s in self.states]

    @property
    def num_transitions(self) -> int:
        return sum(n - 1 for n in self.lengths)

    def subset(self, indices: Sequence[int]) -> Trajectories:
        meta = dict(self.meta)
        for key in ("groups", "kept_indices"):
            if key in meta:
                meta[key] = [meta[key][i] for i in indices]
        return Trajectories([self.states[i] for i in indices], self.layer, self.hidden_size, self.num_layers,
                            self.model_id, 0, meta)

    def save(self, path: str) -> None:
        """Save as one safetensors file (states concatenated, lengths alongside, metadata as JSON)."""
        flat = torch.cat([s.float() for s in self.states]) if self.states else torch.zeros(0, self.hidden_size)
        meta = {"layer": self.layer, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "model_id": self.model_id, "skipped": self.skipped, "meta": self.meta}
        save_file({"states": flat.contiguous(), "lengths": torch.tensor(self.lengths, dtype=torch.int64)},
                  path, metadata={"hf_sde_trajectories": json.dumps(meta)})

    @classmethod
    def load(cls, path: str) -> Trajectories:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No trajectory file at {path!r}.")
        try:
            tensors = load_file(path)
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors trajectory file (corrupt or truncated?): {e}") from e
        if "hf_sde_trajectories" not in metadata or set(tensors) != {"states", "lengths"}:
            raise ValueError(f"{path} is a safetensors file but not an hf-sde trajectory file (keys {sorted(tensors)}).")
        meta = json.loads(metadata["hf_sde_trajectories"])
        lengths = tensors["lengths"].tolist()
        if sum(lengths) != tensors["states"].shape[0]:
            raise ValueError(f"{path}: lengths sum to {sum(lengths)} but there are {tensors['states'].shape[0]} states.")
        states = list(torch.split(tensors["states"], lengths)) if lengths else []
        return cls(states, meta["layer"], meta["hidden_size"], meta.get("num_layers"), meta.get("model_id"),
                   meta.get("skipped", 0), meta.get("meta", {}))


def check_finite(states: Sequence[torch.Tensor], indices: Sequence[int] | None = None) -> None:
    """Raise naming the first sequence and position whose hidden state is NaN or infinite.

    ``indices`` are the names of the sequences (e.g. their corpus indices); default ``0, 1, ...``.
    """
    for i, s in enumerate(states):
        bad = ~torch.isfinite(s).all(dim=-1)
        if bad.any():
            pos = int(bad.nonzero()[0, 0])
            name = indices[i] if indices is not None else i
            raise ValueError(
                f"Non-finite hidden state (NaN/inf) in sequence {name} at position {pos}. The model overflows on "
                "this input: load it in float32 (dtype=torch.float32) or drop that text."
            )


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids for each text (special tokens as the tokenizer adds them), truncated to ``max_length``."""
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=max_length is not None,
                    max_length=max_length)
    return [list(ids) for ids in enc["input_ids"]]


@torch.no_grad()
def extract_from_ids(
    model,
    token_ids: Sequence[Sequence[int]],
    layer: int = -1,
    *,
    batch_size: int = 8,
    min_length: int = 2,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Trajectories:
    """Hidden paths at ``layer`` for already tokenized sequences (see :func:`extract_trajectories`)."""
    layer_idx = resolve_layer(model, layer)
    keep = [i for i, ids in enumerate(token_ids) if len(ids) >= min_length]
    skipped = len(token_ids) - len(keep)
    if skipped:
        logger.warning("Skipped %d of %d texts shorter than %d tokens.", skipped, len(token_ids), min_length)
    if not keep:
        raise ValueError(
            f"No usable text: all {len(token_ids)} texts are shorter than {min_length} tokens "
            "(a trajectory needs at least one transition)."
        )
    device = next(model.parameters()).device
    # Sort by length so batches waste little padding; results go back to corpus order.
    order = sorted(keep, key=lambda i: len(token_ids[i]))
    out: dict[int, torch.Tensor] = {}
    captured: list[torch.Tensor] = []
    handle = register_block_hook(model, layer_idx, lambda h: captured.append(h.detach()))
    try:
        bar = tqdm(total=len(order), desc=f"Extracting layer {layer_idx}", disable=not progress, unit="seq")
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            lengths = [len(token_ids[i]) for i in idx]
            width = max(lengths)
            input_ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                input_ids[r, : lengths[r]] = torch.tensor(token_ids[i])
                mask[r, : lengths[r]] = 1
            captured.clear()
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            hidden = captured[-1].to("cpu", dtype)
            for r, i in enumerate(idx):
                out[i] = hidden[r, : lengths[r]].clone()
            bar.update(len(idx))
        bar.close()
    finally:
        handle.remove()
    states = [out[i] for i in keep]
    check_finite(states, keep)  # name the sequence by its index in token_ids, not among the kept ones
    source = getattr(model, "hf_sde_source", None) or {}
    return Trajectories(states, layer_idx, hidden_size(model), num_decoder_layers(model),
                        source.get("name_or_path") or getattr(model.config, "_name_or_path", None), skipped,
                        {"source": source, "kept_indices": keep})


def extract_trajectories(
    model,
    tokenizer,
    data: str | os.PathLike | Iterable[str],
    layer: int = -1,
    *,
    max_length: int | None = 512,
    batch_size: int = 8,
    template: str | None = None,
    text_column: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> Trajectories:
    """Hidden-state paths of a corpus at one decoder layer.

    ``data`` is anything :func:`hf_sde.corpus.load_texts` reads (a path, a hub dataset id or a list of
    strings). Texts shorter than two tokens are skipped and counted (``Trajectories.skipped``).

    Example:
        >>> traj = extract_trajectories(model, tok, "../shared/data/tinystories_sample.txt", layer=-1)
        >>> traj.states[0].shape   # (tokens, hidden_size)
    """
    from .corpus import load_texts

    texts, groups = load_texts(data, template=template, text_column=text_column, limit=limit, return_groups=True)
    ids = tokenize_texts(tokenizer, texts, max_length)
    traj = extract_from_ids(model, ids, layer, batch_size=batch_size, progress=progress)
    if groups is not None:
        traj.meta["groups"] = [groups[i] for i in traj.meta["kept_indices"]]
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    traj.meta.update({"data": data if isinstance(data, str) else "<list>", "template": template,
                      "max_length": max_length, "num_texts": len(texts)})
    return traj


@torch.no_grad()
def self_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    num_samples: int,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> list[list[int]]:
    """The model's own sampled continuations (prompt + sample token ids): the generation process as a corpus."""
    if not prompts:
        raise ValueError("self_generate needs at least one prompt.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    chosen = [prompts[i % len(prompts)] for i in range(num_samples)]
    results: list[list[int]] = []
    pad = tokenizer.pad_token_id
    for start in tqdm(range(0, num_samples, batch_size), desc="Sampling the model", disable=not progress):
        batch = chosen[start:start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left").to(device)
        seqs = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0,
                              max_new_tokens=max_new_tokens, pad_token_id=pad)
        prompt_width = enc["input_ids"].shape[1]
        for r in range(len(batch)):
            prompt = enc["input_ids"][r][enc["attention_mask"][r].bool()].tolist()
            new = seqs[r, prompt_width:].tolist()
            if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id) + 1]
            results.append(prompt + new)
    return results
