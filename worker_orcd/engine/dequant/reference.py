"""Pure-torch dequantization: the CPU dev-mode path and the oracle for the kernels.

Vectorised over blocks, computed in float32 in the same operation order as
ggml / gguf-py (e.g. ``(d * sc) * q - dmin * m``) so results are bit-identical
to them, then rounded once to the requested dtype. Runs on any device.
Arguments are validated like ``dequantize``'s (``validate``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...gguf.constants import BLOCK_LAYOUT, GGMLType
from .validate import check_args, check_type

Tensor = torch.Tensor


def _f16(fields: Tensor) -> Tensor:
    """[n, 2] little-endian bytes -> [n, 1] float32 (exact widening)."""
    return fields.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """[n, k] packed bytes -> [n, 2k] values: low nibbles first, then high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits(packed: Tensor, shifts: Tensor, mask: int) -> Tensor:
    """Extract ``(packed >> shift) & mask`` for every shift; shifts become dim -2."""
    return (packed.int().unsqueeze(-2) >> shifts.view(-1, 1)) & mask


def _q5_high_bits(qh: Tensor) -> Tensor:
    """[n, 4] bytes of a little-endian u32 -> [n, 32] bits, bit j for element j."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.int32)
    return ((qh.int().unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _q8_0(b: Tensor) -> Tensor:
    d = _f16(b[:, 0:2])
    return b[:, 2:34].view(torch.int8).float() * d


def _q4_0(b: Tensor) -> Tensor:
    d = _f16(b[:, 0:2])
    return d * (_nibbles(b[:, 2:18]).float() - 8.0)


def _q4_1(b: Tensor) -> Tensor:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:20]).float() + m


def _q5_0(b: Tensor) -> Tensor:
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 6:22]).int() | (_q5_high_bits(b[:, 2:6]) << 4)
    return d * (q - 16).float()


def _q5_1(b: Tensor) -> Tensor:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:24]).int() | (_q5_high_bits(b[:, 4:8]) << 4)
    return d * q.float() + m


def _k_scales_mins(packed: Tensor) -> tuple[Tensor, Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml get_scale_min_k4)."""
    p = packed.int().reshape(-1, 3, 4)
    sc_lo, mn_lo, both = p[:, 0], p[:, 1], p[:, 2]
    sc = torch.cat((sc_lo & 63, (both & 0x0F) | ((sc_lo >> 2) & 0x30)), dim=-1)
    mn = torch.cat((mn_lo & 63, (both >> 4) | ((mn_lo >> 2) & 0x30)), dim=-1)
    return sc.float(), mn.float()


def _k_low_nibbles(qs: Tensor) -> Tensor:
    """[n, 128] bytes -> [n, 8, 32]: sub-block 2i = low nibbles of qs[32i:32i+32], 2i+1 = high."""
    q = qs.reshape(-1, 4, 1, 32)
    return torch.cat((q & 0x0F, q >> 4), dim=2).reshape(-1, 8, 32).int()


def _q4_k(b: Tensor) -> Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales_mins(b[:, 4:16])
    q = _k_low_nibbles(b[:, 16:144]).float()
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(-1, 256)


def _q5_k(b: Tensor) -> Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales_mins(b[:, 4:16])
    shifts = torch.arange(8, device=b.device, dtype=torch.int32)
    high = _bits(b[:, 16:48], shifts, 1)  # [n, 8, 32]: bit s of qh[l]
    q = (_k_low_nibbles(b[:, 48:176]) | (high << 4)).float()
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(-1, 256)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 64)
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(n, 8, 32).int()
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.int32)
    high = _bits(b[:, 128:192].reshape(n, 2, 32), shifts, 3).reshape(n, 8, 32)
    q = ((low | (high << 4)) - 32).reshape(n, 16, 16).float()
    scales = b[:, 192:208].view(torch.int8).float()
    d = _f16(b[:, 208:210])
    return ((d * scales).unsqueeze(-1) * q).reshape(n, 256)


def _q2_lane_bits(qs: Tensor) -> Tensor:
    """[n, 64] bytes -> [n, 256] 2-bit values: element 128h + 32k + l = (qs[32h + l] >> 2k) & 3."""
    shifts = torch.tensor([0, 2, 4, 6], device=qs.device, dtype=torch.int32)
    return _bits(qs.reshape(-1, 2, 32), shifts, 3).reshape(-1, 256)


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc = b[:, 0:16].int()
    q = _q2_lane_bits(b[:, 16:80]).reshape(n, 16, 16).float()
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl, ml = d * (sc & 0x0F).float(), dmin * (sc >> 4).float()
    return (dl.unsqueeze(-1) * q - ml.unsqueeze(-1)).reshape(n, 256)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    packed = b[:, 96:108].int()
    low = torch.cat((packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4), dim=-1)  # group g: scales[g%8], nibble g//8
    high = _bits(b[:, 104:108], torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.int32), 3).reshape(n, 16)
    scales = ((low | (high << 4)) - 32).float()
    h = _bits(b[:, 0:32], torch.arange(8, device=b.device, dtype=torch.int32), 1).reshape(n, 256)
    q = (_q2_lane_bits(b[:, 32:96]) - ((h ^ 1) << 2)).reshape(n, 16, 16).float()
    d = _f16(b[:, 108:110])
    return ((d * scales).unsqueeze(-1) * q).reshape(n, 256)


_BLOCK_FNS: dict[GGMLType, Callable[[Tensor], Tensor]] = {
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
}

_FLOAT_VIEWS: dict[GGMLType, torch.dtype] = {
    GGMLType.F32: torch.float32,
    GGMLType.F16: torch.float16,
    GGMLType.BF16: torch.bfloat16,
}


def dequantize_reference(
    raw: Tensor, ggml_type: GGMLType | int, n_elements: int, out_dtype: torch.dtype = torch.float16
) -> Tensor:
    """Dequantize ``raw`` (1-D uint8 block bytes) to a fresh 1-D ``out_dtype`` tensor."""
    ggml_type = check_type(ggml_type)
    n_elements = check_args(ggml_type, raw, n_elements, out_dtype, None)
    if raw.storage_offset() % 4:
        raw = raw.clone()  # f32/f16 views need an aligned start; chunk slices may not have one
    view_dtype = _FLOAT_VIEWS.get(ggml_type)
    if view_dtype is not None:
        # copy=True: never hand back an alias of the caller's staging buffer.
        return raw.view(view_dtype).to(out_dtype, copy=True)
    layout = BLOCK_LAYOUT[ggml_type]
    blocks = raw.view(n_elements // layout.block_size, layout.type_size)
    return _BLOCK_FNS[ggml_type](blocks).reshape(n_elements).to(out_dtype)
