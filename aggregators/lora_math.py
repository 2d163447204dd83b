"""LoRA tensor math shared by the aggregation methods (ffa, flora, hetlora, flexlora).

Canonical names (see :mod:`pollinate.modeling`): a LoRA layer ``<layer>`` has factors
``<layer>.lora_A.weight`` (rank x in) and ``<layer>.lora_B.weight`` (out x rank);
methods that keep a dense global update name it ``<layer>.delta_weight`` (out x in),
and FLoRA's stacked downlink factors are ``<layer>.stack_A`` / ``<layer>.stack_B``.
Everything that is neither a factor nor one of those is a head tensor.

Nothing here keeps state: these are pure functions over named tensors plus two model
helpers (seeded LoRA re-initialisation, loading heads) used by the client halves.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

import torch

from pollinate.aggregators.base import AggregationError, ClientUpdate
from pollinate.modeling import AdapterModel, canonical_name
from pollinate.spec import Tensors

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
DENSE_SUFFIX = ".delta_weight"
STACK_A_SUFFIX = ".stack_A"
STACK_B_SUFFIX = ".stack_B"
_STRUCTURAL = (A_SUFFIX, B_SUFFIX, DENSE_SUFFIX, STACK_A_SUFFIX, STACK_B_SUFFIX)

LayerShapes = dict[str, tuple[int, int, int | None]]  # layer -> (out, in, rank or None)


# -- names ------------------------------------------------------------------------------

def a_name(layer: str) -> str:
    return layer + A_SUFFIX


def b_name(layer: str) -> str:
    return layer + B_SUFFIX


def dense_name(layer: str) -> str:
    return layer + DENSE_SUFFIX


def split_factor(name: str) -> tuple[str, str] | None:
    """``<layer>.lora_A.weight`` -> ``(layer, "A")``; ``None`` for anything else."""
    for kind, suffix in (("A", A_SUFFIX), ("B", B_SUFFIX)):
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return None


def is_factor(name: str) -> bool:
    return split_factor(name) is not None


def is_head(name: str) -> bool:
    return not name.endswith(_STRUCTURAL)


def factor_pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``layer -> {"A": ..., "B": ...}`` for the LoRA factors present (either may be missing)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parsed = split_factor(name)
        if parsed is not None:
            pairs.setdefault(parsed[0], {})[parsed[1]] = tensor
    return pairs


def head_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in state.items() if is_head(n)}


def factor_shapes(state: Mapping[str, torch.Tensor]) -> LayerShapes:
    """Layers of a factor-form state (``lora_A``/``lora_B``): ``(out, in, rank)``."""
    return {layer: (int(f["B"].shape[0]), int(f["A"].shape[1]), int(f["A"].shape[0]))
            for layer, f in factor_pairs(state).items() if "A" in f and "B" in f}


def dense_shapes(state: Mapping[str, torch.Tensor]) -> LayerShapes:
    """Layers of a dense-form state (``delta_weight``): ``(out, in, None)``."""
    return {n[: -len(DENSE_SUFFIX)]: (int(t.shape[0]), int(t.shape[1]), None)
            for n, t in state.items() if n.endswith(DENSE_SUFFIX)}


def dense_initial_state(model: AdapterModel) -> Tensors:
    """Head tensors of ``model`` plus a zero ``<layer>.delta_weight`` (out x in) per LoRA layer."""
    adapter = model.adapter_state()
    state = {n: adapter[n] for n in model.head_names()}
    for layer in model.lora_layers():
        out_dim, in_dim = adapter[b_name(layer)].shape[0], adapter[a_name(layer)].shape[1]
        state[dense_name(layer)] = torch.zeros(out_dim, in_dim, dtype=torch.float32)
    return state


# -- checking updates -------------------------------------------------------------------

def check_update(update: ClientUpdate, method: str, *, layers: LayerShapes,
                 heads: Mapping[str, tuple[int, ...]], rank_rule: str = "any",
                 allow_a: bool = True, need_pairs: bool = False) -> None:
    """Raise :class:`AggregationError` unless ``update`` fits ``layers`` and ``heads``.

    Every LoRA factor must belong to a known layer, have that layer's ``in`` (A) or
    ``out`` (B) size and the rank the update declares (``update.rank``). ``rank_rule``
    compares that rank with the layer's global rank: ``"equal"``, ``"at-most"`` or
    ``"any"``. ``allow_a=False`` rejects ``lora_A`` (FFA); ``need_pairs`` requires both
    factors of a layer whenever one is sent (methods that multiply raw factors).
    """
    who = f"{method}: client {update.node_id}"
    if update.num_examples <= 0:
        raise AggregationError(f"{who}: num-examples must be > 0, got {update.num_examples}")
    if update.rank <= 0 or not math.isfinite(update.alpha) or update.alpha == 0:
        raise AggregationError(f"{who}: invalid LoRA rank {update.rank} / alpha {update.alpha}")
    sent: dict[str, set[str]] = {}
    for name, tensor in update.delta.items():
        if name in heads:
            if tuple(tensor.shape) != heads[name]:
                raise AggregationError(f"{who}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                       f"global is {heads[name]}")
        else:
            parsed = split_factor(name)
            if parsed is None or parsed[0] not in layers:
                raise AggregationError(
                    f"{who}: unknown tensor {name!r} (expected LoRA factors "
                    f"'<layer>{A_SUFFIX}'/'<layer>{B_SUFFIX}' of {len(layers)} known layers, "
                    f"or head tensors {sorted(heads)})")
            layer, kind = parsed
            _check_factor(who, name, tensor, kind, layers[layer], update.rank, rank_rule, allow_a)
            sent.setdefault(layer, set()).add(kind)
        if not bool(torch.isfinite(tensor).all()):
            raise AggregationError(f"{who}: tensor {name!r} has non-finite values")
    if need_pairs:
        for layer, kinds in sent.items():
            if kinds != {"A", "B"}:
                raise AggregationError(f"{who}: {method} needs both LoRA factors of layer "
                                       f"{layer!r}, got only {sorted(kinds)}")


def _check_factor(who: str, name: str, tensor: torch.Tensor, kind: str,
                  shape: tuple[int, int, int | None], rank: int, rank_rule: str,
                  allow_a: bool) -> None:
    out_dim, in_dim, global_rank = shape
    if kind == "A" and not allow_a:
        raise AggregationError(f"{who}: sent {name!r}, but this method keeps lora_A frozen "
                               "(send only lora_B and the head)")
    if tensor.dim() != 2:
        raise AggregationError(f"{who}: tensor {name!r} must be 2-D, "
                               f"got shape {tuple(tensor.shape)}")
    rank_axis, fixed_axis, want = (0, 1, in_dim) if kind == "A" else (1, 0, out_dim)
    if tensor.shape[fixed_axis] != want:
        raise AggregationError(f"{who}: tensor {name!r} has shape {tuple(tensor.shape)}; "
                               f"the layer's {'input' if kind == 'A' else 'output'} size is {want}")
    got = int(tensor.shape[rank_axis])
    if got != rank:
        raise AggregationError(f"{who}: tensor {name!r} has rank {got}, "
                               f"but the update declares rank {rank}")
    if global_rank is not None and rank_rule == "equal" and got != global_rank:
        raise AggregationError(f"{who}: tensor {name!r} has rank {got}, global rank is "
                               f"{global_rank}; use flora, hetlora or flexlora for mixed ranks")
    if global_rank is not None and rank_rule == "at-most" and got > global_rank:
        raise AggregationError(f"{who}: tensor {name!r} has rank {got}, above the global "
                               f"(maximum) rank {global_rank}")


# -- rank padding, truncation and norms -------------------------------------------------

def pad_rank(tensor: torch.Tensor, rank: int, kind: str) -> torch.Tensor:
    """Zero-pad a factor's rank axis (rows of A, columns of B) up to ``rank``."""
    axis = 0 if kind == "A" else 1
    missing = rank - tensor.shape[axis]
    if missing < 0:
        raise ValueError(f"cannot pad rank {tensor.shape[axis]} down to {rank}")
    if missing == 0:
        return tensor
    pad = (0, 0, 0, missing) if kind == "A" else (0, missing)
    return torch.nn.functional.pad(tensor, pad)


def truncate_rank(tensor: torch.Tensor, rank: int, kind: str) -> torch.Tensor:
    """The first ``rank`` rows of A or columns of B."""
    axis = 0 if kind == "A" else 1
    if rank > tensor.shape[axis]:
        raise ValueError(f"cannot truncate rank {tensor.shape[axis]} to the larger rank {rank}")
    return tensor[:rank] if kind == "A" else tensor[:, :rank]


def product_change_norm(b0: torch.Tensor, a0: torch.Tensor,
                        b1: torch.Tensor, a1: torch.Tensor) -> float:
    """``||B1 A1 - B0 A0||_F`` without forming an out x in matrix.

    ``B1 A1 - B0 A0 = [B1 - B0, B1] [A0; A1 - A0]``, so the squared norm is the sum of
    the elementwise product of two 2r x 2r Gram matrices (float64 against cancellation).
    """
    left = torch.cat([b1 - b0, b1], dim=1).to(torch.float64)
    right = torch.cat([a0, a1 - a0], dim=0).to(torch.float64)
    squared = float(((left.T @ left) * (right @ right.T)).sum())
    return math.sqrt(max(squared, 0.0))


def svd_truncate(matrix: torch.Tensor, rank: int,
                 scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced factors: ``scaling * B @ A`` = the best rank-``rank`` approximation of ``matrix``.

    With ``matrix = U S V^T``: ``B = U_r sqrt(S_r / scaling)``, ``A = sqrt(S_r / scaling) V_r^T``.
    Returns ``(B, A, live)``: B is out x rank, A is rank x in, and ``live`` marks the
    rank directions carrying a singular value above numerical zero (``S_max * max(out, in)
    * eps``); dead directions (rank-deficient matrix, or rank > min(out, in)) are zero rows
    of A and zero columns of B.
    """
    m = matrix.detach().to(torch.float32)
    out_dim, in_dim = m.shape
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    keep = min(rank, s.shape[0])
    tol = float(s[0]) * max(out_dim, in_dim) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    live = torch.zeros(rank, dtype=torch.bool, device=m.device)
    live[:keep] = s[:keep] > tol
    root = torch.where(live[:keep], s[:keep], torch.zeros_like(s[:keep])).div(scaling).sqrt()
    b = torch.zeros(out_dim, rank, dtype=torch.float32, device=m.device)
    a = torch.zeros(rank, in_dim, dtype=torch.float32, device=m.device)
    b[:, :keep] = u[:, :keep] * root
    a[:keep] = root[:, None] * vh[:keep]
    return b, a, live


# -- seeds and client-side model helpers ------------------------------------------------

def derive_seed(*parts: object) -> int:
    """A 62-bit seed from e.g. ``(method, run seed, round, node id)``, identical everywhere."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


def lora_seed(options: Mapping[str, object], rnd: int, node_id: int, method: str = "flora") -> int:
    """Seed of a client's fresh LoRA factors in a round (instruction ``lora_seed``)."""
    return derive_seed(method, options.get("seed", 0), rnd, node_id)


def reinit_lora(model: AdapterModel, seed: int, layers: Iterable[str] | None = None) -> None:
    """Fresh LoRA factors for ``layers`` (all by default) with peft's own initialiser.

    Calls each peft ``LoraLayer.reset_lora_parameters`` (A: kaiming-uniform or gaussian as
    the adapter was configured, B: zeros) under a forked RNG seeded with ``seed``, so the
    global RNG is untouched and the same seed gives the same factors on the same device
    type (CPU and CUDA random streams differ).
    """
    from peft.tuners.lora import LoraLayer

    modules = {canonical_name(n): m for n, m in model.model.named_modules()
               if isinstance(m, LoraLayer)}
    init: object = True
    configs = getattr(model.model, "peft_config", None) or {}
    for config in configs.values():
        mode = getattr(config, "init_lora_weights", True)
        # never PiSSA & co: they would edit the base weights
        init = mode if mode is True or mode == "gaussian" else True
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    fork = (torch.random.fork_rng(devices=devices, device_type="cuda") if devices
            else torch.random.fork_rng(devices=[]))
    with fork:
        torch.manual_seed(seed)
        for layer in model.lora_layers() if layers is None else layers:
            module = modules.get(layer)
            if module is None:
                raise KeyError(f"model has no LoRA layer {layer!r}")
            for adapter in list(module.lora_A.keys()):
                module.reset_lora_parameters(adapter, init)


def check_same_rank(model: AdapterModel, state: Mapping[str, torch.Tensor], method: str) -> None:
    """Raise :class:`AggregationError` unless ``model``'s LoRA rank is the global state's.

    Client halves of one-rank methods (fedit, ffa) call it before loading, so a client
    configured with another rank refuses with a message naming both ranks instead of
    failing on a tensor shape deep inside the model.
    """
    for layer in model.lora_layers():
        if a_name(layer) not in state:
            continue
        mine, wanted = model.parameter(a_name(layer)).shape[0], state[a_name(layer)].shape[0]
        if mine != wanted:
            raise AggregationError(
                f"{method}: this client's LoRA rank is {mine}, the global adapter's rank is {wanted}; "
                f"{method} needs one rank for all clients (node config lora-rank, run config "
                "rank-profile): use flora, hetlora or flexlora for mixed ranks")


def head_state(model: AdapterModel, state: Mapping[str, torch.Tensor]) -> Tensors:
    """The head tensors of ``state`` that ``model`` has."""
    return {n: state[n] for n in model.head_names() if n in state}


def full_factor_update(model: AdapterModel, start: Tensors) -> Tensors:
    """Uplink of methods that re-initialise LoRA every round: trained factors as they are,
    plus the change of every trainable head tensor."""
    trained = model.adapter_state()
    sent = {n: trained[n] for n in model.adapter_names if is_factor(n)}
    sent.update({n: trained[n] - start[n] for n in model.head_names()
                 if model.parameter(n).requires_grad})
    return sent
