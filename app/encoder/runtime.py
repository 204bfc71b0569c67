"""How the image tower runs: precision, memory format, compilation, threads — explicit or per model family.

``RECO_PRECISION`` and ``RECO_CHANNELS_LAST`` are ``auto`` by default; :func:`resolve_runtime` turns them
into one :class:`Runtime` from the device and the image tower's family, as ``reco bench precision``
measured on this project's 2-core AVX2 machines (docs/performance.md, "Faster CPU inference"):

- CUDA: fp16 autocast for both towers (uint8 batches normalised on the device).
- CPU, convolutional image tower (``conv``: timm ResNets such as the base encoder reco-base, open_clip's
  ModifiedResNet): channels-last, fp32 — oneDNN's fast layout for convolutions, same embeddings.
- CPU, transformer image tower (``vit``): fp32. Dynamic int8 of every Linear (:func:`quantize_visual_int8`,
  ``RECO_PRECISION=int8``) saves CPU time but keeps the quality goals only on random weights; on trained
  transformer weights (the base encoder's pretrained MiniLM tower, the one trained transformer here) it
  moved embeddings far past them, so it is opt-in. ``torch.compile`` of a ViT is not in the committed run
  (compiling costs minutes here; its time goes to GEMMs that are library calls already).
- bf16 is never chosen on CPU by ``auto``: without AVX-512 BF16 / AMX it is emulated (7–27 × slower here).
- ``RECO_COMPILE`` (off by default) compiles the image tower: 1.6 × less CPU per image for reco-base once
  compiled, but the compilation costs minutes on 2 cores (the on-disk Inductor cache shortens later
  starts), so it pays on long ingestions and re-embeddings, not on short commands.

:func:`apply_runtime` changes a loaded model in place; :func:`autocast_for` gives the autocast context.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

log = logging.getLogger(__name__)

PrecisionName = Literal["fp32", "fp16", "bf16", "int8"]
Family = Literal["vit", "conv", "other"]
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                         "amx_bf16", "amx_int8", "amx_tile")


@dataclass(frozen=True)
class Runtime:
    """How to run the encoder: ``precision`` int8 = dynamic int8 Linear layers in the image tower only."""

    precision: PrecisionName = "fp32"
    channels_last: bool = False
    compile: bool = False
    threads: int = 0  # 0: torch's default

    @property
    def label(self) -> str:
        parts = [self.precision] + (["channels-last"] if self.channels_last else []) + (
            ["compile"] if self.compile else [])
        return "+".join(parts)


def visual_family(visual: nn.Module) -> Family:
    """``vit`` for open_clip's VisionTransformer (or a timm ViT), ``conv`` for ResNets, else ``other``."""
    name = type(visual).__name__
    inner = getattr(visual, "trunk", None)  # open_clip's TimmModel wraps the timm network
    inner_name = type(inner).__name__ if inner is not None else ""
    if "VisionTransformer" in name or "VisionTransformer" in inner_name:
        return "vit"
    if any(k in n for n in (name, inner_name) for k in ("ResNet", "ConvNeXt", "RegNet", "EfficientNet")):
        return "conv"
    return "other"


def default_runtime(device: torch.device, family: Family) -> Runtime:
    """The measured choice per device and family (see the module docstring)."""
    if device.type == "cuda":
        return Runtime(precision="fp16")
    # ViTs stay fp32: int8 passes on random weights but fails the quality goals on trained transformer weights.
    if family == "conv":
        return Runtime(channels_last=True)
    return Runtime()


def resolve_runtime(
    device: torch.device, family: Family, *, precision: str = "auto", channels_last: str = "auto",
    compile_model: bool = False, threads: int = 0,
) -> Runtime:
    """Explicit settings win; ``auto`` takes :func:`default_runtime`. fp16 on CPU and int8 on CUDA are refused."""
    base = default_runtime(device, family)
    chosen = base.precision if precision == "auto" else precision
    if chosen == "fp16" and device.type != "cuda":
        raise ValueError("RECO_PRECISION=fp16 needs CUDA; on CPU use fp32, int8 or bf16")
    if chosen == "int8" and device.type != "cpu":
        raise ValueError("RECO_PRECISION=int8 (dynamic quantization) runs on CPU only")
    layout = base.channels_last if channels_last == "auto" else channels_last == "on"
    return Runtime(precision=chosen, channels_last=layout, compile=compile_model, threads=threads)  # type: ignore[arg-type]


class LinearSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, batch first) with its projections as ``nn.Linear``.

    ``torch.ao.quantization.quantize_dynamic`` only replaces ``nn.Linear`` modules; the packed
    ``in_proj_weight`` of ``nn.MultiheadAttention`` (a third of a ViT block's multiply-adds, with out_proj)
    would stay fp32. Same arithmetic as the original in fp32 (tested).
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha.batch_first or not mha._qkv_same_embed_dim:
            raise ValueError("only batch-first self-attention with one embedding size is supported")
        dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=mha.in_proj_bias is not None)
        self.qkv.weight = nn.Parameter(mha.in_proj_weight.detach().clone(), requires_grad=False)
        if mha.in_proj_bias is not None:
            self.qkv.bias = nn.Parameter(mha.in_proj_bias.detach().clone(), requires_grad=False)
        self.out_proj = nn.Linear(dim, dim, bias=mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("LinearSelfAttention is self-attention only")
        batch, length, dim = query.shape
        qkv = self.qkv(query).view(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim)), None


def _unpack_attention(visual: nn.Module) -> int:
    """Every self-attention ``nn.MultiheadAttention`` of ``visual`` → :class:`LinearSelfAttention`."""
    swapped = 0
    for module in list(visual.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention) and child.batch_first and child._qkv_same_embed_dim \
                    and not hasattr(module, "ln_1_kv") and type(module).__name__ != "AttentionalPooler":
                setattr(module, child_name, LinearSelfAttention(child))
                swapped += 1
    return swapped


def quantize_visual_int8(visual: nn.Module) -> nn.Module:
    """Dynamic int8 (per-tensor activations, per-tensor weights, fbgemm/x86) for every Linear of the tower."""
    swapped = _unpack_attention(visual)
    quantized = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
        visual, {nn.Linear}, dtype=torch.qint8)
    log.info("image tower: int8 dynamic quantization (%d attention blocks unpacked)", swapped)
    return cast(nn.Module, quantized)


def apply_runtime(model: Any, runtime: Runtime) -> None:
    """Change a loaded open_clip model (eval mode, on its device) as ``runtime`` says; the text tower is untouched."""
    if runtime.threads > 0:
        torch.set_num_threads(runtime.threads)
    if runtime.precision == "int8":
        import warnings

        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices (torchao is its successor)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            model.visual = quantize_visual_int8(model.visual)
    if runtime.channels_last:
        model.visual = model.visual.to(memory_format=torch.channels_last)
    if runtime.compile:
        model.visual = torch.compile(model.visual, dynamic=False)


@contextlib.contextmanager
def autocast_for(device: torch.device, runtime: Runtime) -> Iterator[None]:
    """fp16/bf16 autocast; fp32 and int8 run without (int8 layers take and give fp32)."""
    if runtime.precision not in ("fp16", "bf16"):
        yield
        return
    dtype = torch.float16 if runtime.precision == "fp16" else torch.bfloat16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def image_batch_layout(x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if runtime.channels_last and x.dim() == 4 else x


def cpu_flags() -> dict[str, bool | str | int]:
    """The instruction-set flags that decide which precisions run natively (from /proc/cpuinfo)."""
    info = Path("/proc/cpuinfo")
    words: set[str] = set()
    if info.is_file():
        for line in info.read_text(errors="ignore").splitlines():
            if line.startswith("flags"):
                words = set(line.split(":", 1)[1].split())
                break
    flags: dict[str, bool | str | int] = {flag: flag in words for flag in CPU_FLAGS_OF_INTEREST}
    return flags | {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count() or 0}
