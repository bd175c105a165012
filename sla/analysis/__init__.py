"""Analysis tools: measure SLA's premise (paper §3) on a model's own attention, with pictures.

* :class:`AttentionCapture` records q, k, v of chosen self-attention layers and denoising steps with hooks.
* :func:`analyze_attention` measures one capture: weight distribution, stable ranks, output error of
  sparse-only attention and SLA across sparsities, and recall of SLA's pooled block selection.
* :func:`analyze_model` does both around any callable that runs the model; :func:`write_outputs` writes
  ``summary.json``, ``report.md`` and PNGs. The CLI is ``sla analyze``.

Heavy dependencies (diffusers, matplotlib) are imported only when used.
"""

from .capture import AttentionCapture, CapturedAttention, find_self_attention_layers, resolve_layers, resolve_steps
from .gate import PremiseGate, premise_gate
from .layer import AnalysisConfig, OwnProjection, analyze_attention
from .metrics import attention_distribution, block_attention_mass, critical_set_recall, relative_l1, stable_rank
from .report import write_outputs
from .runner import AnalysisResult, analyze_model

__all__ = [
    "AnalysisConfig",
    "AnalysisResult",
    "AttentionCapture",
    "CapturedAttention",
    "OwnProjection",
    "PremiseGate",
    "analyze_attention",
    "analyze_model",
    "attention_distribution",
    "block_attention_mass",
    "critical_set_recall",
    "find_self_attention_layers",
    "premise_gate",
    "relative_l1",
    "resolve_layers",
    "resolve_steps",
    "stable_rank",
    "write_outputs",
]
