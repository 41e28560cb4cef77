"""PEFT LoRA / rsLoRA / DoRA adapters as weight deltas, a row block at a time.

Saved tensor names (PEFT 0.13 - 0.21), after the `base_model.model.` prefix:
  `<module>.lora_A.weight` [r, in], `<module>.lora_B.weight` [out, r], `<module>.lora_B.bias`
  `<module>.lora_embedding_A` [r, vocab], `<module>.lora_embedding_B` [dim, r]
  `<module>.lora_magnitude_vector` [out] (DoRA)
  `<module>.base_layer.weight` (embedding layers saved with the adapter) and
  `<module>.weight` (modules_to_save): full replacement weights.
Scaling follows PEFT exactly: s = alpha / r (rsLoRA: alpha / sqrt(r)), with alpha
from the first `alpha_pattern` key matching the end of the module name.
The config must agree with the tensors as PEFT's loader would demand: each module's rank
(`rank_pattern` / `r`) is its factors' rank, `use_dora` iff magnitude vectors, and a
`lora_B.bias` only where the base layer has a bias.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch.naming import NameMap
from ..arch.plan import check_float
from ..engine.streaming import is_finite_number
from ..io.checkpoint import Checkpoint
from ..io.jsonfile import load_json_object
from ..io.safetensors_reader import CheckpointError
from ..peft_format.adapter_checks import refuse_unsupported, warn_on_contradictions
from ..peft_format.format import PREFIX, lora_scaling, pattern_key
from ..peft_format.targets import adapts_module
from .dora import dora_delta_rows
from .experts import ExpertLoras, take_param_loras
from .fold import adapter_terms

PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}  # LoraConfig's defaults: what PEFT uses when a key is absent
logger = logging.getLogger(__name__)
_LORA_SUFFIX = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
    r"lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$"
)


@dataclass
class LoraModule:
    """One adapted module: where its factors are and how they scale."""

    module: str
    A: str | None = None
    B: str | None = None
    bias: str | None = None
    magnitude: str | None = None
    embedding: bool = False
    transposed: bool = False  # the base layer stores its weight [in, out] (GPT-2 Conv1D)
    scale: float = 1.0

    @property
    def by_columns(self) -> bool:
        """Ψ = s·(B·A)ᵀ against the stored base weight: its rows are columns of A."""
        return self.embedding or self.transposed

    @property
    def target(self) -> str:
        return f"{self.module}.weight"


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_rank(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


class PeftAdapter:
    """A PEFT LoRA adapter folder, read lazily from its safetensors file."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.config = self._read_config()
        self.ckpt = Checkpoint.from_folder(self.folder)
        self.source = str(folder)
        self.modules: dict[str, LoraModule] = {}
        self.replacements: dict[str, str] = {}  # base tensor name -> adapter tensor name
        for key in self.ckpt.names:
            self._classify(key)
        self.param_loras = take_param_loras(self.config, self.modules)  # target_parameters (experts)
        self._drop_unadapted()
        self.experts: ExpertLoras | None = None  # bound to a base by check_base
        for mod in self.modules.values():
            self._finish(mod)
        self._cache: tuple[str, dict] | None = None
        self._by_base: dict[str, LoraModule] | None = None  # by base module key, once check_base bound it

    def _read_config(self) -> dict:
        path = self.folder / "adapter_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder}: no adapter_config.json (not a PEFT adapter folder)")
        config = load_json_object(path)
        self._check_config_types(path, config)
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{path}: peft_type {config['peft_type']!r} is not supported (only LORA/DoRA)")
        refuse_unsupported(path, config)
        return config

    @staticmethod
    def _check_config_types(path: Path, config: dict) -> None:
        """Flags and patterns of the wrong type would be read as something else (a string "false" is true)."""
        for field in ("use_dora", "use_rslora", "lora_bias"):
            if config.get(field) is not None and not isinstance(config[field], bool):
                raise CheckpointError(f"{path}: {field} must be true or false, got {config[field]!r}")
        for field in ("target_modules", "exclude_modules"):
            value = config.get(field)
            if value is not None and not isinstance(value, str) and not (
                    isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise CheckpointError(f"{path}: {field} must be a regular expression or a list of module names, got {value!r}")
        layers = config.get("layers_to_transform")
        if layers is not None and not (_is_index(layers) or (isinstance(layers, list) and all(map(_is_index, layers)))):
            raise CheckpointError(f"{path}: layers_to_transform must be a layer index or a list of them, got {layers!r}")
        for field in ("rank_pattern", "alpha_pattern"):
            patterns = config.get(field) or {}
            if not isinstance(patterns, dict):
                raise CheckpointError(f"{path}: {field} must be an object (module pattern -> value), got {patterns!r}")
            for key in patterns:
                try:
                    re.compile(key)
                except re.error as e:
                    raise CheckpointError(f"{path}: {field} key {key!r} is not a valid regular expression ({e})") from None

    def _drop_unadapted(self) -> None:
        """Modules the config does not adapt: PEFT ignores their tensors when it loads the adapter."""
        dropped = [n for n, mod in self.modules.items() if not adapts_module(self.config, n, embedding=mod.embedding)]
        for name in dropped:
            del self.modules[name]
        if dropped:
            logger.warning("%s: tensors of %d module(s) the config does not adapt are ignored, as PEFT ignores them "
                           "(target_modules / exclude_modules / layers_to_transform): %s", self.source, len(dropped),
                           ", ".join(sorted(dropped)[:5]) + (" ..." if len(dropped) > 5 else ""))

    def _classify(self, key: str) -> None:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _LORA_SUFFIX.match(name)
        if m is None:
            # modules_to_save (`x.modules_to_save.default.weight` in old PEFT) and saved base layers
            name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
            name = re.sub(r"(\.base_layer)+\.", ".", name)  # ParamWrappers nest: base_layer.base_layer
            self.replacements[name] = key
            return
        mod = self.modules.setdefault(m["module"], LoraModule(m["module"]))
        part = m["part"]
        if part.startswith("lora_magnitude_vector"):
            mod.magnitude = key
        elif part == "lora_B.bias":
            mod.bias = key
        else:
            mod.embedding = part.startswith("lora_embedding")
            setattr(mod, "A" if part in ("lora_A.weight", "lora_embedding_A") else "B", key)

    def _finish(self, mod: LoraModule) -> None:
        if mod.A is None or mod.B is None:
            raise CheckpointError(f"{self.folder}: module {mod.module!r} lacks lora_A or lora_B")
        for key in (mod.A, mod.B, mod.magnitude, mod.bias):
            if key is not None:
                check_float(self.ckpt.info(key).dtype, key, self.source)
        self._check_variant(mod)
        r = self._rank(mod)
        alpha, field = self._setting("alpha_pattern", "lora_alpha", mod.module)
        if not is_finite_number(alpha):
            raise CheckpointError(
                f"{self.folder}: adapter_config.json {field} = {alpha!r} (module {mod.module!r}) is not a finite number"
            )
        mod.scale = lora_scaling(alpha, r, rslora=bool(self.config.get("use_rslora")))

    def _setting(self, patterns: str, field: str, module: str) -> tuple[object, str]:
        """A per-module setting as PEFT resolves it: pattern match, else the field, else PEFT's default."""
        table = self.config.get(patterns) or {}
        key = pattern_key(table, module)
        if key is None:
            return self.config.get(field, PEFT_DEFAULTS[field]), field
        return table[key], f"{patterns}[{key!r}]"

    def _rank(self, mod: LoraModule) -> int:
        """The rank the config gives `mod`; PEFT builds layers of that rank, so the factors must have it."""
        a, b = self.ckpt.info(mod.A).shape, self.ckpt.info(mod.B).shape
        if len(a) != 2 or len(b) != 2:
            raise CheckpointError(f"{self.folder}: module {mod.module!r} factors have shapes {list(a)} and {list(b)}, not 2-D")
        r, field = self._setting("rank_pattern", "r", mod.module)
        if not _is_rank(r):
            raise CheckpointError(
                f"{self.folder}: module {mod.module!r}: adapter_config.json {field} = {r!r} is not a positive integer "
                f"(its tensors have rank {a[0]})"
            )
        if a[0] != r or b[1] != r:
            raise CheckpointError(
                f"{self.folder}: module {mod.module!r}: adapter_config.json {field} = {r} but its tensors have rank "
                f"{a[0]} (lora_A rows) / {b[1]} (lora_B columns); PEFT would refuse to load it"
            )
        return r

    def _check_variant(self, mod: LoraModule) -> None:
        """DoRA and lora_bias as the config says: PEFT ignores tensors its config does not ask for."""
        use_dora = bool(self.config.get("use_dora"))
        if mod.embedding and (use_dora or mod.magnitude):
            raise CheckpointError(f"{self.folder}: DoRA on embedding {mod.module!r} is not supported")
        if use_dora and mod.magnitude is None:
            raise CheckpointError(
                f"{self.folder}: adapter_config.json has use_dora = true but module {mod.module!r} has no lora_magnitude_vector"
            )
        if mod.magnitude and not use_dora:
            raise CheckpointError(
                f"{self.folder}: module {mod.module!r} has a DoRA lora_magnitude_vector but adapter_config.json "
                "does not set use_dora = true (config and weights disagree)"
            )
        if mod.bias and self.config.get("lora_bias") is False:
            raise CheckpointError(
                f"{self.folder}: module {mod.module!r} has a lora_B.bias but adapter_config.json has lora_bias = false "
                "(config and weights disagree)"
            )

    # -- validation -----------------------------------------------------------
    def targets(self) -> set[str]:
        names = {m.target for m in self.modules.values()} | set(self.replacements)
        names |= {f"{m.module}.bias" for m in self.modules.values() if m.bias}
        return names

    def check_base(self, base: Checkpoint, resolve=None, *, transposed=None, saved_key=None) -> None:
        """Every target exists in `base` with matching shapes; else the adapter is for another base.

        Binds the adapter to `base`: afterwards `has`, `delta_rows`, `add_rows_` take base tensor
        keys. `resolve` maps PEFT's in-memory names to base keys (a tied head to the embedding),
        `transposed(key)` says which base weights are stored [in, out] (Conv1D), `saved_key` names
        a saved full tensor's output key (default: `resolve`)."""
        resolve = resolve or (lambda n: n if n in base else None)
        # a loaded model is compared by the path transformers loaded it from, not by its class name
        warn_on_contradictions(self.source, self.config, getattr(base, "name_or_path", None) or base.source, base.config)
        if self.param_loras:
            self.experts = ExpertLoras(self.param_loras, NameMap.from_checkpoint(base), self)
        transposed = transposed or (lambda key: False)
        by_base = {}
        for mod in self.modules.values():
            mod.transposed = bool(transposed(resolve(mod.target) or ""))
            self._check_module(base, resolve, mod)
            by_base[resolve(mod.target).rsplit(".", 1)[0]] = mod
        replacements = {}
        for name, key in self.replacements.items():
            base_name = resolve(name)
            if base_name is None:
                raise CheckpointError(f"{self.source}: saved module {name!r} does not exist in the base {base.source}")
            replacements[(saved_key or resolve)(name) or name] = key
            have, want = self.ckpt.info(key).shape, base.info(base_name).shape
            if have[1:] != want[1:] or have[0] < want[0]:
                raise CheckpointError(
                    f"{self.source}: {name!r} has shape {list(have)} but the base has {list(want)} "
                    "(adapter made for another base?)"
                )
        self._by_base, self.replacements = by_base, replacements

    def _check_module(self, base: Checkpoint, resolve, mod: LoraModule) -> None:
        base_name = resolve(mod.target)
        if base_name is None:
            raise CheckpointError(
                f"{self.source}: target module {mod.module!r} does not exist in the base {base.source} "
                "(adapter made for another base?)"
            )
        rows, cols = base.info(base_name).shape
        a, b = self.ckpt.info(mod.A).shape, self.ckpt.info(mod.B).shape
        if mod.transposed and mod.magnitude:
            raise CheckpointError(f"{self.source}: DoRA on {mod.module!r}, a Conv1D layer (weight stored [in, out]), "
                                  "is not supported")
        if mod.by_columns:
            ok = a[1] == rows and b[0] == cols and a[0] == b[1]
        else:
            ok = a[1] == cols and b[0] == rows and a[0] == b[1]
        if not ok:
            raise CheckpointError(
                f"{self.source}: {mod.module!r} factors {list(a)}x{list(b)} do not fit the base weight "
                f"{[rows, cols]} (adapter made for another base?)"
            )
        rows = cols if mod.by_columns else rows  # output features, for the magnitude and bias checks
        if mod.magnitude and list(self.ckpt.info(mod.magnitude).shape) != [rows]:
            raise CheckpointError(
                f"{self.source}: {mod.module!r} DoRA lora_magnitude_vector has shape "
                f"{list(self.ckpt.info(mod.magnitude).shape)} but the base weight has {rows} output rows"
            )
        if mod.bias:
            self._check_bias(base, resolve, mod, rows)

    def _check_bias(self, base: Checkpoint, resolve, mod: LoraModule, rows: int) -> None:
        """lora_B.bias adds to the base layer's bias; PEFT cannot merge it into a layer without one."""
        have = list(self.ckpt.info(mod.bias).shape)
        if have != [rows]:
            raise CheckpointError(
                f"{self.source}: {mod.module!r} lora_B.bias has shape {have} but the base weight has {rows} output rows"
            )
        base_bias = resolve(f"{mod.module}.bias")
        if base_bias is None:
            raise CheckpointError(
                f"{self.source}: {mod.module!r} has a lora_B.bias (lora_bias=True) but its base layer in {base.source} "
                "has no bias: not supported (PEFT cannot merge it either)"
            )
        if list(base.info(base_bias).shape) != [rows]:
            raise CheckpointError(f"{self.source}: {mod.module!r} base bias {base_bias!r} is not [{rows}]")

    # -- deltas -----------------------------------------------------------------
    def _factors(self, mod: LoraModule, device: torch.device) -> dict:
        """A module's small factors on `device`, in float32; one module cached at a time."""
        if self._cache is None or self._cache[0] != mod.module:
            load = lambda k: None if k is None else self.ckpt.read(k).to(device, torch.float32)
            self._cache = (mod.module, {k: load(getattr(mod, k)) for k in ("A", "B", "bias", "magnitude")})
        return self._cache[1]

    def delta_rows(self, name: str, phi: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        """Ψ for rows [start, stop) of base tensor `name`, given those base rows `phi` (float32)."""
        psi = None
        if name in self.replacements:  # modules_to_save / saved base layer: Ψ = saved − Φ
            saved = self.ckpt.read_rows(self.replacements[name], start, stop)
            psi = saved.to(phi.device, torch.float32).sub_(phi)
        lora = self._lora_rows(name, phi, start, stop)
        if lora is None:
            return psi
        return lora if psi is None else psi.add_(lora)

    def has(self, name: str) -> bool:
        experts = self.experts is not None and self.experts.has(name)
        return experts or name in self.replacements or self._module_of(name) is not None

    def needs_base_rows(self, name: str) -> bool:
        """Whether Ψ of `name` depends on Φ (DoRA, saved full weights): then use `delta_rows`."""
        mod = self._module_of(name)
        dora = mod is not None and mod.magnitude is not None and not name.endswith(".bias")
        return dora or name in self.replacements

    def add_rows_(self, out: torch.Tensor, name: str, start: int, stop: int, weight: float) -> None:
        """out += weight·Ψ[start:stop] for a plain LoRA term, as one fused addmm (no Ψ block)."""
        if self.experts is not None and self.experts.has(name):
            out.add_(self.experts.rows(name, start, stop, out.device), alpha=weight)
            return
        mod = self._module_of(name)
        if mod is None:
            return
        f = self._factors(mod, out.device)
        w = weight * mod.scale
        if name.endswith(".bias"):
            if mod.bias:
                out.add_(f["bias"][start:stop], alpha=w)
        elif mod.by_columns:
            out.addmm_(f["A"][:, start:stop].T, f["B"].T, alpha=w)
        else:
            out.addmm_(f["B"][start:stop], f["A"], alpha=w)

    def bound_modules(self):
        """(base module key, module) pairs: keyed by the base's tensor names once bound by check_base."""
        return (self._by_base or {m.module: m for m in self.modules.values()}).items()

    def _module_of(self, name: str) -> LoraModule | None:
        table = self.modules if self._by_base is None else self._by_base
        return table.get(name.rsplit(".", 1)[0])

    def _lora_rows(self, name: str, phi: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        if self.experts is not None and self.experts.has(name):
            return self.experts.rows(name, start, stop, phi.device)
        mod = self._module_of(name)
        if mod is None:
            return None
        f = self._factors(mod, phi.device)
        if name.endswith(".bias"):
            return mod.scale * f["bias"][start:stop] if mod.bias else None
        if mod.by_columns:  # PEFT: (B @ A)^T * s, so rows of the stored weight are columns of A
            lora = (f["A"][:, start:stop].T @ f["B"].T).mul_(mod.scale)
        else:
            lora = (f["B"][start:stop] @ f["A"]).mul_(mod.scale)
        if mod.magnitude is None:
            return lora
        return dora_delta_rows(phi, lora, f["magnitude"][start:stop])

    def fold(self, params: dict[str, torch.Tensor], device, *, scale: str) -> dict:
        """What this adapter adds to a loaded model's live layers at `scale` ("alpha": Ψ; "beta":
        a LoRE-Adapter's Δ), beside `delta_rows` / `add_rows_`, its rows for the streaming merge."""
        return adapter_terms(self, params, device, scale)

    def fingerprint(self) -> str:
        return self.ckpt.fingerprint()

    def close(self) -> None:
        self._cache = None
        self.ckpt.close()
