"""The project's default fusion checkpoint, written from a ``reco reproduce`` run (issue 16).

The default recipe is the candidate with the best validation score; its fusion for the first main seed is
saved with the calibration chosen on validation (blend toward mean fusion, fallback thresholds, softmax scale per
mode, inference mode per task), the training
options, the test figures of the run and a model card, next to a JSON copy of the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.fusion.checkpoint import CheckpointMeta, save_checkpoint
from app.services.method_common import safe_name
from programs.reproduce.aggregate import choose_modes
from programs.reproduce.plan import GENERIC, ReproPlan
from programs.reproduce.runner import RunOutput, calibration_key
from programs.reproduce.workspace import GENERIC_SET, Workspace

LABELS = {"cub100": "CUB-100", "flowers12": "Flowers-12", "imagenette": "Imagenette", "cifar10": "CIFAR-10"}


def _summary(results: list[dict[str, Any]], variant: str) -> dict[str, Any]:
    """Test figures of the variant (mode `best`, mean over its seeds) and CLIP, per memory."""
    out: dict[str, Any] = {}
    for r in results:
        if r["split"] != "test" or r["k_infer"] != r["k"]:
            continue
        if r["variant"] == variant and r["mode"] in ("best", "clip") and r["metric"] in (
                "top1", "ece", "i2t_r@1", "t2i_r@1"):
            model = "reco" if r["mode"] == "best" else "clip"
            out.setdefault(r["memory"], {}).setdefault(r["dataset"], {})[f"{model}_{r['metric']}"] = round(
                r["value"], 4)
    return out


def _recommended_mode(rows: list[dict[str, Any]], variant: str, seed: int, k: int) -> dict[str, str]:
    """The mode chosen on validation (generic+domain memory) for zero-shot and for retrieval."""
    chosen = choose_modes([r for r in rows if r["variant"] == variant and r["seed"] == seed])
    return chosen.get((variant, "generic+domain", k, k, seed), {})


def export_default_checkpoint(folder: Path, ws: Workspace, output: RunOutput, plan: ReproPlan, json_path: Path, *,
                              command: str) -> Path:
    variant = plan.variant(output.default_variant)
    seed = sorted(plan.seeds)[0]
    key = (variant.train_key(), seed)
    model = output.models[key]
    training = next(t for t in output.training if t["variant"] == variant.train_key() and t["seed"] == seed)
    calibration = dict(output.calibration[calibration_key(variant.name, seed, variant.k)])
    calibration.pop("fallback_candidates", None)
    calibration.pop("mean_mix_candidates", None)
    if not calibration.get("mean_mix"):
        calibration.pop("mean_mix", None)
    calibration["recommended_mode"] = _recommended_mode(output.rows, variant.name, seed, variant.k)
    calibration["validation"] = ("held-out 1-in-5 of the CUB-100, Flowers-12 and Imagenette train images and half "
                                 "of Flickr8k val, with the generic, generic+domain and mismatched memories")
    results = json.loads(Path(json_path).read_text(encoding="utf-8"))["results"]
    metrics = {**training, "pairs": training["pairs"], "recipe": variant.name,
               "selection": output.selection, "test": _summary(results, variant.name),
               "reproduction_command": command}
    options = {**output.train_options[key], "variant": variant.model_dump(mode="json"), "seed": seed}
    meta = CheckpointMeta(config=model.cfg.to_dict(), dim=model.dim, encoder_id=ws.encoder_id,
                          memory_version=ws.memories[GENERIC].index.version, metrics=metrics, options=options,
                          calibration=calibration)
    stem = f"{safe_name(ws.encoder_id.split('/')[0])}-fusion-{GENERIC_SET}-default"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.safetensors"
    sha = save_checkpoint(path, model, meta)
    (folder / f"{stem}.json").write_text(json.dumps({"checkpoint": path.name, "sha256": sha,
                                                     "size_bytes": path.stat().st_size,
                                                     **json.loads(meta.to_json())}, indent=1) + "\n",
                                         encoding="utf-8")
    (folder / f"{stem}.md").write_text(_model_card(path, sha, meta, variant.description, training), encoding="utf-8")
    return path


def _model_card(path: Path, sha: str, meta: CheckpointMeta, description: str, training: dict[str, Any]) -> str:
    cal = meta.calibration
    fallback = cal.get("fallback")
    scales = cal.get("softmax_scale", {})
    lines = [f"# `{path.name}` — the default RECO fusion for `{meta.encoder_id}`", "",
             f"sha256 `{sha}`, {path.stat().st_size / 1e6:.1f} MB. Picked by `reco demo`, `reco predict`, `reco eval`, "
             "search and the UI for this encoder unless a checkpoint is named (`--checkpoint`, "
             "`RECO_FUSION_CHECKPOINT`) or one trained on at least 5,000 pairs is registered later.", "",
             "## Recipe", "",
             f"`{meta.metrics['recipe']}`: {description}. Chosen as the default because it has the best validation "
             "score among the trained candidates of the run (table below); never chosen on test.", "",
             "| candidate | validation score |", "|---|---|",
             *[f"| `{s['variant']}` | {100 * s['validation_score']:.2f} |" for s in meta.metrics["selection"]], "",
             f"Fusion config: `{json.dumps(meta.config)}`; k = {meta.options.get('k')}; retrieval "
             f"`{json.dumps(meta.options.get('retrieval'))}`; {training['steps']} steps, {training['pairs']} training "
             f"pairs; loss {training['initial_loss']:.3f} → {training['final_loss']:.3f}; {training['seconds']:.0f} s.",
             "",
             "## Calibration (chosen on validation, stored in the checkpoint)", "",
             "- Fallback to CLIP when the best neighbour's search score is below: "
             + (", ".join(f"{m} queries {t:.4f}" for m, t in fallback.items()) if fallback else "never (none helped on "
                                                                                                  "validation)"),
             "- Blend toward mean fusion (weight of mean fusion per task and query modality): "
             + (json.dumps(cal["mean_mix"]) if cal.get("mean_mix") else "none (the fusion alone)"),
             "- Softmax logit scale per mode (replaces CLIP's fixed 100): "
             + ", ".join(f"{m} {s:g}" for m, s in scales.items()),
             f"- Mode chosen on validation: {json.dumps(cal.get('recommended_mode', {}))}", "",
             "## Data and licence", "",
             "Trained on the pairs of Flickr8k train (Hodosh, Young & Hockenmaier, JAIR 2013; the split of "
             "`../shared/data/flickr8k`), with those pairs as the memory, less near-duplicates of every evaluation "
             "image; the encoder `reco-base` is frozen and was trained on the same split. Terms: Flickr8k is for "
             "research use only and its images belong to their Flickr owners; these weights are derived from them: "
             "use them for research.", "",
             "## Test figures of the run (mode `best`, %, k' = k)", "",
             f"Command: `{meta.metrics['reproduction_command']}`; full tables in `docs/reproduction.md`.", "",
             "| memory | set | CLIP top-1 / R@1 | RECO | CLIP ECE | RECO ECE |", "|---|---|---|---|---|---|"]
    for memory, sets in meta.metrics["test"].items():
        for ds, v in sets.items():
            if "clip_top1" in v:
                lines.append(f"| {memory} | {LABELS.get(ds, ds)} | {100 * v['clip_top1']:.1f} | "
                             f"{100 * v.get('reco_top1', float('nan')):.1f} | "
                             f"{100 * v.get('clip_ece', float('nan')):.1f}"
                             f" | {100 * v.get('reco_ece', float('nan')):.1f} |")
            for metric in ("i2t_r@1", "t2i_r@1"):
                if f"clip_{metric}" in v:
                    lines.append(f"| {memory} | {ds} {metric} | {100 * v[f'clip_{metric}']:.1f} | "
                                 f"{100 * v.get(f'reco_{metric}', float('nan')):.1f} | – | – |")
    return "\n".join(lines) + "\n"
