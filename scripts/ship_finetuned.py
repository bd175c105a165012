"""Copy a model fine-tuned by ``sla finetune`` (its ``final/`` folder) into the form the package ships: the
transformer's weights rounded to bfloat16 (half the bytes), or with ``--delta-from NAME`` stored as an int8
difference from the built-in model NAME it was fine-tuned from (a quarter of the bytes and more exact than
bfloat16; ``sla.models.weight_delta``). The SLA projections and mass offsets stay float32 in
``sla_weights.safetensors``; everything else is copied as written (less ``config.json``'s ``_name_or_path``, the
path of the machine that trained it), with a ``shipped`` note in ``finetune_info.json`` that says where the model
came from.

    python scripts/ship_finetuned.py runs/quality8k/sla_pooled_cov_tile_triton/seed0/train/final \\
        sla/assets/wan8k_finetuned/sla_pooled_cov --delta-from wan8k --note "seed 0 of the fourth experiment, H100"

The copy is written next to DEST and renamed into place, so an interrupted run leaves no half-written model. It
refuses an existing DEST unless ``--overwrite``, and prints the largest difference between the two models' outputs
and the relative L2 difference between the two models' outputs on one random clip.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sla.models.weight_delta import WEIGHTS_NAME as WEIGHTS  # noqa: E402


def ship(src: Path, dest: Path, note: str, overwrite: bool = False, delta_from: str | None = None) -> dict:
    """Write the shipped copy of ``src`` to ``dest``; returns what was written (sizes in bytes, the note).
    ``delta_from``: a built-in model name; store the transformer as its int8 difference from that model."""
    import torch
    from safetensors.torch import load_file, save_file

    from sla.models.small_wan import delta_base_folder
    from sla.models.weight_delta import write_delta
    from sla.training.checkpoint import INFO_NAME

    src, dest = Path(src), Path(dest)
    if not (src / WEIGHTS).is_file() or not (src / INFO_NAME).is_file():
        raise ValueError(f"{src} is not an `sla finetune` final folder (it needs {WEIGHTS} and {INFO_NAME})")
    if dest.exists() and not overwrite:
        raise ValueError(f"{dest} exists; pass --overwrite to replace it")
    if not note.strip():
        raise ValueError("--note must say where the model came from (experiment, seed, card)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for f in src.iterdir():
            if f.is_file() and f.name not in (WEIGHTS, INFO_NAME, "config.json"):
                shutil.copy2(f, tmp / f.name)
        config = json.loads((src / "config.json").read_text())
        config.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = load_file(str(src / WEIGHTS))
        if delta_from:
            written = write_delta(state, delta_from, delta_base_folder(delta_from), tmp)
            how = f"the transformer is stored as an int8 difference from the built-in model {delta_from!r}"
        else:
            rounded = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
            written = tmp / WEIGHTS
            save_file(rounded, str(written), metadata={"format": "pt"})
            how = "the transformer's weights were rounded to bfloat16 for shipping"
        info = json.loads((src / INFO_NAME).read_text())
        info["shipped"] = note.strip() + "; " + how
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 and copies' modes would make a package that only its builder reads
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"bytes_before": (src / WEIGHTS).stat().st_size, "bytes_after": (dest / written.name).stat().st_size,
            "weights": written.name, "shipped": info["shipped"]}


def output_difference(src: Path, dest: Path, seed: int = 0) -> dict:
    """How far the shipped model's output is from the original's on one random clip: the relative L2 error and the
    largest |difference| over the largest |output| (SLA's block choice can flip where two blocks' scores were
    within the rounding, which moves single outputs more than the rest)."""
    import torch

    from sla.training.checkpoint import load_finetuned, synthetic_data_config

    data = synthetic_data_config(str(src))
    outs = []
    for folder in (src, dest):
        model, _ = load_finetuned(folder)
        cfg = model.config
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, cfg.in_channels, data.frames, data.height, data.width, generator=g)
        text = torch.randn(1, 8, cfg.text_dim, generator=g)
        with torch.no_grad():
            outs.append(model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                              return_dict=False)[0])
    diff = outs[0] - outs[1]
    top = outs[0].abs().max()
    return {"relative_l2": float(diff.norm() / outs[0].norm()), "max_relative": float(diff.abs().max() / top)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="an `sla finetune` final/ folder")
    p.add_argument("dest", help="where the shipped copy goes, e.g. sla/assets/wan8k_finetuned/sla_pooled_cov")
    p.add_argument("--note", required=True, help="where the model came from (experiment, arm, seed, card)")
    p.add_argument("--delta-from", metavar="NAME",
                   help="store the transformer as an int8 difference from this built-in model (e.g. wan8k), the one "
                        "it was fine-tuned from; default: the whole transformer in bfloat16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    args = p.parse_args(argv)
    try:
        done = ship(Path(args.src), Path(args.dest), args.note, args.overwrite, args.delta_from)
    except ValueError as err:
        print(f"ship_finetuned.py: error: {err}", file=sys.stderr)
        return 2
    diff = output_difference(Path(args.src), Path(args.dest))
    print(json.dumps({**done, "output_difference": diff}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
