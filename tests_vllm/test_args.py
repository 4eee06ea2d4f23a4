"""Per-request arguments: clear errors for what hf-sde cannot honour, at request time and at engine start."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import engine_config
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from hf_sde.vllm import SDELogitsProcessor, heads_registry, parse_request, sde_args


@pytest.mark.parametrize("extra, params, message", [
    ({"sde_mode": "nope"}, {}, "mode='nope' is not one of"),
    ({"sde_beta": "1.0"}, {}, "sde_beta must be a number, got str"),
    ({"sde_beta": True}, {}, "sde_beta must be a number"),
    ({"sde_heads": "other"}, {}, "sde_heads='other' is not served here; served heads: ['smollm2']"),
    ({"sde_mode": "temperature", "sde_min_temperature": 2.0, "sde_max_temperature": 1.0}, {},
     "need 0 < min_temperature <= max_temperature"),
    ({"sde_colour": 1}, {}, "unknown SDE argument(s) ['sde_colour']"),
    ({"sde_mode": "temperature"}, {"temperature": 0.7}, "conflicts with SDE temperature control"),
    ({"sde_mode": "temperature"}, {"min_p": 0.1}, "vLLM applies min_p before custom logits processors"),
    ({"sde_mode": "observe"}, {"n": 2}, "one sequence per request (n=1)"),
    ({"sde_mode": "steer", "sde_steer_layer": 3}, {}, "precedes the heads' layer 22"),
    ({"sde_mode": "steer", "sde_direction": [1.0, 2.0]}, {}, "a steering vector must have shape (576,)"),
    ({"sde_mode": "steer", "sde_attractor": [0.0] * 3, "sde_direction": "attractor"}, {},
     "sde_attractor must have proj_dim=16 numbers"),
])
def test_bad_arguments_are_refused_by_the_engine(llm, extra, params, message):
    # validate_params' ValueError reaches the caller as vLLM's validation error (HTTP 400 on the server).
    with pytest.raises((ValueError, VLLMValidationError)) as info:
        llm.generate(["Hello"], SamplingParams(max_tokens=2, extra_args=extra, **params), use_tqdm=False)
    assert message in str(info.value)


def test_a_valid_request_still_runs_after_refusals(llm):
    args = sde_args(mode="observe")
    out = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0, extra_args=args), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_requests_without_sde_keys_are_untouched():
    assert parse_request(None) is None
    assert parse_request({"kv_transfer_params": {}}) is None


def test_sde_args_helper_checks_names():
    with pytest.raises(TypeError, match="unknown SDE argument 'betta'"):
        sde_args(mode="temperature", betta=1.0)
    assert sde_args(mode="steer", alpha=0.1, direction=torch.zeros(576).tolist())["sde_alpha"] == 0.1


def test_sde_is_off_without_an_allowlist(monkeypatch):
    monkeypatch.setenv(heads_registry.ENV, "")
    with pytest.raises(ValueError, match="SDE control is not enabled on this vLLM instance: start it with"):
        parse_request({"sde_mode": "observe"})


@pytest.mark.parametrize("spec, message", [
    ("mine", "bare entry 'mine' is not a shipped heads name"),
    ("a=", "must be name=folder_or_repo_id"),
    ("smollm2,smollm2", "listed twice"),
])
def test_allowlist_errors(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        heads_registry.allowlist(spec)


def test_allowlisted_path_that_is_missing_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv(heads_registry.ENV, f"gone={tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match="No SDE heads folder"):
        parse_request({"sde_mode": "observe"})


def _config(**changes):
    return engine_config(**changes)


@pytest.mark.parametrize("changes, message", [
    ({"model_config.enforce_eager": False}, "start vLLM with enforce_eager=True / --enforce-eager"),
    ({"compilation_config.mode": 3}, "torch.compile / CUDA graphs never call module hooks"),
    ({"speculative_config": object()}, "speculative decoding is on"),
    ({"parallel_config.tensor_parallel_size": 2}, "tensor / pipeline parallelism"),
    ({"model_config.hf_config.architectures": ["GPT2LMHeadModel"]}, "architecture ['GPT2LMHeadModel'] is not one"),
    ({"model_config.hf_config.hidden_size": 64}, "heads 'smollm2' were fitted on a model with hidden size 576"),
])
def test_engine_start_refuses_what_cannot_be_honoured(changes, message):
    with pytest.raises(RuntimeError) as info:
        SDELogitsProcessor(_config(**changes), torch.device("cpu"), False)
    assert "HF_SDE_VLLM_HEADS is set" in str(info.value)
    assert message in str(info.value)


def test_processor_is_inert_without_allowlist(monkeypatch):
    monkeypatch.setenv(heads_registry.ENV, "")
    proc = SDELogitsProcessor(_config(**{"model_config.enforce_eager": False}), torch.device("cpu"), False)
    logits = torch.randn(2, 5)
    assert proc.apply(logits.clone()).equal(logits)


class _FakeRunner:
    """Stands in for vLLM's model runner: builds processors in a method, as vLLM does in its __init__."""

    def __init__(self):
        config = SimpleNamespace(num_hidden_layers=30, hidden_size=576)
        config.get_text_config = lambda: config
        self.model = torch.nn.Module()
        self.model.config = config
        self.model.model = torch.nn.Module()
        self.model.model.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(30))
        self.input_batch = SimpleNamespace(req_ids=["a", "b"])

    def get_model(self):
        return self.model

    def execute_model(self):  # pragma: no cover - only its presence matters
        raise NotImplementedError

    def build(self):
        return SDELogitsProcessor(_config(), torch.device("cpu"), False)


def test_only_one_of_two_processor_instances_divides_the_logits():
    """vLLM builds two instances when hf-sde is an installed entry point *and* named in logits_processors."""
    from vllm.v1.sample.logits_processor import BatchUpdate

    runner = _FakeRunner()
    first, second = runner.build(), runner.build()
    params = SamplingParams(max_tokens=2, extra_args=sde_args(mode="temperature"))
    update = BatchUpdate(batch_size=1, removed=[], added=[(0, params, [1, 2, 3], [])], moved=[])
    first.update_state(update)
    second.update_state(update)
    assert first.hooks is second.hooks
    first.hooks.work = SimpleNamespace(tau={0: torch.tensor(2.0)})
    logits = torch.ones(1, 4)
    out = second.apply(first.apply(logits.clone()))
    assert torch.allclose(out, logits / 2)  # divided once, not by tau squared


@pytest.mark.parametrize(("direction", "match"), [
    ({}, "empty dict"),
    ({"x": [1.0]}, "keys are decoder layer indices"),
    ({"22.7": [1.0]}, "keys are decoder layer indices"),
    ({"99": [1.0] * 576}, "out of range"),
    ({"3": [1.0] * 576}, r"before the heads' layer 22.*layers >= 22"),
    ({"22": [1.0] * 576, "-8": [1.0] * 576}, "names decoder layer 22 twice"),
    ({"22": [1.0, 2.0]}, r"layer 22 must be a tensor of shape \(576,\)"),
    ({"22": ["a"]}, "non-empty list of finite numbers"),
])
def test_a_bad_per_layer_direction_is_refused_at_admission(direction, match):
    with pytest.raises(ValueError, match=match):
        parse_request({"sde_mode": "steer", "sde_direction": direction})


def test_a_per_layer_direction_is_admitted_as_tensors():
    request = parse_request({"sde_mode": "steer", "sde_alpha": 0.2, "sde_direction": {"22": [1.0] * 576,
                                                                                    "-1": [0.5] * 576}})
    assert sorted(request.control.direction) == [22, 29]
    assert request.control.direction[29].shape == (576,)
