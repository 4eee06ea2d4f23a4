"""hf-sde under vLLM's Model Runner V2 (the default wherever Triton runs: every CUDA machine), on CPU.

vLLM for CPU runs the V1 runner, so no V2 engine starts here. These tests drive what V2 does with a logits
processor through vLLM's own code and types: both loaders (``build_custom_logits_processors`` /
``build_custom_logits_processors_params_validator`` for V2, ``build_logitsprocs`` /
``validate_logits_processors_parameters`` for V1), V2's ``RequestState`` / ``LogitsProcRequestState``,
``InputBatch`` and ``LogitsContext``. A stand-in runner owns them, builds processors in ``load_model`` as
``GPUModelRunner`` does, hands each real batch to its model state's ``preprocess_state`` before the forward
and runs a model whose decoder blocks return ``(hidden, residual)`` like vLLM's Llama blocks.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import engine_config
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample import logits_processor as v1
from vllm.v1.worker.gpu import buffer_utils
from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
from vllm.v1.worker.gpu.sample.logits_processor import interface as v2
from vllm.v1.worker.gpu.sample.logits_processor import loader as v2_loader
from vllm.v1.worker.gpu.states import RequestState

from hf_sde.vllm import PROCESSOR, SDELogitsProcessor, entry_point_installed, heads_registry, sde_args, traces
from hf_sde.vllm.processor import SDELogitsProcessorV1
from hf_sde.vllm.processor_v2 import SDELogitsProcessorV2

HIDDEN, LAYERS, VOCAB = 576, 30, 11
CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def _config(**changes):
    return engine_config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, **changes)


class _Block(torch.nn.Module):
    """A decoder block with vLLM's Llama signature and output: ``(positions, hidden, residual) -> (h, r)``."""

    def forward(self, positions, hidden_states, residual):
        return hidden_states, residual


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        config = SimpleNamespace(num_hidden_layers=LAYERS, hidden_size=HIDDEN)
        config.get_text_config = lambda: config
        self.config = config
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(_Block() for _ in range(LAYERS))

    def forward(self, positions, hidden, residual):
        for layer in self.model.layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden + residual


class _ModelState:
    """V2's model state as the runner uses it around a forward (``ModelState.preprocess_state`` is a no-op)."""

    def __init__(self):
        self.seen = 0

    def preprocess_state(self, input_batch, block_tables, kv_cache_config, num_computed_tokens) -> None:
        self.seen += 1


@dataclasses.dataclass
class _Step:
    batch: InputBatch
    state: torch.Tensor        # the block output every layer sees without steering: hidden + residual
    out: torch.Tensor          # the model's output (steered rows differ)
    logits: torch.Tensor
    processed: torch.Tensor


@pytest.fixture
def no_uva(monkeypatch):
    """V2's request state pins host memory for UVA, which needs a GPU: use its plain-buffer fallback."""
    monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)


class _V2Runner:
    """Stands in for ``GPUModelRunner``: the same request state, batch type and processor construction."""

    def __init__(self, config=None, max_num_reqs: int = 4):
        self.vllm_config = config or _config()
        self.model = _Model()
        self.req_states = RequestState(max_num_reqs=max_num_reqs, max_model_len=256, max_num_batched_tokens=256,
                                       num_speculative_steps=0, vocab_size=VOCAB, device=CPU)
        self.model_state = _ModelState()
        self.input_buffers = InputBuffers(max_num_reqs, 256, CPU)
        self.processors: list = []

    def get_model(self):
        return self.model

    def execute_model(self):  # pragma: no cover - only its presence matters (how hf-sde recognises a runner)
        raise NotImplementedError

    def load_model(self, custom=()):
        # GPUModelRunner.load_model: the model exists, then the custom processors are built.
        self.processors = v2_loader.build_custom_logits_processors(self.vllm_config, self.req_states, False, custom)
        return self.processors

    def add(self, req_id: str, prompt: list[int], params: SamplingParams) -> tuple[int, list[bool]]:
        """``GPUModelRunner.add_requests`` for one request: request state first, then the sampler's processors."""
        self.req_states.add_request(req_id=req_id, prompt_len=len(prompt), all_token_ids=prompt,
                                    num_computed_tokens=0, max_tokens=params.max_tokens)
        index = self.req_states.req_id_to_index[req_id]
        return index, [p.add_request(index, params) for p in self.processors]

    def batch(self, scheduled: list[tuple[str, list[int], int]]) -> InputBatch:
        """The ``InputBatch`` of a step that feeds ``tokens`` from ``first position`` for each ``req_id``."""
        counts = np.array([len(t) for _, t, _ in scheduled], dtype=np.int32)
        starts = np.zeros(len(scheduled) + 1, dtype=np.int32)
        np.cumsum(counts, out=starts[1:])
        idx = np.array([self.req_states.req_id_to_index[r] for r, _, _ in scheduled], dtype=np.intp)
        dummy = InputBatch.make_dummy(len(scheduled), int(counts.sum()), self.input_buffers, is_padding=False)
        return dataclasses.replace(
            dummy, req_ids=[r for r, _, _ in scheduled], idx_mapping=torch.from_numpy(idx).long(),
            idx_mapping_np=idx, expanded_idx_mapping=torch.from_numpy(idx).long(), num_scheduled_tokens=counts,
            query_start_loc=torch.from_numpy(starts), query_start_loc_np=starts,
            positions=torch.tensor([p for _, t, p0 in scheduled for p in range(p0, p0 + len(t))]),
            input_ids=torch.tensor([x for _, t, _ in scheduled for x in t], dtype=torch.int32))

    def step(self, scheduled, seed: int, real: bool = True) -> _Step:
        """One step: ``preprocess_state`` (real batches only), the forward, then the processors' ``apply``."""
        batch = self.batch(scheduled)
        if real:
            self.model_state.preprocess_state(batch, (), None, None)
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(batch.num_tokens, HIDDEN, generator=g)
        residual = torch.randn(batch.num_tokens, HIDDEN, generator=g)
        out = self.model(batch.positions, hidden.clone(), residual.clone())
        logits = torch.randn(batch.num_reqs, VOCAB, generator=g)
        last = torch.from_numpy(batch.query_start_loc_np[1:] - 1).long()
        ctx = v2.LogitsContext(expanded_idx_mapping=batch.expanded_idx_mapping, idx_mapping=batch.idx_mapping,
                               idx_mapping_np=batch.idx_mapping_np,
                               expanded_local_pos=torch.zeros(batch.num_reqs, dtype=torch.int32),
                               input_ids=batch.input_ids[last], pos=batch.positions[last],
                               seq_lens_upper_bound_np=(batch.positions[last] + 1).numpy())
        processed = logits.clone()
        for proc in self.processors:
            processed = proc.apply(processed, ctx)
        return _Step(batch, hidden + residual, out, logits, processed)


def _tau(heads, control, state: torch.Tensor, position: int, prompt_len: int) -> torch.Tensor:
    """The temperature ``sde_generate`` uses for the token after ``position`` (SDEHeads / SDEControl maths)."""
    with torch.no_grad():
        z = heads.project(state.unsqueeze(0).float())
        k = torch.tensor([position - (prompt_len - 1)])
        origin = getattr(heads.config, "time_origin", "sequence")
        mean, std = heads(z, heads.times(k if origin == "prompt_end" else k + prompt_len - 1))
        return control.temperature_law(heads.zscore(heads.diffusion_magnitude(std)))[0]


# -- loading: both of vLLM's loaders accept the installed plugin ---------------------------------------------
def test_both_loaders_accept_the_installed_plugin():
    assert entry_point_installed(), "install hf-sde into .venv-vllm (pip install -e .) to test its entry point"
    # Model Runner V2: the frontend's validator and the runner's loader (entry points, then the FQCN list).
    validate = v2_loader.build_custom_logits_processors_params_validator(())
    validate(SamplingParams(max_tokens=2))
    assert SDELogitsProcessor in v2_loader._load_v2_logitsprocs(())
    assert v2_loader._load_v2_logitsprocs([PROCESSOR]).count(SDELogitsProcessor) == 2
    # V1 runner: the same, through V1's loader and validator.
    assert SDELogitsProcessor in v1._load_custom_logitsprocs(())
    assert v1._load_custom_logitsprocs((PROCESSOR,)).count(SDELogitsProcessor) == 2
    v1.validate_logits_processors_parameters(None, SamplingParams(max_tokens=2))
    assert issubclass(SDELogitsProcessor, v1.LogitsProcessor) and issubclass(SDELogitsProcessor, v2.LogitsProcessor)


@pytest.mark.parametrize("extra, message", [
    ({"sde_mode": "nope"}, "mode='nope' is not one of"),
    ({"sde_beta": "1.0"}, "sde_beta must be a number, got str"),
    ({"sde_heads": "other"}, "sde_heads='other' is not served here"),
])
def test_both_validators_refuse_bad_arguments_at_admission(extra, message):
    params = SamplingParams(max_tokens=2, extra_args=extra)
    with pytest.raises(VLLMValidationError, match=message.replace("(", r"\(")):
        v2_loader.build_custom_logits_processors_params_validator((PROCESSOR,))(params)
    with pytest.raises(VLLMValidationError, match=message.replace("(", r"\(")):
        v1.validate_logits_processors_parameters((PROCESSOR,), params)


def test_the_runner_gets_its_own_implementation(no_uva):
    runner = _V2Runner()
    procs = runner.load_model((PROCESSOR,))  # the entry point and the FQCN: two instances, as vLLM builds them
    assert [type(p) for p in procs] == [SDELogitsProcessorV2, SDELogitsProcessorV2]
    assert all(isinstance(p, v2.LogitsProcessor) for p in procs)

    class V1Runner:
        def get_model(self):
            return _Model()

        def execute_model(self):  # pragma: no cover
            raise NotImplementedError

        def build(self):
            return SDELogitsProcessor(_config(), CPU, False)  # as V1's build_logitsprocs calls it

    assert type(V1Runner().build()) is SDELogitsProcessorV1


@pytest.mark.parametrize("changes, message", [
    ({"model_config.enforce_eager": False}, "start vLLM with enforce_eager=True / --enforce-eager"),
    ({"compilation_config.mode": 3}, "torch.compile / CUDA graphs never call module hooks"),
    ({"parallel_config.enable_dbo": True}, "dual batch overlap is on"),
    ({"speculative_config": object()}, "speculative decoding is on"),
])
def test_v2_engine_start_refuses_what_hooks_cannot_do(no_uva, changes, message):
    with pytest.raises(RuntimeError) as info:
        _V2Runner(_config(**changes)).load_model()
    assert "HF_SDE_VLLM_HEADS is set" in str(info.value) and message in str(info.value)


# -- per-request logic under V2 -----------------------------------------------------------------------------
def test_rows_follow_their_requests_across_steps(no_uva):
    traces.clear()
    runner = _V2Runner()
    runner.load_model()
    prompts = {"temp": [1, 2, 3, 4, 5], "plain": [6, 7, 8], "steer": [9, 10, 11, 12]}
    args = {"temp": sde_args(mode="temperature", beta=1.0), "plain": None, "steer": sde_args(mode="steer", alpha=0.5)}
    slots, wants = {}, {}
    for name, prompt in prompts.items():
        params = SamplingParams(max_tokens=8, temperature=0, extra_args=args[name])
        slots[name], (wants[name],) = runner.add(name, prompt, params)
    assert wants == {"temp": True, "plain": False, "steer": False}  # only temperature requests touch logits
    proc = runner.processors[0]
    control = proc.slots[slots["temp"]].control
    heads = control.heads

    # Step 1: whole prompts, batch order temp, plain, steer. Step 2: one decode token each, order reversed.
    first = runner.step([(n, prompts[n], 0) for n in ("temp", "plain", "steer")], seed=1)
    second = runner.step([("steer", [3], 4), ("plain", [2], 3), ("temp", [1], 5)], seed=2)
    for step, rows in ((first, {"temp": 0, "plain": 1, "steer": 2}), (second, {"steer": 0, "plain": 1, "temp": 2})):
        starts = step.batch.query_start_loc_np
        last = {n: int(starts[b + 1]) - 1 for n, b in rows.items()}
        position = int(step.batch.positions[last["temp"]])
        tau = _tau(heads, control, step.state[last["temp"]], position, len(prompts["temp"]))
        assert torch.allclose(step.processed[rows["temp"]], step.logits[rows["temp"]] / tau, atol=1e-6)
        for name in ("plain", "steer"):  # their logits rows are untouched
            assert torch.equal(step.processed[rows[name]], step.logits[rows[name]])
        # Hidden states: only the steered request's rows at positions >= prompt_len - 1 move.
        changed = (step.out - step.state).abs().amax(-1) > 0
        steer_rows = range(int(starts[rows["steer"]]), int(starts[rows["steer"] + 1]))
        p0 = len(prompts["steer"]) - 1
        expect = torch.zeros_like(changed)
        for r in steer_rows:
            expect[r] = int(step.batch.positions[r]) >= p0
        assert torch.equal(changed, expect)

    got = traces.fetch(["temp", "steer", "plain"])
    assert got["plain"] is None
    assert got["temp"]["positions"] == [[4, 5]] and got["steer"]["positions"] == [[3, 4]]
    assert all(v > 0 for v in got["steer"]["steer_norm"][0])
    assert got["temp"]["temperature"][0][0] == pytest.approx(float(
        _tau(heads, control, first.state[4], 4, 5)), rel=1e-5)


def test_recycled_slots_dummy_forwards_and_stopped_requests(no_uva):
    traces.clear()
    runner = _V2Runner(max_num_reqs=1)
    runner.load_model()
    proc = runner.processors[0]
    temp = SamplingParams(max_tokens=3, temperature=0, stop_token_ids=[7], extra_args=sde_args(mode="temperature"))
    index, _ = runner.add("a", [1, 2, 3], temp)
    # A dummy / profiling forward never reaches preprocess_state: nothing is read or divided.
    dummy = runner.step([("a", [1, 2, 3], 0)], seed=0, real=False)
    assert torch.equal(dummy.processed, dummy.logits)
    assert traces.fetch(["a"], pop=False)["a"] is None
    runner.step([("a", [1, 2, 3], 0)], seed=1)
    runner.step([("a", [5], 3)], seed=2)
    # Asynchronous scheduling computed one step after the stop token 7 was sampled: it is not a step of "a".
    late = runner.step([("a", [7], 4)], seed=3)
    assert torch.equal(late.processed, late.logits)
    assert traces.fetch(["a"])["a"]["positions"] == [[2, 3]]

    # The slot is recycled for a request without SDE arguments: hf-sde forgets the old occupant.
    runner.req_states.remove_request("a")
    again, (wants,) = runner.add("b", [4, 5, 6], SamplingParams(max_tokens=3))
    assert again == index and not wants and index not in proc.slots
    plain = runner.step([("b", [4, 5, 6], 0)], seed=4)
    assert torch.equal(plain.processed, plain.logits) and torch.equal(plain.out, plain.state)


def test_a_preempted_request_continues_its_trace(no_uva):
    traces.clear()
    runner = _V2Runner()
    runner.load_model()
    params = SamplingParams(max_tokens=4, temperature=0, extra_args=sde_args(mode="observe"))
    runner.add("a", [1, 2, 3], params)
    runner.step([("a", [1, 2, 3], 0)], seed=1)
    runner.step([("a", [4], 3)], seed=2)
    runner.req_states.remove_request("a")                 # preempted: its slot is freed
    runner.add("other", [9, 9], SamplingParams(max_tokens=2))
    runner.req_states.add_request(req_id="a", prompt_len=3, all_token_ids=[1, 2, 3, 4, 5], num_computed_tokens=0,
                                  max_tokens=4)            # resumed: prompt + its two tokens, recomputed
    slot = runner.req_states.req_id_to_index["a"]
    assert runner.processors[0].add_request(slot, params) is False
    runner.step([("a", [1, 2, 3, 4, 5], 0)], seed=3)
    assert traces.fetch(["a"])["a"]["positions"] == [[2, 3, 4]]


# -- a plugin must never break its host ---------------------------------------------------------------------
def test_inert_without_heads(no_uva, monkeypatch):
    monkeypatch.setenv(heads_registry.ENV, "")
    runner = _V2Runner(_config(**{"model_config.enforce_eager": False}))  # would be refused with heads on
    (proc,) = runner.load_model()
    assert type(proc) is SDELogitsProcessor
    _, (wants,) = runner.add("a", [1, 2, 3], SamplingParams(max_tokens=2))
    assert wants is False
    step = runner.step([("a", [1, 2, 3], 0)], seed=0)
    assert torch.equal(step.processed, step.logits)
    v1_proc = SDELogitsProcessor(_config(**{"model_config.enforce_eager": False}), CPU, False)
    assert type(v1_proc) is SDELogitsProcessor and v1_proc.is_argmax_invariant()
    v1_proc.update_state(None)


def test_inert_when_hf_sde_s_vllm_modules_fail_to_import(no_uva, monkeypatch):
    for name in ("hf_sde.vllm.engine", "hf_sde.vllm.processor", "hf_sde.vllm.processor_v2"):
        monkeypatch.setitem(sys.modules, name, None)  # "import hf_sde.vllm.engine" now raises ImportError
    (proc,) = _V2Runner().load_model()
    assert type(proc) is SDELogitsProcessor
    assert type(SDELogitsProcessor(_config(), CPU, False)) is SDELogitsProcessor
    SDELogitsProcessor.validate_params(SamplingParams(max_tokens=2))  # plain requests are admitted
    with pytest.raises(ValueError, match="hf-sde cannot serve SDE requests on this server: importing"):
        SDELogitsProcessor.validate_params(SamplingParams(max_tokens=2, extra_args={"sde_mode": "observe"}))


@pytest.mark.parametrize("heads_env", ["", "smollm2"])
def test_loaders_never_raise_in_a_fresh_process(heads_env):
    """vLLM's loaders in a new process, with hf-sde's SDE modules unimportable (a torch-only dependency broken)."""
    script = textwrap.dedent("""
        import sys, types
        from importlib.abc import MetaPathFinder

        class Broken(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name in ("hf_sde.vllm.engine", "hf_sde.vllm.processor", "hf_sde.vllm.processor_v2"):
                    raise ImportError(f"{name}: simulated broken dependency")
                return None

        sys.meta_path.insert(0, Broken())
        from vllm import SamplingParams
        from vllm.v1.sample import logits_processor as v1
        from vllm.v1.worker.gpu.sample.logits_processor import loader as v2

        v2.build_custom_logits_processors_params_validator(())(SamplingParams(max_tokens=2))
        v1.validate_logits_processors_parameters(None, SamplingParams(max_tokens=2))
        classes = v2._load_v2_logitsprocs(()) + v1._load_custom_logitsprocs(())
        cfg = types.SimpleNamespace()
        for cls in classes:
            assert type(cls(cfg, None)).__name__ == "SDELogitsProcessor"        # as V2 builds it
            assert type(cls(cfg, "cpu", False)).__name__ == "SDELogitsProcessor"  # as V1 builds it
        print("ok", len(classes))
    """)
    env = {**os.environ, heads_registry.ENV: heads_env}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["ok", "2"]


# -- what the real V2 runner does, read from its source (it cannot run on CPU) ------------------------------
def test_model_runner_v2_still_works_the_way_hf_sde_relies_on():
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    from vllm.v1.worker.gpu.model_states.interface import ModelState

    # hf-sde recognises the runner building it by these two methods (engine.find_runner).
    assert callable(GPUModelRunner.get_model) and callable(GPUModelRunner.execute_model)
    load = inspect.getsource(GPUModelRunner.load_model)
    assert load.index("self.model = ") < load.index("build_custom_logits_processors(")  # model first
    execute = inspect.getsource(GPUModelRunner.execute_model)
    # Each real batch reaches the model state right before the forward; dummy batches never do.
    assert execute.index("self.model_state.preprocess_state(\n                input_batch,") < execute.index(
        "model_output = self.model(**model_inputs)")
    assert execute.index("if not dummy_run:\n            # Common case.") < execute.index("preprocess_state(")
    assert list(inspect.signature(ModelState.preprocess_state).parameters)[:2] == ["self", "input_batch"]
    fields = {f.name for f in dataclasses.fields(InputBatch)}
    assert {"req_ids", "num_reqs", "idx_mapping_np", "query_start_loc_np", "positions", "input_ids"} <= fields
    assert {f.name for f in dataclasses.fields(v2.LogitsContext)} >= {"idx_mapping_np", "pos"}
