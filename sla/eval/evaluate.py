"""What ``sla eval`` measures, as functions.

- :func:`heldout_loss`: flow-matching loss on held-out clips at fixed sigmas with fixed noise (keys
  ``(1234, clip index, sigma)``): the same number on every run, machine and process count.
- :func:`generate`: Euler sampling from fixed noise (keyed by clip index) for held-out captions.
- :func:`sample_quality`: Frechet distance to real held-out clips in the feature space of the shipped
  feature network, caption attribute agreement, temporal change (see :mod:`sla.eval.features`).
- :func:`attention_error`: per self-attention layer, the relative error ``||o - o_dense|| / ||o_dense||`` of
  what the layer's attention computes against dense softmax attention on the *same* q, k, v (after QK-norm
  and RoPE), plus the achieved sparsity of the exact branch.
- :func:`forward_seconds`: measured time of one model forward; :func:`forward_timing`: several models timed
  in alternation, with a warning when the machine was busy (see :mod:`sla._timing`).
"""

from __future__ import annotations

import time

import torch

from ..training.flow_matching import draw_noise_and_sigma, euler_sample, flow_matching_loss

EVAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)
EVAL_NOISE_SEED = 1234


def _batches(dataset, indices, batch_size):
    from ..data.synthetic import collate

    for i in range(0, len(indices), batch_size):
        yield collate([dataset[j] for j in indices[i:i + batch_size]])


@torch.no_grad()
def heldout_loss(model, dataset, n: int = 32, sigmas=EVAL_SIGMAS, batch_size: int = 4, device="cpu",
                 progress: bool = False) -> dict:
    """Mean flow-matching loss over ``n`` held-out clips x ``sigmas``; also per sigma."""
    model.eval()
    per_sigma = {float(s): 0.0 for s in sigmas}
    idx = list(range(min(n, len(dataset))))
    it = _batches(dataset, idx, batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=(len(idx) + batch_size - 1) // batch_size, desc="held-out loss", leave=False)
    for b in it:
        x0, te = b["video"].to(device), b["text_embeds"].to(device)
        for s in sigmas:
            pairs = [draw_noise_and_sigma(tuple(x0.shape[1:]), (EVAL_NOISE_SEED, int(i), round(s * 1000)), sigma=s)
                     for i in b["index"]]
            noise = torch.stack([p[0] for p in pairs]).to(device)
            sig = torch.stack([p[1] for p in pairs]).to(device)
            per_sigma[float(s)] += flow_matching_loss(model, x0, noise, sig, te, reduction="none").sum().item()
    per_sigma = {s: v / len(idx) for s, v in per_sigma.items()}
    return {"loss": sum(per_sigma.values()) / len(per_sigma), "per_sigma": per_sigma, "clips": len(idx)}


@torch.no_grad()
def generate(model, dataset, indices, steps: int = 20, shift: float = 1.0, batch_size: int = 4, device="cpu",
             progress: bool = False) -> torch.Tensor:
    """Clips ``(N, C, F, H, W)`` for the captions of ``dataset[indices]``, from noise keyed by clip index."""
    model.eval()
    out = []
    it = _batches(dataset, list(indices), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=(len(indices) + batch_size - 1) // batch_size, desc="sampling", leave=False)
    for b in it:
        shape = tuple(b["video"].shape[1:])
        noise = torch.stack([draw_noise_and_sigma(shape, (EVAL_NOISE_SEED + 1, int(i)), sigma=1.0)[0]
                             for i in b["index"]]).to(device)
        out.append(euler_sample(model, noise, b["text_embeds"].to(device), steps=steps, shift=shift).float().cpu())
    return torch.cat(out).clamp(-1, 1)


def sample_quality(generated: torch.Tensor, real: torch.Tensor, labels: torch.Tensor, feature_net=None) -> dict:
    """Frechet distance (features), attribute agreement, temporal change of generated vs real clips."""
    from .features import attribute_agreement, extract, frechet_distance, load_feature_net, temporal_consistency

    net = feature_net or load_feature_net()
    fg, pg = extract(net, generated)
    fr, pr = extract(net, real)
    return {
        "frechet_distance": frechet_distance(fg, fr),
        "attribute_agreement": attribute_agreement(pg, labels),
        "attribute_agreement_real": attribute_agreement(pr, labels),
        "temporal_change": temporal_consistency(generated),
        "temporal_change_real": temporal_consistency(real),
        "samples": int(generated.shape[0]),
    }


@torch.no_grad()
def attention_error(model, batch: dict, sigma: float = 0.5, device="cpu") -> list[dict]:
    """Per SLA layer: relative error vs dense attention on the same inputs, and achieved sparsity.

    Runs one forward at ``sigma`` with hooks on every ``attn.sla`` module. Layers without one (dense
    attention) are not listed.
    """
    import torch.nn.functional as F

    from ..ops.sla.blockmap import build_block_map

    rows = []
    hooks = []

    def make_hook(name):
        def hook(module, inputs, output):
            q, k, v = inputs[:3]
            dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            out = output[0] if isinstance(output, tuple) else output
            err = ((out.float() - dense).norm() / dense.norm()).item()
            row = {"layer": name, "rel_error_vs_dense": err}
            if hasattr(module, "critical"):
                bm = build_block_map(q, k, critical=module.critical, negligible=module.negligible,
                                     block_q=module.block_q, block_k=module.block_k)
                row.update(sparsity=float(bm.sparsity()), block_sparsity=float(bm.block_sparsity),
                           n_critical=bm.n_critical, n_negligible=bm.n_negligible, n_marginal=bm.n_marginal,
                           key_blocks=bm.num_key_blocks)
            else:  # linear-only: no exact branch at all
                row.update(sparsity=1.0, block_sparsity=1.0)
            rows.append(row)
        return hook

    root = model.module if hasattr(model, "module") else model
    for name, mod in root.named_modules():
        if name.endswith(".sla") and isinstance(mod, torch.nn.Module):
            hooks.append(mod.register_forward_hook(make_hook(name[:-4])))
    try:
        model.eval()
        x0, te = batch["video"].to(device), batch["text_embeds"].to(device)
        noise = torch.stack([draw_noise_and_sigma(tuple(x0.shape[1:]), (EVAL_NOISE_SEED, int(i), 0), sigma=sigma)[0]
                             for i in batch["index"]]).to(device)
        s = torch.full((x0.shape[0],), sigma, device=device)
        flow_matching_loss(model, x0, noise, s, te)
    finally:
        for h in hooks:
            h.remove()
    return rows


def forward_seconds(model, batch: dict, repeats: int = 2, device="cpu") -> float:
    """Median wall time of one forward on ``batch`` (after one warm-up); see :func:`forward_timing` to compare
    models and to know whether the machine was busy."""
    return forward_timing([("model", model)], batch, repeats=repeats, device=device).median("model")


@torch.no_grad()
def forward_timing(models, batch: dict, repeats: int = 3, device="cpu"):
    """Time one forward of each of ``models`` (``[(key, model)]``) on ``batch``, interleaved: every repeat runs
    each model once, in rotating order, so that load on the machine hits every model alike. Returns a
    :class:`sla._timing.Timing` keyed like ``models``; its ``warnings`` say when the times are not trustworthy.
    """
    from .._timing import time_interleaved

    x0, te = batch["video"].to(device), batch["text_embeds"].to(device)
    t = torch.full((x0.shape[0],), 500.0, device=device)

    def once(model):
        model(hidden_states=x0, timestep=t, encoder_hidden_states=te, return_dict=False)
        if x0.is_cuda:
            torch.cuda.synchronize()

    for _, model in models:
        model.eval()
    return time_interleaved({key: (lambda m=model: once(m)) for key, model in models}, repeats,
                            threads=torch.get_num_threads(), check_cpu=not x0.is_cuda)


def model_attention_shape(model, frames: int, height: int, width: int) -> dict:
    cfg = model.config
    pt, ph, pw = cfg.patch_size
    return dict(seq_len=(frames // pt) * (height // ph) * (width // pw), head_dim=cfg.attention_head_dim,
                heads=cfg.num_attention_heads, layers=cfg.num_layers)


def evaluation_backend(model, backend: str, device) -> str:
    """The backend the float32 evaluation runs ``model``'s SLA layers on: ``backend``, except on CUDA for head dims
    the Triton kernels do not run in float32 (``MAX_FP32_HEAD_DIM_ON_GPU``; wan8k's heads are 128 wide), where the
    PyTorch path computes the same operator. Evaluation stays in float32 so that its numbers do not depend on a
    low-precision path; training (bf16 autocast) is not affected. Recorded in the results as ``sla_backend``."""
    from ..ops.sla.triton.limits import MAX_FP32_HEAD_DIM_ON_GPU

    if str(device).startswith("cuda") and backend in ("auto", "triton") and \
            model.config.attention_head_dim > MAX_FP32_HEAD_DIM_ON_GPU:
        return "torch"
    return backend


def _evaluation_backends(entries, device) -> list:
    """Set every SLA layer's backend for the float32 evaluation (:func:`evaluation_backend`); returns what to
    restore afterwards, ``[(module, backend)]``."""
    from ..integrations.diffusers import is_sla_applied, sla_modules

    changed = []
    for _, model, _ in entries:
        for module in sla_modules(model).values() if is_sla_applied(model) else ():
            backend = evaluation_backend(model, module.backend, device)
            if backend != module.backend:
                changed.append((module, module.backend))
                module.backend = backend
    return changed


def evaluate_models(entries, out_dir, *, clips: int = 16, samples: int = 8, steps: int = 20, shift: float = 1.0,
                    batch_size: int = 4, device="cpu", data=None,
                    progress: bool = True, title: str = "SLA evaluation", notes: str = "") -> list[dict]:
    """Evaluate ``entries`` = [(name, model, info)] on the synthetic held-out split; write ``eval.json``,
    ``eval.md``, PNG grids and GIFs into ``out_dir``. Returns the result rows.

    ``data`` is the :class:`~sla.data.synthetic.SyntheticVideoConfig` of the clips (every model must have been
    trained on them; :func:`sla.training.checkpoint.synthetic_data_config` reads a model's own); default: the
    first testbed's 16 x 64 x 64 clips.

    A row's files are named after its name made safe (:func:`sla._paths.safe_filename`: ``"../x"`` gives
    ``x_samples.png`` inside ``out_dir``, never a path outside it) and distinct from the other rows' and from
    ``real_samples.*``; the report shows the names as given.

    Evaluation runs in float32; on a GPU, SLA layers whose head dim the Triton kernels do not run in float32 run on
    the PyTorch path for the call (:func:`evaluation_backend`; each row records ``sla_backend``)."""
    from .._paths import prepare_output_dir

    prepare_output_dir(out_dir, "out_dir")
    changed = _evaluation_backends(entries, device)
    try:
        return _evaluate(entries, out_dir, clips, samples, steps, shift, batch_size, device, data, progress, title,
                         notes, changed)
    finally:
        for module, backend in changed:
            module.backend = backend


def _evaluate(entries, out_dir, clips, samples, steps, shift, batch_size, device, data, progress, title, notes,
              changed) -> list[dict]:
    import json
    import os
    import platform

    from .._paths import unique_filenames

    from ..data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset, collate
    from ..integrations.diffusers import is_sla_applied, sla_modules
    from ..training.variants import attention_flops
    from .features import load_feature_net
    from .media import save_gif, save_grid_png

    if progress and changed:
        print(f"[eval] SLA layers run on the PyTorch path for this float32 evaluation (head dim above the Triton "
              f"kernels' float32 limit on the GPU; the same operator): {len(changed)} layers", flush=True)
    stems = unique_filenames([name for name, _, _ in entries], reserved=("real",))
    from dataclasses import replace

    text_dim = entries[0][1].config.text_dim
    data = replace(data or SyntheticVideoConfig(), text_dim=text_dim)
    frames, height, width = data.frames, data.height, data.width
    val = SyntheticVideoDataset("val", size=max(clips, samples, 2), config=data)
    real_b = collate([val[i] for i in range(samples)])
    real, labels = real_b["video"], real_b["labels"]
    captions = list(real_b["caption"])  # generated clip i is for held-out caption i, like real clip i
    save_grid_png(real, os.path.join(out_dir, "real_samples.png"), row_labels=captions)
    save_gif(real, os.path.join(out_dir, "real_samples.gif"))
    from ..models.small_wan import feature_net_for

    net = load_feature_net(feature_net_for(data), device=device)
    probe = collate([val[i] for i in range(min(2, len(val)))])
    one = collate([val[0]])
    rows = []
    for (name, model, info), stem in zip(entries, stems):
        model.to(device).eval()
        mode = info.get("attention", "full")
        s = info.get("sla", {})
        row = dict(name=name, attention=mode, sla=s if mode != "full" else {})
        backends = {m.backend for m in sla_modules(model).values()} if is_sla_applied(model) else set()
        if backends:
            row["sla_backend"] = backends.pop() if len(backends) == 1 else sorted(backends)
        t0 = time.time()
        row["heldout"] = heldout_loss(model, val, n=clips, batch_size=batch_size, device=device, progress=progress)
        gen = generate(model, val, range(samples), steps=steps, shift=shift, batch_size=batch_size, device=device,
                       progress=progress)
        row["quality"] = sample_quality(gen, real, labels, net)
        row["samples_png"] = os.path.basename(save_grid_png(gen, os.path.join(out_dir, f"{stem}_samples.png"),
                                                            row_labels=captions))
        row["samples_gif"] = os.path.basename(save_gif(gen, os.path.join(out_dir, f"{stem}_samples.gif")))
        row["layers"] = attention_error(model, probe, device=device)
        if row["layers"]:
            row["rel_error_vs_dense"] = sum(r["rel_error_vs_dense"] for r in row["layers"]) / len(row["layers"])
            row["sparsity"] = sum(r["sparsity"] for r in row["layers"]) / len(row["layers"])
        else:
            row["rel_error_vs_dense"], row["sparsity"] = 0.0, 0.0
        shape = model_attention_shape(model, frames, height, width)
        flop_kw = {k: s[k] for k in ("critical", "negligible", "block_q", "block_k", "linear_scope") if k in s}
        row["attention_gflops_per_clip"] = attention_flops(mode, **shape, **flop_kw) / 1e9
        row["eval_seconds"] = time.time() - t0
        rows.append(row)
        if progress:
            print(f"[eval] {name}: held-out loss {row['heldout']['loss']:.4f}, FD {row['quality']['frechet_distance']:.2f}, "
                  f"rel. error vs dense {row['rel_error_vs_dense']:.3f}, sparsity {row['sparsity']:.3f}", flush=True)
    # All models' forwards timed together, interleaved: timed one model at a time, a burst of load from another
    # process landed on whichever model was being timed and made it look slow.
    timing = forward_timing([(str(i), model) for i, (_, model, _) in enumerate(entries)], one, device=device)
    for i, row in enumerate(rows):
        row["forward_seconds_batch1"] = timing.median(str(i))
    if progress and timing.warnings:
        print(f"[eval] warning: forward {timing.warning_text()}", flush=True)
    dev = (torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda")
           else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    meta = dict(device=dev, torch=torch.__version__, clips=clips, samples=samples, sampling_steps=steps, shift=shift,
                frames=frames, height=height, width=width, sigmas=list(EVAL_SIGMAS),
                forward_timing=dict(timing.to_dict(), interleaved=True, warning=timing.warning_text()))
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=2)
    write_markdown(rows, meta, os.path.join(out_dir, "eval.md"), title=title, notes=notes)
    return rows


def write_markdown(rows, meta, path, title: str = "SLA evaluation", notes: str = "") -> None:
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += [
        f"Measured on {meta['device']}, torch {meta['torch']}. Held-out loss: {meta['clips']} held-out clips x sigmas "
        f"{meta['sigmas']}, fixed noise. Samples: {meta['samples']} held-out captions, {meta['sampling_steps']} Euler "
        f"steps, fixed noise. FD = Frechet distance to the real held-out clips in the shipped feature network's space "
        f"(few samples: compare rows, not absolute values). Attribute agreement: how often the feature network's "
        f"attribute predictions on a sample match its caption (real clips: see the last columns). Temporal change: "
        f"mean |frame(t+1) - frame(t)|.",
        "",
        "| model | attention | held-out loss | FD | attribute agreement | temporal change | rel. error vs dense "
        "| sparsity | attn GFLOP/clip | forward s (batch 1) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r["quality"]
        lines.append(
            f"| {r['name']} | {r['attention']} | {r['heldout']['loss']:.4f} | {q['frechet_distance']:.2f} | "
            f"{q['attribute_agreement']:.3f} | {q['temporal_change']:.4f} | {r['rel_error_vs_dense']:.3f} | "
            f"{r['sparsity']:.3f} | {r['attention_gflops_per_clip']:.2f} | {r['forward_seconds_batch1']:.3f} |")
    if rows:
        q = rows[0]["quality"]
        lines += ["", f"Real held-out clips: attribute agreement {q['attribute_agreement_real']:.3f}, "
                      f"temporal change {q['temporal_change_real']:.4f}.", ""]
    on_torch = [r["name"] for r in rows if r.get("sla_backend") == "torch"]
    if on_torch and not str(meta.get("device", "")).startswith("CPU"):
        lines += [f"SLA in {', '.join(on_torch)} ran on the PyTorch path (float32 evaluation; the Triton kernels run "
                  "float32 only for narrower heads on the GPU): the same operator, so the quality columns hold, but "
                  "the forward times are not the kernels'.", ""]
    warning = meta.get("forward_timing", {}).get("warning")
    if warning:
        lines += [f"**Warning (forward s column):** {warning}", ""]
    lines += ["## Samples", "", "Real held-out clips:", "", "![real](real_samples.png)", "",
              "![real](real_samples.gif)", ""]
    for r in rows:
        lines += [f"**{r['name']}** ({r['attention']}):", "", f"![{r['name']}]({r['samples_png']})", "",
                  f"![{r['name']}]({r['samples_gif']})", ""]
    lines += ["## Per-layer attention error against dense attention (same q, k, v)", "",
              "| model | layer | rel. error | sparsity | critical / marginal / negligible blocks |", "|---|---|---|---|---|"]
    for r in rows:
        for lay in r["layers"]:
            counts = (f"{lay['n_critical']} / {lay['n_marginal']} / {lay['n_negligible']} of {lay['key_blocks']}"
                      if "n_critical" in lay else "no exact branch")
            lines.append(f"| {r['name']} | {lay['layer']} | {lay['rel_error_vs_dense']:.4f} | {lay['sparsity']:.3f} "
                         f"| {counts} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
