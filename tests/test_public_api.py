"""The public surface of ``hf_sde``: every name in ``__all__`` imports, is documented and (classes) constructs.

No model is loaded: classes are built from tiny tensors, as a user would build them by hand.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import hf_sde

D = 4  # SDE coordinates of the tiny objects below

#: what the package docstring must point a reader to
MAIN_ENTRY_POINTS = (
    "load_model", "ModelSpec", "DEFAULT_MODEL", "load_texts", "iter_documents", "extract_trajectories",
    "extract_to_shards", "load_shards", "Trajectories", "fit_heads", "fit_heads_distributed", "FitResult",
    "SDEHeads", "DEFAULT_HEADS", "SDEControl", "sde_generate", "enable_sde_control", "SDETrace", "simulate",
    "build_report", "token_pieces",
)


def _heads() -> hf_sde.SDEHeads:
    config = hf_sde.SDEHeadsConfig(hidden_size=8, proj_dim=D, layer=1, num_layers=2, horizon=16.0)
    return hf_sde.SDEHeads(config)


def _vectors(n: int = 3):
    return [torch.zeros(1) for _ in range(n)]


class _Runtime:
    """Stands in for the control runtime that ``generate`` builds: it owns the step's temperature."""

    def on_logits(self, scores):
        return scores / 2


#: one way to build each public class from scratch
FACTORIES = {
    "ModelSpec": lambda: hf_sde.ModelSpec("some/repo", gguf_file="model.gguf"),
    "Trajectories": lambda: hf_sde.Trajectories(states=[torch.zeros(5, 8)], layer=1, hidden_size=8),
    "SDEHeadsConfig": lambda: hf_sde.SDEHeadsConfig(hidden_size=8, proj_dim=D, layer=1, num_layers=2, horizon=16.0),
    "SDEHeads": _heads,
    "OUBaseline": lambda: hf_sde.OUBaseline(weight=torch.zeros(D + 1, D), std=torch.ones(D)),
    "BrownianBaseline": lambda: hf_sde.BrownianBaseline(mean=torch.zeros(D), std=torch.ones(D)),
    "BaselineSDE": lambda: hf_sde.BaselineSDE(hf_sde.OUBaseline(weight=torch.zeros(D + 1, D), std=torch.ones(D)),
                                              horizon=16.0),
    "FitResult": lambda: hf_sde.FitResult(heads=_heads(), history={}, heldout_nll={}, heldout_parts={},
                                          train_indices=[], heldout_indices=[]),
    "SDEControl": lambda: hf_sde.SDEControl(_heads(), mode="observe"),
    "SDEGenerationMixin": hf_sde.SDEGenerationMixin,
    "SDETemperatureLogitsProcessor": lambda: hf_sde.SDETemperatureLogitsProcessor(_Runtime()),
    "SDEStep": lambda: hf_sde.SDEStep(0, *_vectors(5), None),
    "SDETrace": lambda: hf_sde.SDETrace(*_vectors(7)),
    "SDEGenerateOutput": lambda: hf_sde.SDEGenerateOutput(sequences=torch.zeros(1, 3, dtype=torch.long)),
    "TextScore": lambda: hf_sde.TextScore(index=0, num_tokens=3, mean_surprise=0.0, tube_exit_rate=0.0, sde_nll=1.0,
                                          ou_nll=None, sde_minus_ou_nll=None, mean_zscore=0.0, token_nll=2.0,
                                          entropy=1.5),
}


def test_every_public_name_imports():
    assert len(set(hf_sde.__all__)) == len(hf_sde.__all__)
    for name in hf_sde.__all__:
        assert hasattr(hf_sde, name), name


@pytest.mark.parametrize("name", hf_sde.__all__)
def test_every_public_name_is_documented(name):
    obj = getattr(hf_sde, name)
    if callable(obj):
        doc = inspect.getdoc(obj) or ""
        assert doc.strip(), f"hf_sde.{name} has no docstring"
        if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
            assert not doc.startswith(f"{name}("), f"hf_sde.{name} has only the generated dataclass docstring"
    else:  # a constant: its type's docstring says nothing about it, the package docstring must
        assert name in hf_sde.__doc__ or name == "__version__", f"hf_sde.{name} is not in the package docstring"


def test_package_docstring_lists_the_main_entry_points():
    doc = hf_sde.__doc__
    missing = [name for name in MAIN_ENTRY_POINTS if name not in doc]
    assert not missing, f"hf_sde's docstring does not mention {missing}"
    assert set(MAIN_ENTRY_POINTS) <= set(hf_sde.__all__)


def test_every_public_class_constructs():
    classes = {name for name in hf_sde.__all__ if inspect.isclass(getattr(hf_sde, name))}
    assert classes == set(FACTORIES), "add a factory for each new public class"
    for name, make in FACTORIES.items():
        assert isinstance(make(), getattr(hf_sde, name)), name


def test_hand_built_objects_work():
    heads = _heads()
    z = torch.zeros(2, D)
    mean, std = heads(z, heads.times(torch.tensor([0, 1])))
    assert mean.shape == std.shape == (2, D)
    paths = hf_sde.analysis.simulate(FACTORIES["BaselineSDE"](), torch.zeros(D), steps=3, seed=0)
    assert paths.shape == (1, 4, D)
    scores = torch.ones(1, 5)
    assert torch.equal(FACTORIES["SDETemperatureLogitsProcessor"]()(torch.zeros(1, 2, dtype=torch.long), scores),
                       scores / 2)


# ----- the layout: a handful of subpackages, each saying what it is and what it exports ---------------------
SUBPACKAGES = ("data", "trajectories", "fitting", "control", "analysis", "serving", "vllm", "demo", "commands",
               "pretrained")


def test_the_package_top_holds_subpackages_not_modules():
    from pathlib import Path

    top = Path(hf_sde.__file__).parent
    entries = sorted(p.name for p in top.iterdir() if p.name != "__pycache__" and not p.name.endswith(".pyc"))
    assert entries == sorted(["__init__.py", "version.py", *SUBPACKAGES]), entries
    assert len(entries) <= 12


@pytest.mark.parametrize("name", [s for s in SUBPACKAGES if s not in ("vllm", "commands", "demo", "pretrained")])
def test_each_subpackage_exports_what_it_defines(name):
    import importlib

    module = importlib.import_module(f"hf_sde.{name}")
    assert module.__doc__ and module.__doc__.strip(), f"hf_sde.{name} has no docstring"
    assert module.__all__, f"hf_sde.{name} exports nothing"
    for public in module.__all__:
        assert getattr(module, public) is getattr(hf_sde, public, getattr(module, public))
    # every top-level name comes from one of the subpackages, the same object either way
    owners = {n: f"hf_sde.{s}" for s in SUBPACKAGES[:6] for n in importlib.import_module(f"hf_sde.{s}").__all__}
    # GGUF control vectors stay out of hf_sde.control's imports: that package travels in custom_generate
    # folders, which must not need the gguf package
    owners.update(dict.fromkeys(importlib.import_module("hf_sde.control.vectors").__all__, "hf_sde.control.vectors"))
    missing = [n for n in hf_sde.__all__ if n not in owners and n not in ("DEFAULT_HEADS", "__version__")]
    assert not missing, f"names in hf_sde.__all__ that no subpackage exports: {missing}"
