"""Readapt a loaded model live: swap its layers for fused Ω = Φ + α·Ψ + β·Δ layers.

`patch_model` reads Δ (a full RE-Adapter or a LoRE-Adapter) and Ψ (a PEFT
LoRA/rsLoRA/DoRA adapter) from disk and replaces the matching `nn.Linear` and
`nn.Embedding` layers of a transformers base model; `set_scales` changes α and β
without reloading. Linear layers run the Triton kernels of
`stream_readapt.live.readapt_linear` on CUDA (their PyTorch references on the
CPU); the merged weight is never materialized. Other parameters (norms, biases)
are small and are recomputed from Φ, Δ and Ψ when the scales change.
"""

from __future__ import annotations

import logging
import math
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.plan import bind_adapter
from ..arch.quirks import plain_linear
from ..arch.roles import table_of_model
from ..arch.table import Role
from ..deltas.sources import FullDelta, open_readapter
from ..engine.streaming import check_scales
from ..io.safetensors_reader import CheckpointError
from ..optional import available, install_hint
from ..terms.dora import dora_row_scale
from ..terms.fold import Terms, merge_terms
from ..terms.peft_adapter import PeftAdapter
from .readapt_linear import (
    fold_lowrank,
    readapt_linear_full,
    readapt_linear_full_ref,
    readapt_linear_lowrank,
    readapt_linear_lowrank_ref,
)

logger = logging.getLogger(__name__)
try:  # GPT-2 style layers: y = x·W + b with W stored [in, out]
    from transformers.pytorch_utils import Conv1D as _CONV1D
except ImportError:  # patch_model takes transformers models, so without it there is no Conv1D to meet
    _CONV1D = ()
BASE_NORM_RTOL = 1e-3  # bf16/fp16 rounding moves a weight's norm by ~1e-5; another base by far more


class ReadaptLinear(nn.Module):
    """y = x·Φᵀ + α·Ψ(x) + β·Δ(x) [+ bias], fused; α and β are live.

    A Conv1D layer (GPT-2: y = x·W + b, W stored [in, out]) is taken as the linear layer of
    Wᵀ: its weight and full terms are used through transposed views (no copy); its low-rank
    factors are already in the linear orientation (PEFT's fan_in_fan_out)."""

    def __init__(self, base: nn.Module, weight_terms: Terms, bias_terms: Terms | None, *, transposed: bool = False,
                 cache: bool = False):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # Φ, under nn.Linear's names
        self.transposed, self.cache = transposed, cache
        self.effective: torch.Tensor | None = None  # Φ + α·Ψ + β·Δ in Φ's dtype, when cached
        self.skinny: tuple[torch.Tensor, torch.Tensor] | None = None  # (downᵀ, up) run beside it
        self.terms, self.bias_terms = weight_terms, bias_terms
        self.dora_scale = self._dora_scale() if weight_terms.magnitude is not None else None
        self.set_scales(0.5, 0.5, build=False)  # patch_model sets the scales it was given next

    def _dora_scale(self) -> torch.Tensor:
        """c = m / ‖Φ + s·B·A‖_row, once at load (PEFT detaches the norm the same way)."""
        A, B, s = self.terms.lora
        return dora_row_scale(self.linear_weight.float() + s * (B.float() @ A.float()), self.terms.magnitude.float())

    @property
    def linear_weight(self) -> torch.Tensor:
        """Φ as an [out, in] linear weight (a view for Conv1D)."""
        return self.weight.T if self.transposed else self.weight

    def set_scales(self, alpha: float, beta: float, *, build: bool = True) -> None:
        t = self.terms
        U, V = t.lore if t.lore else (None, None)
        A, B, s = t.lora if t.lora else (None, None, 1.0)
        self.down, self.up, self.row_scale = fold_lowrank(
            U, None, V, A, B, s, alpha=alpha, beta=beta, magnitude_scale=self.dora_scale, dtype=self.weight.dtype
        )
        self.delta, self.delta_scale = _full_weight_term(t.full, alpha, beta, self.weight.dtype)
        if self.delta is not None and self.transposed:
            self.delta = self.delta.T
        self.bias_eff = _combined_bias(self.bias, self.bias_terms, alpha, beta)
        if self.cache and build:
            self.effective = self._effective_weight()

    # The skinny product (x·down)·upᵀ is folded into the cached weight only when it would cost
    # more than this share of the layer's own matmul per token; below it, it runs beside the
    # matmul in the model's dtype and set_scales never touches the weight.
    FOLD_SHARE = 0.1

    @torch.no_grad()
    def _effective_weight(self) -> torch.Tensor:
        """The weight part of these scales in Φ's dtype, rounded once from fp32 (as `merge` rounds
        it), written over the previous one; Φ itself when no term changes it."""
        phi = self.linear_weight
        n, k = phi.shape
        rank = self.down.shape[1] if self.down is not None else 0
        fold = rank > 0 and rank * (n + k) > self.FOLD_SHARE * n * k
        self.skinny = None if fold or rank == 0 else (self.down.T.to(phi.dtype).contiguous(), self.up.to(phi.dtype))
        if not fold and self.row_scale is None and self.delta is None:
            return phi
        out = self.effective if self.effective is not None and self.effective is not phi else torch.empty_like(phi)
        if not fold and self.row_scale is None:
            # one fused pass (fp32 per element, rounded once): no weight-sized temporary
            return torch.add(phi, self.delta, alpha=float(self.delta_scale), out=out)
        # fp32 throughout: a mixed bf16 + fp32 add_ took 5x longer on the CPU than converting first
        w = phi.to(torch.float32, copy=True)
        if self.row_scale is not None:
            w.mul_(self.row_scale.float()[:, None])
        if fold:
            w.addmm_(self.up.float(), self.down.float().T)
        if self.delta is not None:
            w.add_(self.delta.float(), alpha=float(self.delta_scale))
        return out.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.effective is not None:
            y = F.linear(x, self.effective, self.bias_eff)
            if self.skinny is not None:  # low rank beside the matmul, in the model's dtype
                down, up = self.skinny
                y = y + F.linear(F.linear(x, down), up)
            return y
        row_scale = None if self.row_scale is None else self.row_scale.to(x.device)
        # Triton kernels on CUDA; on the CPU their references (never the slow interpreter).
        full, lowrank = (readapt_linear_full, readapt_linear_lowrank) if x.is_cuda else (readapt_linear_full_ref, readapt_linear_lowrank_ref)
        weight = self.linear_weight
        if self.delta is not None:
            return full(x, weight, self.delta, self.delta_scale, bias=self.bias_eff, row_scale=row_scale,
                        down=self.down, up=self.up)
        if self.down is None:  # only bias terms
            return F.linear(x, weight, self.bias_eff)
        return lowrank(x, weight, self.down, self.up, bias=self.bias_eff, row_scale=row_scale)


class ReadaptEmbedding(nn.Module):
    """Embedding lookup of Φ + α·Ψ + β·Δ, row by row: the merged table is never built.

    Each term goes through the base module's own forward with its table swapped in
    (`torch.func.functional_call`), so whatever that forward does besides the lookup, Gemma's
    √hidden scale or OPT's position offset, applies to Δ and Ψ exactly as to Φ. Low-rank
    terms look up their left factor's rows the same way, then multiply by the right one
    (a lookup followed by a scale commutes with that product)."""

    def __init__(self, base: nn.Embedding, terms: Terms, *, cache: bool = False):
        super().__init__()
        # The base module is held outside the module tree (its weight is ours, registered once),
        # so the patched model's parameters and state_dict keys stay the base model's.
        self._base, self.terms, self.cache = (base,), terms, cache
        self.weight, self.padding_idx = base.weight, base.padding_idx
        self.effective: torch.Tensor | None = None
        self.set_scales(0.5, 0.5, build=False)  # patch_model sets the scales it was given next

    def set_scales(self, alpha: float, beta: float, *, build: bool = True) -> None:
        self.alpha, self.beta = alpha, beta
        if self.cache and build:
            self.effective = self._effective_table()

    @torch.no_grad()
    def _effective_table(self) -> torch.Tensor:
        """Φ + α·Ψ + β·Δ as one table in Φ's dtype (rows past Φ's are not added: see patch_model)."""
        scales = {"alpha": self.alpha, "beta": self.beta}
        if len(self.terms.full) == 1 and self.terms.lore is None and self.terms.lora is None:
            (scale_name, full), = self.terms.full.items()  # a full Δ: one fused pass, rounded once
            out = self.effective if self.effective is not None else torch.empty_like(self.weight)
            return torch.add(self.weight, full.to(self.weight.dtype), alpha=scales[scale_name], out=out)
        table = self.weight.to(torch.float32, copy=True)
        for scale_name, full in self.terms.full.items():
            table.add_(full.float(), alpha=scales[scale_name])
        if self.terms.lore is not None:
            U, V = self.terms.lore
            table.addmm_(U.float(), V.float().T, alpha=self.beta)
        if self.terms.lora is not None:
            A, B, s = self.terms.lora
            table.addmm_(B.float(), A.float(), alpha=self.alpha * s)
        return table.to(self.weight.dtype)

    def _lookup(self, table: torch.Tensor, args, kwargs) -> torch.Tensor:
        return torch.func.functional_call(self._base[0], {"weight": table}, args, kwargs).float()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.effective is not None:
            return torch.func.functional_call(self._base[0], {"weight": self.effective}, args, kwargs)
        out = self._base[0](*args, **kwargs).float()
        for scale_name, full in self.terms.full.items():
            out += getattr(self, scale_name) * self._lookup(full, args, kwargs)
        if self.terms.lore is not None:  # Δ rows = U[ids]·Vᵀ
            U, V = self.terms.lore
            out += self.beta * self._lookup(U, args, kwargs) @ V.float().T
        if self.terms.lora is not None:  # Ψ rows = s·B[ids]·A (factors already in row orientation)
            A, B, s = self.terms.lora
            out += (self.alpha * s) * self._lookup(B, args, kwargs) @ A.float()
        return out.to(self.weight.dtype)


def _full_weight_term(full: dict[str, torch.Tensor], alpha: float, beta: float, dtype):
    """(tensor, scale) for the fused full-rank kernel, which scales the tensor in fp32 registers.

    One stored tensor (the usual case: a full RE-Adapter's Δ) is passed as it is, so a layer
    holds no second weight-sized copy and `set_scales` costs nothing; two (Δ and a saved
    weight's Ψ on the same layer) are combined, at (1, 1)."""
    if len(full) == 1:
        (name, tensor), = full.items()
        return tensor, {"alpha": alpha, "beta": beta}[name]
    return _combine(full, alpha, beta, dtype), 1.0


def _combine(full: dict[str, torch.Tensor], alpha: float, beta: float, dtype) -> torch.Tensor | None:
    if not full:
        return None
    scales = {"alpha": alpha, "beta": beta}
    return sum(scales[k] * v.float() for k, v in full.items()).to(dtype)


def _combined_bias(base_bias, terms: Terms | None, alpha: float, beta: float):
    if terms is None or not terms.full:
        return None if base_bias is None else base_bias.detach()
    extra = _combine(terms.full, alpha, beta, torch.float32)
    start = base_bias.float() if base_bias is not None else 0
    return (start + extra).to(extra.dtype if base_bias is None else base_bias.dtype)


# ----------------------------------------------------------------------------- loading


def _saved_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers a checkpoint holds (DeepSeek's router `e_score_correction_bias`), not derived ones."""
    saved = set(model.state_dict())
    return {n: b for n, b in model.named_buffers() if n in saved}


class LoadedBase:
    """A loaded model seen as a checkpoint (names, shapes, config), so the adapters' own base
    checks (`plan`, `check_base`: every tensor has a counterpart of a fitting shape) run on it.

    Names are checkpoint keys, as the readapters store them (transformers renames some at load:
    GPT-NeoX's `embed_out` is `lm_head` in memory); `role_table` maps them to parameters. A tied
    head is left out, as a tied checkpoint leaves it out."""

    def __init__(self, model: nn.Module):
        params = {**_saved_buffers(model), **dict(model.named_parameters(remove_duplicate=False))}
        self.role_table = table_of_model(model)
        self.params = {r.key: params[r.param] for r in self.role_table.roles.values()
                       if r.param in params and not r.tied_to}
        self.names = list(self.params)
        self.config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
        self.source = f"{type(model).__name__} (loaded model)"
        self.name_or_path = str(getattr(model, "name_or_path", "") or "")  # where transformers loaded it from

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def info(self, name: str) -> SimpleNamespace:
        p = self.params[name]
        return SimpleNamespace(shape=tuple(p.shape), dtype=p.dtype)


def load_terms(model: nn.Module, readapter=None, knowledge=None, *, ignore_base_mismatch=False) -> dict[str, Terms]:
    """Everything the readapter (Δ, scale β) and the knowledge adapter (Ψ, scale α) add, per parameter.

    Raises CheckpointError, before anything is loaded, when an adapter does not fit the model:
    a tensor or target module it lacks, a shape that differs, or (unless `ignore_base_mismatch`)
    a readapter whose recorded base weight norms are not this model's.
    """
    base = LoadedBase(model)
    params = base.params
    device = next(model.parameters()).device
    terms: dict[str, Terms] = {}
    if readapter is not None:
        delta = open_readapter(readapter)
        try:
            _plan_readapter(delta, base)
            _check_base_norms(delta, base, ignore_base_mismatch)
            merge_terms(terms, delta.fold(params, device))
        finally:
            delta.close()
    if knowledge is not None:
        psi = PeftAdapter(knowledge)
        try:
            bind_adapter(psi, base)
            merge_terms(terms, psi.fold(params, device, scale="alpha"))
        finally:
            psi.close()
    return {base.role_table.param_of(key): t for key, t in terms.items()}  # by the model's own names


def _plan_readapter(delta, base: LoadedBase) -> None:
    """The readapter's plan against the loaded model. Per-expert checkpoint tensors have no
    counterpart in a model that fuses its experts at load: say what does work."""
    try:
        delta.plan(base)
    except CheckpointError as e:
        experts = any(r.role is Role.EXPERTS for r in base.role_table.roles.values())
        if not (experts and isinstance(delta, FullDelta)):
            raise
        raise CheckpointError(f"{e}; this model fuses its experts at load, so patch_model takes their Δ from a "
                              "LoRE-Adapter (extract --energy/--max-error), or merge a checkpoint") from None


def recorded_base_norms(manifest: dict | None) -> dict[str, float]:
    """‖Φ‖ per base parameter, as `extract` recorded it (older manifests: ‖Δ‖ / (‖Δ‖/‖Φ‖))."""
    manifest = manifest or {}
    norms = {}
    for name, rec in manifest.get("tensors", {}).items():  # full RE-Adapter
        if "base_norm" in rec:
            norms[name] = rec["base_norm"]
        elif isinstance(rec.get("rel_norm"), float) and 0 < rec["rel_norm"] < float("inf"):
            norms[name] = rec["norm"] / rec["rel_norm"]
    for module, rec in manifest.get("modules", {}).items():  # LoRE-Adapter: its low-rank modules
        if "base_norm" in rec:
            norms[f"{module}.weight"] = rec["base_norm"]
    return norms


def _norm(t: torch.Tensor, chunk: int = 2**22) -> float:
    """‖t‖ in float64, chunk by chunk: torch's float32 vector_norm on the CPU drifted 0.6% on a
    32000×2048 bf16 embedding (160.967 vs 161.911), which read as "another base"."""
    flat = t.detach().reshape(-1)
    return math.sqrt(sum(float(flat[i:i + chunk].double().square().sum()) for i in range(0, flat.numel(), chunk)))


def _check_base_norms(delta, base: LoadedBase, ignore: bool) -> None:
    """Same names and shapes are not the same model (a Llama and a Qwen of one size match):
    compare the weight norms the readapter recorded with the loaded model's."""
    for name, want in recorded_base_norms(delta.manifest).items():
        name = name if name in base else base.role_table.key_of(name)  # LoRE records PEFT's names
        if name not in base:
            continue
        got = _norm(base.params[name])
        if abs(got - want) > BASE_NORM_RTOL * max(want, 1e-30):
            msg = (f"{delta.folder}: RE-Adapter was extracted from another base than {base.source} "
                   f"(‖{name}‖ is {got:.6g}, recorded {want:.6g})")
            if not ignore:
                raise CheckpointError(msg + "; pass ignore_base_mismatch=True to go on")
            logger.warning(msg)
            return


# ----------------------------------------------------------------------------- patching


def _warn_without_kernels(model: nn.Module) -> None:
    """On CUDA without Triton the layers run the PyTorch references: right, but slower."""
    if any(p.is_cuda for p in model.parameters()) and not available("triton"):
        logger.warning("triton is not installed: patched layers run the PyTorch references on CUDA "
                       "(%s for the fused kernels)", install_hint("triton"))


def _refuse_quantized_layers(model: nn.Module) -> None:
    """Layers that keep quantized weights (transformers' FP8Linear on a GPU, bitsandbytes, GPTQ …)
    have no float weight to readapt: load the base dequantized instead."""
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.int8, torch.int32) and p.dim() >= 2:
            raise ValueError(f"{name} is stored quantized ({str(p.dtype).replace('torch.', '')}, in "
                             f"{type(model.get_submodule(name.rpartition('.')[0])).__name__}): patch_model readapts float "
                             "weights; load the base dequantized (e.g. quantization_config=FineGrainedFP8Config("
                             "dequantize=True) or Mxfp4Config(dequantize=True)) and patch that")


def patch_model(
    model: nn.Module,
    readapter: str | os.PathLike | None = None,
    knowledge: str | os.PathLike | None = None,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    ignore_base_mismatch: bool = False,
    cache_weights: bool | None = None,
) -> nn.Module:
    """Swap `model`'s layers for readapted ones (in place); returns the model.

    Args:
        model: a loaded transformers base model Φ (any dtype/device).
        readapter: a full RE-Adapter or LoRE-Adapter folder from `extract` (Δ).
        knowledge: a PEFT LoRA/rsLoRA/DoRA folder trained on the base (Ψ).
        alpha, beta: initial scales; change them later with `set_scales`.
        ignore_base_mismatch: patch even if the readapter's recorded base weight norms are
            not this model's (by default a CheckpointError: it was made for another base).
        cache_weights: each layer forms its weight Φ + β·Δ (+ high-rank terms) once per
            `set_scales` in the model's dtype and runs low ranks beside one plain matmul (the merged
            checkpoint's speed, for one more weight per layer with a full Δ). None (default): cached
            unless the fused Triton kernels run (CUDA with triton), which apply the terms on the fly
            with no extra weight.

    Rows the instruct model added to the vocabulary are not added here: the
    patched model keeps the base vocabulary (merge a checkpoint to get them).

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("base", dtype=torch.bfloat16, device_map="cuda")
        >>> patch_model(model, readapter="lore", knowledge="lora")
        >>> set_scales(model, alpha=0.3, beta=0.7)
    """
    check_scales(alpha=alpha, beta=beta)
    if _is_patched(model):
        raise ValueError("model is already patched: change α and β with set_scales, or patch a freshly loaded base")
    _refuse_quantized_layers(model)
    if cache_weights is None:
        cache_weights = not (next(model.parameters()).is_cuda and available("triton"))
    if not cache_weights:
        _warn_without_kernels(model)
    terms = load_terms(model, readapter, knowledge, ignore_base_mismatch=ignore_base_mismatch)
    _tie_lm_head(model, terms)
    layers, applied = [], set()
    for name, module in list(model.named_modules()):
        weight_terms = terms.get(f"{name}.weight")
        bias_terms = terms.get(f"{name}.bias")
        is_conv1d = isinstance(module, _CONV1D)
        if (plain_linear(module) or is_conv1d) and (weight_terms or bias_terms):
            layers.append((name, ReadaptLinear(module, weight_terms or Terms(), bias_terms, transposed=is_conv1d,
                                               cache=cache_weights)))
            applied |= {f"{name}.weight", f"{name}.bias"}
        elif isinstance(module, nn.Embedding) and weight_terms:
            layers.append((name, ReadaptEmbedding(module, weight_terms, cache=cache_weights)))
            applied.add(f"{name}.weight")
    _check_all_applied(model, terms, applied)  # before the model is touched: a refusal leaves it as it was
    for name, layer in layers:
        _replace(model, name, layer)
    _patch_other_params(model, terms)
    set_scales(model, alpha, beta)
    return model


def _check_all_applied(model: nn.Module, terms: dict[str, Terms], applied: set[str]) -> None:
    """Every term lands somewhere: a readapted layer, or a parameter rewritten per scale (full
    terms of parameters and saved buffers). Anything else would be dropped without a word."""
    rewritable = {n for n, _ in [*model.named_parameters(), *_saved_buffers(model).items()]}
    left = sorted(name for name, t in terms.items()
                  if name not in applied and not (t.full and not (t.lore or t.lora) and name in rewritable))
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise CheckpointError(f"{left[0]}{more}: the adapters change it, but patch_model has no layer or parameter of "
                              f"this {type(model).__name__} to apply that to; merge a checkpoint instead")


def _tie_lm_head(model: nn.Module, terms: dict[str, Terms]) -> None:
    """A tied lm_head reads the embedding: it gets the embedding's terms unless it has its own."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if out is None or inp is None or id(out) not in names:
        return
    emb, head = f"{names[id(inp)]}.weight", f"{names[id(out)]}.weight"
    if emb in terms and head not in terms:
        terms[head] = terms[emb]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


class _ParamReadapter:
    """Norm weights and other small parameters: Φ kept aside, the parameter rewritten per scale."""

    def __init__(self, param: nn.Parameter, terms: Terms):
        self.param, self.phi, self.terms = param, param.detach().clone(), terms

    def set_scales(self, alpha: float, beta: float) -> None:
        with torch.no_grad():
            self.param.copy_(self.phi.float() + _combine(self.terms.full, alpha, beta, torch.float32))


def _patch_other_params(model: nn.Module, terms: dict[str, Terms]) -> None:
    handled = {id(p) for m in model.modules() if isinstance(m, (ReadaptLinear, ReadaptEmbedding)) for p in m.parameters()}
    keepers = []
    for name, param in [*model.named_parameters(), *_saved_buffers(model).items()]:
        t = terms.get(name)
        if t is not None and t.full and id(param) not in handled:
            keepers.append(_ParamReadapter(param, t))
    model._readapt_params = keepers  # a plain list: no new parameters or state_dict keys


def _is_patched(model: nn.Module) -> bool:
    return hasattr(model, "_readapt_params") or any(
        isinstance(m, (ReadaptLinear, ReadaptEmbedding)) for m in model.modules())


def set_scales(model: nn.Module, alpha: float, beta: float) -> None:
    """Change α and β of a model patched by `patch_model`, without reloading anything."""
    check_scales(alpha=alpha, beta=beta)
    layers = [m for m in model.modules() if isinstance(m, (ReadaptLinear, ReadaptEmbedding))]
    layers += getattr(model, "_readapt_params", [])
    for layer in layers:
        layer.set_scales(alpha, beta)
    if not layers:
        raise ValueError("model has no readapted layers: call patch_model first")
