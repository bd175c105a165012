"""Pictures of an analysis (matplotlib, Agg backend; imported only when plots are drawn)."""

from __future__ import annotations

from pathlib import Path

import torch

CLASS_COLOURS = ("#d9d9d9", "#f2c14e", "#c0392b")  # negligible, marginal, critical (class -1, 0, 1)

# (key in entry["errors"], label, x key) for the error-vs-sparsity picture.
ERROR_CURVES = (
    ("token_topk_renormalised", "top-x% entries per row, renormalised", "sparsity"),
    ("token_topk_masked", "top-x% entries per row, P*M V (not renormalised)", "sparsity"),
    ("block_pooled_sparse_only", "block sparse-only, pooled selection (SLA's)", "block_achieved_sparsity"),
    ("block_oracle_sparse_only", "block sparse-only, oracle top blocks", "block_achieved_sparsity"),
    ("sla_mass_rule", "SLA, mass rule as it starts (identity Proj)", "block_achieved_sparsity"),
    ("sla_lstsq_projection", "SLA paper rule, least-squares Proj (cross-fitted)", "block_achieved_sparsity"),
    ("sla_own_projection", "SLA, the layer's own Proj", "block_achieved_sparsity"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(entry: dict) -> str:
    return f"{entry['layer']} @ step {entry['step']}"


def _mean_curve(entries: list[dict], section: str, key: str) -> list[float] | None:
    curves = [e[section][key] for e in entries if e[section].get(key) is not None]
    if not curves:
        return None
    return [sum(vals) / len(vals) for vals in zip(*curves)]


def plot_class_map(entry: dict, class_map: torch.Tensor, path: Path, max_heads: int = 8) -> Path:
    """Block class map (critical / marginal / negligible) of every analysed head of one capture."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n = min(class_map.shape[0], max_heads)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows + 0.6), squeeze=False)
    cmap = ListedColormap(CLASS_COLOURS)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(class_map[i].numpy(), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(f"head {entry['heads'][i]}", fontsize=9)
        ax.set_xlabel("key block", fontsize=8)
        ax.set_ylabel("query block", fontsize=8)
        ax.tick_params(labelsize=7)
    bc = entry["block_classes"]
    fig.suptitle(f"{_label(entry)}: {bc['n_critical']} critical, {bc['n_marginal']} marginal, "
                 f"{bc['n_negligible']} negligible of {bc['num_key_blocks']} key blocks per row", fontsize=10)
    fig.legend(handles=[Patch(color=CLASS_COLOURS[2], label="critical (exact)"),
                        Patch(color=CLASS_COLOURS[1], label="marginal (linear)"),
                        Patch(color=CLASS_COLOURS[0], label="negligible (skipped)")],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_histogram(entries: list[dict], path: Path) -> Path:
    """Distribution of ``log10(N * P)`` per capture, with the paper's two thresholds marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for e in entries:
        hist = e["distribution"]["histogram"]
        edges, counts = hist["edges"], hist["counts"]
        total = sum(counts)
        centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        ax.plot(centres, [c / total for c in counts], lw=1.3,
                label=f"{_label(e)} (>1/N: {100 * e['distribution']['frac_above_mean']:.1f}%, "
                      f"<1/(100N): {100 * e['distribution']['frac_below_mean_over_100']:.1f}%)")
    ax.axvline(0.0, color="k", ls="--", lw=0.8)
    ax.axvline(-2.0, color="k", ls=":", lw=0.8)
    ax.text(0.05, ax.get_ylim()[1] * 0.95, "1/N", fontsize=8, va="top")
    ax.text(-1.95, ax.get_ylim()[1] * 0.95, "1/(100N)", fontsize=8, va="top")
    ax.set_xlabel("log10(N * attention weight)   (0 = uniform weight 1/N; end bins hold everything beyond)")
    ax.set_ylabel("fraction of weights")
    ax.set_title("Attention-weight distribution (sampled query rows)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.18), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_errors(entries: list[dict], path: Path) -> Path:
    """Relative L1 error vs sparsity (mean over captures) and the pooled selection's recall."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for key, label, xkey in ERROR_CURVES:
        y = _mean_curve(entries, "errors", key)
        if y is None:
            continue
        x = _mean_curve(entries, "errors", xkey)
        ax.plot([100 * v for v in x], [100 * v for v in y], marker="o", ms=3, lw=1.4, label=label)
    ax.set_xlabel("sparsity (%): entries / key blocks left out of the exact computation")
    ax.set_ylabel("relative L1 error of the output (%)")
    ax.set_title(f"Error vs dense attention (mean of {len(entries)} capture(s))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    x = [100 * v for v in _mean_curve(entries, "errors", "block_achieved_sparsity")]
    for key, label, style in (("recall", "recall of the true top blocks", "-o"),
                              ("mass_pooled", "attention mass in pooled critical blocks", "-s"),
                              ("mass_oracle", "attention mass in the true top blocks", "--^")):
        ax2.plot(x, [100 * v for v in _mean_curve(entries, "recall", key)], style, ms=3, lw=1.4, label=label)
    ax2.set_xlabel("block sparsity (%)")
    ax2.set_ylabel("%")
    ax2.set_ylim(0, 102)
    ax2.set_title("Does the pooled score find the largest blocks?")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_stable_ranks(entries: list[dict], path: Path) -> Path:
    """Stable rank of the full map, its top-x% part and the remainder, per capture (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(entries) + 2), 4))
    width = 0.27
    top = entries[0]["stable_rank"]["top_fraction"] if entries else 0.08
    for j, (key, label) in enumerate((("full", "full P"), ("top", f"top {100 * top:g}% per row"),
                                      ("rest", "remainder"))):
        xs = [i + (j - 1) * width for i in range(len(entries))]
        ax.bar(xs, [e["stable_rank"][key] for e in entries], width, label=label)
    ax.set_yscale("log")
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels([_label(e) for e in entries], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("stable rank ||P||_F^2 / ||P||_2^2")
    ax.set_title("Stable rank of the sampled attention rows (head mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
