"""Datasets for fine-tuning: the built-in synthetic video set and folders of pre-encoded latents."""

from .latents import LatentsDataset, write_latents_example
from .synthetic import SyntheticVideoConfig, SyntheticVideoDataset, collate

__all__ = ["LatentsDataset", "SyntheticVideoConfig", "SyntheticVideoDataset", "collate", "write_latents_example"]
