"""Write an analysis to a folder: ``summary.json``, ``report.md`` and PNG pictures."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .._paths import atomic_write_text
from .gate import gate_summary_line, premise_gate
from .runner import AnalysisResult

# The paper's measurements on Wan2.1 (arXiv 2509.24006, §3, Figures 1 and 3), for comparison.
PAPER_REFERENCE = {
    "frac_above_mean": 0.081,
    "frac_below_mean_over_100": 0.45,
    "error_top_8_percent": 0.33,
    "stable_rank": {"full": 6226, "top_8_percent": 6230, "rest": 9},
}


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: float) -> str:
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def write_outputs(result: AnalysisResult, out_dir: str | os.PathLike, *, plots: bool = True) -> dict:
    """Write ``summary.json``, ``report.md`` and (with ``plots``) the PNGs into ``out_dir`` (created).

    Returns ``{"summary": path, "report": path, "plots": [paths]}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written_plots = []
    if plots and result.entries:
        from . import plots as P

        written_plots.append(P.plot_histogram(result.entries, out / "weight_histogram.png"))
        written_plots.append(P.plot_errors(result.entries, out / "error_vs_sparsity.png"))
        written_plots.append(P.plot_stable_ranks(result.entries, out / "stable_rank.png"))
        for entry, class_map in zip(result.entries, result.class_maps):
            name = f"class_map_{entry['layer'].replace('.', '_')}_step{entry['step']}.png"
            written_plots.append(P.plot_class_map(entry, class_map, out / name))
    summary = {
        "meta": result.meta,
        "config": result.config.to_dict(),
        "paper_reference_wan2.1": PAPER_REFERENCE,
        "premise_gate": premise_gate(result.entries),
        "captures": result.entries,
        "plots": [p.name for p in written_plots],
    }
    summary_path = out / "summary.json"
    atomic_write_text(summary_path, json.dumps(summary, indent=1))
    report_path = out / "report.md"
    atomic_write_text(report_path, render_markdown(result, [p.name for p in written_plots]))
    return {"summary": summary_path, "report": report_path, "plots": written_plots}


def render_markdown(result: AnalysisResult, plot_names: list[str]) -> str:
    """The human-readable report."""
    cfg = result.config
    meta = result.meta
    entries = result.entries
    lines = ["# SLA premise analysis", ""]
    model = meta.get("model", meta.get("model_class", "model"))
    lines += [f"Model: `{model}`. " + (meta.get("model_description", "") or ""), ""]
    if entries:
        e0 = entries[0]
        lines += [
            f"Captured {len(entries)} self-attention call(s): sequence length {e0['seq_len_k']}, head dim "
            f"{e0['head_dim']}, {e0['num_heads_analysed']} of {e0['num_heads']} heads, {e0['query_rows']} sampled "
            f"query rows ({len(e0['query_blocks'])} whole query blocks of {cfg.block_q}) per call.",
            f"SLA settings: critical={cfg.critical}, negligible={cfg.negligible}, blocks {cfg.block_q}x{cfg.block_k}, "
            f"feature map `{cfg.feature_map}`, linear scope `{cfg.linear_scope}`.",
            f"Time: capture {meta.get('capture_seconds', 'n/a')} s, analysis {meta.get('analysis_seconds', 'n/a')} s "
            f"on {meta.get('analysis_device', 'cpu')}.",
            "",
        ]
    if entries:
        gate = premise_gate(entries)
        lines += ["## Premise gate", "", gate_summary_line(gate) + ".", "",
                  "| layer | step | critical-block mass (pooled) | (oracle) | weights > 1/N | passes |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['step']} | {r['critical_mass']:.3f} | {r['oracle_critical_mass']:.3f} | "
                  f"{_pct(r['frac_above_mean'])} | {'yes' if r['passes'] else 'no'} |" for r in gate["captures"]]
        lines.append("")
    lines += [
        "## What is measured",
        "",
        "- **Weight distribution**: share of attention weights above the uniform weight 1/N and below 1/(100N) "
        "(the paper reports 8.1% and 45% on Wan2.1).",
        "- **Stable rank** `||P||_F^2 / ||P||_2^2` of the sampled rows of the weight map P, of its top "
        f"{100 * cfg.rank_top:g}% entries per row and of the remainder (paper, full 32K x 32K map: 6226, 6230, 9). "
        "Only the sampled rows enter, so values are bounded by the number of sampled rows.",
        "- **Relative L1 error** `sum|O' - O| / sum|O|` against dense attention O, across sparsities: keeping the "
        "top-x% entries per row (with and without renormalising; the paper's Fig. 1 style, ~33% at 92% on Wan2.1), "
        "block-sparse attention with SLA's pooled block selection and with the oracle selection (the key blocks "
        "holding the most exact attention mass), and SLA itself.",
        "- **SLA's error** needs the projection `Proj` of the linear branch. " + (
            "Where a layer runs SLA, its own trained Proj is used (column 'SLA own')." if any(
                e["linear_branch"]["own_projection"] for e in entries) else
            "No analysed layer runs SLA, so its Proj would be the zero initialisation and SLA would equal block "
            "sparse-only. Shown instead: SLA with the **best least-squares Proj** (weight and bias shared by the "
            "heads, as in the module), fitted on half of the sampled query blocks and evaluated on the other half "
            "(cross-fitted, so no row is scored by a fit that saw it). It shows what a projection *can* recover "
            "at this layer without fine-tuning the rest of the model; fine-tuning usually does better."),
        "- **Recall**: share of the true top key blocks (by exact block attention mass) that the pooled score "
        "`mean(q) . mean(k - mean k)` selects as critical, and the attention mass both sets hold.",
        "",
        "## Per capture",
        "",
        "| layer @ step | > 1/N | < 1/(100N) | stable rank full / top / rest | recall at critical "
        "| mass pooled / oracle |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        d, sr, rc = e["distribution"], e["stable_rank"], e["recall"]["at_critical"]
        lines.append(
            f"| {e['layer']} @ {e['step']} | {_pct(d['frac_above_mean'])} | {_pct(d['frac_below_mean_over_100'])} | "
            f"{_num(sr['full'])} / {_num(sr['top'])} / {_num(sr['rest'])} | {_pct(rc['recall'])} "
            f"({rc['n_critical_blocks']} blocks) | {_pct(rc['mass_pooled'])} / {_pct(rc['mass_oracle'])} |")
    lines += ["", "## Error vs sparsity (mean over captures and heads)", ""]
    if entries:
        sp = entries[0]["errors"]["sparsity"]

        def curve_mean(key):  # per sparsity, over the captures that have the curve (None if none has it)
            curves = [e["errors"][key] for e in entries if e["errors"].get(key) is not None]
            return [sum(v) / len(v) for v in zip(*curves)] if curves else None

        mean = {key: curve_mean(key) for key in {k for e in entries for k in e["errors"]} - {"sparsity"}}
        cols = [("top-x% renorm.", "token_topk_renormalised"), ("top-x% P*M", "token_topk_masked"),
                ("block sparse (pooled)", "block_pooled_sparse_only"),
                ("block sparse (oracle)", "block_oracle_sparse_only"),
                ("SLA mass rule (untrained)", "sla_mass_rule"),
                ("SLA paper rule, least-sq. Proj", "sla_lstsq_projection"),
                ("SLA own Proj", "sla_own_projection")]
        cols = [(n, k) for n, k in cols if mean.get(k) is not None]
        lines.append("| sparsity | block sparsity achieved | " + " | ".join(n for n, _ in cols) + " |")
        lines.append("|---" * (2 + len(cols)) + "|")
        for i, s in enumerate(sp):
            lines.append(f"| {_pct(s)} | {_pct(mean['block_achieved_sparsity'][i])} | "
                         + " | ".join(_pct(mean[k][i]) for _, k in cols) + " |")
        lines += ["", "Token-level columns keep exactly round((1 - sparsity) N) entries per row; block columns keep "
                  "max(1, floor((1 - sparsity) T_n)) key blocks per query block, so their achieved sparsity can be "
                  "higher than the nominal one. 'SLA mass rule (untrained)' is `combine=\"mass\"` as it starts "
                  "(identity Proj, zero offsets): `a o_s + (1 - a) o_l` with `a` estimated from the two branches' "
                  "normalisers; 'least-sq. Proj' is the paper's `o_s + Proj(o_l)` with the best shared Proj. "
                  "`summary.json` also holds `sla_identity_projection` (o_s + o_l unprojected, the public code's "
                  "`proj=None`-style sum).", ""]
        decomposition = [("mass rule (untrained)", "sla_mass_rule"),
                         ("... with the exact critical mass a", "mass_rule_true_a"),
                         ("... with exact attention over the linear blocks", "mass_rule_exact_rest"),
                         ("... with both exact", "mass_rule_true_a_exact_rest"),
                         ("key-block means for a and the rest", "mass_rule_pooled"),
                         ("... with the keys' spread", "mass_rule_pooled_var"),
                         ("... over half blocks", "mass_rule_pooled_half"),
                         ("... over quarter blocks", "mass_rule_pooled_quarter"),
                         ("key-block means + least-sq. Proj(o_l)", "pooled_lstsq_projection")]
        a_errors = ["mass_estimate_error", "pooled_mass_estimate_error", "pooled_var_mass_estimate_error"]
        # Columns measured only where they apply (finer groups that tile a block, a fit with two row groups).
        optional = ("mass_rule_pooled_half", "mass_rule_pooled_quarter", "pooled_lstsq_projection")
        decomposition = [(n, k) for n, k in decomposition if k not in optional or mean.get(k) is not None]
        if all(mean.get(key) is not None for key in [k for _, k in decomposition] + a_errors):
            lines += ["Where the mass rule's error comes from (relative L1 against dense attention; the middle "
                      "columns replace an estimate by the exact quantity, and with the marginal scope 'both exact' "
                      "misses only the negligible blocks; the last four columns are candidates that estimate both from "
                      "the key blocks' mean keys and values (`combine=\"pooled\"`), the same with each block's "
                      "logit raised by the spread of its keys, `scale^2/2 sum_d q_d^2 var(K_j)_d`, over the means "
                      "of half and quarter key blocks (2x and 4x the coarse work), and the first of them plus the best "
                      "least-squares correction from the linear branch, scored out of sample):", ""]
            lines.append("| sparsity | " + " | ".join(n for n, _ in decomposition)
                         + " | mean abs. error of a: normalisers / key-block means / with spread |")
            lines.append("|---" * (2 + len(decomposition)) + "|")
            for i, s in enumerate(sp):
                lines.append(f"| {_pct(s)} | " + " | ".join(_pct(mean[k][i]) for _, k in decomposition)
                             + " | " + " / ".join(f"{mean[k][i]:.3f}" for k in a_errors) + " |")
            lines.append("")
        left_out = [("key-block means (pooled rule, untrained)", "mass_rule_pooled"),
                    ("... each block's exact mass", "pooled_exact_block_mass"),
                    ("... each block's exact value average", "pooled_exact_block_values"),
                    ("... values to first order in the keys' spread", "pooled_first_order"),
                    ("... same, weights averaged per query block", "pooled_first_order_block"),
                    ("... and the keys' spread in the weights and a", "pooled_spread_first_order_block"),
                    ("... per query block + least-sq. Proj(o_l)", "pooled_first_order_block_lstsq")]
        left_out = [(n, k) for n, k in left_out if k != "pooled_first_order_block_lstsq" or mean.get(k) is not None]
        if all(mean.get(k) is not None for _, k in left_out):
            lines += ["What the key-block means leave out (relative L1 against dense attention, the pooled rule with "
                      "one part made exact at a time: each block's attention mass per row, with mean values and the "
                      "exact `a` that follows; each block's softmax average of its values, with the rule's weights; "
                      "or each mean value plus `scale q . C_j`, `C_j` the block's key-value covariance, per row and "
                      "with the weights averaged over the query block, as one `D x D` state per query block; that "
                      "state with the spread-raised weights and `a`, and with the best least-squares `Proj(o_l)` "
                      "added, scored out of sample):", ""]
            lines.append("| sparsity | " + " | ".join(n for n, _ in left_out) + " |")
            lines.append("|---" * (1 + len(left_out)) + "|")
            for i, s in enumerate(sp):
                lines.append(f"| {_pct(s)} | " + " | ".join(_pct(mean[k][i]) for _, k in left_out) + " |")
            lines.append("")
    if plot_names:
        lines += ["## Pictures", ""]
        for name in plot_names:
            lines += [f"![{name}]({name})", ""]
    lines += ["All numbers are in `summary.json` (per head under `per_head`).", ""]
    return "\n".join(lines)
