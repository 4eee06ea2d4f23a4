"""Point the hub cache at the repository's ../shared assets when they exist (offline use).

Examples import this first (before anything imports huggingface_hub); with your own HF_HUB_CACHE / network, it
changes nothing. The models themselves are named in :mod:`hf_sde.data.loading` (``DEFAULT_MODEL``, ``STORIES260K``).
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
TINYSTORIES = os.path.join(SHARED, "data", "tinystories_sample.txt")
HELPSTEER = os.path.join(SHARED, "data", "helpsteer_sample_500.jsonl")

if os.path.isdir(os.path.join(SHARED, "hf-cache", "hub")):
    os.environ.setdefault("HF_HUB_CACHE", os.path.join(SHARED, "hf-cache", "hub"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
