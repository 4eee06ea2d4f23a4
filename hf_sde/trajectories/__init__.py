"""Extracting hidden-state paths from a model, in memory, cached on disk or in shards."""

from .extract import Trajectories, extract_from_ids, extract_trajectories, self_generate
from .shards import extract_to_shards, load_shards

__all__ = ["Trajectories", "extract_from_ids", "extract_to_shards", "extract_trajectories", "load_shards",
           "self_generate"]
