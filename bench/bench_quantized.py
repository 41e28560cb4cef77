"""Benchmark `extract` and `merge` of a fine-grained FP8 pair against a plain copy of the same bytes.

Builds (once, cached in the workdir) an FP8 copy of the 1b preset's pair: every decoder Linear
weight as float8_e4m3fn with a float32 `weight_scale_inv` per 128×128 block (DeepSeek-V3's
layout), embeddings, head and norms as they are. Then, each a fresh child under
`/usr/bin/time -v`, alternating, from a warm page cache:

  copy     bench/copy_floor.py: read base + instruct once, write base-size bytes once (the floor)
  extract  stream-readapt extract BASE INSTRUCT (full RE-Adapter; bfloat16, as for any quantized pair)
  merge    stream-readapt merge BASE --instruct INSTRUCT (FP8 blocks written back, fresh scales)

and reports wall time, × copy and peak RSS (which must stay a few row blocks: dequantization
never materializes a whole tensor).

    python bench/bench_quantized.py [--workdir /tmp/bench-data] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import harness_cpu as hc
import make_checkpoints as mc
import torch

from stream_readapt.engine.requantize import Requantizer
from stream_readapt.io.checkpoint import Checkpoint
from stream_readapt.io.quantized import QuantScheme

HERE = Path(__file__).resolve().parent
BLOCK = (128, 128)
SKIP = ("embed_tokens", "lm_head", "norm")


def fp8_copy(src: Path, dst: Path) -> Path:
    """`src` with its decoder Linear weights in FP8 blocks, shard by shard (a tensor at a time)."""
    from safetensors.torch import save_file

    if (dst / "done").is_file():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    scheme = QuantScheme("fp8", "weight_scale_inv", BLOCK)
    weight_map = {}
    with Checkpoint.from_folder(src) as ckpt:
        shards = sorted(set(ckpt.weight_map.values()))
        for shard in shards:
            tensors = {}
            for name in [n for n in ckpt.names if ckpt.weight_map[n] == shard]:
                w = ckpt.read(name)
                if w.dim() == 2 and name.endswith(".weight") and not any(s in name for s in SKIP):
                    scale_name = name[: -len("weight")] + "weight_scale_inv"
                    q, s, _, _ = Requantizer(scheme, torch.float8_e4m3fn, tuple(w.shape), scale_name).encode(w)
                    tensors[name], tensors[scale_name] = q, s
                else:
                    tensors[name] = w
            save_file(tensors, dst / shard, metadata={"format": "pt"})
            weight_map.update({n: shard for n in tensors})
    if len(shards) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "done").write_text("")
    return dst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(mc.DEFAULT_WORKDIR))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=HERE / "out")
    args = p.parse_args(argv)
    plain = mc.build("1b", args.workdir)
    root = args.workdir / "1b-fp8"
    base, instruct = fp8_copy(plain["base"], root / "base"), fp8_copy(plain["instruct"], root / "instruct")
    runs = root / "runs"
    runs.mkdir(exist_ok=True)
    (runs / "no-adapter").mkdir(exist_ok=True)
    exe = shutil.which("stream-readapt", path=str(Path(sys.executable).parent)) or "stream-readapt"
    commands = {
        "copy": [sys.executable, str(HERE / "copy_floor.py"), str(base), str(instruct), str(runs / "no-adapter"),
                 "-o", str(runs / "out")],
        "extract": [exe, "extract", str(base), str(instruct), "-o", str(runs / "out"), "--quiet", "--device", "cpu"],
        "merge": [exe, "merge", str(base), "--instruct", str(instruct), "-o", str(runs / "out"), "--quiet",
                  "--device", "cpu"],
    }
    env = hc.role_cache_env("warm", runs / "role-cache")
    hc.prime_role_cache(runs / "role-cache", base, instruct)
    rows = []
    for run in range(1, args.repeat + 1):
        for tool, cmd in commands.items():
            hc.warm_page_cache([base, instruct])
            hc.remove(runs / "out")
            stats = hc.run_timed(cmd, runs / f"{tool}-{run}.log", env=env)
            written = hc.folder_bytes(runs / "out")
            rows.append({"tool": tool, "run": run, **stats, "written_gb": written / 1e9})
            print(f"  {tool:8s} run {run}: {stats['wall_s']:.1f} s, peak RSS {stats['peak_rss_mb']:.0f} MB, "
                  f"wrote {written / 1e9:.2f} GB, others {stats['others_cpu_s']:.0f} CPU-s", flush=True)
    hc.remove(runs / "out")
    best_copy = min(r["wall_s"] for r in rows if r["tool"] == "copy")
    for r in rows:
        r["x_copy"] = r["wall_s"] / best_copy
    read = hc.folder_bytes(base) + hc.folder_bytes(instruct)
    extra = {"machine": hc.machine_info(), "code": hc.code_version(HERE.parent), "read_gb": read / 1e9}
    paths = hc.write_rows(rows, extra, args.out_dir, "quantized_1b_fp8")
    print(hc.format_table(rows, ["tool", "run", "wall_s", "x_copy", "peak_rss_mb", "user_s", "sys_s", "written_gb"]))
    print(f"reads {read / 1e9:.2f} GB; {extra['machine']}; wrote {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main()
