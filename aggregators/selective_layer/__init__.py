"""Selective layer fine-tuning (Sun et al., 2024): each client trains a few transformer blocks.

``method``: both halves (:class:`SelectiveLayer`, :class:`SelectiveLayerClient`);
``config``: the options and per-client budgets; ``layers``: block groups and gradient
importance; ``policies``: client-side choices; ``regulate``: the server's regulated
assignment; ``heatmap``: the rounds x layers plot. docs/selective_layer.md.
"""

from pollinate.aggregators.selective_layer.config import SelectionOptions, client_budget, parse_budgets
from pollinate.aggregators.selective_layer.heatmap import selection_heatmap
from pollinate.aggregators.selective_layer.layers import block_of, layer_importance, transformer_layers
from pollinate.aggregators.selective_layer.method import HEATMAP, SelectiveLayer, SelectiveLayerClient
from pollinate.aggregators.selective_layer.policies import POLICIES, SelectionInput
from pollinate.aggregators.selective_layer.regulate import disagreement, objective, regulate

__all__ = ["HEATMAP", "POLICIES", "SelectionInput", "SelectionOptions", "SelectiveLayer",
           "SelectiveLayerClient", "block_of", "client_budget", "disagreement", "layer_importance",
           "objective", "parse_budgets", "regulate", "selection_heatmap", "transformer_layers"]
