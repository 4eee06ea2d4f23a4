"""Quality of generated responses, judged by a model other than the one that wrote them.

The judge is Gemma-3-270M (base; a different family and tokenizer from SmolLM2, twice its size), fetched
with ``../shared/models/fetch-gemma-judge`` and converted once from GGUF to a saved transformers folder (the
GGUF tokenizer conversion alone takes minutes). One forward pass per batch gives both numbers we need:

* judge NLL: mean per-token NLL of the response given the end of its prompt (lower = more fluent and
  on-topic to an independent model);
* MAUVE features: the judge's final hidden state averaged over the response tokens, compared with
  ``mauve-text`` against the human responses to the same prompts.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import _common as C

JUDGE_GGUF = "gemma-3-270m-q4_k_m.gguf"


def judge_model():
    """The judge and its tokenizer: fetched once, then loaded through ``hf_sde.load_model``, whose GGUF cache
    makes every load after the first take seconds."""
    import hf_sde

    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf-sde" / "models" / "gemma-3-270m"
    if not (base / JUDGE_GGUF).is_file():
        subprocess.run([str(C.SHARED / "models" / "fetch-gemma-judge"), str(base)], check=True,
                       stdout=subprocess.DEVNULL)
    return hf_sde.load_model(str(base), gguf_file=JUDGE_GGUF)


class Judge:
    """NLL and MAUVE features of responses under the judge model."""

    def __init__(self, max_context: int = 64, max_response: int = 128):
        self.model, self.tok = judge_model()
        self.max_context, self.max_response = max_context, max_response
        self.sep = self.tok("\n\n", add_special_tokens=False)["input_ids"]

    def score(self, contexts: list[str], responses: list[str], batch: int = 16):
        """``(nll, features)``: per-text mean NLL (NaN for an empty response) and (n, hidden) features."""
        import numpy as np
        import torch

        nlls, feats = [], []
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        for s in range(0, len(responses), batch):
            items = []
            for ctx, resp in zip(contexts[s:s + batch], responses[s:s + batch], strict=True):
                c = self.tok(ctx, add_special_tokens=False)["input_ids"][-self.max_context:]
                r = self.tok(resp, add_special_tokens=False)["input_ids"][: self.max_response]
                items.append((bos + c + self.sep, r))
            width = max(len(a) + len(b) for a, b in items)
            ids = torch.zeros(len(items), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (a, b) in enumerate(items):
                ids[i, : len(a) + len(b)] = torch.tensor(a + b)
                mask[i, : len(a) + len(b)] = 1
            with torch.inference_mode():
                hidden = self.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
                for i, (a, b) in enumerate(items):
                    if not b:
                        nlls.append(float("nan"))
                        feats.append(np.zeros(hidden.shape[-1], dtype=np.float32))
                        continue
                    h = hidden[i, len(a) - 1: len(a) + len(b) - 1]  # states predicting the response tokens
                    logits = self.model.lm_head(h).float()
                    if getattr(self.model.config, "final_logit_softcapping", None):
                        cap = self.model.config.final_logit_softcapping
                        logits = torch.tanh(logits / cap) * cap
                    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(b), reduction="mean")
                    nlls.append(float(nll))
                    feats.append(hidden[i, len(a): len(a) + len(b)].mean(0).numpy().astype(np.float32))
        return nlls, np.stack(feats) if feats else np.zeros((0, 1), dtype=np.float32)


def mauve(p_feats, q_feats, seed: int = 0) -> float:
    """MAUVE (``mauve-text``) of generated features ``p`` against human features ``q``."""
    import mauve as _mauve

    n = min(len(p_feats), len(q_feats))
    buckets = max(2, min(n // 5, 25))
    out = _mauve.compute_mauve(p_features=p_feats, q_features=q_feats, num_buckets=buckets, device_id=-1,
                               verbose=False, seed=seed, kmeans_num_redo=2, kmeans_max_iter=200)
    return float(out.mauve)


def mauve_ci(p_feats, p_groups, q_feats, q_groups, boot: int, seed: int = 0) -> list[float]:
    """95% interval of MAUVE over prompt resamples (the same prompts drawn on both sides)."""
    import numpy as np

    keys = sorted(set(p_groups) & set(q_groups))
    p_idx = {k: [i for i, g in enumerate(p_groups) if g == k] for k in keys}
    q_idx = {k: [i for i, g in enumerate(q_groups) if g == k] for k in keys}
    rng = np.random.default_rng(seed)
    vals = []
    for b in range(boot):
        pick = rng.integers(0, len(keys), len(keys))
        pi = [i for j in pick for i in p_idx[keys[j]]]
        qi = [i for j in pick for i in q_idx[keys[j]]]
        vals.append(mauve(p_feats[pi], q_feats[qi], seed=seed + b))
    return [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]
