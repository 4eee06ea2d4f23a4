"""Extraction of hidden-state trajectories with a forward hook: correctness, batching, layers, failure modes."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import TINY_ARCHITECTURES, TINYSTORIES, make_tiny_model, random_ids

from hf_sde.data.layers import decoder_layers, num_decoder_layers, resolve_layer
from hf_sde.trajectories.extract import (
    Trajectories,
    check_finite,
    extract_from_ids,
    extract_trajectories,
    self_generate,
    tokenize_texts,
)

LENGTHS = (5, 9, 2, 14, 7, 3)


def _stories_texts() -> list[str]:
    """Texts of very different lengths (first sentences, whole stories) so batches need real padding."""
    stories = [s.strip() for s in TINYSTORIES.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
    return [stories[0].split(".")[0] + ".", stories[1][:200], stories[2], "The end.", stories[3][:90]]


def _max_diff(a: Trajectories, b: Trajectories) -> float:
    assert a.lengths == b.lengths
    return max(float((x - y).abs().max()) for x, y in zip(a.states, b.states, strict=True))


def _hidden_states(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states


def _final_norm(model):
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if module is not None:
            return module
    raise AssertionError(f"no final norm known for {type(model).__name__}")


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_architectures_batched_equals_unbatched_and_output_hidden_states(arch, tiny_models):
    model = tiny_models(arch)
    n = num_decoder_layers(model)
    ids = random_ids(LENGTHS)
    batched = extract_from_ids(model, ids, -1, batch_size=len(ids), progress=False)
    single = extract_from_ids(model, ids, -1, batch_size=1, progress=False)
    assert batched.lengths == list(LENGTHS)
    assert batched.hidden_size == 32 and batched.num_layers == n and batched.layer == n - 1
    assert _max_diff(batched, single) < 1e-4

    # Correctness: an intermediate layer's path is hidden_states[layer + 1] of a plain forward ...
    middle = extract_from_ids(model, ids, 1, batch_size=4, progress=False)
    for seq, states in zip(ids, middle.states, strict=True):
        torch.testing.assert_close(states, _hidden_states(model, seq)[2][0], atol=1e-5, rtol=1e-5)
    # ... and the last block's output is the residual stream *before* the final norm, which
    # output_hidden_states reports as its last entry.
    norm = _final_norm(model)
    for seq, states in zip(ids, batched.states, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(norm(states), _hidden_states(model, seq)[-1][0], atol=1e-5, rtol=1e-5)


def test_stories_batched_equals_unbatched_and_hidden_states(stories_model):
    model, tok = stories_model
    texts = _stories_texts()
    batched = extract_trajectories(model, tok, texts, layer=-1, batch_size=5, progress=False)
    single = extract_trajectories(model, tok, texts, layer=-1, batch_size=1, progress=False)
    assert len(set(batched.lengths)) == len(texts)  # really different lengths, so padding was exercised
    assert _max_diff(batched, single) < 1e-4
    assert batched.meta["kept_indices"] == list(range(len(texts)))
    assert batched.model_id == "ggml-org/models-moved"
    assert batched.meta["source"]["gguf_file"] == "tinyllamas/stories260K.gguf"

    ids = tokenize_texts(tok, texts, 512)
    assert batched.lengths == [len(x) for x in ids]
    middle = extract_from_ids(model, ids, 2, batch_size=5, progress=False)
    for seq, states, last in zip(ids, middle.states, batched.states, strict=True):
        hs = _hidden_states(model, seq)
        torch.testing.assert_close(states, hs[3][0], atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(model.model.norm(last), hs[-1][0], atol=1e-4, rtol=1e-4)


def test_negative_layers_equal_positive_ones(tiny_models):
    model = tiny_models("llama")
    n = num_decoder_layers(model)
    ids = random_ids((4, 6))
    for negative in range(-n, 0):
        pos = extract_from_ids(model, ids, negative + n, progress=False)
        neg = extract_from_ids(model, ids, negative, progress=False)
        assert neg.layer == pos.layer == negative + n
        assert _max_diff(pos, neg) == 0.0
    # Different layers give different paths (the hook really moves).
    assert _max_diff(extract_from_ids(model, ids, 0, progress=False), extract_from_ids(model, ids, 1, progress=False)) > 1e-3


def _hooks(model) -> list[set[int]]:
    """The forward hooks on each decoder block (transformers itself adds permanent ones for
    output_hidden_states, so tests compare before / after rather than expect none)."""
    return [set(block._forward_hooks) for block in decoder_layers(model)]


@pytest.mark.parametrize("layer", [3, 17, -4, -100])
def test_out_of_range_layer_lists_the_valid_range(layer, tiny_models):
    model = tiny_models("llama")
    before = _hooks(model)
    with pytest.raises(ValueError, match=r"valid layers are -3\.\.2"):
        extract_from_ids(model, random_ids((4,)), layer, progress=False)
    with pytest.raises(ValueError, match=r"-3\.\.2"):
        resolve_layer(model, layer)
    with pytest.raises(TypeError):
        resolve_layer(model, 1.0)
    assert _hooks(model) == before


def test_decoder_layers_found_for_each_architecture(tiny_models):
    for arch in TINY_ARCHITECTURES:
        model = tiny_models(arch)
        blocks = decoder_layers(model)
        assert len(blocks) == 3
        assert "Layer" in type(blocks[0]).__name__ or "Block" in type(blocks[0]).__name__


def test_hook_is_removed_even_if_forward_raises():
    model = make_tiny_model("llama")  # a fresh model: no hooks at all yet
    block = decoder_layers(model)[1]
    assert not block._forward_hooks
    with pytest.raises(IndexError):  # a token id outside the vocabulary fails inside the forward
        extract_from_ids(model, [[1, 2, 3], [4, 10_000, 5]], 1, progress=False)
    assert not block._forward_hooks

    def fail(*_):
        assert len(block._forward_hooks) == 1  # the extraction hook is in place during the forward
        raise RuntimeError("boom in the hooked block")

    handle = block.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        extract_from_ids(model, [[1, 2, 3]], 1, progress=False)
    handle.remove()
    assert not block._forward_hooks
    # The forward stops after the deepest requested block: later blocks (and the LM head) never run.
    later = []
    handle = decoder_layers(model)[2].register_forward_pre_hook(lambda *_: later.append(1))
    extract_from_ids(model, [[1, 2, 3]], 1, progress=False)
    handle.remove()
    assert not block._forward_hooks and later == []


def test_short_texts_are_skipped_and_counted(tiny_models, caplog):
    model = tiny_models("gpt2")
    ids = [[5], [6, 7, 8], [], [9, 10], [11]]
    with caplog.at_level(logging.WARNING, logger="hf_sde.trajectories.extract"):
        traj = extract_from_ids(model, ids, -1, progress=False)
    assert traj.skipped == 3
    assert len(traj) == 2 and traj.lengths == [3, 2]
    assert traj.meta["kept_indices"] == [1, 3]
    assert traj.num_transitions == 3
    assert "Skipped 3 of 5" in caplog.text
    # The kept paths are those of the right inputs, in corpus order.
    alone = extract_from_ids(model, [[9, 10]], -1, progress=False)
    torch.testing.assert_close(traj.states[1], alone.states[0])
    with pytest.raises(ValueError, match="shorter than 2 tokens"):
        extract_from_ids(model, [[1], [2]], -1, progress=False)


def test_short_texts_skipped_through_a_tokenizer(stories_model):
    model, tok = stories_model
    # Truncated to one token (the BOS) every text is too short.
    with pytest.raises(ValueError, match="No usable text"):
        extract_trajectories(model, tok, ["Once upon a time", "The end"], max_length=1, progress=False)
    traj = extract_trajectories(model, tok, ["Once upon a time", "The end"], max_length=3, progress=False)
    assert traj.skipped == 0 and traj.lengths == [3, 3]


def test_empty_corpus_raises_a_clear_error(stories_model, tmp_path):
    model, tok = stories_model
    with pytest.raises(ValueError, match="empty"):
        extract_trajectories(model, tok, [], progress=False)
    with pytest.raises(ValueError, match="empty"):
        extract_trajectories(model, tok, ["", "   ", "\n"], progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n<|endoftext|>\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        extract_trajectories(model, tok, str(empty), progress=False)


def test_nan_states_raise_naming_sequence_and_position(tiny_models):
    model = tiny_models("llama")
    block = decoder_layers(model)[2]
    before = set(block._forward_hooks)

    def inject(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] == 7:  # only the 7-token sequence, at position 4
            hidden = hidden.clone()
            hidden[:, 4, 3] = float("nan")
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(inject)  # registered first, so extraction sees the NaN
    try:
        # The first text is skipped, so the bad one is corpus index 2 (and kept index 1).
        with pytest.raises(ValueError, match="sequence 2 at position 4"):
            extract_from_ids(model, [[1], [3, 4, 5, 6, 7], [3, 4, 5, 6, 7, 8, 9]], 2, batch_size=1, progress=False)
    finally:
        handle.remove()
    assert set(block._forward_hooks) == before

    states = [torch.zeros(3, 4), torch.zeros(5, 4)]
    check_finite(states)
    states[1][3, 0] = float("inf")
    with pytest.raises(ValueError, match="sequence 1 at position 3"):
        check_finite(states)
    with pytest.raises(ValueError, match="sequence 8 at position 3"):
        check_finite(states, indices=[5, 8])


def test_trajectories_save_load_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    traj = Trajectories([torch.randn(n, 6, generator=g) for n in (4, 2, 9)], layer=2, hidden_size=6,
                        num_layers=3, model_id="org/model", skipped=2,
                        meta={"groups": ["a", "b", "a"], "kept_indices": [0, 2, 3], "max_length": 64})
    path = tmp_path / "traj.safetensors"
    traj.save(str(path))
    back = Trajectories.load(str(path))
    assert (back.layer, back.hidden_size, back.num_layers, back.model_id, back.skipped) == (2, 6, 3, "org/model", 2)
    assert back.meta == traj.meta
    assert back.lengths == [4, 2, 9]
    for a, b in zip(traj.states, back.states, strict=True):
        assert torch.equal(a, b)

    sub = back.subset([2, 0])
    assert sub.lengths == [9, 4] and sub.meta["groups"] == ["a", "a"] and sub.meta["kept_indices"] == [3, 0]


def test_trajectories_load_rejects_corrupt_files(tmp_path):
    from safetensors.torch import save_file

    traj = Trajectories([torch.randn(5, 4), torch.randn(3, 4)], layer=0, hidden_size=4)
    good = tmp_path / "good.safetensors"
    traj.save(str(good))
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        Trajectories.load(str(truncated))

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        Trajectories.load(str(garbage))

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(ValueError, match="not an hf-sde trajectory file"):
        Trajectories.load(str(foreign))

    with pytest.raises(FileNotFoundError, match="No trajectory file"):
        Trajectories.load(str(tmp_path / "missing.safetensors"))

    inconsistent = tmp_path / "inconsistent.safetensors"
    save_file({"states": torch.zeros(7, 4), "lengths": torch.tensor([5, 3])}, str(inconsistent),
              metadata={"hf_sde_trajectories": '{"layer": 0, "hidden_size": 4}'})
    with pytest.raises(ValueError, match="lengths sum to 8"):
        Trajectories.load(str(inconsistent))


def test_self_generate_returns_prompt_plus_sample_and_is_seeded(stories_model):
    model, tok = stories_model
    prompts = ["Once upon a time", "The little dog"]
    a = self_generate(model, tok, prompts, 3, max_new_tokens=8, seed=0, batch_size=2, progress=False)
    b = self_generate(model, tok, prompts, 3, max_new_tokens=8, seed=0, batch_size=2, progress=False)
    c = self_generate(model, tok, prompts, 3, max_new_tokens=8, seed=1, batch_size=2, progress=False)
    assert a == b
    assert a != c
    assert len(a) == 3
    for i, seq in enumerate(a):
        prompt = tok(prompts[i % 2])["input_ids"]
        assert seq[: len(prompt)] == prompt  # no padding leaks into the prompt part
        assert len(prompt) < len(seq) <= len(prompt) + 8
        new = seq[len(prompt):]
        assert tok.pad_token_id not in new[:-1]  # stops at the first EOS (= pad here)
    # The samples are a corpus: they extract like any other token ids.
    traj = extract_from_ids(model, a, -1, progress=False)
    assert traj.lengths == [len(s) for s in a]
    with pytest.raises(ValueError, match="prompt"):
        self_generate(model, tok, [], 2, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        self_generate(model, tok, prompts, 0, progress=False)


# ----- several layers from one forward ------------------------------------------------------------------
def test_multi_layer_extraction_equals_single_layers(tiny_models):
    model = tiny_models("llama")
    ids = random_ids(LENGTHS)
    starts = [0, 3, 0, 5, 1, 0]
    calls = []
    handle = decoder_layers(model)[0].register_forward_pre_hook(lambda *_: calls.append(1))
    many = extract_from_ids(model, ids, [2, 0, -2], batch_size=4, progress=False, starts=starts)
    handle.remove()
    assert len(calls) == 2  # one forward per batch for all three layers
    assert [t.layer for t in many] == [2, 0, 1]
    for traj, layer in zip(many, (2, 0, -2), strict=True):
        single = extract_from_ids(model, ids, layer, batch_size=1, progress=False, starts=starts)
        assert _max_diff(traj, single) < 1e-5 and traj.meta == single.meta
    assert isinstance(extract_from_ids(model, ids, [1], progress=False), list)


# ----- chat data: the response path in the context of the prompt -----------------------------------------
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}:\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:\n{% endif %}")
ROWS = [{"prompt": "Tell me about a cat.", "response": "Once upon a time there was a cat named Tom."},
        {"prompt": "Tell me about a cat.", "response": "The cat sat on the mat and slept."},
        {"prompt": "What did the dog do?", "response": "The dog ran to the park. He played with a ball all day."}]


@pytest.fixture(scope="module")
def chat_tok(stories_model):
    import copy

    tok = copy.deepcopy(stories_model[1])  # the session's tokenizer stays as it is
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _template_ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_path_starts_at_the_last_prompt_position(chat_tok):
    from hf_sde.data.corpus import load_texts
    from hf_sde.trajectories.extract import tokenize_chats

    convs = load_texts(ROWS, template="helpsteer-chat")
    assert convs[0] == [{"role": "user", "content": ROWS[0]["prompt"]},
                        {"role": "assistant", "content": ROWS[0]["response"]}]
    ids, starts = tokenize_chats(chat_tok, convs)
    for conv, seq, start in zip(convs, ids, starts, strict=True):
        context = _template_ids(chat_tok, conv[:-1], add_generation_prompt=True)
        full = _template_ids(chat_tok, conv)
        assert start == len(context) - 1 and seq[:len(context)] == context
        assert chat_tok.decode(seq[start + 1:]).strip() == conv[-1]["content"]  # the response, nothing else
        assert full[:len(seq)] == seq and chat_tok.decode(full[len(seq):]).strip() == "</s>"  # closing tokens cut


def test_chat_states_equal_the_full_conversation_forward(stories_model, chat_tok):
    model, _ = stories_model
    batched = extract_trajectories(model, chat_tok, ROWS, [2, -1], template="helpsteer-chat", batch_size=3,
                                   progress=False)
    single = extract_trajectories(model, chat_tok, ROWS, [2, -1], template="helpsteer-chat", batch_size=1,
                                  progress=False)
    from hf_sde.data.corpus import load_texts
    from hf_sde.trajectories.extract import tokenize_chats

    ids, starts = tokenize_chats(chat_tok, load_texts(ROWS, template="helpsteer-chat"))
    for b, s in zip(batched, single, strict=True):
        assert _max_diff(b, s) < 1e-4
        assert b.meta["path_start"] == starts and b.meta["time_origin"] == "prompt_end"
        assert b.meta["groups"] == [r["prompt"] for r in ROWS] and b.meta["template"] == "helpsteer-chat"
        assert b.lengths == [len(x) - st for x, st in zip(ids, starts, strict=True)]
    for conv_ids, start, mid, last in zip(ids, starts, batched[0].states, batched[1].states, strict=True):
        hs = _hidden_states(model, conv_ids)
        torch.testing.assert_close(mid, hs[3][0, start:], atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(model.model.norm(last), hs[-1][0, start:], atol=1e-4, rtol=1e-4)


def test_chat_truncation_groups_and_messages(stories_model, chat_tok):
    from conftest import HELPSTEER

    from hf_sde.data.corpus import load_texts
    from hf_sde.trajectories.extract import tokenize_chats

    convs, groups = load_texts(HELPSTEER, template="helpsteer-chat", limit=8, return_groups=True)
    assert groups == load_texts(HELPSTEER, template="helpsteer", limit=8, return_groups=True)[1]
    ids, starts = tokenize_chats(chat_tok, convs)
    short, short_starts = tokenize_chats(chat_tok, convs, max_length=6)
    assert short_starts == starts and all(len(x) - st == 6 for x, st in zip(short, short_starts, strict=True))
    assert all(a == b[:len(a)] for a, b in zip(short, ids, strict=True))
    cut, cut_starts = tokenize_chats(chat_tok, convs, max_length=6, max_context=20)
    for c, st, full, full_st in zip(cut, cut_starts, short, short_starts, strict=True):
        assert len(c) <= 20 and c == full[len(full) - len(c):] and st == full_st - (len(full) - len(c)) >= 1
    # The model's context bounds the default: HelpSteer conversations are longer than stories260K's 512.
    model, _ = stories_model
    traj = extract_trajectories(model, chat_tok, HELPSTEER, template="helpsteer-chat", limit=3, max_length=8,
                                progress=False)
    limit = model.config.max_position_embeddings
    assert traj.lengths == [8, 8, 8] and traj.meta["max_context"] == limit
    assert all(1 <= st <= limit - 8 for st in traj.meta["path_start"])

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello there."}]
    (conv,), chat_groups = load_texts([{"messages": messages}], template="chat", return_groups=True)
    assert conv == messages and chat_groups == [json.dumps(messages[:-1], sort_keys=True)]
    assert load_texts(ROWS[:1], template="chat") == load_texts(ROWS[:1], template="helpsteer-chat")
    with pytest.raises(ValueError, match="last message must be the assistant"):
        load_texts([{"messages": messages[:2]}], template="chat")
    with pytest.raises(ValueError, match="needs column 'prompt'"):
        load_texts([{"question": "q"}], template="chat")


def test_chat_without_a_chat_template_names_template_and_model(stories_model):
    model, tok = stories_model
    assert tok.chat_template is None
    with pytest.raises(ValueError, match=r"template='helpsteer-chat'.*chat template.*models-moved"):
        extract_trajectories(model, tok, ROWS, template="helpsteer-chat", progress=False)


def test_path_start_survives_save_and_subset(tmp_path, stories_model, chat_tok):
    model, _ = stories_model
    traj = extract_trajectories(model, chat_tok, ROWS, template="helpsteer-chat", progress=False)
    traj.save(str(tmp_path / "t.safetensors"))
    back = Trajectories.load(str(tmp_path / "t.safetensors"))
    assert back.meta["path_start"] == traj.meta["path_start"] and back.meta["time_origin"] == "prompt_end"
    assert back.subset([2, 0]).meta["path_start"] == [traj.meta["path_start"][2], traj.meta["path_start"][0]]
