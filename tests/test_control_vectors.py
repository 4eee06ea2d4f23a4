"""Control vectors in llama.cpp / repeng GGUF format: round trip, interop with both writers/readers, and errors.

The reference files are written with ``gguf.GGUFWriter`` exactly as repeng's ``ControlVector.export_gguf`` does,
and read back with ``gguf.GGUFReader`` as repeng's ``import_gguf`` and llama.cpp's loader read them.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from hf_sde.control.vectors import load_control_vector, model_hint_for, save_control_vector

N_EMBD = 16


def _directions(layers=(3, 7, 12), n=N_EMBD, seed=0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(n, generator=g) for layer in layers}


def _write_like_repeng(path, tensors: dict[str, np.ndarray], *, arch="controlvector", model_hint="llama",
                       layer_count=None) -> None:
    """repeng/extract.py ControlVector.export_gguf, with the tensor names and values given."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", model_hint)
    writer.add_uint32(f"{arch}.layer_count", len(tensors) if layer_count is None else layer_count)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    assert field is not None, key
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1].tolist()[0]


def test_round_trip_non_contiguous_layers(tmp_path):
    dirs = _directions((12, 3, 7))  # unsorted on purpose
    path = tmp_path / "v.gguf"
    assert save_control_vector(dirs, path, model_hint="llama") == str(path)
    loaded = load_control_vector(path)
    assert list(loaded) == [3, 7, 12]
    for layer, vec in dirs.items():
        assert loaded[layer].dtype == torch.float32 and loaded[layer].device.type == "cpu"
        assert loaded[layer].shape == (N_EMBD,)
        torch.testing.assert_close(loaded[layer], vec, rtol=0, atol=0)


def test_save_casts_to_float32_and_accepts_numpy(tmp_path):
    dirs = {2: torch.randn(N_EMBD, dtype=torch.float64), 5: np.arange(N_EMBD, dtype=np.float16)}
    path = save_control_vector(dirs, tmp_path / "v.gguf", model_hint="qwen2")
    loaded = load_control_vector(path)
    torch.testing.assert_close(loaded[2], dirs[2].float(), rtol=0, atol=0)
    torch.testing.assert_close(loaded[5], torch.arange(N_EMBD, dtype=torch.float32), rtol=0, atol=0)


def test_loads_a_file_written_like_repeng(tmp_path):
    rng = np.random.default_rng(1)
    # repeng's read_representations stores float32 (n_embd,) arrays keyed by positive layer indices.
    arrays = {layer: rng.standard_normal(N_EMBD).astype(np.float32) for layer in (10, 2, 5)}
    path = tmp_path / "repeng.gguf"
    _write_like_repeng(path, {f"direction.{k}": v for k, v in arrays.items()}, model_hint="mistral")
    loaded = load_control_vector(path)
    assert list(loaded) == [2, 5, 10]
    for layer, array in arrays.items():
        np.testing.assert_array_equal(loaded[layer].numpy(), array)


def test_layer_count_is_ignored_on_read(tmp_path):
    path = tmp_path / "v.gguf"
    _write_like_repeng(path, {"direction.4": np.ones(N_EMBD, np.float32)}, layer_count=32)  # the model's count
    assert list(load_control_vector(path)) == [4]


def test_file_we_write_reads_like_llama_cpp_and_repeng_expect(tmp_path):
    dirs = _directions((1, 6, 9))
    path = save_control_vector(dirs, tmp_path / "v.gguf", model_hint="gemma2")
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "controlvector"
    assert _field(reader, "controlvector.model_hint") == "gemma2"
    layer_count = reader.get_field("controlvector.layer_count")
    assert layer_count.types == [gguf.GGUFValueType.UINT32]  # as repeng writes it
    assert _field(reader, "controlvector.layer_count") == len(dirs)  # number of direction tensors
    names = [t.name for t in reader.tensors]
    assert names == ["direction.1", "direction.6", "direction.9"]
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32  # llama.cpp rejects anything else
        assert [int(d) for d in tensor.shape] == [N_EMBD]  # ggml_n_dims == 1, nelements == n_embd
        layer = int(tensor.name.split(".")[1])  # repeng's import_gguf parsing
        np.testing.assert_array_equal(np.asarray(tensor.data), dirs[layer].numpy())


def test_model_hint_for_maps_to_llama_cpp_arch_names():
    def cfg(model_type):
        return SimpleNamespace(model_type=model_type)

    expected = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                "gemma2": "gemma2", "gpt2": "gpt2", "gpt_neox": "gptneox", "phi": "phi2", "qwen2_moe": "qwen2moe",
                "some_new_arch": "some_new_arch"}
    for model_type, arch in expected.items():
        assert model_hint_for(cfg(model_type)) == arch, model_type
        assert arch in gguf.MODEL_ARCH_NAMES.values() or arch == "some_new_arch"


def test_model_hint_for_real_configs_and_models():
    from transformers import AutoConfig, MistralConfig

    assert model_hint_for(MistralConfig()) == "llama"
    assert model_hint_for(SimpleNamespace(config=AutoConfig.for_model("qwen2"))) == "qwen2"  # a model
    with pytest.raises(ValueError, match="model_type"):
        model_hint_for(object())


# --- load errors ---------------------------------------------------------------------------------------------


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_control_vector(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all", b"\x00\x01\x02\x03rest"])
def test_load_not_gguf(tmp_path, content):
    path = tmp_path / "v.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_control_vector(path)


def test_load_truncated_gguf(tmp_path):
    good = save_control_vector(_directions(), tmp_path / "good.gguf", model_hint="llama")
    path = tmp_path / "v.gguf"
    path.write_bytes(open(good, "rb").read()[:40])
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_control_vector(path)


def test_load_wrong_architecture(tmp_path):
    path = tmp_path / "model.gguf"
    _write_like_repeng(path, {"direction.1": np.ones(N_EMBD, np.float32)}, arch="llama")
    with pytest.raises(ValueError, match="architecture 'llama', not 'controlvector'"):
        load_control_vector(path)


@pytest.mark.parametrize("name", ["blk.3.attn_q.weight", "direction.x", "direction.3.1", "direction"])
def test_load_bad_tensor_name(tmp_path, name):
    path = tmp_path / "v.gguf"
    _write_like_repeng(path, {"direction.1": np.ones(N_EMBD, np.float32), name: np.ones(N_EMBD, np.float32)})
    with pytest.raises(ValueError, match=r"tensor named '.*'.*'direction\.<layer>'"):
        load_control_vector(path)


@pytest.mark.parametrize("layer", [0, -2])
def test_load_layer_below_one(tmp_path, layer):
    path = tmp_path / "v.gguf"
    _write_like_repeng(path, {f"direction.{layer}": np.ones(N_EMBD, np.float32)})
    with pytest.raises(ValueError, match=rf"layer {layer}: layer indices start at 1, llama.cpp reserves index 0"):
        load_control_vector(path)


def test_load_duplicate_layer(tmp_path):
    path = tmp_path / "v.gguf"
    _write_like_repeng(path, {"direction.3": np.ones(N_EMBD, np.float32), "direction.03": np.ones(N_EMBD, np.float32)})
    with pytest.raises(ValueError, match="two tensors for layer 3"):
        load_control_vector(path)


def test_load_not_1d(tmp_path):
    path = tmp_path / "v.gguf"
    _write_like_repeng(path, {"direction.2": np.ones((2, N_EMBD), np.float32)})
    with pytest.raises(ValueError, match=r"'direction\.2' has ggml shape \[16, 2\].*1-D"):
        load_control_vector(path)


def test_load_accepts_trailing_unit_dims_like_ggml_n_dims(tmp_path):
    # numpy (1, n) is ggml ne = [n, 1]: ggml_n_dims is 1, so llama.cpp loads it.
    path = tmp_path / "v.gguf"
    _write_like_repeng(path, {"direction.2": np.arange(N_EMBD, dtype=np.float32).reshape(1, N_EMBD)})
    loaded = load_control_vector(path)
    np.testing.assert_array_equal(loaded[2].numpy(), np.arange(N_EMBD, dtype=np.float32))


def test_load_mixed_sizes(tmp_path):
    path = tmp_path / "v.gguf"
    _write_like_repeng(path, {"direction.1": np.ones(N_EMBD, np.float32), "direction.2": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match=r"'direction\.2' has 8 values but the tensors before it have 16"):
        load_control_vector(path)


def test_load_f16_rejected_like_llama_cpp(tmp_path):
    path = tmp_path / "v.gguf"
    _write_like_repeng(path, {"direction.1": np.ones(N_EMBD, np.float16)})
    with pytest.raises(ValueError, match="is F16, but llama.cpp only loads F32"):
        load_control_vector(path)


def test_load_no_directions(tmp_path):
    path = tmp_path / "v.gguf"
    _write_like_repeng(path, {})
    with pytest.raises(ValueError, match="without any 'direction.<layer>' tensor"):
        load_control_vector(path)


# --- save errors and atomic write ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directions", "error", "match"),
    [
        ({}, ValueError, "directions is empty"),
        ({0: torch.ones(N_EMBD)}, ValueError, "Layer 0 cannot be stored: llama.cpp reserves index 0"),
        ({-1: torch.ones(N_EMBD)}, ValueError, "Layer -1 cannot be stored"),
        ({"3": torch.ones(N_EMBD)}, TypeError, "Layer keys must be ints"),
        ({True: torch.ones(N_EMBD)}, TypeError, "Layer keys must be ints"),
        ({2: torch.ones(2, N_EMBD)}, ValueError, r"layer 2 has shape \(2, 16\); it must be 1-D"),
        ({2: torch.tensor(1.0)}, ValueError, "it must be 1-D"),
        ({2: torch.ones(0)}, ValueError, "layer 2 is empty"),
        ({2: torch.tensor([1.0, float("nan")])}, ValueError, "layer 2 has non-finite values"),
        ({2: torch.tensor([1.0, 1e300], dtype=torch.float64)}, ValueError, "non-finite values"),  # inf in float32
        ({2: torch.ones(N_EMBD), 4: torch.ones(8)}, ValueError, "layer 4 has 8 values, others have 16"),
    ],
)
def test_save_rejects_bad_directions_and_writes_nothing(tmp_path, directions, error, match):
    with pytest.raises(error, match=match):
        save_control_vector(directions, tmp_path / "v.gguf", model_hint="llama")
    assert os.listdir(tmp_path) == []


def test_save_requires_model_hint(tmp_path):
    with pytest.raises(ValueError, match="model_hint must be a non-empty string"):
        save_control_vector(_directions(), tmp_path / "v.gguf", model_hint="")
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_temp_file_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "v.gguf"
    old = _directions(seed=1)
    save_control_vector(old, path, model_hint="llama")
    before = path.read_bytes()

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_control_vector(_directions(seed=2), path, model_hint="llama")
    assert os.listdir(tmp_path) == ["v.gguf"]  # no temporary file left behind
    assert path.read_bytes() == before
    monkeypatch.undo()
    torch.testing.assert_close(load_control_vector(path), dict(sorted(old.items())), rtol=0, atol=0)


def test_save_overwrites_existing_file(tmp_path):
    path = tmp_path / "v.gguf"
    save_control_vector(_directions((1, 2)), path, model_hint="llama")
    new = _directions((5,), seed=3)
    save_control_vector(new, path, model_hint="llama")
    assert list(load_control_vector(path)) == [5]
    assert sorted(os.listdir(tmp_path)) == ["v.gguf"]


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_control_vector(_directions(), tmp_path / "missing" / "v.gguf", model_hint="llama")
