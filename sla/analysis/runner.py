"""Python API: capture a model's self-attention while it runs, then analyse every capture.

Example (any diffusers pipeline; q, k, v are taken where the attention kernel sees them)::

    from sla.analysis import AnalysisConfig, analyze_model, write_outputs

    result = analyze_model(pipe.transformer, lambda: pipe(prompt, num_inference_steps=30),
                           layers=[0, 15, -1], steps=[0, 15, 29], num_steps=30, heads=4)
    write_outputs(result, "analysis_out")   # summary.json, report.md, PNGs
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .capture import AttentionCapture, resolve_steps
from .layer import AnalysisConfig, analyze_attention


@dataclass
class AnalysisResult:
    """Everything one analysis produced.

    Attributes:
        config: the :class:`AnalysisConfig` used.
        entries: one JSON-ready dict per captured (layer, step): ``layer``, ``layer_index``, ``step``,
            ``heads``, ``num_heads``, ``source`` and the measurements of :func:`analyze_attention`.
        class_maps: ``(H_sampled, T_m, T_n)`` int8 class map of the full sequence, per entry.
        meta: free-form facts about the run (model, timings, device), copied into summary.json.
    """

    config: AnalysisConfig
    entries: list = field(default_factory=list)
    class_maps: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def analyze_model(model: torch.nn.Module, run_fn, *, layers="auto", steps=None, num_steps: int | None = None,
                  heads=4, batch_index: int = 0, config: AnalysisConfig | None = None,
                  device: torch.device | str | None = None, progress: bool = True,
                  token_grid: tuple[int, int, int] | None = None) -> AnalysisResult:
    """Run ``run_fn()`` (which must call ``model``) while capturing q, k, v, then analyse each capture.

    Args:
        model: the diffusers transformer whose self-attention is analysed.
        run_fn: a no-argument callable that runs the model (a pipeline call, a denoising loop, ...).
        layers: see :func:`sla.analysis.capture.resolve_layers` (``"auto"``, ``"all"``, indices, names).
        steps: forward calls of ``model`` to capture. With ``num_steps`` given: ``"auto"`` (first, middle, last),
            ``"all"`` or indices (negative from the end); without it, ``None`` (all) or non-negative indices.
        num_steps: how many times ``run_fn`` calls the model, if known.
        heads: ``None`` (all), a count (evenly spread) or a list of head indices.
        batch_index: batch element analysed (e.g. 0 = the conditional half of a CFG batch, depending on the
            pipeline).
        config: :class:`AnalysisConfig`; defaults to the paper's settings.
        device: where the analysis runs (default: CPU, where captures are stored).
        progress: show tqdm progress bars.
        token_grid: ``(F, H, W)`` video tokens of the model's input after patching; needed (and only used) with
            ``config.token_tile``.

    Raises:
        ValueError: a bad layer or step selection, or a requested (layer, step) that never ran.
    """
    from tqdm.auto import tqdm

    config = config or AnalysisConfig()
    config.validate()
    order = None
    if config.token_tile is not None:
        from ..ops.sla.tiles import tile_permutation

        if token_grid is None:
            raise ValueError("config.token_tile needs token_grid=(F, H, W), the model's video tokens after patching")
        order = tile_permutation(token_grid, config.token_tile)[0]
    if num_steps is not None:
        steps = resolve_steps(steps if steps is not None else "auto", num_steps)
    elif isinstance(steps, str):
        raise ValueError(f"steps={steps!r} needs num_steps (how many model calls run_fn makes); or pass indices")
    t0 = time.perf_counter()
    with AttentionCapture(model, layers=layers, steps=steps, heads=heads, batch_index=batch_index) as cap:
        run_fn()
    cap.check_complete()
    t1 = time.perf_counter()

    result = AnalysisResult(config=config)
    total_heads = sum(c.q.shape[0] for c in cap.captures)
    bar = tqdm(total=total_heads, desc="analysing heads", disable=not progress, leave=False)
    # Analyse in (layer, step) order and free each capture once done.
    captures = sorted(cap.captures, key=lambda c: (c.layer_index, c.step))
    cap.captures = []
    while captures:
        c = captures.pop(0)
        q, k, v = (x.to(device) if device is not None else x for x in (c.q, c.k, c.v))
        if order is not None and c.source == "sdpa":  # an SLA layer's capture is already in its SLA's order
            if q.shape[1] != order.numel():
                raise ValueError(f"token_tile: {c.layer_name} attends over {q.shape[1]} tokens, but token_grid "
                                 f"{tuple(token_grid)} has {order.numel()}")
            q, k, v = (x[:, order.to(x.device)] for x in (q, k, v))
        measured, class_map = analyze_attention(q, k, v, config, scale=c.scale, own_projection=c.own_projection,
                                                progress=bar)
        entry = {"layer": c.layer_name, "layer_index": c.layer_index, "step": c.step, "heads": c.heads,
                 "num_heads": c.num_heads, "source": c.source}
        if c.own_projection is not None:
            op = c.own_projection
            entry["own_sla_settings"] = {"critical": op.critical, "negligible": op.negligible, "block_q": op.block_q,
                                         "block_k": op.block_k, "feature_map": op.feature_map,
                                         "linear_scope": op.linear_scope}
        entry.update(measured)
        result.entries.append(entry)
        result.class_maps.append(class_map.cpu())
    bar.close()
    result.meta.update({"capture_seconds": round(t1 - t0, 3), "analysis_seconds": round(time.perf_counter() - t1, 3),
                        "model_calls": cap.num_calls, "model_class": type(model).__name__,
                        "analysis_device": str(device or "cpu")})
    return result
