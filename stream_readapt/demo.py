"""`stream-readapt demo`: the whole pipeline on a tiny generated Llama-shaped pair, offline.

Builds a base Φ, an "instruct" Θ (Φ plus a low-rank drift, with 2 added tokens)
and a PEFT LoRA Ψ, all written by this package's own writer (no transformers
needed), then runs extract, LoRE extract and merge, and checks each result
against a float64 recomputation.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .io.checkpoint import Checkpoint
from .io.writer import CheckpointWriter, PlannedTensor, SafetensorsShardWriter, shards_by_size
from .peft_format.format import PREFIX

HIDDEN, FFN, LAYERS, VOCAB, ADDED = 64, 176, 2, 256, 2
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
    "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": HIDDEN // 4, "vocab_size": VOCAB, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}


def tiny_llama_shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    kv = HIDDEN // 2
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
        })
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (vocab, HIDDEN)})
    return shapes


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict, max_shard_bytes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    plan = [PlannedTensor(n, t.numel() * t.element_size()) for n, t in tensors.items()]
    writer = CheckpointWriter(folder, shards_by_size(plan, max_shard_bytes), metadata={"format": "pt"})
    for name, t in tensors.items():
        writer.add(name, t.contiguous())
    writer.finalize()
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def make_pair(root: Path, gen: torch.Generator) -> tuple[dict, dict]:
    base = {}
    for name, shape in tiny_llama_shapes(VOCAB).items():
        base[name] = (1 + 0.1 * torch.randn(shape, generator=gen)) if len(shape) == 1 else 0.05 * torch.randn(shape, generator=gen)
    instruct = {}
    for name, w in base.items():  # instruction tuning as a low-rank drift plus a little noise
        drift = 0.01 * torch.randn(w.shape, generator=gen)
        if w.dim() == 2:
            drift += 0.02 * torch.randn(w.shape[0], 4, generator=gen) @ torch.randn(4, w.shape[1], generator=gen) / 2
        instruct[name] = w + drift
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # two added chat tokens
        instruct[name] = torch.cat([instruct[name], 0.05 * torch.randn(ADDED, HIDDEN, generator=gen)])
    base = {n: t.to(torch.bfloat16) for n, t in base.items()}
    instruct = {n: t.to(torch.bfloat16) for n, t in instruct.items()}
    write_checkpoint(root / "base", base, CONFIG, max_shard_bytes=200_000)
    write_checkpoint(root / "instruct", instruct, dict(CONFIG, vocab_size=VOCAB + ADDED), max_shard_bytes=10**9)
    (root / "instruct" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, VOCAB + 1]}))
    return base, instruct


def make_lora(folder: Path, base: dict, gen: torch.Generator, r: int = 8, alpha: int = 16) -> dict:
    """A PEFT-format LoRA on q/v/down projections; returns Ψ per target (float64)."""
    folder.mkdir(parents=True)
    tensors, psi = {}, {}
    for name, w in base.items():
        if any(k in name for k in ("q_proj", "v_proj", "down_proj")):
            module = name[: -len(".weight")]
            A = 0.1 * torch.randn(r, w.shape[1], generator=gen)
            B = 0.1 * torch.randn(w.shape[0], r, generator=gen)
            tensors[f"{PREFIX}{module}.lora_A.weight"] = A
            tensors[f"{PREFIX}{module}.lora_B.weight"] = B
            psi[name] = (alpha / r) * B.double() @ A.double()
    with SafetensorsShardWriter(folder / "adapter_model.safetensors", tensors, {"format": "pt"}) as w:
        for n, t in tensors.items():
            w.add(n, t)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "base_model_name_or_path": str(folder.parent / "base"), "use_rslora": False, "use_dora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return psi


def expected_merge(base: dict, instruct: dict, psi: dict, alpha: float, beta: float) -> dict:
    out = {}
    for name, t in instruct.items():
        phi = base[name].double()
        theta = t.double()
        rows = phi.shape[0] if phi.dim() else 1
        omega = theta.clone()  # added rows: Θ's rows unscaled
        omega[:rows] = phi + beta * (theta[:rows] - phi) + alpha * psi.get(name, 0)
        out[name] = omega
    return out


def max_error(folder: Path, expected: dict) -> float:
    with Checkpoint.from_folder(folder) as ckpt:
        return max(float((ckpt.read(n).double() - t.to(ckpt.info(n).dtype).double()).abs().max()) for n, t in expected.items())


def run_demo(workdir: str | None = None, quiet: bool = True) -> dict:  # noqa: C901 - a script, read top to bottom
    """Run the pipeline in `workdir` (a temporary folder if None); returns what was done."""
    from .engine.extract import extract
    from .engine.merge import merge

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="stream-readapt-demo-"))
    if workdir and root.exists() and (not root.is_dir() or root.is_symlink() or any(root.iterdir())):
        # the demo writes base/, instruct/ … there: never over what someone else put in it
        raise FileExistsError(f"{root}: --dir must be a new or empty folder (the demo writes its models there)")
    lines = []
    say = lines.append
    try:
        gen = torch.Generator().manual_seed(0)
        base, instruct = make_pair(root, gen)
        psi = make_lora(root / "knowledge-lora", base, gen)
        say(f"built tiny Llama pair in {root}: base ({len(base)} tensors, 2+ shards), instruct (+{ADDED} tokens), LoRA r=8")

        m = extract(root / "base", root / "instruct", root / "readapter", dtype="float32", device="cpu", quiet=quiet)
        rebuilt = max_error(root / "readapter", {n: t.float() - _padded(base[n], t).float() for n, t in instruct.items()})
        say(f"extract: full RE-Adapter, {len(m['tensors'])} tensors, base + Δ == instruct: {rebuilt == 0.0}")

        lore = extract(root / "base", root / "instruct", root / "lore", energy=0.5, device="cpu", quiet=quiet)
        ranks = [mod["rank"] for mod in lore["modules"].values() if "rank" in mod]
        say(f"extract --energy 0.5: LoRE-Adapter with ranks {min(ranks)}..{max(ranks)} per module")

        expected = expected_merge(base, instruct, psi, 0.5, 0.5)
        merge(root / "base", root / "merged", instruct=root / "instruct", knowledge=root / "knowledge-lora", device="cpu", quiet=quiet)
        err = max_error(root / "merged", expected)
        say(f"merge α=β=0.5 (instruct + LoRA): max |Ω − float64 reference| = {err:.2e} (bf16 output)")
        merge(root / "base", root / "merged-from-readapter", readapter=root / "readapter", knowledge=root / "knowledge-lora", device="cpu", quiet=quiet)
        err2 = max_error(root / "merged-from-readapter", expected)
        say(f"merge --readapter (same inputs via the stored Δ): max error {err2:.2e}")
        merge(root / "base", root / "merged-lore", readapter=root / "lore", knowledge=root / "knowledge-lora", device="cpu", quiet=quiet)
        say("merge --readapter lore: readapted model with the low-rank Δ written")
        say(_try_transformers(root / "merged"))
        ok = rebuilt == 0.0 and err < 0.02 and err2 < 0.02
        say("demo " + ("passed" if ok else "FAILED"))
        if not ok:
            raise RuntimeError("demo results disagree with the float64 reference:\n" + "\n".join(lines))
        return {"text": "\n".join(lines), "workdir": str(root), "ok": ok}
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _padded(phi: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Φ with zero rows where the instruct model added vocabulary."""
    if phi.shape == like.shape:
        return phi
    return torch.cat([phi, torch.zeros(like.shape[0] - phi.shape[0], *phi.shape[1:], dtype=phi.dtype)])


def _try_transformers(folder: Path) -> str:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return "transformers not installed: skipped loading the merged model"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    logits = model(torch.tensor([[1, 5, 7, VOCAB + 1]])).logits
    return f"transformers loads the merged model: logits {list(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}"
