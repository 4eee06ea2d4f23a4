"""Hidden-state trajectories: the path ``H_0, H_1, ...`` of one text at one decoder layer.

Extraction reads block outputs with forward hooks (one per requested layer, all from one forward pass that
stops after the deepest of them), batches texts of similar length with right padding (causal attention
makes every real position independent of the padding, so each row equals its unbatched extraction), and
stores everything as safetensors. The trajectory file format is read and written here only.

Chat data (a conversation whose last message is the response) is modelled on the response: the model reads
the whole conversation and the path runs from the last position before the first response token (the state
that produced it, ``k = 0``) to the last response token (see :func:`tokenize_chats`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data.layers import hidden_size, num_decoder_layers, register_block_hook, resolve_layer

logger = logging.getLogger(__name__)

#: Default token cap of an extracted path (the CLI's --max-length too: one set of defaults).
DEFAULT_MAX_LENGTH = 256

_HEADER_KEY = "hf_sde_trajectories"


def read_trajectory_header(path: str) -> tuple[dict, list[int]]:
    """A trajectory file's header (layer, sizes, model, ``meta``) and per-sequence lengths, without its states."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No trajectory file at {path!r}.")
    try:
        with safe_open(path, "pt") as f:
            metadata, keys = f.metadata() or {}, set(f.keys())
            lengths = f.get_tensor("lengths").tolist() if "lengths" in keys else None
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors trajectory file (corrupt or truncated?): {e}") from e
    if _HEADER_KEY not in metadata or keys != {"states", "lengths"}:
        raise ValueError(f"{path} is a safetensors file but not an hf-sde trajectory file (keys {sorted(keys)}).")
    return json.loads(metadata[_HEADER_KEY]), lengths


@dataclass
class Trajectories:
    """A list of per-sequence hidden paths ``(L_i, D)`` plus where they came from.

    ``meta`` may hold per-sequence lists (``groups``, ``kept_indices``, ``path_start``: the absolute
    position of each path's first state) and ``time_origin`` (``"prompt_end"`` for response paths).
    """

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
        for key in ("groups", "kept_indices", "path_start", "doc_indices"):
            if key in meta:
                meta[key] = [meta[key][i] for i in indices]
        return Trajectories([self.states[i] for i in indices], self.layer, self.hidden_size, self.num_layers,
                            self.model_id, 0, meta)

    def save(self, path: str) -> None:
        """Save as one safetensors file (states concatenated as float32, lengths alongside, metadata as JSON)."""
        flat = torch.cat([s.float() for s in self.states]) if self.states else torch.zeros(0, self.hidden_size)
        meta = {"layer": self.layer, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "model_id": self.model_id, "skipped": self.skipped, "meta": self.meta}
        save_file({"states": flat.contiguous(), "lengths": torch.tensor(self.lengths, dtype=torch.int64)},
                  path, metadata={_HEADER_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str) -> Trajectories:
        header, lengths = read_trajectory_header(path)
        try:
            with safe_open(path, "pt") as f:
                flat = f.get_tensor("states")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors trajectory file (corrupt or truncated?): {e}") from e
        if sum(lengths) != flat.shape[0]:
            raise ValueError(f"{path}: lengths sum to {sum(lengths)} but there are {flat.shape[0]} states.")
        states = list(torch.split(flat, lengths)) if lengths else []
        return cls(states, header["layer"], header["hidden_size"], header.get("num_layers"), header.get("model_id"),
                   header.get("skipped", 0), header.get("meta", {}))


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


# ----- tokenization -------------------------------------------------------------------------------------
def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids for each text (special tokens as the tokenizer adds them), truncated to ``max_length``."""
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=max_length is not None,
                    max_length=max_length)
    return [list(ids) for ids in enc["input_ids"]]


def _render(tokenizer, messages: list[dict], **kw) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def _response_span(tokenizer, messages: list[dict]) -> tuple[list[int], int, int]:
    """``(ids, first, end)``: the conversation's token ids and the response tokens ``ids[first:end]``.

    The template's tokens before the response (role header) and after it (closing special tokens) lie
    outside ``first:end``; found from the rendered text's character offsets, so BPE merges cannot shift it.
    """
    text = _render(tokenizer, messages)
    context = _render(tokenizer, messages[:-1], add_generation_prompt=True)
    if not text.startswith(context):
        raise ValueError("the chat template does not render the conversation as its context (with the "
                         "generation prompt) followed by the response, so the response cannot be located")
    response = messages[-1]["content"]
    at = text.find(response, len(context))
    if at < 0:  # templates may trim the content
        response = response.strip()
        at = text.find(response, len(context))
    if at < 0:
        raise ValueError("the chat template does not reproduce the response text verbatim")
    resp_end = at + len(response)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    first = next(i for i, (_, e) in enumerate(offsets) if e > at)
    end = 1 + max(i for i, (s, _) in enumerate(offsets) if s < resp_end)
    return list(enc["input_ids"]), first, end


def model_name(model) -> str | None:
    """Where the model came from (what ``load_model`` recorded, else its config's name)."""
    source = getattr(model, "hf_sde_source", None) or {}
    return source.get("name_or_path") or getattr(model.config, "_name_or_path", None)


def check_chat_template(tokenizer, template: str | None = None, model=None) -> None:
    """Raise, naming the corpus template and the model, when the tokenizer has no chat template."""
    if getattr(tokenizer, "chat_template", None) is not None:
        return
    name = (model_name(model) if model is not None else None) or getattr(tokenizer, "name_or_path", None) or "?"
    what = f"template={template!r}" if template else "Chat data"
    raise ValueError(
        f"{what} formats conversations with the tokenizer's chat template, but the tokenizer of {name!r} has "
        "none (tokenizer.chat_template is None). Use a chat model (e.g. SmolLM2-135M-Instruct), set "
        "tokenizer.chat_template, or a plain-text template ('helpsteer', 'helpsteer-response').")


def tokenize_chats(
    tokenizer, conversations: Sequence[list[dict]], max_length: int | None = None, max_context: int | None = None,
    *, template: str | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Token ids of each conversation through ``tokenizer.apply_chat_template``, and where its path starts.

    A conversation is a list of ``{"role", "content"}`` messages; the last is the assistant's response.
    Returns ``(ids, starts)``: ``ids`` runs from the conversation's start to the response's last token (the
    template's closing tokens are cut: causal attention makes them irrelevant to earlier states), and the
    modelled path is ``ids[start:]``: the last position before the first response token (the state that
    produced it) through the response. ``max_length`` bounds the path (``len(ids) - start``), and so does
    ``max_context - 1``; when the whole input exceeds ``max_context`` tokens its context is cut from the
    left (the oldest prompt tokens go first; at least one context token always stays before the path, so
    position 0, the attention sink of most models, never enters it). ``template`` names the corpus
    template in errors.
    """
    check_chat_template(tokenizer, template)
    caps = [x for x in (max_length, max_context - 1 if max_context is not None else None) if x is not None]
    all_ids, starts = [], []
    for n, messages in enumerate(conversations):
        try:
            ids, first, end = _response_span(tokenizer, messages)
        except ValueError as e:
            raise ValueError(f"Conversation {n}: {e}.") from None
        start = first - 1
        if start < 1:
            raise ValueError(f"Conversation {n}: the chat template puts the response at position {first}; "
                             "the path needs at least one context token before it.")
        end = min([end] + [start + c for c in caps])
        cut = max(0, end - max_context) if max_context is not None else 0
        all_ids.append(ids[cut:end])
        starts.append(start - cut)
    return all_ids, starts


def tokenize_documents(tokenizer, documents: Sequence, max_length: int | None = None,
                       max_context: int | None = None, *,
                       template: str | None = None) -> tuple[list[list[int]], list[int] | None]:
    """``(ids, starts)`` for texts (:func:`tokenize_texts`, ``starts`` is ``None``) or conversations
    (:func:`tokenize_chats`): what :func:`extract_from_ids` takes, whatever :func:`~hf_sde.corpus.load_texts`
    returned."""
    documents = list(documents)
    if documents and all(isinstance(d, list) for d in documents):
        return tokenize_chats(tokenizer, documents, max_length, max_context, template=template)
    if any(isinstance(d, list) for d in documents):
        raise ValueError("A corpus mixes texts and conversations; use one template for all of it.")
    return tokenize_texts(tokenizer, documents, max_length), None


# ----- extraction ---------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by the hook of the deepest requested layer: the blocks after it and the LM head are not needed."""


def _batch(token_ids: Sequence[Sequence[int]], idx: list[int], starts: Sequence[int] | None):
    """Right-padded ids, attention mask and the mask of the path positions to keep, for rows ``idx``."""
    lengths = torch.tensor([len(token_ids[i]) for i in idx])
    width = int(lengths.max())
    input_ids = torch.tensor([list(token_ids[i]) + [0] * (width - len(token_ids[i])) for i in idx])
    pos = torch.arange(width)
    mask = pos < lengths[:, None]
    first = torch.tensor([starts[i] for i in idx]) if starts is not None else torch.zeros(len(idx), dtype=torch.long)
    return input_ids, mask.long(), mask & (pos >= first[:, None]), (lengths - first).tolist()


def _capture(model, layers: list[int]):
    """Hooks storing each requested block's output in a dict; the deepest one stops the forward."""
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def make(layer: int):
        def fn(h: torch.Tensor):
            captured[layer] = h
            if layer == deepest:
                raise _StopForward
        return fn

    return captured, [register_block_hook(model, layer, make(layer)) for layer in layers]


def _run_batches(model, token_ids, order: list[int], layers: list[int], starts, batch_size: int, dtype,
                 progress: bool) -> dict[int, list[torch.Tensor]]:
    """``{layer: paths}`` for the rows ``order`` (in that order), one forward per batch for all layers."""
    device = next(model.parameters()).device
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    captured, handles = _capture(model, layers)
    try:
        bar = tqdm(total=len(order), desc=f"Extracting layer{'s' if len(layers) > 1 else ''} "
                   f"{','.join(map(str, layers))}", disable=not progress, unit="seq")
        for a in range(0, len(order), batch_size):
            input_ids, mask, keep, path_lengths = _batch(token_ids, order[a:a + batch_size], starts)
            captured.clear()
            try:
                model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _StopForward:
                pass
            keep = keep.to(device)
            for layer in layers:
                # One gather of the path rows, one copy to the CPU; the paths are views of it (no padding kept).
                flat = captured[layer][keep].to("cpu", dtype)
                out[layer].extend(flat.split(path_lengths))
            bar.update(len(path_lengths))
        bar.close()
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def extract_from_ids(
    model,
    token_ids: Sequence[Sequence[int]],
    layer: int | Sequence[int] = -1,
    *,
    batch_size: int = 8,
    min_length: int = 2,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    starts: Sequence[int] | None = None,
) -> Trajectories | list[Trajectories]:
    """Hidden paths at ``layer`` for already tokenized sequences (see :func:`extract_trajectories`).

    ``layer`` may be a list of layers: then one :class:`Trajectories` per layer comes back (in that order),
    all from one forward pass per batch (a layer sweep costs one extraction, not one per layer). ``starts``
    (e.g. from :func:`tokenize_chats`) keeps only ``states[starts[i]:]`` of sequence ``i`` (the model still
    reads the whole sequence) and records them as ``meta["path_start"]`` with
    ``meta["time_origin"] = "prompt_end"``. Paths shorter than ``min_length`` states are skipped and counted.
    """
    layers = [resolve_layer(model, x) for x in ([layer] if isinstance(layer, int) else layer)]
    if not layers:
        raise ValueError("extract_from_ids needs at least one layer.")
    if starts is not None and len(starts) != len(token_ids):
        raise ValueError(f"starts has {len(starts)} entries for {len(token_ids)} sequences.")
    first = starts if starts is not None else [0] * len(token_ids)
    keep = [i for i, ids in enumerate(token_ids) if len(ids) - first[i] >= min_length]
    skipped = len(token_ids) - len(keep)
    if skipped:
        logger.warning("Skipped %d of %d texts shorter than %d tokens.", skipped, len(token_ids), min_length)
    if not keep:
        raise ValueError(
            f"No usable text: all {len(token_ids)} texts are shorter than {min_length} tokens "
            "(a trajectory needs at least one transition)."
        )
    # Sort by length so batches waste little padding; results go back to corpus order.
    order = sorted(keep, key=lambda i: len(token_ids[i]))
    paths = _run_batches(model, token_ids, order, sorted(set(layers)), starts, batch_size, dtype, progress)
    rank = {i: r for r, i in enumerate(order)}
    meta = {"source": getattr(model, "hf_sde_source", None) or {}, "kept_indices": keep}
    if starts is not None:
        meta.update(path_start=[int(starts[i]) for i in keep], time_origin="prompt_end")
    result = []
    for layer_idx in layers:
        states = [paths[layer_idx][rank[i]] for i in keep]
        check_finite(states, keep)  # name the sequence by its index in token_ids, not among the kept ones
        result.append(Trajectories(states, layer_idx, hidden_size(model), num_decoder_layers(model),
                                   model_name(model), skipped, dict(meta)))
    return result[0] if isinstance(layer, int) else result


def corpus_description(data, template: str | None, text_column: str | None, limit: int | None) -> dict:
    """How a corpus was read, as recorded beside extracted trajectories (a local path made absolute)."""
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if isinstance(data, str):
        data = os.path.abspath(data) if os.path.exists(data) else data
    else:
        data = "<list>"
    return {"data": data, "template": template, "text_column": text_column, "limit": limit}


def extract_documents(
    model,
    tokenizer,
    docs: Sequence,
    layer: int | Sequence[int] = -1,
    *,
    groups: Sequence | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    max_context: int | None = None,
    batch_size: int = 8,
    template: str | None = None,
    progress: bool = True,
    cache=None,
    corpus: dict | None = None,
    tokens: tuple | None = None,
) -> Trajectories | list[Trajectories]:
    """:func:`extract_trajectories` of already loaded documents (:func:`~hf_sde.corpus.load_texts` with
    ``return_groups=True``): ``groups`` go into ``meta["groups"]``, ``corpus`` (see :func:`corpus_description`)
    into ``meta`` and a cache entry's record, ``tokens`` is ``tokenize_documents``' result if already computed.

    ``cache`` (``True``: ``$HF_SDE_CACHE/trajectories``; a path: that folder; see :mod:`hf_sde.trajectory_cache`)
    reads the layers already extracted with the same model, documents and caps (saying so on stderr when
    ``progress``), and stores the others. ``meta["cache"]`` says where each came from (``{"status": "read"}``,
    ``"written"`` or ``"off"``, with the entry's ``"path"``).
    """
    from . import cache as tc

    if max_context is None:
        max_context = getattr(model.config, "max_position_embeddings", None)
    layers = [resolve_layer(model, x) for x in ([layer] if isinstance(layer, int) else layer)]
    if not layers:
        raise ValueError("extract_documents needs at least one layer.")
    corpus = dict(corpus or {"data": "<list>", "template": template, "text_column": None, "limit": None})
    root = tc.resolve_cache(cache)
    key = (tc.extraction_key(model, tokenizer, docs, groups, max_length=max_length, max_context=max_context)
           if root is not None else None)
    found: dict[int, Trajectories] = {}
    status: dict[int, dict] = {}
    if root is not None:
        for x in sorted(set(layers)):
            traj = tc.lookup(root, key, x)
            if traj is not None:
                found[x] = traj
                status[x] = {"status": "read", "path": str(tc.entry_dir(root, key, x))}
                if progress:
                    tqdm.write(f"Read the layer-{x} trajectories from the cache ({status[x]['path']}); no extraction.",
                               file=sys.stderr)
    missing = sorted(set(layers) - set(found))
    if missing:
        ids, starts = tokens if tokens is not None else tokenize_documents(tokenizer, docs, max_length, max_context,
                                                                           template=template)
        fresh = extract_from_ids(model, ids, missing, batch_size=batch_size, progress=progress, starts=starts)
        for x, traj in zip(missing, fresh, strict=True):
            if groups is not None:
                traj.meta["groups"] = [groups[i] for i in traj.meta["kept_indices"]]
            traj.meta.update({"data": corpus["data"], "template": template, "max_length": max_length,
                              "num_texts": len(docs)})
            if starts is not None:
                traj.meta["max_context"] = max_context
            found[x] = traj
            status[x] = {"status": "off"}
            if root is not None:
                entry = tc.store(root, key, traj, corpus)
                if entry is not None:
                    status[x] = {"status": "written", "path": str(entry)}
    result = []
    for x in layers:
        traj = found[x]
        traj.meta.update({"data": corpus["data"], "template": template, "cache": status[x]})
        result.append(traj)
    return result[0] if isinstance(layer, int) else result


def extract_trajectories(
    model,
    tokenizer,
    data: str | os.PathLike | Iterable,
    layer: int | Sequence[int] = -1,
    *,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    max_context: int | None = None,
    batch_size: int = 8,
    template: str | None = None,
    text_column: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    cache=None,
) -> Trajectories | list[Trajectories]:
    """Hidden-state paths of a corpus at one decoder layer (or a list of layers: one result per layer).

    ``data`` is anything :func:`hf_sde.corpus.load_texts` reads (a path, a hub dataset id, a list of strings
    or of row dicts). Texts shorter than two tokens are skipped and counted (``Trajectories.skipped``).
    With a chat template (``template="helpsteer-chat"`` or ``"chat"``) the path is the response read in the
    context of the prompt (see :func:`tokenize_chats`): ``max_length`` bounds the path, ``max_context``
    (default: the model's ``max_position_embeddings``) the whole input, cut from the left of the prompt.

    ``cache=True`` reuses an earlier extraction of the same documents with the same model, layer and caps from
    ``$HF_SDE_CACHE/trajectories`` (default ``~/.cache/hf-sde``) and stores new ones there; a path names
    another cache folder. Off by default (see :mod:`hf_sde.trajectory_cache` for the key and the checks).

    Example:
        >>> traj = extract_trajectories(model, tok, "../shared/data/tinystories_sample.txt", layer=-1)
        >>> traj.states[0].shape   # (tokens, hidden_size)
    """
    from ..data.corpus import CHAT_TEMPLATES, load_texts

    if template in CHAT_TEMPLATES:
        check_chat_template(tokenizer, template, model)
    docs, groups = load_texts(data, template=template, text_column=text_column, limit=limit, return_groups=True)
    corpus = corpus_description(data, template, text_column, limit)
    result = extract_documents(model, tokenizer, docs, layer, groups=groups, max_length=max_length,
                               max_context=max_context, batch_size=batch_size, template=template, progress=progress,
                               cache=cache, corpus=corpus)
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    for traj in [result] if isinstance(result, Trajectories) else result:
        traj.meta["data"] = data if isinstance(data, str) else "<list>"
    return result


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
