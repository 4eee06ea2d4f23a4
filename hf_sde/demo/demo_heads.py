"""Demo heads: fitted once on a small built-in story corpus and cached on disk, for models without shipped heads.

The Space prefers the heads shipped with hf-sde (``hf_sde.pretrained.DEFAULT_HEADS``); these are the fallback,
so that any allowed model can be shown without a data set at hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .. import __version__
from ..fitting.heads import CONFIG_NAME, WEIGHTS_NAME, SDEHeads

logger = logging.getLogger(__name__)

#: Settings of the heads fitted at start-up when none are given (part of the cache key).
DEMO_FIT = {"layer": -1, "proj_dim": 8, "width": 64, "depth": 2, "epochs": 30, "patience": 8,
            "batch_size": 256, "lr": 2e-3, "max_length": 256, "seed": 0}

#: A small built-in corpus of TinyStories-style stories (written for hf-sde, Apache-2.0), so the demo can fit
#: heads with no data set at hand. ``../shared/data/tinystories_sample.txt`` is added when it exists.
DEMO_STORIES = (
    "Once upon a time, there was a little girl named Lily. She loved to play in the park with her red ball. "
    "One day, the ball rolled into the pond. Lily was sad. A kind duck pushed the ball back to her. "
    "Lily smiled and said, \"Thank you, duck!\" They played together until the sun went down.",
    "Tom had a big blue truck. He liked to push it up and down the hill. One day the truck lost a wheel. "
    "Tom looked everywhere for it. His dad helped him find the wheel under the bed. "
    "They fixed the truck together, and Tom was happy again.",
    "There was a small cat who lived in a warm house. The cat liked to sleep in the sun. "
    "One morning, a bird sat on the window. The cat wanted to play with the bird, but the bird flew away. "
    "The cat went back to sleep and dreamed of flying.",
    "Once upon a time, a boy named Ben found a shiny stone in the garden. He showed it to his mom. "
    "\"It is very pretty,\" she said. Ben put the stone in a box under his bed. "
    "Every night he opened the box to look at it, and it made him feel brave.",
    "Sara and her friend Max wanted to build a tall tower. They used many blocks. The tower got taller and taller. "
    "Then the dog ran into the room and the tower fell down. Sara and Max laughed. "
    "They built the tower again, even taller than before.",
    "A little bunny lived in the forest. He was scared of the dark. One night, he saw a light in the trees. "
    "It was a friendly firefly. The firefly said, \"Do not be scared. I will light the way.\" "
    "The bunny walked home and was not scared anymore.",
    "Once upon a time, there was a big tree in the middle of the town. Children came to play under it every day. "
    "One day, a storm came and the wind was very strong. The tree did not fall. "
    "The next day, the children hugged the tree and said thank you.",
    "Mia wanted to bake a cake for her mom. She got flour, eggs and milk. She mixed them in a big bowl. "
    "The cake went into the oven. When it was ready, it smelled so good. "
    "Her mom came home and was very surprised. They ate the cake together.",
    "There was a happy dog named Spot. Spot liked to run and jump. One day he saw a ball in the yard. "
    "He ran to get it, but it was a big orange. Spot sniffed it and rolled it to his friend Tim. "
    "Tim laughed and gave Spot a real ball to play with.",
    "Anna had a little boat. She took it to the lake with her grandpa. The boat sailed on the water. "
    "A fish jumped out and splashed the boat. Anna clapped her hands. "
    "Grandpa said, \"The fish wants to play too.\" They stayed at the lake all afternoon.",
    "Once upon a time, a little bird could not fly. Every day she tried, and every day she fell. "
    "Her mother said, \"Be patient, and keep trying.\" One morning the wind was soft, and the bird flapped her wings. "
    "She flew up high over the trees and sang a happy song.",
    "Jack had a toy robot that could talk. One day the robot stopped talking. Jack was sad. "
    "His sister said, \"Maybe it needs new batteries.\" They put in new batteries, and the robot said, \"Hello, Jack!\" "
    "Jack gave his sister a big hug.",
)

def _shared_sample() -> Path | None:
    """``shared/data/tinystories_sample.txt`` beside the repository checkout, if there is one."""
    candidates = [Path(__file__).resolve().parents[3] / "shared" / "data" / "tinystories_sample.txt",
                  Path.cwd().parent / "shared" / "data" / "tinystories_sample.txt"]
    for path in candidates:
        if path.is_file():
            return path
    return None


def demo_corpus() -> list[str]:
    """The texts the demo fits heads on: :data:`DEMO_STORIES` plus the shared TinyStories sample if present."""
    texts = list(DEMO_STORIES)
    sample = _shared_sample()
    if sample is not None:
        from ..data.corpus import load_texts

        texts += load_texts(str(sample))
    return texts


def default_cache_dir() -> Path:
    """``$HF_SDE_CACHE/demo-heads``, else ``~/.cache/hf-sde/demo-heads``."""
    root = os.environ.get("HF_SDE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf-sde")
    return Path(root) / "demo-heads"


def _cache_key(model, texts: list[str], fit: dict) -> str:
    source = getattr(model, "hf_sde_source", None) or {}
    from ..data.layers import hidden_size, num_decoder_layers

    payload = {"source": source, "hidden": hidden_size(model), "layers": num_decoder_layers(model), "fit": fit,
               "corpus": hashlib.sha256("\x00".join(texts).encode()).hexdigest(), "version": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def demo_heads(model, tokenizer, *, cache_dir: str | os.PathLike | None = None, epochs: int | None = None,
               texts: list[str] | None = None, progress: bool = True) -> tuple[SDEHeads, str]:
    """Heads for ``model`` fitted on the demo corpus, cached on disk. Returns ``(heads, description)``.

    The first call extracts the corpus' hidden paths and fits (tqdm progress); later calls, in this process
    or another one, load the cached folder. The cache key covers the model source, the corpus and the fit
    settings, so changing any of them fits anew.
    """
    from ..fitting.fit import fit_heads
    from ..trajectories.extract import extract_trajectories

    fit = dict(DEMO_FIT)
    if epochs is not None:
        fit["epochs"] = int(epochs)
    texts = list(texts) if texts is not None else demo_corpus()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = getattr(model, "hf_sde_source", None) or {}
    name = str(source.get("gguf_file") or source.get("name_or_path") or "model").replace("/", "--")
    folder = root / f"{name}-{_cache_key(model, texts, fit)}"
    if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
        try:
            heads = SDEHeads.from_pretrained(str(folder))
            heads.check_compatible(model)
            return heads, "demo heads (fitted on the demo corpus, cached)"
        except (ValueError, FileNotFoundError, OSError) as e:
            logger.warning("Cached demo heads in %s are unusable (%s); fitting again.", folder, e)
    traj = extract_trajectories(model, tokenizer, texts, fit["layer"], max_length=fit["max_length"], progress=progress)
    from ..data.layers import hidden_size

    result = fit_heads(
        traj, proj_dim=min(fit["proj_dim"], hidden_size(model)), width=fit["width"], depth=fit["depth"],
        epochs=fit["epochs"], patience=fit["patience"], batch_size=fit["batch_size"], lr=fit["lr"], seed=fit["seed"],
        progress=progress, base_model=source.get("name_or_path"), base_model_revision=source.get("revision"),
        gguf_file=source.get("gguf_file"), model_type=getattr(model.config, "model_type", None),
        data_description={"corpus": f"hf-sde demo corpus ({len(texts)} short stories)", "sequences": len(traj)},
    )
    heads = result.heads
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        heads.save_pretrained(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process saved the same heads first
            shutil.rmtree(tmp, ignore_errors=True)
        where = "fitted at start-up on the demo corpus, cached"
    except OSError as e:
        logger.warning("Could not cache the demo heads in %s: %s", root, e)
        where = "fitted at start-up on the demo corpus (not cached)"
    return heads, f"demo heads ({where})"
