"""Quantized checkpoints read as float32, a row block at a time.

A checkpoint whose config.json declares a `quantization_config` stores some weights as 8-bit
values plus scales. Readaptation is arithmetic on the weights, so such a checkpoint is read
through `DequantizedCheckpoint`: a weight and its scale companion are one float32 tensor
(value × scale, per scale block), the scales are never tensors of their own (no Δ of a scale),
and rows are dequantized as they are read, so memory stays a few row blocks whatever the size.

Read exactly (every scale block, edge blocks included):

- `quant_method: "fp8"` (transformers' fine-grained FP8: DeepSeek-V3/V3.1, Kimi-K2, Qwen3 -FP8):
  float8_e4m3fn weights with a float32 `weight_scale_inv` per `weight_block_size` block (or one
  per tensor when no block size is given);
- `quant_method: "compressed-tensors"`, formats `float-quantized`, `int-quantized` and
  `naive-quantized` with 8-bit symmetric weights (`weight_scale` per tensor, channel, group or
  block): Red Hat's W8A8 / FP8-dynamic releases;
- `quant_method: "mxfp4"` (gpt-oss): expert parameters stored as `<param>_blocks` (two E2M1
  values a byte, 32 per group) and `<param>_scales` (an E8M0 exponent per group), served as the
  parameter `<param>` in its in-memory layout [experts, in, out], as transformers loads it.

Everything else a config may declare (GPTQ, AWQ, bitsandbytes, packed int4, NVFP4 …)
is refused in one line naming the method and the way out: a guess at a format would give a
silently wrong model. Activation scales (`input_scale`) are dropped: they describe the
quantized forward, not the weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .safetensors_reader import CheckpointError, TensorInfo

_WHOLE = 1 << 62  # a block dimension spanning the whole tensor
MXFP4_GROUP = 32  # values sharing one E8M0 scale
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # E2M1 codes
_FIX = ("dequantize it first (load it in transformers with the method's dequantize option, or its own "
        "tool, and save_pretrained in bfloat16), or use the unquantized release")
_DROPPED_SUFFIXES = (".input_scale", ".k_scale", ".v_scale", ".output_scale")


@dataclass(frozen=True)
class QuantScheme:
    """How one checkpoint's quantized weights are laid out."""

    method: str  # "fp8" or "compressed-tensors"
    scale_suffix: str  # the companion of `<module>.weight`: "weight_scale_inv" / "weight_scale"
    block: tuple[int, int] | None  # rows × columns one scale covers; None: from the strategy (below)
    strategy: str = "block"  # compressed-tensors: tensor / channel / group / block
    group_size: int = 0

    def describe(self) -> str:
        if self.method == "mxfp4":
            return "MXFP4 experts"
        if self.method == "fp8":
            return f"fine-grained FP8, {self.block[0]}×{self.block[1]} blocks" if self.block else "FP8, per tensor"
        grain = f"group {self.group_size}" if self.strategy == "group" else self.strategy
        return f"compressed-tensors 8-bit, per {grain}"

    def block_for(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Rows × columns one scale covers in a weight of `shape` (_WHOLE: all of that dimension)."""
        if self.block is not None:
            return self.block
        return {"tensor": (_WHOLE, _WHOLE), "channel": (1, _WHOLE), "group": (1, self.group_size)}[self.strategy]

    def block_in(self, shape: tuple[int, int]) -> tuple[int, int]:
        """`block_for`, at most the matrix itself (the block an edge or a whole-tensor scale covers)."""
        bn, bk = self.block_for(shape)
        return min(bn, shape[0]) or 1, min(bk, shape[1]) or 1


def scheme_of(config: dict, source: str) -> QuantScheme | None:
    """The checkpoint's quantization scheme (None: not quantized); refuses what is not read exactly."""
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{source}/config.json: quantization_config must be an object")
    method = qc.get("quant_method")
    if method == "fp8":
        return _fp8_scheme(qc, source)
    if method == "compressed-tensors":
        return _compressed_scheme(qc, source)
    if method == "mxfp4":  # gpt-oss: experts as `<param>_blocks` (two FP4 values a byte) + `<param>_scales`
        return QuantScheme("mxfp4", "_scales", (1, MXFP4_GROUP))
    raise CheckpointError(f"{source}: quantization_config.quant_method {method!r} is not read by stream-readapt "
                          f"(it reads fine-grained FP8 and 8-bit compressed-tensors): {_FIX}")


def _fp8_scheme(qc: dict, source: str) -> QuantScheme:
    if qc.get("scale_fmt", "float") != "float":
        raise CheckpointError(f"{source}: FP8 with scale_fmt {qc.get('scale_fmt')!r} scales is not read by "
                              f"stream-readapt (float32 scales only): {_FIX}")
    if qc.get("expert_dtype", "fp8") != "fp8":
        raise CheckpointError(f"{source}: FP8 with {qc.get('expert_dtype')!r} experts is not read by stream-readapt: {_FIX}")
    block = qc.get("weight_block_size")
    if block is not None and (not isinstance(block, list) or len(block) != 2
                              or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"{source}/config.json: quantization_config.weight_block_size must be two positive "
                              f"integers, got {block!r}")
    return QuantScheme("fp8", "weight_scale_inv", tuple(block) if block else (_WHOLE, _WHOLE))


def _compressed_scheme(qc: dict, source: str) -> QuantScheme:
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "int-quantized", "naive-quantized"):
        raise CheckpointError(f"{source}: compressed-tensors format {fmt!r} is not read by stream-readapt "
                              f"(float-quantized, int-quantized and naive-quantized 8-bit weights only): {_FIX}")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise CheckpointError(f"{source}: compressed-tensors with {len(groups or {})} config groups is not read by "
                              f"stream-readapt (one group only): {_FIX}")
    weights = next(iter(groups.values())).get("weights") or {}
    strategy, bits = weights.get("strategy"), weights.get("num_bits")
    if bits != 8 or weights.get("symmetric") is False or weights.get("dynamic") is True:
        raise CheckpointError(f"{source}: compressed-tensors weights of {bits} bits (symmetric="
                              f"{weights.get('symmetric')}) are not read by stream-readapt (8-bit symmetric only): {_FIX}")
    if strategy == "block":
        structure = weights.get("block_structure")
        if not (isinstance(structure, list) and len(structure) == 2 and all(isinstance(b, int) and b > 0 for b in structure)):
            raise CheckpointError(f"{source}: compressed-tensors block strategy without a block_structure: {_FIX}")
        return QuantScheme("compressed-tensors", "weight_scale", tuple(structure), "block")
    if strategy == "group":
        size = weights.get("group_size")
        if not isinstance(size, int) or size <= 0:
            raise CheckpointError(f"{source}: compressed-tensors group strategy without a positive group_size: {_FIX}")
        return QuantScheme("compressed-tensors", "weight_scale", None, "group", size)
    if strategy in ("tensor", "channel"):
        return QuantScheme("compressed-tensors", "weight_scale", None, strategy)
    raise CheckpointError(f"{source}: compressed-tensors strategy {strategy!r} is not read by stream-readapt: {_FIX}")


def dequantize_rows(q: torch.Tensor, scale_rows: torch.Tensor, row0: int, first_scale_row: int,
                    block: tuple[int, int]) -> torch.Tensor:
    """Rows [row0, row0 + len(q)) of a quantized matrix as float32: each value times the scale of
    its block (`block`: rows × columns, at most the matrix's). `scale_rows` are the scale rows
    from `first_scale_row` on that cover those rows."""
    out = q.to(torch.float32)
    scale = scale_rows.to(torch.float32)
    if scale.numel() == 1:
        return out.mul_(scale.reshape(()))
    bn, bk = block
    per_row = scale.reshape(scale.shape[0], -1)[torch.arange(row0, row0 + out.shape[0]) // bn - first_scale_row]
    return per_block(torch.mul, out, per_row, bk)


def per_block(op, x: torch.Tensor, per_row: torch.Tensor, bk: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """`op(x, the scale of each element's block)` into `out` (default: in place), with `per_row`
    [rows, column blocks] broadcast over each block's `bk` columns through views: no
    scale tensor the size of `x`."""
    n, cols = x.shape
    full, rem = divmod(cols, bk)
    out = x if out is None else out
    op(x[:, : full * bk].view(n, full, bk), per_row[:, :full, None], out=out[:, : full * bk].view(n, full, bk))
    if rem:
        op(x[:, full * bk:], per_row[:, full: full + 1], out=out[:, full * bk:])
    return out


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Experts [e, out, groups, 16] bytes + [e, out, groups] exponents -> float32 [e, in, out]
    (low nibble first; value · 2^(exponent − 127); the parameter's in-memory layout)."""
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32)
    e, out, groups, half = blocks.shape
    values = torch.empty(e, out, groups, half * 2, dtype=torch.float32)
    values[..., 0::2] = lut[(blocks & 0x0F).long()]
    values[..., 1::2] = lut[(blocks >> 4).long()]
    values = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None])
    return values.reshape(e, out, groups * half * 2).transpose(1, 2).contiguous()


class DequantizedCheckpoint:
    """A quantized checkpoint seen as float32 tensors: the same API as `Checkpoint`, scales hidden.

    Built by `Checkpoint.from_folder` when config.json declares a quantization_config."""

    def __init__(self, inner, scheme: QuantScheme):
        self.inner, self.scheme = inner, scheme
        self.folder, self.files, self.source = inner.folder, inner.files, inner.source
        self.scale_of: dict[str, str] = {}  # quantized weight -> its scale companion
        self.packed: dict[str, tuple[str, str]] = {}  # MXFP4 parameter -> (its _blocks, its _scales)
        hidden = set()
        for name in inner.weight_map:
            if scheme.method == "mxfp4":
                if name.endswith("_blocks"):
                    param = name[: -len("_blocks")]
                    if param + "_scales" not in inner.weight_map:
                        raise CheckpointError(f"{inner.source}: {name!r} has no scales {param + '_scales'!r}")
                    self.packed[param] = (name, param + "_scales")
                    hidden |= {name, param + "_scales"}
                continue
            if name.endswith("." + scheme.scale_suffix):
                weight = name[: -len(scheme.scale_suffix)] + "weight"
                if weight not in inner.weight_map:
                    raise CheckpointError(f"{inner.source}: scale {name!r} has no weight {weight!r}")
                self.scale_of[weight] = name
                hidden.add(name)
            elif name.endswith(_DROPPED_SUFFIXES) or name.endswith(".weight_zero_point"):
                if name.endswith(".weight_zero_point"):
                    raise CheckpointError(f"{inner.source}: tensor {name!r}: asymmetric quantization (zero points) "
                                          f"is not read by stream-readapt: {_FIX}")
                hidden.add(name)
        self.weight_map = {n: f for n, f in inner.weight_map.items() if n not in hidden}
        for param, (blocks, _) in self.packed.items():
            self.weight_map[param] = inner.weight_map[blocks]
            self._check_packed(param)
        for weight in self.scale_of:
            self._check(weight)
        self._names = None

    def _check_packed(self, param: str) -> None:
        blocks, scales = (self.inner.info(k) for k in self.packed[param])
        if (blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or len(blocks.shape) != 4
                or blocks.shape[-1] * 2 != MXFP4_GROUP or tuple(blocks.shape[:-1]) != tuple(scales.shape)):
            raise CheckpointError(f"{self.source}: {self.packed[param][0]!r} {list(blocks.shape)} {blocks.dtype} with "
                                  f"scales {list(scales.shape)} {scales.dtype} is not MXFP4 experts "
                                  "([experts, out, groups, 16] bytes + [experts, out, groups] exponents)")

    def _block(self, weight: str) -> tuple[int, int]:
        return self.scheme.block_in(self.inner.info(weight).shape)

    def _check(self, weight: str) -> None:
        info, scale = self.inner.info(weight), self.inner.info(self.scale_of[weight])
        if len(info.shape) != 2:
            raise CheckpointError(f"{self.source}: quantized tensor {weight!r} has shape {list(info.shape)}: "
                                  "only quantized matrices are read")
        if info.dtype not in (torch.float8_e4m3fn, torch.int8) or not scale.dtype.is_floating_point:
            raise CheckpointError(f"{self.source}: quantized tensor {weight!r} is {info.dtype} with "
                                  f"{scale.dtype} scales: not the declared {self.scheme.describe()}")
        bn, bk = self._block(weight)
        want = (math.ceil(info.shape[0] / bn), math.ceil(info.shape[1] / bk))
        if math.prod(scale.shape) != math.prod(want) or (len(scale.shape) == 2 and tuple(scale.shape) != want):
            raise CheckpointError(f"{self.source}: scale {self.scale_of[weight]!r} has shape {list(scale.shape)}, "
                                  f"but {self.scheme.describe()} of a {list(info.shape)} weight needs {list(want)}")

    # -- the Checkpoint API ------------------------------------------------------
    @property
    def names(self) -> list[str]:
        if self._names is None:  # storage order; an MXFP4 parameter where its blocks are
            at = {blocks: param for param, (blocks, _) in self.packed.items()}
            self._names = [at.get(n, n) for n in self.inner.names if n in self.weight_map or n in at]
        return self._names

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"{self.source}: no tensor named {name!r}")
        return self.inner.file_of(self.packed[name][0] if name in self.packed else name)

    def info(self, name: str) -> TensorInfo:
        if name in self.packed:  # [experts, in, out] float32
            blocks = self.inner.info(self.packed[name][0])
            e, out, groups, half = blocks.shape
            shape = (e, groups * half * 2, out)
            return TensorInfo(name, torch.float32, shape, blocks.start, math.prod(shape) * 4)
        info = self.file_of(name).info(name)
        if name in self.scale_of:  # served as float32
            return dataclasses.replace(info, dtype=torch.float32, nbytes=info.numel * 4)
        return info

    def quantized(self, name: str) -> bool:
        return name in self.scale_of or name in self.packed

    def read_rows(self, name: str, start: int = 0, stop: int | None = None, *, out=None) -> torch.Tensor:
        if name in self.packed:  # rows are experts
            blocks, scales = self.packed[name]
            block = dequantize_mxfp4(self.inner.read_rows(blocks, start, stop), self.inner.read_rows(scales, start, stop))
            return block if out is None else out.copy_(block)
        if name not in self.scale_of:
            return self.file_of(name).read_rows(name, start, stop, out=out)
        rows = self.inner.info(name).shape[0]
        stop = rows if stop is None else min(stop, rows)
        q = self.inner.read_rows(name, start, stop)
        scale_name, (bn, bk) = self.scale_of[name], self._block(name)
        first = start // bn
        if math.prod(self.inner.info(scale_name).shape) == 1 or stop <= start:
            scale = self.inner.read(scale_name)
        else:  # only the scale rows these rows use
            scale = self.inner.read_rows(scale_name, first, (stop - 1) // bn + 1)
        block = dequantize_rows(q, scale, start, first, (bn, bk))
        return block if out is None else out.copy_(block)

    def read(self, name: str) -> torch.Tensor:
        return self.read_rows(name, 0, None)

    def prefetch(self, nbytes: int) -> int:
        return self.inner.prefetch(nbytes)

    @property
    def config(self) -> dict:
        return self.inner.config

    @property
    def total_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self.weight_map)

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def close(self) -> None:
        self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plain_config(config: dict) -> dict:
    """`config` of a checkpoint written in plain floats: no quantization_config to mislead a loader."""
    config = dict(config)
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict) and "quantization_config" in config["text_config"]:
        config["text_config"] = {k: v for k, v in config["text_config"].items() if k != "quantization_config"}
    return config
