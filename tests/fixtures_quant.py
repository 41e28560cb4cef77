"""Quantized copies of a tiny checkpoint, in the layouts real releases use (built at test time).

`fp8_blocks_copy`: transformers' fine-grained FP8 (DeepSeek-V3, Kimi-K2, Qwen3 -FP8):
float8_e4m3fn Linear weights with a float32 `weight_scale_inv` per block, `quant_method: "fp8"`.
`compressed_copy`: compressed-tensors `float-quantized` / `int-quantized` (Red Hat's W8A8):
an 8-bit weight with a float `weight_scale` per tensor, channel or group.

The quantizer is the plain recipe (scale = block amax / the format's max), written here only to
build inputs; the references the tests compare against are transformers' and
compressed-tensors' own dequantization of these files.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from fixtures_models import load_state_dict

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
SKIP = ("embed_tokens", "lm_head", "norm", "mlp.gate.")  # Linear layers of the decoder only, routers kept (as DeepSeek-V3)


def quantize_blocks(w: torch.Tensor, block: tuple[int, int], *, kind: str = "fp8") -> tuple[torch.Tensor, torch.Tensor]:
    """(values, per-block scale) with w ≈ values · scale over each `block` (edge blocks smaller)."""
    rows, cols = w.shape
    bn, bk = min(block[0], rows), min(block[1], cols)
    sr, sc = math.ceil(rows / bn), math.ceil(cols / bk)
    scale = torch.empty(sr, sc, dtype=torch.float32)
    values = torch.empty(rows, cols, dtype=torch.float8_e4m3fn if kind == "fp8" else torch.int8)
    top = FP8_MAX if kind == "fp8" else 127.0
    for i in range(sr):
        for j in range(sc):
            tile = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float()
            s = max(float(tile.abs().max()) / top, 1e-12)
            scale[i, j] = s
            q = (tile / s).clamp(-top, top)
            values[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = q.to(values.dtype) if kind == "fp8" else q.round().to(torch.int8)
    return values, scale


def _quantized_copy(src: Path, out: Path, quantize, quantization_config: dict) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    state = load_state_dict(src)
    tensors = {}
    for name, w in state.items():
        if name.endswith(".weight") and w.dim() == 2 and not any(s in name for s in SKIP):
            tensors.update(quantize(name[: -len(".weight")], w))
        else:
            tensors[name] = w.contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(f, out / f.name)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def fp8_blocks_copy(src: str | Path, out: str | Path, block=(24, 40)) -> Path:
    """`src` with its decoder Linear weights in fine-grained FP8 (`block` rows × columns; the
    default does not divide the tiny models' sizes: edge blocks on both axes)."""
    def quantize(module, w):
        q, s = quantize_blocks(w, block)
        return {f"{module}.weight": q, f"{module}.weight_scale_inv": s}

    return _quantized_copy(Path(src), Path(out), quantize, {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block)})


def compressed_copy(src: str | Path, out: str | Path, *, kind: str = "float", strategy: str = "channel",
                    group_size: int = 16) -> Path:
    """`src` in compressed-tensors 8-bit (`kind` float → float-quantized, int → int-quantized)."""
    def quantize(module, w):
        block = {"tensor": w.shape, "channel": (1, w.shape[1]), "group": (1, group_size)}[strategy]
        q, s = quantize_blocks(w, tuple(block), kind="fp8" if kind == "float" else "int")
        if strategy == "tensor":
            s = s.reshape(1)
        return {f"{module}.weight": q, f"{module}.weight_scale": s}

    weights = {"num_bits": 8, "type": kind, "symmetric": True, "strategy": strategy, "dynamic": False,
               "group_size": group_size if strategy == "group" else None}
    return _quantized_copy(Path(src), Path(out), quantize, {
        "quant_method": "compressed-tensors", "format": f"{kind}-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
        "ignore": ["lm_head"], "quantization_status": "compressed"})


def transformers_dequantized(folder: str | Path) -> dict[str, torch.Tensor]:
    """The float32 weights transformers itself loads from a fine-grained FP8 folder (its
    `FineGrainedFP8Config(dequantize=True)`), by checkpoint key."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 quantization_config=FineGrainedFP8Config(dequantize=True))
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert parameter [E, in, out] as gpt-oss stores it: blocks [E, out, in/32, 16] (two E2M1
    codes a byte, low nibble first) and E8M0 scales [E, out, in/32] (exponent + 127)."""
    t = w.float().transpose(1, 2)
    e, out, n = t.shape
    g = t.reshape(e, out, n // 32, 32)
    amax = g.abs().amax(-1, keepdim=True).clamp_min(2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0))
    scaled = g / torch.exp2(exp)
    mag = (scaled.abs()[..., None] - _FP4).abs().argmin(-1)  # nearest magnitude code 0..7
    codes = (mag + 8 * (scaled < 0)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp[..., 0] + 127).to(torch.uint8)


def build_mxfp4_pair(root: str | Path) -> tuple[Path, Path, Path, Path]:
    """A tiny gpt-oss pair (experts' in-dims multiples of 32, as MXFP4 needs), plain and with its
    experts in MXFP4: (base, instruct, base_mxfp4, instruct_mxfp4)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GptOssConfig

    root = Path(root)
    config = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=8, tie_word_embeddings=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(root / "instruct")
    out = []
    for side in ("base", "instruct"):
        state = load_state_dict(root / side)
        tensors = {}
        for name, w in state.items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                tensors[name + "_blocks"], tensors[name + "_scales"] = quantize_mxfp4(w)
            else:
                tensors[name] = w.contiguous()
        dst = root / f"{side}_mxfp4"
        dst.mkdir()
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((root / side / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
        out.append(dst)
    return root / "base", root / "instruct", out[0], out[1]


def transformers_mxfp4_dequantized(folder: str | Path) -> dict[str, torch.Tensor]:
    """The float32 weights transformers loads from an MXFP4 folder (`Mxfp4Config(dequantize=True)`)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 quantization_config=Mxfp4Config(dequantize=True))
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}
