"""The premise gate: does a model's attention have the structure SLA relies on?

SLA can keep quality at 95% sparsity only if, for most query blocks, the few key blocks its pooled scores
pick hold most of the attention mass. This module turns an analysis (one entry per captured (layer, step))
into that yes/no answer with the numbers behind it. The thresholds are the testbed requirement of the
project (issue 12): in at least 75% of the captured (layer, step) pairs, the pooled critical blocks at
``critical`` hold at least 60% of the attention mass, and at most 15% of the attention weights exceed the
mean 1/N (the paper measured 8.1% on Wan2.1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PremiseGate:
    """Thresholds of :func:`premise_gate`.

    Attributes:
        min_critical_mass: attention mass the pooled critical blocks must hold in a capture.
        max_above_mean: largest fraction of weights above 1/N a capture may have.
        min_share: fraction of captures that must meet both.
    """

    min_critical_mass: float = 0.60
    max_above_mean: float = 0.15
    min_share: float = 0.75


def premise_gate(entries: list[dict], gate: PremiseGate = PremiseGate()) -> dict:
    """Evaluate ``gate`` on analysis entries (``sla analyze``'s ``summary.json["captures"]``).

    Returns a JSON-ready dict: the thresholds, one row per capture (layer, step, critical mass of the pooled
    selection at the analysed ``critical``, fraction of weights above 1/N, whether it passes) and the verdict.
    """
    rows = []
    for e in entries:
        mass = float(e["recall"]["at_critical"]["mass_pooled"])
        above = float(e["distribution"]["frac_above_mean"])
        rows.append({"layer": e["layer"], "layer_index": e["layer_index"], "step": e["step"],
                     "critical_mass": mass, "oracle_critical_mass": float(e["recall"]["at_critical"]["mass_oracle"]),
                     "frac_above_mean": above,
                     "passes": mass >= gate.min_critical_mass and above <= gate.max_above_mean})
    n_pass = sum(r["passes"] for r in rows)
    share = n_pass / len(rows) if rows else 0.0
    return {"thresholds": asdict(gate), "captures": rows, "passing": n_pass, "total": len(rows), "share": share,
            "mean_critical_mass": sum(r["critical_mass"] for r in rows) / max(1, len(rows)),
            "mean_frac_above_mean": sum(r["frac_above_mean"] for r in rows) / max(1, len(rows)),
            "passed": bool(rows) and share >= gate.min_share}


def gate_summary_line(result: dict) -> str:
    t = result["thresholds"]
    verdict = "PASSES" if result["passed"] else "FAILS"
    return (f"premise gate {verdict}: {result['passing']}/{result['total']} captures ({100 * result['share']:.0f}%, "
            f"need {100 * t['min_share']:.0f}%) have pooled critical-block mass >= {t['min_critical_mass']:.2f} and "
            f"<= {100 * t['max_above_mean']:.0f}% of weights above 1/N (means: mass {result['mean_critical_mass']:.3f}, "
            f"above 1/N {100 * result['mean_frac_above_mean']:.1f}%)")
