"""Build Llama-shaped benchmark inputs: base Φ, instruct Θ and a PEFT LoRA adapter Ψ.

Θ = Φ + a rank-4 drift + noise (per tensor), all bf16, sharded the Hugging Face way with a
config.json that transformers loads; the adapter is a PEFT LoRA folder (r=16, q/k/v/o/gate/
up/down) with non-zero A and B. Everything is written tensor by tensor, in row blocks,
through the project's streaming `CheckpointWriter`, so building needs little RAM.

Generating gigabytes of random numbers on two cores is slow, so one pool of seeded
normal values is drawn once and every block is a window of it at a tensor- and
block-dependent offset, scaled per tensor: not independent data, but non-trivial.

    python bench/make_checkpoints.py --preset 1b [--workdir /tmp/bench-data]
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from stream_readapt.io.writer import (
    CheckpointWriter,
    OutputFolder,
    PlannedTensor,
    shards_by_size,
)

DTYPE = torch.bfloat16
LORA_R, LORA_ALPHA = 16, 32
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POOL_SIZE = 2**24 + 17  # float32 values drawn once; every block is a window of this pool
BLOCK_ELEMS = 2**23  # elements per generated row block (32 MiB fp32)
DRIFT_RANK = 4
DEFAULT_WORKDIR = "/tmp/bench-data"


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions that fix every tensor shape of a Llama checkpoint."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float = 10000.0
    max_positions: int = 2048

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of each linear module of one decoder layer, by its short name."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


PRESETS = {
    "tiny": LlamaShape(hidden=256, intermediate=688, layers=2, heads=8, kv_heads=2, vocab=1000),
    "1b": LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    "1b-deep": LlamaShape(hidden=2048, intermediate=5632, layers=44, heads=32, kv_heads=4, vocab=32000),
    "70b-slice": LlamaShape(hidden=8192, intermediate=28672, layers=2, heads=64, kv_heads=8, vocab=128256,
                            rope_theta=500000.0, max_positions=8192),
}


def module_path(layer: int, short: str) -> str:
    part = "mlp" if short in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{part}.{short}"


def model_tensors(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the checkpoint, in file order."""
    out = [("model.embed_tokens.weight", (shape.vocab, shape.hidden))]
    for layer in range(shape.layers):
        for short, dims in shape.linear_shapes().items():
            out.append((f"{module_path(layer, short)}.weight", dims))
        out.append((f"model.layers.{layer}.input_layernorm.weight", (shape.hidden,)))
        out.append((f"model.layers.{layer}.post_attention_layernorm.weight", (shape.hidden,)))
    out += [("model.norm.weight", (shape.hidden,)), ("lm_head.weight", (shape.vocab, shape.hidden))]
    return out


def adapter_tensors(shape: LlamaShape) -> list[tuple[str, tuple[int, int]]]:
    """(key, shape) of the LoRA factors, keyed the way PEFT saves them."""
    out = []
    for layer in range(shape.layers):
        for short, (rows, cols) in shape.linear_shapes().items():
            key = f"base_model.model.{module_path(layer, short)}"
            out += [(f"{key}.lora_A.weight", (LORA_R, cols)), (f"{key}.lora_B.weight", (rows, LORA_R))]
    return out


def llama_config(shape: LlamaShape) -> dict:
    """A config.json that transformers' LlamaConfig / AutoModelForCausalLM accepts as is."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "head_dim": shape.hidden // shape.heads,
        "vocab_size": shape.vocab, "max_position_embeddings": shape.max_positions,
        "rms_norm_eps": 1e-5, "rope_theta": shape.rope_theta, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "use_cache": True, "torch_dtype": "bfloat16",
    }


def adapter_config(base_path: Path) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_path),
        "r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(LORA_TARGETS), "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }


class Pool:
    """Seeded normal values drawn once; `window(key, n)` is a length-n view at a key-dependent offset."""

    def __init__(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        pool = torch.randn(POOL_SIZE, generator=gen)
        self.values = torch.cat([pool, pool[:BLOCK_ELEMS]])  # any window of <= BLOCK_ELEMS is a view
        self.gen = gen

    def window(self, key: str, n: int) -> torch.Tensor:
        assert n <= BLOCK_ELEMS
        offset = zlib.crc32(key.encode()) % POOL_SIZE
        return self.values[offset:offset + n]

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen)


def row_ranges(rows: int, cols: int):
    step = max(1, BLOCK_ELEMS // max(1, cols))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


class PairWriter:
    """Writes Φ and Θ in lockstep: each base block is generated once and drifted into Θ's."""

    def __init__(self, base: CheckpointWriter, instruct: CheckpointWriter, pool: Pool):
        self.base, self.instruct, self.pool = base, instruct, pool

    def tensor(self, name: str, dims: tuple[int, ...]) -> None:
        for w in (self.base, self.instruct):
            w.begin(name, DTYPE, dims)
        if len(dims) == 1:
            self._vector(name, dims[0])
        else:
            self._matrix(name, *dims)
        for w in (self.base, self.instruct):
            w.end()

    def _vector(self, name: str, n: int) -> None:
        phi = 1.0 + 0.05 * self.pool.window(name, n)
        theta = phi + 0.01 * self.pool.window(name + "/noise", n)
        self._emit(phi, theta)

    def _matrix(self, name: str, rows: int, cols: int) -> None:
        u = self.pool.randn(rows, DRIFT_RANK).mul_(0.002)  # rank-4 drift U·V, |entries| ~ 2e-3
        v = self.pool.randn(DRIFT_RANK, cols).div_(DRIFT_RANK**0.5)
        for start, stop in row_ranges(rows, cols):
            n = (stop - start) * cols
            phi = self.pool.window(f"{name}/{start}", n).view(stop - start, cols) * 0.02
            theta = torch.addmm(phi, u[start:stop], v)
            theta.add_(self.pool.window(f"{name}/{start}/noise", n).view(stop - start, cols), alpha=2e-4)
            self._emit(phi, theta)

    def _emit(self, phi: torch.Tensor, theta: torch.Tensor) -> None:
        self.base.write(phi.to(DTYPE))
        self.instruct.write(theta.to(DTYPE))


def _groups(tensors, max_shard_bytes: int) -> list[list[str]]:
    plan = [PlannedTensor(n, _numel(d) * DTYPE.itemsize) for n, d in tensors]
    return shards_by_size(plan, max_shard_bytes)


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def write_pair(base_dir: Path, instruct_dir: Path, shape: LlamaShape, pool: Pool, max_shard_bytes: int) -> None:
    """Φ and Θ, sharded alike, each with config.json and generation_config.json."""
    tensors = model_tensors(shape)
    groups = _groups(tensors, max_shard_bytes)
    base = CheckpointWriter(base_dir, groups, metadata={"format": "pt"})
    instruct = CheckpointWriter(instruct_dir, groups, metadata={"format": "pt"})
    pair = PairWriter(base, instruct, pool)
    for name, dims in tensors:
        pair.tensor(name, dims)
    for folder, writer in ((base_dir, base), (instruct_dir, instruct)):
        writer.finalize()
        (folder / "config.json").write_text(json.dumps(llama_config(shape), indent=2))
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def write_adapter(folder: Path, base_path: Path, shape: LlamaShape, pool: Pool) -> None:
    """A PEFT LoRA folder; s·B·A has entries ~1e-3, comparable to the instruct drift."""
    tensors = adapter_tensors(shape)
    writer = CheckpointWriter(folder, [[n for n, _ in tensors]], prefix="adapter_model", metadata={"format": "pt"})
    for key, dims in tensors:
        values = pool.window(key, _numel(dims)).view(dims) * 0.02
        writer.add(key, values.to(DTYPE))
    writer.finalize()
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(base_path), indent=2))


def preset_dirs(workdir: str | Path, preset: str) -> dict[str, Path]:
    root = Path(workdir) / preset
    return {"base": root / "base", "instruct": root / "instruct", "lora": root / "lora"}


def build(preset: str, workdir: str | Path = DEFAULT_WORKDIR, *, seed: int = 0,
          max_shard_bytes: int = 2 * 10**9) -> dict:
    """Write the preset's base / instruct / lora folders (skipped when already complete); returns their paths."""
    dirs = preset_dirs(workdir, preset)
    stamp = dirs["base"].parent / "complete.json"
    want = {"preset": preset, "shape": asdict(PRESETS[preset]), "seed": seed, "max_shard_bytes": max_shard_bytes}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return dirs
    stamp.unlink(missing_ok=True)
    pool = Pool(seed)
    with OutputFolder(dirs["base"], overwrite=True) as b, OutputFolder(dirs["instruct"], overwrite=True) as i:
        write_pair(b, i, PRESETS[preset], pool, max_shard_bytes)
    with OutputFolder(dirs["lora"], overwrite=True) as a:
        write_adapter(a, dirs["base"], PRESETS[preset], pool)
    stamp.write_text(json.dumps(want))
    return dirs


def preset_bytes(preset: str) -> dict[str, int]:
    """Data bytes of one model checkpoint and of the adapter (before building anything)."""
    shape = PRESETS[preset]
    model = sum(_numel(d) for _, d in model_tensors(shape)) * DTYPE.itemsize
    adapter = sum(_numel(d) for _, d in adapter_tensors(shape)) * DTYPE.itemsize
    return {"model": model, "adapter": adapter}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True, help="model shape to build")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="folder for <preset>/{base,instruct,lora}")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pool")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="shard size limit in GB (default 2)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    dirs = build(args.preset, args.workdir, seed=args.seed, max_shard_bytes=int(args.max_shard_gb * 1e9))
    sizes = preset_bytes(args.preset)
    print(f"{args.preset}: {sizes['model'] / 1e9:.2f} GB per checkpoint, adapter {sizes['adapter'] / 1e6:.1f} MB, "
          f"in {dirs['base'].parent} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
