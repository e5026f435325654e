"""Interchange interventions on a subspace: at one site, replace the base run's component in a k-dimensional
subspace by the source run's (x + B Bᵀ (s - x), B an orthonormal basis [d, k]), leaving the orthogonal
complement alone; and distributed alignment search (DAS, Geiger et al. 2023; as CausalGym uses it), which learns
that basis by gradient descent so that the intervention makes the model give the counterfactual label.

The site is any hook point whose last dimension is the subspace's ambient space (the residual stream, one head's
`hook_z` with `index=(pos, head)`, ...); `index` picks cells after the batch dimension as in `interp.patching`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..model import Transformer
from .hooks import HookPoint, hooks, select
from .patching import Index, Site, Source, check_source_shape, index_key, site_name, source_values


def _check_basis(basis: torch.Tensor) -> None:
    if basis.dim() != 2 or basis.shape[1] > basis.shape[0]:
        raise UserError(f"basis must be [d, k] with k <= d (orthonormal columns), got {tuple(basis.shape)}")
    gram = basis.T.float() @ basis.float()
    if (gram - torch.eye(basis.shape[1], device=basis.device)).abs().max() > 1e-3:
        raise UserError("basis columns must be orthonormal (basis.T @ basis == I); orthonormalise it first, "
                        "e.g. torch.linalg.qr(basis).Q")


def interchange(model: Transformer, base_ids: torch.Tensor, source: Source, site: Site, basis: torch.Tensor, *,
                index: Index = None, **forward_kwargs) -> torch.Tensor:
    """The logits of the base input with its component in span(basis) at `site`/`index` taken from the source
    run (an `ActivationCache` or the source's ids, same shape as the base). `basis` is [d, k], orthonormal
    columns (the first k columns of a rotation)."""
    _check_basis(basis)
    name = select(model, site_name(site))[0]
    values = source_values(model, source, [name], forward_kwargs)
    key = index_key(index)

    def swap(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        b = basis.to(x.device, x.dtype)
        src = values[hook.name].to(x.device, x.dtype)
        check_source_shape(src, x, x.shape[0], hook.name)
        if src.shape[-1] != b.shape[0]:
            raise UserError(f"the basis is [{b.shape[0]}, k] but {hook.name} has {src.shape[-1]} features; give a "
                            "basis over the site's last dimension")
        x = x.clone()
        diff = src[key] - x[key]
        x[key] = x[key] + (diff @ b) @ b.T
        return x

    with torch.no_grad(), hooks(model, {name: swap}):
        return model(base_ids, **forward_kwargs)


@dataclass
class LearnedSubspace:
    """What `learn_subspace` found: the basis [d, k] (orthonormal columns), the share of pairs whose
    intervened prediction is the counterfactual label, and the training losses."""

    basis: torch.Tensor
    accuracy: float
    losses: list[float] = field(default_factory=list)


def learn_subspace(model: Transformer, base_ids: torch.Tensor, source_ids: torch.Tensor,
                   labels: torch.Tensor | Sequence[int], site: Site, k: int = 1, *, index: Index = -1,
                   pos: int = -1, steps: int = 200, lr: float = 1e-2, batch: int = 64, seed: int = 0,
                   **forward_kwargs) -> LearnedSubspace:
    """Distributed alignment search: learn a k-dimensional subspace at `site`/`index` (default: the last
    position) such that interchanging it from the source into the base input makes the model predict `labels`
    [N] (the counterfactual answers) at position `pos`. Pairs are the rows of `base_ids` and `source_ids`
    [N, T]. The basis is an orthogonally parametrised [k, d] map trained with Adam on the cross-entropy of the
    labels; the model's weights are not touched."""
    labels = torch.as_tensor(labels, device=base_ids.device)
    if base_ids.shape != source_ids.shape or labels.shape != (base_ids.shape[0],):
        raise UserError(f"base_ids and source_ids must have one shape [N, T] and labels [N]; got "
                        f"{tuple(base_ids.shape)}, {tuple(source_ids.shape)} and {tuple(labels.shape)}")
    name = select(model, site_name(site))[0]
    src = source_values(model, source_ids, [name], forward_kwargs)[name]
    d = src.shape[-1]
    if not 1 <= k <= d:
        raise UserError(f"k must lie in [1, {d}] (the site's last dimension), got {k}")
    key = index_key(index)
    torch.manual_seed(seed)
    rotation = nn.utils.parametrizations.orthogonal(nn.Linear(d, k, bias=False)).to(src.device)
    optimizer = torch.optim.Adam(rotation.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    rows: dict[str, torch.Tensor] = {}

    def swap(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        w = rotation.weight.to(x.dtype)  # [k, d], orthonormal rows
        diff = src[rows["now"]].to(x.device, x.dtype)[key] - x[key]
        x = x.clone()
        x[key] = x[key] + (diff @ w.T) @ w
        return x

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses: list[float] = []
    try:
        with hooks(model, {name: swap}):
            for _ in range(steps):
                rows["now"] = torch.randperm(len(labels), generator=generator)[:batch].to(base_ids.device)
                logits = model(base_ids[rows["now"]], **forward_kwargs)[:, pos]
                loss = F.cross_entropy(logits.float(), labels[rows["now"]])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            with torch.no_grad():
                rows["now"] = torch.arange(len(labels), device=base_ids.device)
                accuracy = float((model(base_ids, **forward_kwargs)[:, pos].argmax(-1) == labels).float().mean())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return LearnedSubspace(rotation.weight.detach().T.contiguous(), accuracy, losses)
