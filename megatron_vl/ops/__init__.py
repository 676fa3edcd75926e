"""Fused kernels behind one dispatch per op: each has a plain torch reference with the
same semantics, and a fused path taken only on CUDA when its library imports."""

from .attention import Documents, attention, attention_reference, attention_sdpa, documents_from_segments
from ._dispatch import check_required, implementations
from .cross_entropy import fused_cross_entropy
from .norm import rms_norm, rms_norm_reference
from .rope import RotaryFrequencies, apply_rope, apply_rope_reference, rope_cos_sin, rope_inv_freq
from .swiglu import swiglu, swiglu_reference

__all__ = ["check_required", "implementations", "RotaryFrequencies", "Documents", "documents_from_segments", "attention", "attention_reference", "attention_sdpa", "fused_cross_entropy", "rms_norm",
           "rms_norm_reference", "apply_rope", "apply_rope_reference", "rope_cos_sin",
           "rope_inv_freq", "swiglu", "swiglu_reference"]
