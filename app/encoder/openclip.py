"""open_clip backend of :class:`~app.encoder.base.Encoder`.

Weights come from (in this order of interpretation of ``pretrained``):
- empty string: random initialisation from a seed — loudly flagged, embeddings carry no meaning;
- a path to a local checkpoint (safetensors, or a torch file loaded with ``weights_only=True``);
- a tag registered by this project (:mod:`app.encoder.pretrained`), resolved to a local file;
- an open_clip pretrained tag (e.g. ``laion2b_s34b_b79k``), downloaded by open_clip unless
  ``HF_HUB_OFFLINE=1``; the file is then hashed and loaded weights-only like a local one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from PIL import Image

from app.encoder.base import l2_normalise
from app.encoder.quiet import quiet_model_creation
from app.encoder.registry import ensure_model_configs_registered
from app.encoder.runtime import (
    Runtime,
    apply_runtime,
    autocast_for,
    image_batch_layout,
    resolve_runtime,
    visual_family,
)
from app.encoder.text_trim import encode_text_trimmed, trimmable_text_tower
from app.encoder.weights import (
    OmittedWeightsError,
    file_sha256,
    load_state_dict_file,
    omitted_prefix_verified,
    resolve_registered_tag,
)
from app.encoder_identity import EncoderId

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: encoder {model!r} has no pretrained weights (RECO_CLIP_PRETRAINED is empty); "
    "its embeddings are meaningless and any accuracy it shows is not CLIP's."
)


class EncoderLoadError(RuntimeError):
    pass


def collection_name_for(encoder_id: str) -> str:
    """A Qdrant-safe collection name for an embedding version."""
    return "reco__" + re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder_id)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EncoderLoadError("RECO_DEVICE=cuda but no CUDA device is visible: set RECO_DEVICE=cpu (or auto)")
    return torch.device(device)


class OpenClipEncoder:
    """Lazy: nothing is loaded until the first call that needs the model (thread-safe)."""

    def __init__(
        self,
        model_name: str,
        pretrained: str = "",
        *,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 64,
        seed: int = 0,
        channels_last: str = "auto",
        compile_model: bool = False,
        threads: int = 0,
    ) -> None:
        ensure_model_configs_registered()
        import open_clip

        if model_name not in open_clip.list_models():
            raise EncoderLoadError(
                f"unknown model {model_name!r}; known reco-* models: "
                f"{[m for m in open_clip.list_models() if m.startswith('reco-')]} (+ all open_clip models): "
                "fix RECO_CLIP_MODEL"
            )
        self.model_name = model_name
        self.pretrained = pretrained.strip()
        self.device = _resolve_device(device)
        self.precision = precision  # as asked; :attr:`runtime` is what runs (auto resolved per family)
        self.channels_last = channels_last
        self.compile_model = compile_model
        self.threads = threads
        self._runtime: Runtime | None = None
        self.batch_size = batch_size
        self.seed = seed
        self._lock = threading.Lock()
        self._model: Any = None
        self._preprocess: Any = None
        self._tokenizer: Any = None
        self._weights_file: Path | None = None
        self._weights_sha: str | None = None
        self._tag: str | None = None
        self._classify_pretrained()

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenClipEncoder:
        return cls(
            settings.clip_model,
            settings.clip_pretrained,
            device=settings.device,
            precision=settings.precision,
            batch_size=settings.encode_batch_size,
            seed=settings.random_init_seed,
            channels_last=settings.channels_last,
            compile_model=settings.compile,
            threads=settings.torch_threads,
        )

    # --- identity ---------------------------------------------------------------------------
    def _classify_pretrained(self) -> None:
        p = self.pretrained
        if not p:
            return
        path = Path(p).expanduser()
        if path.is_file():
            self._weights_file = path.resolve()
            return
        if any(p.endswith(ext) for ext in (".safetensors", ".pt", ".pth", ".bin")) or "/" in p:
            raise EncoderLoadError(
                f"checkpoint file not found: {p}: fix RECO_CLIP_PRETRAINED (a file, a tag, or empty)")
        registered = resolve_registered_tag(self.model_name, p)
        if registered is not None:
            self._weights_file, self._weights_sha = registered
            self._tag = p
            return
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(self.model_name)
        if p not in tags:
            raise EncoderLoadError(f"unknown pretrained tag {p!r} for {self.model_name}; known: {tags}")
        self._tag = p

    @property
    def is_random(self) -> bool:
        return not self.pretrained

    @property
    def encoder_id(self) -> str:
        if self.is_random:
            return EncoderId(self.model_name, "", self.seed).format()
        if self._weights_file is None:  # open_clip tag: the file is known only after download
            self._ensure_loaded()
        assert self._weights_file is not None
        if self._weights_sha is None:
            self._weights_sha = file_sha256(self._weights_file)
        label = self._tag or "file"
        return f"{self.model_name}/{label}/{self._weights_sha[:12]}"

    @property
    def collection_name(self) -> str:
        return collection_name_for(self.encoder_id)

    @property
    def dim(self) -> int:
        import open_clip

        cfg = open_clip.get_model_config(self.model_name)
        return int(cfg["embed_dim"])

    # --- loading ----------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._model is not None:
            return
        with self._lock:
            if self._model is None:
                self._load()

    def _load(self) -> None:
        import open_clip

        if self._tag is not None and self._weights_file is None:
            model, preprocess = self._load_open_clip_tag()
        else:
            # Seeded so that random-init encoders are identical in every process (CLI, workers, UI).
            with torch.random.fork_rng(devices=[]), quiet_model_creation():
                torch.manual_seed(self.seed)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    self.model_name, pretrained=None, device="cpu"
                )
            if self._weights_file is not None:
                self._load_local_weights(model, self._weights_file)
            else:
                log.warning(RANDOM_WEIGHTS_WARNING.format(model=self.model_name))
        model.eval().requires_grad_(False)
        model = model.to(self.device)
        try:
            runtime = resolve_runtime(self.device, visual_family(model.visual), precision=self.precision,
                                      channels_last=self.channels_last, compile_model=self.compile_model,
                                      threads=self.threads)
        except ValueError as exc:
            raise EncoderLoadError(str(exc)) from exc
        apply_runtime(model, runtime)
        self._runtime = runtime
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(self.model_name)
        # last: `_model` is what _ensure_loaded checks without the lock, so everything else is set before it
        # (a request racing the warm-up thread once found the model but not yet the tokenizer)
        self._model = model

    def _load_open_clip_tag(self) -> tuple[Any, Any]:
        """open_clip loads its tags weights-only and applies the tag's mean/std/resize."""
        import open_clip

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.model_name, pretrained=self._tag, device="cpu", weights_only=True
            )
            cfg = open_clip.get_pretrained_cfg(self.model_name, self._tag)
            self._weights_file = Path(open_clip.download_pretrained(cfg))  # cached: no second download
        except Exception as exc:  # offline, no cache, hub down
            raise EncoderLoadError(
                f"could not load weights {self.model_name}/{self._tag}: {exc}. Offline machines need "
                "a local checkpoint file in RECO_CLIP_PRETRAINED (HF_HUB_OFFLINE=1 uses the cache only)."
            ) from exc
        return model, preprocess

    def _load_local_weights(self, model: torch.nn.Module, path: Path) -> None:
        try:  # a frozen tower the file leaves out came from its package at model creation: check it is the same
            omitted = omitted_prefix_verified(path)
        except OmittedWeightsError as exc:
            raise EncoderLoadError(str(exc)) from exc
        state = load_state_dict_file(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # position_ids and similar buffers differ between open_clip versions; weights must not.
        real_missing = [
            k for k in missing if not k.endswith("position_ids") and not (omitted and k.startswith(omitted))
        ]
        if real_missing or unexpected:
            raise EncoderLoadError(
                f"checkpoint {path} does not fit {self.model_name}: "
                f"missing {real_missing[:5]}, unexpected {unexpected[:5]}"
            )

    @property
    def runtime(self) -> Runtime:
        """Precision, memory format, compilation and threads actually in use (loads the model)."""
        self._ensure_loaded()
        assert self._runtime is not None
        return self._runtime

    @property
    def image_tower(self) -> torch.nn.Module:
        """The loaded image tower, as :attr:`runtime` changed it."""
        self._ensure_loaded()
        return cast(torch.nn.Module, self._model.visual)

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        with autocast_for(self.device, self.runtime):
            yield

    # --- encoding ---------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        self._ensure_loaded()
        return cast(torch.Tensor, self._preprocess(image))

    def preprocess_uint8(self, image: Image.Image) -> np.ndarray | None:
        """First stage of :meth:`preprocess`: the transform's PIL steps (resize, crop, RGB) as (H, W, 3) uint8.

        No torch op runs here, so decode threads never start an OpenMP team beside the encoder's (on 2 busy
        cores the full transform took 17 ms per image that way instead of 2.3 ms single-threaded). Finish a
        batch with :meth:`pixels_from_uint8`; together they equal :meth:`preprocess` bit for bit. None when
        the transform does not end in ToTensor + Normalize (then use :meth:`preprocess`).
        """
        stages = self._split_stages()
        if stages is None:
            return None
        out = stages[0](image)
        return np.asarray(out if out.mode == "RGB" else out.convert("RGB"))

    def pixels_from_uint8(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Second stage: ToTensor + Normalize on the encoder's device, for a (B, H, W, 3) uint8 array or a
        (B, 3, H, W) uint8 tensor already on any device (images decoded on the GPU: :mod:`app.encoder.jpeg`).

        On CUDA the batch crosses PCIe as uint8 (a quarter of float32's bytes) and is normalised there.
        """
        stages = self._split_stages()
        if stages is None:
            raise EncoderLoadError(f"{self.model_name}: preprocessing cannot be split")
        mean, std = stages[1].to(self.device), stages[2].to(self.device)
        if isinstance(batch, torch.Tensor):
            x = batch.to(self.device, non_blocking=True).contiguous().float().div_(255)
        else:
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            x = x.permute(0, 3, 1, 2).contiguous().float().div_(255)  # ToTensor's order of operations
        return x.sub_(mean[:, None, None]).div_(std[:, None, None])

    def _split_stages(self) -> tuple[Any, torch.Tensor, torch.Tensor] | None:
        self._ensure_loaded()
        if not hasattr(self, "_stages"):
            from torchvision import transforms

            steps = list(getattr(self._preprocess, "transforms", []))
            to_tensor = next((i for i, t in enumerate(steps) if isinstance(t, transforms.ToTensor)), None)
            split = None
            if to_tensor is not None and len(steps) == to_tensor + 2 and isinstance(steps[-1], transforms.Normalize):
                norm = steps[-1]
                split = (transforms.Compose(steps[:to_tensor]), torch.as_tensor(norm.mean, dtype=torch.float32),
                         torch.as_tensor(norm.std, dtype=torch.float32))
            self._stages: tuple[Any, torch.Tensor, torch.Tensor] | None = split
        return self._stages

    @property
    def image_size(self) -> int:
        import open_clip

        size = open_clip.get_model_config(self.model_name)["vision_cfg"]["image_size"]
        return int(size[0] if isinstance(size, list | tuple) else size)

    def encode_images(self, images: Sequence[Image.Image] | torch.Tensor) -> np.ndarray:
        self._ensure_loaded()
        if isinstance(images, torch.Tensor):
            batch = images
        else:
            if len(images) == 0:
                return np.zeros((0, self.dim), np.float32)
            batch = torch.stack([self._preprocess(im) for im in images])
        outs = []
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(batch), self.batch_size):
                chunk = batch[start : start + self.batch_size].to(self.device, non_blocking=True)
                outs.append(l2_normalise(self._encode_image_chunk(chunk)))
        return np.concatenate(outs) if outs else np.zeros((0, self.dim), np.float32)

    def _encode_image_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        """A compiled tower sees one batch shape only: a short batch is padded (a new shape would recompile)."""
        rows = len(chunk)
        if self.runtime.compile and rows < self.batch_size:
            chunk = torch.cat([chunk, chunk.new_zeros((self.batch_size - rows, *chunk.shape[1:]))])
        return cast(torch.Tensor, self._model.encode_image(image_batch_layout(chunk, self.runtime))[:rows])

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self._ensure_loaded()
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        outs = []
        if trimmable_text_tower(self._model):  # prompts of like length batched together, each batch cut short
            tokens = self._tokenizer(list(texts))
            order = torch.argsort(tokens.argmax(dim=-1), stable=True)
            with torch.inference_mode(), self._autocast():
                for start in range(0, len(texts), self.batch_size):
                    chunk = tokens[order[start : start + self.batch_size]].to(self.device)
                    outs.append(l2_normalise(encode_text_trimmed(self._model, chunk)))
            out = np.concatenate(outs)
            restored = np.empty_like(out)
            restored[order.numpy()] = out
            return restored
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(texts), self.batch_size):
                tokens = self._tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
                outs.append(l2_normalise(self._model.encode_text(tokens)))
        return np.concatenate(outs)

    def describe(self) -> dict[str, Any]:
        return {
            "encoder_id": self.encoder_id,
            "model": self.model_name,
            "pretrained": self.pretrained or None,
            "random_weights": self.is_random,
            "device": str(self.device),
            "precision": self.precision,
            "runtime": self.runtime.label if self._runtime is not None else None,
            "dim": self.dim,
        }
