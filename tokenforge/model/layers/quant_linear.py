"""int8 linear layers for the CPU, where decoding a few sequences is bound by how many bytes of
weights a step reads from memory: the weights are stored as int8 codes with one scale per output
channel (a quarter of fp32's bytes) and multiplied by torch._int_mm (int8 x int8 -> int32, MKL's
integer GEMM) without ever being dequantized.

The activations are quantized per token on the fly, symmetrically:
- int8 (activation_digits 2): q = round(x / scale) as a 16-bit integer (scale = amax / 32767), so
  the result is that of int8 weights alone (weight-only quality). The C kernels multiply q as int16
  (vpmaddwd); for _int_mm, which takes int8 only, q is split into two bytes, q = 256 hi + lo + 128,
  multiplied in one _int_mm of twice the rows, and recombined exactly with the weights' row sums.
- w8a8 (activation_digits 1): one int8 (scale = amax / 127): half the integer work, at some cost
  in quality.

Native kernels (layers/native/int8_linear.c, AVX2, and int8_tiles512.c, AVX-512 VNNI, compiled on
first use) compute the same bits in one or three calls instead of ~16 small torch ops: one row
(single-stream decode, a draft model's steps) and, where _int_mm is not faster for that many rows
(int_mm_is_faster), any number of rows entirely in C; else C quantization, _int_mm, C rescaling.
Since every path gives the same integer sums and the same float ops after them, the output of a
row never depends on the batch it ran in (speculative verification runs k + 1 rows, plain decode one).

(PyTorch's packed weight-only kernels, aten._weight_int8pack_mm and _weight_int4pack_mm_for_cpu,
were 1.5x-30x slower than fp32 MKL on an AVX2 CPU, measured; dequantizing slices to fp32 before an
fp32 matmul was 2.3x slower than two-digit _int_mm at one row.)

Int4Linear (quant_int4.py) keeps 4-bit weights and takes the same paths; Int8BlockLinear
(quant_block.py) rounds activations to int8 per block of 32 inputs and runs its own kernel;
quantize.py chooses the layers of a model.
"""

import ctypes
import functools
import logging
import time
from typing import NamedTuple

import torch
from torch import nn

from tokenforge.model.layers.block_layout import stored_rows
from tokenforge.model.layers.native import Int8Kernels, Int8RowArgs, int8_kernels

logger = logging.getLogger(__name__)

KERNEL_STEP = 32  # the native kernels take the input width in steps of 32
ACTIVATION_MAX = {1: 127, 2: 32767}  # |q| of the quantized activations, by activation_digits


def quantize_rows(weight: torch.Tensor, slice_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes [out, in] and one fp32 scale per output row [out, 1]; computed
    slice_rows rows at a time, so a large head's temporaries stay small."""
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty((weight.shape[0], 1), dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], slice_rows):
        part = weight[start:start + slice_rows].detach().float()
        part_scales = part.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        codes[start:start + slice_rows] = torch.round(part / part_scales).clamp(-127, 127)
        scales[start:start + slice_rows] = part_scales
    return codes, scales


class RowCall(NamedTuple):
    """A layer's fixed arguments of int8_row_linear_packed, and the tensors they point into."""
    args: Int8RowArgs
    address: int  # of args, as the kernel takes it
    weight: torch.Tensor  # the codes args point into: a replaced weight makes a new RowCall
    kept: tuple  # scales, bias, the digits' work buffer, row sums: referenced for as long as args is


class Int8Linear(nn.Module):
    ACTIVATION_KINDS = (1, 2)  # activation_digits this class takes
    INTERLEAVED = False  # weight holds [out, in] codes (Int8BlockLinear: in its kernel's order)
    INT_MM_PATH = True  # several rows may run around torch._int_mm (int_mm_is_faster); Int8BlockLinear: C only

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation_digits: int = 2):
        super().__init__()
        if activation_digits not in self.ACTIVATION_KINDS:
            raise ValueError(f"activation_digits must be one of {self.ACTIVATION_KINDS}, not {activation_digits}")
        self.out_features, self.in_features = weight.shape
        self.activation_digits = activation_digits
        self._store_weights(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.kernels = int8_kernels() if self.in_features % KERNEL_STEP == 0 else None
        self._row_args: RowCall | None = None  # the row kernel's fixed arguments, made on the first row

    def _store_weights(self, weight: torch.Tensor) -> None:
        """The quantized weights as buffers: int8 codes (weight) and row scales (Int4Linear: 4-bit groups)."""
        codes, scales = quantize_rows(weight)
        self.register_buffer("weight", codes)  # read as its transpose [in, out], the layout _int_mm reads fastest
        self.register_buffer("scales", scales.view(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == 1 and self._row_fits(x):
            return self._forward_row(x)  # single-stream decode: the shortest path
        rows = x.reshape(-1, self.in_features)
        if self._kernels_fit(rows):
            out = self._forward_native(rows)
        else:
            out = self._forward_torch(rows)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _forward_torch(self, rows: torch.Tensor) -> torch.Tensor:
        num_rows = rows.shape[0]
        x_scales = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / ACTIVATION_MAX[self.activation_digits]
        q = torch.round(rows / x_scales)
        if self.activation_digits == 1:
            total = torch._int_mm(q.to(torch.int8), self.codes().t())
        else:
            high = torch.floor(q / 256)
            low = q - high * 256 - 128
            sums = torch._int_mm(torch.cat([high, low]).to(torch.int8), self.codes().t()).long()
            total = sums[:num_rows] * 256 + sums[num_rows:] + 128 * self.row_sums().long()
        # Separately rounded ops (no fused multiply-add): the native kernels repeat them.
        out = total.to(rows.dtype) * (x_scales * self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out

    def first_outputs(self, num_outputs: int) -> "Int8Linear":
        """A layer of this one's first num_outputs outputs, sharing its codes and scales (a draft's
        head limited to the most frequent ids). int8 layers only (Int4Linear stores groups)."""
        if type(self) is not Int8Linear:
            raise TypeError(f"first_outputs needs an Int8Linear, not {type(self).__name__}")
        part = Int8Linear.__new__(Int8Linear)
        nn.Module.__init__(part)
        part.out_features, part.in_features = num_outputs, self.in_features
        part.activation_digits = self.activation_digits
        part.register_buffer("weight", self.weight[:num_outputs])
        part.register_buffer("scales", self.scales[:, :num_outputs])
        part.bias = None if self.bias is None else nn.Parameter(self.bias[:num_outputs], requires_grad=False)
        part.kernels, part._row_args = self.kernels, None
        return part

    def row_sums(self) -> torch.Tensor:
        """sum(codes) per output [out] (int32), for the two-byte _int_mm path; made on first use."""
        cached = getattr(self, "_row_sums", None)
        if cached is None or cached[0] is not self.weight:
            cached = (self.weight, self.codes().sum(dim=1, dtype=torch.int32).contiguous())
            self._row_sums = cached
        return cached[1]

    def _kernels_fit(self, rows: torch.Tensor) -> bool:
        return (self.kernels is not None and rows.dtype == torch.float32 and rows.device.type == "cpu"
                and rows.is_contiguous() and not torch.is_grad_enabled() and rows.shape[0] > 0
                and (self.bias is None or (self.bias.dtype == torch.float32 and self.bias.is_contiguous())))

    def _row_fits(self, row: torch.Tensor) -> bool:
        """_kernels_fit for one row, with the layer's own checks made once (single-stream decode runs
        ~120 layer calls a step: their Python counts)."""
        if self._row_args_stale():
            if not self._kernels_fit(row):
                return False
            self._make_row_args()
        return row.dtype is torch.float32 and row.is_cpu and row.is_contiguous() and not torch.is_grad_enabled()

    def _row_args_stale(self) -> bool:
        """No row arguments yet, or made for weights since replaced."""
        return self._row_args is None or self._row_args.weight is not self.weight

    def _make_row_args(self) -> None:
        work = torch.empty(2 * self.in_features, dtype=torch.int8)
        bias = None if self.bias is None else self.bias.data_ptr()
        weights = self._weight_pointers()
        row_sums = self.row_sums() if self.activation_digits == 1 else None  # the AVX-512 tiles' offset
        args = Int8RowArgs(weights[0], self.scales.data_ptr(), bias, work.data_ptr(), self.in_features,
                           self.out_features, self.activation_digits, torch.get_num_threads(), *weights[1:],
                           None if row_sums is None else row_sums.data_ptr())
        self._row_args = RowCall(args, ctypes.addressof(args), self.weight, (self.scales, self.bias, work, row_sums))

    def _weight_pointers(self) -> tuple[int | None, int | None, int | None]:
        """What the row kernels read: int8 codes, or 4-bit indices and group multipliers."""
        return self.weight.data_ptr(), None, None

    def codes(self) -> torch.Tensor:
        """The int8 codes [out, in] the layer multiplies by."""
        return self.weight

    def _native_codes(self) -> torch.Tensor:
        """codes() for the native path (Int4Linear expands them in C)."""
        return self.weight

    def _forward_row(self, row: torch.Tensor) -> torch.Tensor:
        """One row all in C; the same bits as _forward_torch."""
        call = self._row_args
        threads = torch.get_num_threads()
        if call.args.num_threads != threads:
            call.args.num_threads = threads
        out = torch.empty(1, self.out_features)
        self.kernels.row_linear_packed(row.data_ptr(), out.data_ptr(), call.address)
        return out

    def _forward_native(self, rows: torch.Tensor, use_int_mm: bool | None = None) -> torch.Tensor:
        """Two rows or more: C around _int_mm, or all in C where that multiplies faster on this CPU
        (int_mm_is_faster, unless use_int_mm says); the same bits as _forward_torch either way."""
        num_rows, digits = rows.shape[0], self.activation_digits
        out = torch.empty((num_rows, self.out_features), dtype=torch.float32)
        codes = torch.empty((digits * num_rows, self.in_features), dtype=torch.int8)
        x_scales = torch.empty(num_rows, dtype=torch.float32)
        if not (int_mm_is_faster(num_rows) if use_int_mm is None else use_int_mm):
            self._rows_call().rows_linear(rows.data_ptr(), out.data_ptr(), num_rows, self._row_args.address,
                                          codes.data_ptr(), x_scales.data_ptr())
            return out
        bias = None if self.bias is None else self.bias.data_ptr()
        threads = torch.get_num_threads()
        self.kernels.quantize_rows(rows.data_ptr(), num_rows, self.in_features, digits, codes.data_ptr(),
                                   x_scales.data_ptr(), threads)
        sums = torch._int_mm(codes, self._native_codes().t())
        self.kernels.rescale(sums.data_ptr(), num_rows, self.out_features, digits, x_scales.data_ptr(),
                             self.scales.data_ptr(), self.row_sums().data_ptr(), bias, out.data_ptr(), threads)
        return out

    def _rows_call(self) -> Int8Kernels:
        """The kernels, with the layer's row arguments made and set to this thread count."""
        if self._row_args_stale():
            self._make_row_args()
        self._row_args.args.num_threads = torch.get_num_threads()
        return self.kernels


DECODE_ROWS = 64  # up to this many rows a call (decode batches, DecodePlan): one case of int_mm_is_faster
INT_MM_MARGIN = 1.5  # for those, _int_mm must be this much faster: the C loop also runs DecodePlan's 64 rows


def int_mm_is_faster(num_rows: int = DECODE_ROWS) -> bool:
    """Whether torch._int_mm multiplies num_rows rows faster than int8_rows_linear here, measured once
    for up to DECODE_ROWS rows and once for more (a few ms each). They give the same sums; their speeds
    differ by CPU: _int_mm did ~175 G multiply-adds/s on an earlier session's 2-core machine, ~2 G on
    an AMD EPYC Zen 3 (MKL/oneDNN take a slow path there), where the C loop does ~60-100 G; on an
    Intel Xeon with AVX-512 VNNI both do ~150-300 G (int8_tiles512.c). Up to DECODE_ROWS rows the C
    loop also lets DecodePlan run a decode step in one call, without Python between layers: on that
    Xeon, with _int_mm measured 1.09x-1.23x faster inside the engine, offline 16 streams ran 1.23x
    faster on the C loop and the plan (452 vs 367 out tok/s); on the earlier machine, _int_mm 1.7x
    faster, the plan lost beyond ~6 tokens. So _int_mm must win by INT_MM_MARGIN there."""
    if num_rows <= DECODE_ROWS:
        return _int_mm_speedup(DECODE_ROWS) > INT_MM_MARGIN
    return _int_mm_speedup(8 * DECODE_ROWS) > 1.0


CLEAR_RATIO = 4.0  # a first call of each path this many times apart settles _int_mm_speedup


@functools.cache
def _int_mm_speedup(num_rows: int, calls: int = 5) -> float:
    """C seconds / _int_mm seconds for num_rows rows of a 1536 x 576 layer (SmolLM2's MLP), each path
    whole (_int_mm with its quantization and rescaling), `calls` calls a round, best of 3 alternated
    rounds (single calls of ~0.1 ms measured the threads' wake-up). Where one first call of each is
    CLEAR_RATIO apart, that ratio is the answer: on an AMD EPYC Zen 3, where _int_mm is ~30x slower,
    the rounds took 9-12 s and stalled the first request of a server."""
    generator = torch.Generator().manual_seed(0)
    layer = Int8Linear(torch.randn(1536, 576, generator=generator), None)
    rows = torch.randn(num_rows, 576, generator=generator)
    seconds = {True: float("inf"), False: float("inf")}  # by use_int_mm
    with torch.inference_mode():
        for use_int_mm in seconds:
            started = time.perf_counter()
            layer._forward_native(rows, use_int_mm)
            seconds[use_int_mm] = time.perf_counter() - started
        if not 1 / CLEAR_RATIO < seconds[False] / seconds[True] < CLEAR_RATIO:
            return _logged_speedup(num_rows, seconds)
        for _ in range(3):
            for use_int_mm in seconds:
                layer._forward_native(rows, use_int_mm)
                started = time.perf_counter()
                for _ in range(calls):
                    layer._forward_native(rows, use_int_mm)
                seconds[use_int_mm] = min(seconds[use_int_mm], (time.perf_counter() - started) / calls)
    return _logged_speedup(num_rows, seconds)


def _logged_speedup(num_rows: int, seconds: dict[bool, float]) -> float:
    logger.info("int8 GEMM of %d rows: _int_mm %.3f ms, C %.3f ms a call", num_rows, seconds[True] * 1e3,
                seconds[False] * 1e3)
    return seconds[False] / seconds[True]


class Int8Embedding(nn.Module):
    """Token embeddings as int8 codes [vocab, hidden] with one fp32 scale per token [vocab, 1]: a
    quarter of fp32's memory (SmolLM2: 113 -> 28 MB; Qwen2.5-1.5B: 934 -> 233 MB); a lookup
    dequantizes only the rows it reads. The rounding is that of the int8 head's rows."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, interleaved: bool = False):
        super().__init__()
        self.interleaved = interleaved  # codes in w8a8-block order (a tied w8a8-block head's)
        self.register_buffer("weight", codes)
        self.register_buffer("scales", scales.view(-1, 1))

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int8Embedding":
        return cls(*quantize_rows(weight))

    @classmethod
    def sharing(cls, head: Int8Linear) -> "Int8Embedding":
        """The embedding of a tied model, from its quantized head's codes and scales (no copy)."""
        return cls(head.weight, head.scales, interleaved=head.INTERLEAVED)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        codes = stored_rows(self.weight, input_ids) if self.interleaved else self.weight[input_ids]
        return codes.float() * self.scales[input_ids]
