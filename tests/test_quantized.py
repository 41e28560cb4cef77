"""Quantized inputs: fine-grained FP8 and 8-bit compressed-tensors read as float32, a row block
at a time, against transformers' and compressed-tensors' own dequantization (and float64)."""

from __future__ import annotations

import json

import pytest
import torch

import fixtures_models as fm
import fixtures_quant as fq
from stream_readapt import extract, merge
from stream_readapt.cli import main
from stream_readapt.io.checkpoint import Checkpoint
from stream_readapt.io.quantized import DequantizedCheckpoint

pytest.importorskip("transformers")

EDGE = (24, 40)  # divides none of the tiny model's sizes: edge blocks on both axes


@pytest.fixture(scope="module")
def fp8_pair(llama_pair, tmp_path_factory):
    """llama_pair in fine-grained FP8, 16×16 blocks (what transformers' own dequantizer accepts)."""
    root = tmp_path_factory.mktemp("fp8")
    return fm.ModelPair(fq.fp8_blocks_copy(llama_pair.base, root / "base", (16, 16)),
                        fq.fp8_blocks_copy(llama_pair.instruct, root / "instruct", (16, 16)))


@pytest.fixture(scope="module")
def deq(fp8_pair):
    """transformers' FineGrainedFP8Config(dequantize=True) weights of the pair, float32."""
    return fq.transformers_dequantized(fp8_pair.base), fq.transformers_dequantized(fp8_pair.instruct)


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _float64_dequantized(folder, name, scale_suffix, block) -> torch.Tensor:
    """value · scale of its block, in float64, from the raw file (expanded, not broadcast)."""
    raw = fm.load_state_dict(folder)
    q, s = raw[name].double(), raw[name[: -len("weight")] + scale_suffix].double()
    rows, cols = q.shape
    bn, bk = min(block[0], rows), min(block[1], cols)
    s = s.reshape(-1, 1) if s.dim() < 2 else s
    return q * s.repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols] if s.numel() > 1 else q * s.item()


def test_fp8_reads_as_transformers_dequantizes_it(fp8_pair, deq):
    with Checkpoint.from_folder(fp8_pair.base) as ckpt:
        assert isinstance(ckpt, DequantizedCheckpoint)
        assert not any("scale" in n for n in ckpt.names)  # scales are never tensors of their own
        assert set(ckpt.names) == {n for n in fm.checkpoint_keys(fp8_pair.base) if not n.endswith("_scale_inv")}
        for name in ckpt.names:
            assert torch.equal(ckpt.read(name), deq[0][name]), name
            rows = ckpt.info(name).shape[0]
            blocks = [ckpt.read_rows(name, a, min(a + 7, rows)) for a in range(0, rows, 7)]  # not on the grid
            assert torch.equal(torch.cat(blocks), deq[0][name]), name


def test_fp8_edge_blocks_read_exactly(llama_pair, tmp_path):
    folder = fq.fp8_blocks_copy(llama_pair.base, tmp_path / "edge", EDGE)
    with Checkpoint.from_folder(folder) as ckpt:
        quantized = [n for n in ckpt.names if ckpt.quantized(n)]
        assert quantized
        for name in quantized:
            want = _float64_dequantized(folder, name, "weight_scale_inv", EDGE)
            got = torch.cat([ckpt.read_rows(name, a, a + 10) for a in range(0, ckpt.info(name).shape[0], 10)])
            assert torch.equal(got.double(), want.float().double()), name  # one float32 rounding of the product


@pytest.mark.parametrize("kind,strategy", [("float", "channel"), ("float", "tensor"), ("int", "channel"),
                                           ("int", "group")])
def test_compressed_tensors_read_as_compressed_tensors_dequantizes(llama_pair, tmp_path, kind, strategy):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    folder = fq.compressed_copy(llama_pair.base, tmp_path / "ct", kind=kind, strategy=strategy)
    args = QuantizationArgs(**json.loads((folder / "config.json").read_text())["quantization_config"]
                            ["config_groups"]["group_0"]["weights"])
    raw = fm.load_state_dict(folder)
    with Checkpoint.from_folder(folder) as ckpt:
        quantized = [n for n in ckpt.names if ckpt.quantized(n)]
        assert quantized and ct is not None
        for name in quantized:
            want = dequantize(raw[name], raw[name[: -len("weight")] + "weight_scale"], args=args, dtype=torch.float32)
            torch.testing.assert_close(ckpt.read_rows(name, 3, 40), want[3:40], rtol=0, atol=0)


def test_extract_from_fp8_is_the_difference_of_the_dequantized_models(fp8_pair, deq, tmp_path):
    extract(fp8_pair.base, fp8_pair.instruct, tmp_path / "full", dtype="float32")
    delta = _tensors(tmp_path / "full")
    phi, theta = deq
    assert set(delta) == {n for n in fm.checkpoint_keys(fp8_pair.instruct) if not n.endswith("_scale_inv")}
    for name, d in delta.items():
        assert torch.equal(d, theta[name] - phi[name]), name
    assert "quantization_config" not in json.loads((tmp_path / "full" / "config.json").read_text())


def test_extract_defaults_to_bfloat16_for_quantized_inputs(fp8_pair, tmp_path):
    extract(fp8_pair.base, fp8_pair.instruct, tmp_path / "full")
    assert {t.dtype for t in _tensors(tmp_path / "full").values()} == {torch.bfloat16}


def test_merge_of_fp8_pair_matches_float64_and_loads_in_transformers(fp8_pair, deq, lora_adapter, llama_pair, tmp_path):
    """Ω = Φ + α·Ψ + β·Δ over the dequantized weights; the result is a plain checkpoint."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    merge(fp8_pair.base, out, instruct=fp8_pair.instruct, knowledge=lora_adapter, dtype="float32")
    plain = {k: v.double() for k, v in fm.load_state_dict(llama_pair.base).items()}
    psi = {k: v.double() - plain[k] for k, v in fm.peft_merged_state_dict(llama_pair.base, lora_adapter,
                                                                            dtype=torch.float64).items()}
    phi, theta = deq
    got = fm.load_state_dict(out)
    for name, w in got.items():
        want = phi[name].double() + 0.5 * psi[name] + 0.5 * (theta[name].double() - phi[name].double())
        torch.testing.assert_close(w.double(), want, rtol=0, atol=2e-7 * float(want.abs().max()) + 1e-12)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()  # a plain checkpoint
    assert all(torch.equal(loaded[name], w) for name, w in got.items())


def test_lore_of_fp8_pair_loads_in_peft_on_the_dequantized_base(fp8_pair, deq, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    manifest = extract(fp8_pair.base, fp8_pair.instruct, tmp_path / "lore", rank=8)
    factors = fm.load_state_dict(tmp_path / "lore")
    assert {t.dtype for t in factors.values()} == {torch.bfloat16}  # a normal bf16 adapter
    base = AutoModelForCausalLM.from_pretrained(fp8_pair.base, dtype=torch.float32,
                                                quantization_config=FineGrainedFP8Config(dequantize=True))
    merged = PeftModel.from_pretrained(base, str(tmp_path / "lore")).merge_and_unload().state_dict()
    phi, theta = deq
    for module, rec in manifest["modules"].items():
        name = module + ".weight"
        if rec.get("rank") is None or name not in phi:
            continue
        true = theta[name].double() - phi[name].double()
        err = float((merged[name].double() - phi[name].double() - true).norm() / true.norm())
        assert err <= rec["rel_error"] + 2e-2, (name, err, rec["rel_error"])


def _requantize_reference(w: torch.Tensor, block) -> torch.Tensor:
    """The same recipe (block amax / 448, round to nearest), from the fixture's quantizer, dequantized."""
    q, scale = fq.quantize_blocks(w.float(), block)
    rows, cols = w.shape
    bn, bk = min(block[0], rows), min(block[1], cols)
    return q.double() * scale.double().repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]


@pytest.mark.parametrize("block", [(16, 16), EDGE])
def test_merge_keeps_the_fp8_format_with_fresh_scales(llama_pair, lora_adapter, tmp_path, block):
    """Default merge of an FP8 pair: FP8 blocks out (scales after their weights, in their shard),
    the instruct config's quantization_config kept; dequantized, within the recipe's own error
    of the float64 Ω, and as close as the recipe applied to the exact Ω gets."""
    base = fq.fp8_blocks_copy(llama_pair.base, tmp_path / "base", block)
    instruct = fq.fp8_blocks_copy(llama_pair.instruct, tmp_path / "instruct", block)
    out = tmp_path / "merged"
    manifest = merge(base, out, instruct=instruct, knowledge=lora_adapter)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == list(block)
    raw = fm.load_state_dict(out)
    assert set(raw) == set(fm.checkpoint_keys(instruct))  # every weight and every scale, nothing else
    assert list(raw).index("model.layers.0.self_attn.q_proj.weight_scale_inv") > 0
    with Checkpoint.from_folder(base) as phi_ckpt, Checkpoint.from_folder(instruct) as theta_ckpt, \
            Checkpoint.from_folder(out) as omega:
        plain = {k: v.double() for k, v in fm.load_state_dict(llama_pair.base).items()}
        psi = {k: v.double() - plain[k] for k, v in fm.peft_merged_state_dict(llama_pair.base, lora_adapter,
                                                                                dtype=torch.float64).items()}
        for name in omega.names:
            phi, theta = phi_ckpt.read(name).double(), theta_ckpt.read(name).double()
            want = phi + 0.5 * psi[name] + 0.5 * (theta - phi)
            got = omega.read(name).double()
            if not omega.quantized(name):
                torch.testing.assert_close(got, want, rtol=0, atol=2e-7 * float(want.abs().max()))
                continue
            assert raw[name].dtype == torch.float8_e4m3fn
            err = float((got - want).norm() / want.norm())
            best = float((_requantize_reference(want, block) - want).norm() / want.norm())
            assert err <= best * 1.02 + 1e-6, (name, err, best)
            assert manifest["tensors"][name]["requant_rel_error"] == pytest.approx(err, rel=1e-2)
    if block == (16, 16):  # transformers dequantizes only grid-divisible shapes
        loaded = fq.transformers_dequantized(out)
        with Checkpoint.from_folder(out) as omega:
            assert all(torch.equal(loaded[n], omega.read(n)) for n in omega.names)


def test_merge_keeps_compressed_tensors_int8_channels(llama_pair, tmp_path):
    pytest.importorskip("compressed_tensors")
    base = fq.compressed_copy(llama_pair.base, tmp_path / "base", kind="int", strategy="channel")
    instruct = fq.compressed_copy(llama_pair.instruct, tmp_path / "instruct", kind="int", strategy="channel")
    merge(base, tmp_path / "merged", instruct=instruct, beta=1.0, alpha=0.0)
    raw = fm.load_state_dict(tmp_path / "merged")
    theta = fm.load_state_dict(instruct)
    name = "model.layers.1.mlp.down_proj.weight"
    assert raw[name].dtype == torch.int8
    # β = 1, α = 0: Ω = Θ, so requantizing Θ's own int8 channels gives them back exactly
    assert torch.equal(raw[name], theta[name])
    torch.testing.assert_close(raw["model.layers.1.mlp.down_proj.weight_scale"],
                               theta["model.layers.1.mlp.down_proj.weight_scale"], rtol=1e-6, atol=0)


def test_merge_with_dtype_writes_a_plain_checkpoint(fp8_pair, tmp_path):
    merge(fp8_pair.base, tmp_path / "m", instruct=fp8_pair.instruct, dtype="bfloat16")
    assert {t.dtype for t in fm.load_state_dict(tmp_path / "m").values()} == {torch.bfloat16}
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())


def test_per_tensor_scales_are_not_written_back_but_refused_in_one_line(llama_pair, tmp_path, capsys):
    base = fq.compressed_copy(llama_pair.base, tmp_path / "base", strategy="tensor")
    instruct = fq.compressed_copy(llama_pair.instruct, tmp_path / "instruct", strategy="tensor")
    rc = main(["merge", str(base), "--instruct", str(instruct), "-o", str(tmp_path / "m"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "--dtype bfloat16" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("config", [
    {"quant_method": "gptq", "bits": 4},
    {"quant_method": "awq", "bits": 4},
    {"quant_method": "bitsandbytes", "load_in_4bit": True},
    {"quant_method": "fbgemm_fp8"},
    {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}},
    {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {}},
    {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
])
def test_other_quantization_methods_are_refused_naming_method_and_fix(llama_pair, tmp_path, capsys, config):
    folder = tmp_path / "q"
    folder.mkdir()
    for f in llama_pair.base.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = config
    (folder / "config.json").write_text(json.dumps(cfg))
    rc = main(["extract", str(folder), str(llama_pair.instruct), "-o", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "dequantize it first" in err
    assert repr(config["quant_method"]) in err or repr(config.get("format")) in err or "ue8m0" in err
    assert not (tmp_path / "out").exists()


def test_scale_of_the_wrong_shape_is_named(llama_pair, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = fq.fp8_blocks_copy(llama_pair.base, tmp_path / "bad", (16, 16))
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    tensors[key] = tensors[key][:2]
    save_file(tensors, folder / "model.safetensors")
    rc = main(["extract", str(folder), str(llama_pair.instruct), "-o", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and key in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def mxfp4_pair(tmp_path_factory):
    """A tiny gpt-oss pair with its experts in MXFP4: (base, instruct, base_mxfp4, instruct_mxfp4)."""
    return fq.build_mxfp4_pair(tmp_path_factory.mktemp("mxfp4"))


def test_mxfp4_experts_read_as_transformers_dequantizes_them(mxfp4_pair):
    want = fq.transformers_mxfp4_dequantized(mxfp4_pair[2])
    with Checkpoint.from_folder(mxfp4_pair[2]) as ckpt:
        assert set(ckpt.names) == set(want)  # `<param>_blocks` / `_scales` served as `<param>`
        experts = [n for n in ckpt.names if ckpt.quantized(n)]
        assert len(experts) == 4
        for name in ckpt.names:
            assert torch.equal(ckpt.read(name), want[name]), name
            if name in experts:  # rows are experts
                assert torch.equal(torch.cat([ckpt.read_rows(name, e, e + 1) for e in range(4)]), want[name])


def test_extract_and_merge_of_an_mxfp4_pair(mxfp4_pair, tmp_path, capsys):
    base, instruct = mxfp4_pair[2], mxfp4_pair[3]
    phi, theta = fq.transformers_mxfp4_dequantized(base), fq.transformers_mxfp4_dequantized(instruct)
    extract(base, instruct, tmp_path / "full", dtype="float32")
    for name, d in _tensors(tmp_path / "full").items():
        assert torch.equal(d, theta[name] - phi[name]), name
    capsys.readouterr()  # the reference loads' progress bars
    rc = main(["merge", str(base), "--instruct", str(instruct), "-o", str(tmp_path / "m"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "MXFP4" in err and "--dtype bfloat16" in err and len(err.splitlines()) == 1
    assert not any(tmp_path.glob("*m*partial*")) and not (tmp_path / "m").exists()
    merge(base, tmp_path / "m", instruct=instruct, dtype="float32", alpha=0.0, beta=1.0)
    got = fm.load_state_dict(tmp_path / "m")
    assert all(torch.equal(got[n], theta[n]) for n in theta)  # Ω = Θ at β = 1: the dequantized instruct


def _fused(state: dict, key: str) -> torch.Tensor:
    """A DeepSeek per-expert checkpoint key's rows in transformers' fused parameters."""
    layer, _, rest = key.partition(".mlp.experts.")
    if not rest:
        return state[key]
    expert, proj = rest.split(".")[:2]
    e = int(expert)
    if proj == "down_proj":
        return state[f"{layer}.mlp.experts.down_proj"][e]
    fused = state[f"{layer}.mlp.experts.gate_up_proj"][e]
    half = fused.shape[0] // 2
    return fused[:half] if proj == "gate_proj" else fused[half:]


def test_deepseek_v3_moe_in_fp8_blocks(tmp_path):
    """DeepSeek-V3's layout: per-expert FP8 matrices with their own scales, MLA projections, a
    bf16 router; extract, LoRE (experts by target_parameters) and a format-keeping merge."""
    import fixtures_moe
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    pair = fixtures_moe.build_moe_pair("deepseek_v3", tmp_path / "plain")
    base = fq.fp8_blocks_copy(pair.base, tmp_path / "base", (8, 8))
    instruct = fq.fp8_blocks_copy(pair.instruct, tmp_path / "instruct", (8, 8))
    phi, theta = fq.transformers_dequantized(base), fq.transformers_dequantized(instruct)
    extract(base, instruct, tmp_path / "full", dtype="float32")
    delta = _tensors(tmp_path / "full")
    assert any(".experts.3.up_proj." in k for k in delta)
    for key, d in delta.items():
        assert torch.equal(d, _fused(theta, key) - _fused(phi, key)), key

    manifest = extract(base, instruct, tmp_path / "lore", rank=6)
    config = json.loads((tmp_path / "lore" / "adapter_config.json").read_text())
    assert config.get("target_parameters")  # the experts, as PEFT reaches them
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                 quantization_config=FineGrainedFP8Config(dequantize=True))
    merged = PeftModel.from_pretrained(model, str(tmp_path / "lore")).merge_and_unload().state_dict()
    for param, rec in manifest["modules"].items():
        name = param if param in phi else param + ".weight"
        if name in phi and rec.get("rank"):
            true = theta[name].double() - phi[name].double()
            err = float((merged[name].double() - phi[name].double() - true).norm() / true.norm())
            assert err <= rec["rel_error"] + 2e-2, (name, err, rec["rel_error"])

    manifest = merge(base, tmp_path / "merged", instruct=instruct)
    assert manifest["format"].startswith("fine-grained FP8")
    omega = fq.transformers_dequantized(tmp_path / "merged")
    for name, want_phi in phi.items():
        want = 0.5 * (want_phi.double() + theta[name].double())
        err = float((omega[name].double() - want).norm() / max(float(want.norm()), 1e-30))
        assert err < 0.05, (name, err)  # FP8's own rounding where requantized; float32 elsewhere


def test_patch_model_on_the_dequantized_fp8_base_matches_the_merge(fp8_pair, tmp_path):
    """Live readaptation of a base loaded with transformers' own FP8 dequantization equals the
    streaming merge (as float32) of the same FP8 pair and LoRE-Adapter."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from stream_readapt import patch_model, set_scales

    extract(fp8_pair.base, fp8_pair.instruct, tmp_path / "lore", rank=8, dtype="float32")
    merge(fp8_pair.base, tmp_path / "merged", readapter=tmp_path / "lore", alpha=0.0, beta=0.7, dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(fp8_pair.base, dtype=torch.float32,
                                                 quantization_config=FineGrainedFP8Config(dequantize=True))
    patch_model(model, readapter=tmp_path / "lore", alpha=0.0, beta=0.3)
    set_scales(model, alpha=0.0, beta=0.7)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        live = model(ids).logits
    torch.testing.assert_close(live, fm.logits(tmp_path / "merged", ids), rtol=1e-4, atol=1e-4)


def test_patch_model_refuses_layers_that_keep_quantized_weights(llama_pair):
    from transformers import AutoModelForCausalLM

    from stream_readapt import patch_model

    model = AutoModelForCausalLM.from_pretrained(llama_pair.base, dtype=torch.float32)
    layer = model.model.layers[0].mlp.down_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ValueError, match=r"down_proj.weight is stored quantized \(float8_e4m3fn.*dequantize=True"):
        patch_model(model, readapter=None, knowledge=None)


def test_inspect_shows_the_quantized_format(fp8_pair, capsys):
    assert main(["inspect", str(fp8_pair.base)]) == 0
    out = capsys.readouterr().out
    assert "quantized: fine-grained FP8, 16×16 blocks, 14 tensors" in out
    assert "F8_E4M3: 14 tensors" in out
