"""Every architecture in hf-sde's vLLM table (besides Llama, test_parity.py) gives ``sde_generate``'s numbers.

Per family (Mistral, Qwen2, Qwen3, Gemma2): a tiny random model (3 layers, hidden 64, vocab 128, float32) saved
to a folder, heads fitted on its paths at layer 1, one vLLM engine serving that folder with those heads, and one
batch through chunked prefill: temperature, steering at the heads' layer, temperature + steering at the last
layer (so the steered stream goes into the final norm), a sampled temperature request with logprobs and a plain
request. Architectures outside the table are refused at engine start, naming themselves and the supported
list.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import pytest
import torch
from test_parity import assert_traces_close
from vllm import LLM, SamplingParams

import hf_sde
from hf_sde import SDEControl, sde_generate
from hf_sde.vllm import get_traces, heads_registry, llm_kwargs, sde_args, sde_prompt
from hf_sde.vllm.engine import STREAMS, SUPPORTED_ARCHITECTURES, refusals

FAMILIES = {  # family -> its architecture in config.json
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
VOCAB, HIDDEN, LAYERS, HEADS_LAYER = 128, 64, 3, 1
NEW_TOKENS = 12
TEMPERATURE = dict(mode="temperature", beta=1.0, max_temperature=5.0)  # z-scores run to -1.6: no clipping
MODES = [
    TEMPERATURE,
    # alpha=2: the random Gemma2 mostly repeats its last token (tied embeddings scaled by sqrt(hidden)), and only a
    # push that large at the middle layer changes its greedy text, without which the edit itself goes unchecked.
    dict(mode="steer", alpha=2.0),
    dict(mode="temperature+steer", beta=0.5, alpha=0.5, steer_layer=LAYERS - 1),
]
# The batch: each SDE mode greedy, then a sampled temperature request with logprobs, then a plain greedy one.
SAMPLED = len(MODES)
PLAIN = SAMPLED + 1
PROMPT_LENGTHS = [37, 23, 41, 30, 37]  # > 32 tokens: two prefill chunks of max_num_batched_tokens=32


def tiny_config(family: str):
    """A tiny config of ``family`` (head_dim 32: vLLM's CPU attention kernels take 32, 64, 80, ...)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    if family == "mistral":
        return tf.MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common)
    if family == "gemma2":  # default soft caps (attention 50, final 30) and alternating sliding layers (4096)
        return tf.Gemma2Config(**common)
    raise ValueError(family)


def fitted_heads(model, paths: list[list[int]]) -> hf_sde.SDEHeads:
    """Heads fitted on ``paths`` at HEADS_LAYER (projection, horizon), their nets then perturbed and recalibrated.

    On random paths the fit keeps its OU starting point, whose diffusion is the same on every state (z-scores
    all 0, nothing to compare); the perturbation (as for the random heads of tests/test_control_parity.py) makes
    drift and diffusion depend on the state, and the calibration puts the z-scores back around 0 +- 1.
    """
    traj = hf_sde.extract_from_ids(model, paths, HEADS_LAYER, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "diffusion is (nearly) constant": fixed below
        heads = hf_sde.fit_heads(traj, proj_dim=8, epochs=2, width=32, progress=False).heads.float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        logs = torch.cat([heads.diffusion_magnitude(heads(heads.project(h), heads.times(torch.arange(len(h))))[1]).log()
                          for h in traj.states])
    heads.config.log_diffusion_mean, heads.config.log_diffusion_std = float(logs.mean()), float(logs.std())
    return heads


@dataclass
class Served:
    family: str
    model: torch.nn.Module
    heads: hf_sde.SDEHeads
    prompts: list[list[int]]
    tokens: list[list[int]]
    logprobs: list[float]
    traces: list


#: Every engine this module starts, kept until the process exits. Shutting an in-process engine down (or letting
#: it be collected, whose finalizer shuts it down) tears down vLLM's process-wide distributed state, which the
#: session engine of conftest.py (``llm``, used by other modules before and after this one) still needs. The
#: tiny engines hold a few MB each.
_ENGINES: list = []


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tmp_path_factory) -> Served:
    """One family's model and heads, and what vLLM made of the batch."""
    from transformers import AutoModelForCausalLM

    family = request.param
    root = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager").float().eval()
    assert type(model).__name__ == FAMILIES[family]
    model.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    paths = [torch.randint(3, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(24, 49, (16,), generator=g)]
    fitted_heads(model, paths).save_pretrained(root / "heads")
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]

    before = os.environ[heads_registry.ENV]
    os.environ[heads_registry.ENV] = f"{family}={root / 'heads'}"
    try:
        _, heads = heads_registry.resolve_heads(family)
        llm = LLM(str(root / "model"), **llm_kwargs(
            skip_tokenizer_init=True, max_model_len=128, max_num_batched_tokens=32, max_num_seqs=8, seed=0,
            block_size=32, num_gpu_blocks_override=64, logprobs_mode="processed_logprobs"))
        _ENGINES.append(llm)
        args = [sde_args(**m) for m in MODES] + [sde_args(**TEMPERATURE), None]
        params = [SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, extra_args=a) for a in args]
        params[SAMPLED] = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, ignore_eos=True, logprobs=0,
                                         extra_args=args[SAMPLED])
        outs = llm.generate([sde_prompt({"prompt_token_ids": p}, a) for p, a in zip(prompts, args, strict=True)],
                            params, use_tqdm=False)
        traces = get_traces(llm, [a["sde_trace_id"] for a in args if a])
    finally:
        os.environ[heads_registry.ENV] = before
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    sampled = outs[SAMPLED].outputs[0]
    logprobs = [step[t].logprob for step, t in zip(sampled.logprobs, sampled.token_ids, strict=True)]
    return Served(family, model, heads, prompts, tokens, logprobs, traces)


def reference(model, heads, ids, control):
    """``sde_generate``'s greedy tokens and trace (``control=None``: plain greedy decoding)."""
    input_ids = torch.tensor([ids])
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, eos_token_id=None,
                  pad_token_id=0, attention_mask=torch.ones_like(input_ids))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "temperature control under greedy decoding"
        out = sde_generate(model, input_ids, sde_control=SDEControl(heads, **control) if control else None, **kwargs)
    return out.sequences[0, len(ids):].tolist(), getattr(out, "sde_trace", None)


@pytest.mark.parametrize("i", range(len(MODES)))
def test_sde_request_matches_sde_generate(served, i):
    control = MODES[i]
    ref_tokens, ref_trace = reference(served.model, served.heads, served.prompts[i], control)
    assert served.tokens[i] == ref_tokens
    assert_traces_close(ref_trace, served.traces[i], steers="steer" in control["mode"])
    if "temperature" in control["mode"]:
        law = SDEControl(served.heads, **control).temperature_law(ref_trace.zscore)
        assert torch.allclose(served.traces[i].temperature, law, atol=1e-5)
        assert len(set(law[0].tolist())) > 1  # the law is not clipped to one bound all along


@pytest.mark.parametrize("i", [i for i, m in enumerate(MODES) if "steer" in m["mode"]])
def test_steering_changes_the_greedy_text(served, i):
    plain, _ = reference(served.model, served.heads, served.prompts[i], None)
    assert served.tokens[i] != plain, f"{MODES[i]} was expected to change the greedy text"


def test_plain_request_is_plain_greedy(served):
    plain, _ = reference(served.model, served.heads, served.prompts[PLAIN], None)
    assert served.tokens[PLAIN] == plain


def test_sampled_temperature_divides_the_model_s_logits(served):
    """On a sampled path: the z-scores are the heads' on transformers' states along it, and the processed logprobs
    are log_softmax(logits / tau) of the family's own logits (Gemma2: soft-capped)."""
    ids, tokens, trace, heads = served.prompts[SAMPLED], served.tokens[SAMPLED], served.traces[SAMPLED], served.heads
    n = len(ids) - 1
    states = hf_sde.extract_from_ids(served.model, [ids + tokens[:-1]], HEADS_LAYER, progress=False).states[0][n:]
    assert getattr(heads.config, "time_origin", "sequence") == "sequence"
    with torch.no_grad():
        _, std = heads(heads.project(states), heads.times(torch.arange(n, n + len(tokens))))
        zscore = heads.zscore(heads.diffusion_magnitude(std))
        logits = served.model(torch.tensor([ids + tokens])).logits[0, n: n + len(tokens)]
    assert torch.allclose(trace.zscore[0], zscore, atol=1e-4), (trace.zscore[0] - zscore).abs().max()
    tau = trace.temperature[0]
    assert ((tau > 1.0) & (tau < TEMPERATURE["max_temperature"])).any() and len(set(tau.tolist())) > 1
    assert torch.allclose(tau, SDEControl(heads, **TEMPERATURE).temperature_law(zscore), atol=1e-4)
    want = torch.log_softmax(logits / tau.unsqueeze(-1), -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
    got = torch.tensor(served.logprobs)
    assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()


def test_every_family_is_in_the_table():
    assert SUPPORTED_ARCHITECTURES == tuple(STREAMS)
    assert {"LlamaForCausalLM", *FAMILIES.values()} <= set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("config", ["gpt2", "phi3"])
def test_an_architecture_outside_the_table_is_refused_at_engine_start(config, tmp_path):
    """A real engine start, SDE control on: the processor refuses, naming the architecture and the supported list."""
    import transformers as tf

    if config == "gpt2":
        cfg, arch = tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=256), \
            "GPT2LMHeadModel"
    else:
        cfg, arch = tf.Phi3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                  num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=256, pad_token_id=0), "Phi3ForCausalLM"
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(Exception) as info:
        _ENGINES.append(LLM(str(tmp_path), **llm_kwargs(skip_tokenizer_init=True, max_model_len=128, block_size=32,
                                                        num_gpu_blocks_override=8)))
    text = "".join(str(e) for e in _chain(info.value))
    assert f"architecture ['{arch}'] is not one whose decoder-block output hf-sde can read in vLLM" in text
    assert f"(supported: {list(SUPPORTED_ARCHITECTURES)})" in text


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def test_the_transformers_backend_is_refused():
    """``model_impl='transformers'`` runs transformers' blocks, not the vLLM blocks the table describes."""
    from types import SimpleNamespace

    hf_config = SimpleNamespace(architectures=["Qwen2ForCausalLM"], hidden_size=576, num_hidden_layers=30)
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(enforce_eager=True, hf_config=hf_config, model_impl="transformers"),
        compilation_config=SimpleNamespace(mode=0), speculative_config=None,
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1))
    assert any("Transformers backend" in why for why in refusals(cfg))
    cfg.model_config.model_impl = "auto"
    assert refusals(cfg) == []
