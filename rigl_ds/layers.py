"""Which weights of a model are sparsified, found by module type or by name pattern.

The default is every weight matrix of Linear, Hugging Face GPT-2 ``Conv1D``, convolution and
RNN (LSTM/GRU/RNN gate matrices) layers, except embeddings and the output head, tied or not.
Knows nothing of transformers: ``Conv1D`` is recognised by class name.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
RNN_WEIGHT_PREFIXES = ("weight_ih", "weight_hh", "weight_hr")


def name_matches(pattern: str, name: str) -> bool:
    """A pattern (shell-style, ``*`` and ``?``) matches a parameter name, with or without ``.weight``."""
    return fnmatchcase(name, pattern) or fnmatchcase(name.removesuffix(".weight"), pattern)


def resolve_patterns(patterns: Iterable[str], names: Sequence[str], key: str) -> Dict[str, List[str]]:
    """Maps each pattern to the names it matches; a pattern that matches nothing is an error naming ``key``."""
    out: Dict[str, List[str]] = {}
    for pattern in patterns:
        hits = [n for n in names if name_matches(pattern, n)]
        if not hits:
            sample = ", ".join(list(names)[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"rigl.{key}: pattern {pattern!r} matches none of the sparsifiable weights ({sample})")
        out[pattern] = hits
    return out


def _head_weights(model: nn.Module, embedding_weights: Set[int]) -> Set[int]:
    """Ids of output-head weights: get_output_embeddings() (Hugging Face), a Linear tied to an
    embedding, or the last Linear (in module order) projecting onto an embedding's vocabulary; an
    earlier layer that happens to have as many outputs as the vocabulary is not a head."""
    heads: Set[int] = set()
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), torch.Tensor):
            heads.add(id(head.weight))
    vocab_sizes = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    last_onto_vocab: Dict[int, int] = {}
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        if id(module.weight) in embedding_weights:
            heads.add(id(module.weight))
        elif module.out_features in vocab_sizes:
            last_onto_vocab[module.out_features] = id(module.weight)
    return heads | set(last_onto_vocab.values())


def global_shape(p: torch.Tensor) -> Tuple[int, ...]:
    """A parameter's full shape, also when ZeRO-3 has partitioned it (it then keeps ``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def default_sparse_weights(model: nn.Module) -> List[str]:
    """Names (as in ``named_parameters``) of the weights sparsified when ``modules`` is not set."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    excluded = embedding_weights | _head_weights(model, embedding_weights)
    wanted: Set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear,) + _CONV_TYPES) or type(module).__name__ == "Conv1D":
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and len(global_shape(weight)) >= 2:
                wanted.add(id(weight))
        elif isinstance(module, nn.RNNBase):
            for pname, p in module.named_parameters(recurse=False):
                if pname.startswith(RNN_WEIGHT_PREFIXES):
                    wanted.add(id(p))
    return [n for n, p in model.named_parameters() if id(p) in wanted and id(p) not in excluded]


def find_sparse_weights(model: nn.Module, modules: Optional[Sequence[str]] = None) -> Dict[str, nn.Parameter]:
    """The weights to sparsify, in ``named_parameters`` order (identical on every process).

    ``modules`` patterns may name any parameter of two or more dimensions (an embedding included,
    if a user asks for it); matching a bias or norm, or nothing at all, is an error.
    """
    params = dict(model.named_parameters())
    if modules is None:
        names = default_sparse_weights(model)
        if not names:
            raise ValueError("rigl.modules: the model has no Linear, Conv1D, conv or RNN weights to sparsify")
        return {n: params[n] for n in names}
    names = weights_matching(modules, {n: global_shape(p) for n, p in params.items()})
    return {n: params[n] for n in names}


def weights_matching(modules: Sequence[str], shapes: Dict[str, Tuple[int, ...]]) -> List[str]:
    """The names of ``shapes`` (every parameter, in order) that the ``modules`` patterns choose;
    also for a model no process holds whole (pipeline stages pool their parameters' shapes)."""
    matched = resolve_patterns(modules, list(shapes), "modules")
    chosen: Set[str] = set()
    for pattern, hits in matched.items():
        flat = [n for n in hits if len(shapes[n]) < 2]
        if flat:
            raise ValueError(
                f"rigl.modules: pattern {pattern!r} matches {flat[:3]}, which are not weight matrices "
                "(biases and norms stay dense)"
            )
        chosen.update(hits)
    return [n for n in shapes if n in chosen]
