"""Bit-packing of b-bit codes (1 ≤ b ≤ 8) into bytes: every 8 codes fill exactly b bytes.

Codes are little-endian within each 8-code word: code i occupies bits [b·i, b·i + b) of the word,
and the word's bytes are stored low byte first.
"""

from __future__ import annotations

import torch

from weightwise.errors import WeightwiseError


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes that ``n_codes`` codes of ``bits`` bits occupy (whole 8-code words; 8-bit codes unpadded)."""
    return n_codes if bits == 8 else -(-n_codes // 8) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a tensor of integer codes in [0, 2^bits) into a flat uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise WeightwiseError(f"codes out of range for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    pad = (-flat.numel()) % 8
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        lanes = torch.nn.functional.pad(flat.to(torch.uint8), (0, pad)).view(-1, per_byte)
        packed = lanes[:, 0].clone()
        for lane in range(1, per_byte):
            packed |= lanes[:, lane] << (bits * lane)
        return packed
    words = torch.nn.functional.pad(flat.to(torch.int64), (0, pad)).view(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=words.device) * bits
    word = (words << shifts).sum(dim=1)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=word.device) * 8
    return ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n_codes`` codes, as uint8 (int64 work on the fly)."""
    _check_bits(bits)
    if packed.numel() != packed_nbytes(n_codes, bits):
        raise WeightwiseError(f"packed buffer holds {packed.numel()} bytes, expected {packed_nbytes(n_codes, bits)}")
    if bits == 8:
        return packed[:n_codes]
    if bits in (1, 2, 4):
        mask = 2**bits - 1
        lanes = [(packed >> (bits * lane)) & mask for lane in range(8 // bits)]
        return torch.stack(lanes, dim=1).reshape(-1)[:n_codes]
    bytes_ = packed.view(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (bytes_ << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (word.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:n_codes].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise WeightwiseError(f"bit width {bits} is not packable: use 1 to 8 bits")
