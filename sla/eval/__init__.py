"""Evaluation: feature network for Frechet distance, temporal consistency, SLA-vs-dense attention error."""
