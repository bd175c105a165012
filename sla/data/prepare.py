"""``sla prepare``: encode a folder of captioned videos into the latents folder ``sla finetune --data`` reads.

What it does, per clip: read frames ``0, s, 2s, ...`` (``--frames`` of them, stride ``s = --stride``), scale each
so it covers ``--height x --width`` and cut out the centre, map pixels to [-1, 1], encode with the pipeline's
``AutoencoderKLWan`` (the posterior mean, ``latent_dist.mode()``), normalise to model space with the VAE's own
statistics, ``(z - latents_mean) / latents_std`` (the inverse of what ``WanPipeline`` applies before decoding),
and encode the caption with the pipeline's own ``encode_prompt`` (its text cleaning, ``--text-len`` tokens,
zeros after the caption: exactly what ``WanPipeline`` feeds the transformer at sampling time). One
``<name>.safetensors`` per clip (format: :mod:`sla.data.latents`), written atomically.

Inputs (the top level of ``--videos``): video files (:data:`~sla.data.video.VIDEO_EXTENSIONS`) and folders of
frame images. Captions: ``<name>.txt`` beside each clip, or, with ``--captions FILE``, one CSV (header with a
``file``/``video``/``path``/``name`` column and a ``caption``/``text``/``prompt`` column) or JSONL file (one object
per line with the same keys) for the whole folder; entries match a clip by file name or by name without
extension.

Problems with single clips never end the run: an unreadable or too short video, or a clip without caption, is
reported by name (on the console and in ``<out>/prepare_report.json``) and skipped; every other clip is encoded.
``strict`` turns a run with skipped clips into a failure *after* everything else has been encoded. Settings
that would make the folder inconsistent (a different size, pipeline or caption length than the files already
there) are refused before any work.

Resumable: a clip whose output file exists, was made with the same settings and holds the same caption is
skipped; a changed caption is encoded again. Files are written through a temp name and ``os.replace``, so an
interrupted run leaves no partial file behind.
"""

from __future__ import annotations

import csv
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._paths import atomic_write_text
from .latents import PREPARE_KEY, read_metadata, read_prepare_info, write_latents_example
from .video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ClipError, image_files, load_clip

REPORT_NAME = "prepare_report.json"
FILE_COLUMNS = ("file", "video", "path", "name")
CAPTION_COLUMNS = ("caption", "text", "prompt")
# Settings recorded in every file; a folder must not mix values of these (they decide the tensors' meaning/shape).
CONSISTENCY_KEYS = ("frames", "height", "width", "stride", "text_len", "z_dim", "latents_mean", "latents_std",
                    "text_dim")


@dataclass
class PrepareSettings:
    pipeline: str
    videos: str
    out: str
    frames: int = 81
    height: int = 480
    width: int = 832
    stride: int = 1
    text_len: int = 512
    batch_size: int = 1
    captions: str | None = None
    device: str = "auto"
    workers: int = 2
    strict: bool = False
    progress: bool = True


@dataclass
class Clip:
    name: str  # output file stem
    source: Path
    caption: str | None = None
    missing_caption: str = ""  # why there is no caption


@dataclass
class PrepareReport:
    out: str
    encoded: list = field(default_factory=list)
    already_done: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # {"clip": source name, "reason": ...}
    ignored: list = field(default_factory=list)  # entries of --videos that are not clips, with why
    unused_captions: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------------
# finding clips and captions
# ------------------------------------------------------------------------------------------------------------

def _check_settings(s: PrepareSettings) -> None:
    if s.frames < 1 or (s.frames - 1) % 4:
        raise ValueError(f"--frames must be 4k+1 for the Wan VAE, which encodes the first frame alone and then "
                         f"4 frames per latent frame (e.g. 81, 49, 17), got {s.frames}")
    for name in ("stride", "text_len", "batch_size"):
        if getattr(s, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    if s.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {s.workers}")
    for name in ("height", "width"):
        # 16 = the VAE's 8x spatial compression times the transformer's 2x2 patches; WanPipeline needs it too.
        if getattr(s, name) < 16 or getattr(s, name) % 16:
            raise ValueError(f"--{name} must be a positive multiple of 16 (the Wan VAE's factor 8 times the "
                             f"transformer's 2x2 patches), got {getattr(s, name)}")
    if not Path(s.videos).is_dir():
        raise FileNotFoundError(f"--videos {s.videos} is not a folder; pass the folder that holds your clips "
                                "(video files or folders of frames) and their <name>.txt captions")


def read_captions_file(path: str | os.PathLike) -> dict[str, str]:
    """``{key: caption}`` from a CSV or JSONL file; keys are what the file column holds, reduced to a file name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--captions {path} does not exist; pass a .csv or .jsonl file, or drop --captions "
                                "to read <name>.txt files beside the clips")
    rows = []  # (line number, record)
    if path.suffix.lower() == ".csv":
        # utf-8-sig: spreadsheet programs start CSV files with a byte-order mark, which would glue onto the
        # first column's name.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            # line 1 is the header; column names compare case- and space-insensitively
            rows = [(i + 2, {(k or "").strip().lower(): v for k, v in r.items()}) for i, r in enumerate(reader)]
            columns = [(c or "").strip().lower() for c in reader.fieldnames or []]
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        columns = None
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--captions {path} line {i} is not JSON ({e})") from e
                if not isinstance(rec, dict):
                    raise ValueError(f"--captions {path} line {i} is not a JSON object")
                rows.append((i, rec))
    else:
        raise ValueError(f"--captions {path} must be a .csv or .jsonl file")

    def pick(keys, options, what, where):
        found = [k for k in options if k in keys]
        if not found:
            raise ValueError(f"--captions {path}{where} has no {what} column: name one of {', '.join(options)}")
        return found[0]

    out, seen = {}, {}
    for line, rec in rows:
        keys = columns if columns is not None else list(rec)
        where = "" if columns is not None else f" line {line}"
        fcol, ccol = pick(keys, FILE_COLUMNS, "file", where), pick(keys, CAPTION_COLUMNS, "caption", where)
        key = Path(str(rec.get(fcol) or "").strip()).name
        if not key:
            raise ValueError(f"--captions {path} line {line}: empty {fcol!r}")
        if key in seen:
            raise ValueError(f"--captions {path}: {key!r} appears twice (lines {seen[key]} and {line}); keep one")
        seen[key] = line
        out[key] = "" if rec.get(ccol) is None else str(rec.get(ccol))
    return out


def find_clips(videos: str | os.PathLike, captions_file: str | None = None) -> tuple[list[Clip], list, list]:
    """Clips at the top level of ``videos`` with their captions; also ``(ignored entries, unused caption keys)``.

    Raises ``ValueError`` when two clips would write the same output file (same name, different extension)."""
    root = Path(videos)
    table = read_captions_file(captions_file) if captions_file else None
    clips, ignored, by_name = [], [], {}
    sidecars = {p.stem: p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".txt"}
    for p in sorted(root.iterdir(), key=lambda q: q.name):
        if p.name.startswith("."):
            continue  # hidden files (.DS_Store, editors' swap files) are nobody's clip
        if p.is_dir():
            if not image_files(p):
                ignored.append({"entry": p.name,
                                "reason": f"folder without frame images ({', '.join(IMAGE_EXTENSIONS)})"})
                continue
        elif p.suffix.lower() not in VIDEO_EXTENSIONS:
            if p.suffix.lower() != ".txt" and (captions_file is None or p.resolve() != Path(captions_file).resolve()):
                ignored.append({"entry": p.name, "reason": "not a video file or a folder of frames"})
            continue
        name = p.stem if p.is_file() else p.name
        if name in by_name:
            raise ValueError(f"--videos {root}: {by_name[name].name} and {p.name} would both be written as "
                             f"{name}.safetensors; rename one of them")
        by_name[name] = p
        clip = Clip(name=name, source=p)
        if table is not None:
            cap = table.get(p.name, table.get(name))
            if cap is None:
                clip.missing_caption = f"no entry for {p.name} (or {name}) in --captions {captions_file}"
            else:
                clip.caption = cap.strip()
        elif name in sidecars:
            clip.caption = sidecars[name].read_text(encoding="utf-8").strip()
        else:
            clip.missing_caption = (f"no caption: expected {name}.txt beside it (or pass --captions FILE with an "
                                    "entry for it)")
        if clip.caption is not None and not clip.caption:
            clip.caption, clip.missing_caption = None, "its caption is empty"
        clips.append(clip)
    used = set()
    for c in clips:
        used |= {c.source.name, c.name}
    unused = sorted(k for k in (table or {}) if k not in used)
    if table is None:
        ignored += [{"entry": t.name, "reason": "caption without a clip of the same name"}
                    for n, t in sorted(sidecars.items()) if n not in by_name]
    return clips, ignored, unused


# ------------------------------------------------------------------------------------------------------------
# encoding
# ------------------------------------------------------------------------------------------------------------

def _settings_record(s: PrepareSettings, pipe, text_dim: int) -> dict:
    vae = pipe.vae.config
    return dict(frames=s.frames, height=s.height, width=s.width, stride=s.stride, text_len=s.text_len,
                z_dim=int(vae.z_dim), latents_mean=[float(x) for x in vae.latents_mean],
                latents_std=[float(x) for x in vae.latents_std], text_dim=int(text_dim),
                pipeline=str(Path(s.pipeline).resolve()),
                normalisation="(vae.encode(x).latent_dist.mode() - latents_mean) / latents_std")


def _existing_state(out: Path, record: dict) -> dict[str, str]:
    """``{name: stored caption}`` of the finished files in ``out``; ``ValueError`` if one was made with other
    settings (a folder must hold one size and one model space)."""
    done = {}
    for f in sorted(out.glob("*.safetensors")):
        meta = read_metadata(f)
        info = read_prepare_info(meta, f)
        if info is None:
            raise ValueError(f"--out {out} already holds {f.name}, which `sla prepare` did not write; use an empty "
                             "or new --out folder")
        diff = [k for k in CONSISTENCY_KEYS if info.get(k) != record[k]]
        if diff:
            k = diff[0]
            raise ValueError(f"--out {out} holds latents made with {k}={info.get(k)!r} ({f.name}), this run has "
                             f"{k}={record[k]!r}; all clips of one folder must share their settings: use a new "
                             "--out, or the settings of the first run")
        done[f.stem] = meta.get("caption", "")
    return done


def _clean_temp_files(out: Path) -> None:
    # Left by a run killed between writing and renaming; never valid data (the rename is what completes a file).
    for f in out.glob("*.safetensors.tmp"):
        f.unlink(missing_ok=True)


def _load(clip: Clip, s: PrepareSettings):
    try:
        return load_clip(clip.source, s.frames, s.height, s.width, s.stride), None
    except ClipError as e:
        return None, str(e)
    except Exception as e:  # anything else a broken file provokes (PIL, numpy): this clip only
        return None, f"{clip.source}: cannot be read ({type(e).__name__}: {e})"


def prepare_latents(s: PrepareSettings, log=print) -> PrepareReport:
    """Run ``sla prepare`` with settings ``s``; returns the report (also written to ``<out>/prepare_report.json``)."""
    from tqdm.auto import tqdm

    from ..integrations.wan_pipeline import latent_stats, load_encoding_pipeline, resolve_device

    t_start = time.time()
    _check_settings(s)
    clips, ignored, unused = find_clips(s.videos, s.captions)
    report = PrepareReport(out=str(s.out), ignored=ignored, unused_captions=unused)
    device = resolve_device(s.device)
    # UMT5 runs in bfloat16 on GPUs (the dtype Wan ships it in and WanPipeline uses); float32 on CPU.
    pipe = load_encoding_pipeline(s.pipeline, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    # The 16 checked above is Wan2.1's factor; the Wan2.2 TI2V-5B VAE compresses 16x in space, so ask the VAE.
    multiple = int(pipe.vae_scale_factor_spatial) * 2
    for name in ("height", "width"):
        if getattr(s, name) % multiple:
            raise ValueError(f"--{name} must be a multiple of {multiple} for this pipeline (its VAE's factor "
                             f"{pipe.vae_scale_factor_spatial} times the transformer's 2x2 patches), got "
                             f"{getattr(s, name)}")
    if (s.frames - 1) % int(pipe.vae_scale_factor_temporal):
        raise ValueError(f"--frames must be {pipe.vae_scale_factor_temporal}k+1 for this pipeline's VAE, "
                         f"got {s.frames}")
    record = _settings_record(s, pipe, pipe.text_encoder.config.d_model)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    _clean_temp_files(out)
    done = _existing_state(out, record)

    todo = []
    for c in clips:
        if c.caption is None:
            report.skipped.append({"clip": c.source.name, "reason": c.missing_caption})
        elif done.get(c.name) == c.caption:
            report.already_done.append(c.name)
        else:
            todo.append(c)
    mean, std = latent_stats(pipe.vae, device=device)

    def skip(clip, reason):
        report.skipped.append({"clip": clip.source.name, "reason": reason})
        (bar.write if bar is not None else log)(f"skipped {clip.source.name}: {reason}")

    bar = tqdm(total=len(todo), desc="encoding", unit="clip", dynamic_ncols=True) if s.progress else None
    batches = [todo[i:i + s.batch_size] for i in range(0, len(todo), s.batch_size)]
    # Decoding runs in threads (PyAV and Pillow release the GIL), one batch ahead of the encoders.
    pool = ThreadPoolExecutor(max_workers=max(1, s.workers)) if s.workers > 0 else None

    def submit(batch):
        if pool is None:
            return [_load(c, s) for c in batch]
        return [pool.submit(_load, c, s) for c in batch]

    def collect(pending):
        return [p.result() if pool is not None else p for p in pending]

    try:
        pending = submit(batches[0]) if batches else None
        for bi, batch in enumerate(batches):
            loaded = collect(pending)
            if bi + 1 < len(batches):
                pending = submit(batches[bi + 1])
            good = []
            for clip, (video, err) in zip(batch, loaded):
                if err is not None:
                    skip(clip, err)
                else:
                    good.append((clip, video))
            if good:
                with torch.no_grad():
                    x = torch.stack([v for _, v in good]).to(device)
                    z = (pipe.vae.encode(x).latent_dist.mode().float() - mean) / std
                    emb = pipe.encode_prompt([c.caption for c, _ in good], do_classifier_free_guidance=False,
                                             max_sequence_length=s.text_len, device=device)[0].float()
                for i, (clip, _) in enumerate(good):
                    info = dict(record, source=clip.source.name)
                    write_latents_example(out / f"{clip.name}.safetensors", z[i].cpu(), emb[i].cpu(), clip.caption,
                                          prepare_info=info)
                    report.encoded.append(clip.name)
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(skipped=len(report.skipped))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
        report.seconds = time.time() - t_start
        _write_report(out, report)
    return report


def _write_report(out: Path, report: PrepareReport) -> None:
    atomic_write_text(out / REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")


def summarize(report: PrepareReport) -> str:
    lines = [f"{len(report.encoded)} clips encoded, {len(report.already_done)} already done, "
             f"{len(report.skipped)} skipped -> {report.out} ({report.seconds:.1f} s)"]
    for item in report.skipped:
        lines.append(f"  skipped {item['clip']}: {item['reason']}")
    for item in report.ignored:
        lines.append(f"  ignored {item['entry']}: {item['reason']}")
    if report.unused_captions:
        shown = ", ".join(report.unused_captions[:5]) + (" ..." if len(report.unused_captions) > 5 else "")
        lines.append(f"  {len(report.unused_captions)} caption entries match no clip: {shown}")
    lines.append(f"  details: {Path(report.out) / REPORT_NAME}")
    return "\n".join(lines)


def export_synthetic(out: str | os.PathLike, count: int, split: str = "train", frames: int = 16, height: int = 64,
                     width: int = 64, text_dim: int = 64, progress: bool = True) -> int:
    """Write ``count`` clips of the built-in synthetic set in the latents format (pixel space: no VAE)."""
    from tqdm.auto import tqdm

    from .synthetic import SyntheticVideoConfig, SyntheticVideoDataset

    ds = SyntheticVideoDataset(split, size=count, config=SyntheticVideoConfig(
        frames=frames, height=height, width=width, text_dim=text_dim))
    os.makedirs(out, exist_ok=True)
    for i in tqdm(range(count), desc="writing", disable=not progress):
        item = ds[i]
        write_latents_example(Path(out) / f"{split}-{i:07d}.safetensors", item["video"], item["text_embeds"],
                              item["caption"])
    return count


__all__ = ["PrepareReport", "PrepareSettings", "export_synthetic", "find_clips", "prepare_latents",
           "read_captions_file", "summarize", "PREPARE_KEY"]
