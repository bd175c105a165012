"""Models shipped with the package (the small video DiT used by the embedded default)."""

from .small_wan import SMALL_WAN_CONFIG, build_small_model, load_small_model, small_model_path

__all__ = ["SMALL_WAN_CONFIG", "build_small_model", "load_small_model", "small_model_path"]
