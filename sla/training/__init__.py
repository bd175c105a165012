"""Fine-tuning a diffusers video DiT into SLA: flow-matching / distillation losses, trainer, checkpoints.

Python API (imported lazily, so ``import sla.training.config`` stays light)::

    from sla.training import make_config, finetune, load_finetuned
    summary = finetune(make_config(attention="sla", steps=200, output_dir="runs/sla"))
    model, info = load_finetuned("runs/sla/final")
"""

_LAZY = {
    "FinetuneConfig": "config", "make_config": "config", "read_config_file": "config",
    "finetune": "trainer", "load_finetuned": "checkpoint", "export_model": "checkpoint",
    "apply_attention_mode": "variants", "ATTENTION_MODES": "variants",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sla.training' has no attribute {name!r}")
