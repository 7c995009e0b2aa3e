"""The SAE architectures in one import (each lives in its own module; this keeps older imports working)."""

from __future__ import annotations

from .base import (
    SAE,
    SAE_CLASSES,
    PartialEncoder,
    SAEOutput,
    StepOutput,
    UnitDecoderMixin,
    architectures,
    build_sae,
    register_sae_class,
    sae_class,
)
from .batchtopk import BatchTopKSAE
from .config import SAEConfig, SAEError
from .jumprelu import JumpReLUSAE
from .kernels import RaggedDecode, RaggedEncode, SparseDecode, SparseEncode
from .matryoshka import MatryoshkaSAE
from .relu_l1 import ReluL1SAE
from .topk import TopKSAE
from .train import geometric_median

ARCHITECTURES = architectures()

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "SAE_CLASSES",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "PartialEncoder",
    "RaggedDecode",
    "RaggedEncode",
    "ReluL1SAE",
    "SAEConfig",
    "SAEError",
    "SAEOutput",
    "SparseDecode",
    "SparseEncode",
    "StepOutput",
    "TopKSAE",
    "UnitDecoderMixin",
    "build_sae",
    "geometric_median",
    "register_sae_class",
    "sae_class",
]
