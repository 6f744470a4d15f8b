"""Muon: momentum whose update is orthogonalised, for the 2-D hidden matrices of a Transformer.

Each step is SGD with Nesterov momentum, except that the update matrix G = U·S·Vᵀ is replaced by (about) U·Vᵀ:
every direction of the update moves the weights by the same amount, instead of the few largest singular
directions dominating. U·Vᵀ is approximated by a quintic Newton–Schulz iteration (a few matmuls, no SVD).
Embeddings, the head and 1-D parameters are not matrices in this sense and stay with AdamW
(`CombinedOptimizer` steps both as one).

References: Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024), and the
modded-nanogpt speedrun and nanochat that train with it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

# (a, b, c) of X <- a·X + b·(X·Xᵀ)·X + c·(X·Xᵀ)²·X, each singular value σ -> aσ + bσ³ + cσ⁵. Chosen (Jordan 2024) for
# the steepest slope at 0, so small σ grow fast, at the price of not converging to 1: after 5 steps every σ of a
# normalised matrix that is not tiny lies in about [0.7, 1.2], which trains as well as the exact U·Vᵀ.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None) -> torch.Tensor:
    """About U·Vᵀ of each matrix g = U·S·Vᵀ (..., m, n), by a quintic Newton–Schulz iteration.

    Computed in `dtype` (default: bfloat16 on CUDA, where it is fast and precise enough, float32 elsewhere).
    The result is U·p(S)·Vᵀ with the same singular vectors and p(σ) roughly in [0.7, 1.2]; see NS_COEFFS.
    """
    a, b, c = NS_COEFFS
    x = g.to(dtype or (torch.bfloat16 if g.is_cuda else torch.float32))
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix X·Xᵀ
        x = x.mT
    # the iteration converges for σ ≤ 1: the Frobenius norm bounds the spectral one; eps keeps a zero update zero
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then `orthogonalize`, per 2-D parameter; decoupled weight decay as AdamW's.

    `split` = k treats a (k·m, n) weight as k separate (m, n) matrices: GPT-2's c_attn holds the query, key and
    value projections side by side, three maps that are orthogonalised one by one. The update is scaled by
    sqrt(max(1, m/n)) so a tall matrix's output changes as much per step as a square one's.
    Gradients are used as given: under DDP they are already averaged, so every rank computes the same update.
    Under FSDP (parameters are DTensors sharded by rows) the momentum stays sharded, each update matrix is
    gathered whole for the orthogonalisation, and each rank applies its own rows of the result.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = NS_STEPS,
        split: int = 1,
        ns_dtype: torch.dtype | None = None,
    ) -> None:
        if not (lr >= 0 and 0 <= momentum < 1 and weight_decay >= 0 and ns_steps >= 1 and split >= 1):
            raise ValueError(f"Muon: needs lr >= 0, 0 <= momentum < 1, weight_decay >= 0, ns_steps >= 1, split >= 1; "
                             f"got {lr}, {momentum}, {weight_decay}, {ns_steps}, {split}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        split=split)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # Newton–Schulz's dtype (None: orthogonalize's default); not saved with the state
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2 or p.size(0) % group["split"]:
                    raise ValueError(f"Muon: a parameter of shape {tuple(p.shape)} is not a 2-D matrix whose rows "
                                     f"split in {group['split']}; give it to AdamW")

    def _momentum_update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """buf <- μ·buf + g; the update is g + μ·buf with Nesterov, else buf (as torch.optim.SGD, dampening 0).
        Under FSDP the buffer is kept as a DTensor (checkpoints reshard it) and updated through this rank's
        shard: the returned update is this rank's rows."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf, grad = _local(state["momentum_buffer"]), _local(p.grad)
        buf.mul_(group["momentum"]).add_(grad)
        return grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # matrices of one shape are orthogonalised together: one batched matmul chain instead of many
            by_shape: dict[torch.Size, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            for (rows, cols), ps in by_shape.items():
                k, m = group["split"], rows // group["split"]
                updates = torch.stack([self._momentum_update(p, group) for p in ps])
                sharded = isinstance(ps[0], DTensor)
                if sharded:  # FSDP: Newton–Schulz needs whole matrices, one all-gather per shape
                    updates = _whole(updates, ps[0])
                ortho = orthogonalize(updates.view(len(ps), k, m, cols), group["ns_steps"], self.ns_dtype)
                ortho = ortho.view(len(ps), rows, cols)
                if sharded:  # each rank applies its own rows of the result
                    ortho = _own_rows(ortho, ps[0])
                scale = max(1.0, m / cols) ** 0.5
                for p, u in zip(ps, ortho.unbind(0), strict=True):
                    target = _local(p)
                    if group["weight_decay"]:
                        target.mul_(1 - group["lr"] * group["weight_decay"])
                    target.add_(u.to(target.dtype), alpha=-group["lr"] * scale)
        return loss


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the DTensor), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _stacked_placements(p: DTensor) -> list:
    """p's placements for a stack of tensors shaped like p: the sharded dim moves one to the right."""
    return [Shard(pl.dim + 1) if isinstance(pl, Shard) else pl for pl in p.placements]


def _whole(local_rows: torch.Tensor, p: DTensor) -> torch.Tensor:
    """The whole (n, rows, cols) stack from every rank's rows of it (FSDP's shards may be uneven)."""
    n = local_rows.size(0)
    shape = (n, *p.shape)
    stride = (p.shape[0] * p.shape[1], p.shape[1], 1)
    return DTensor.from_local(local_rows, p.device_mesh, _stacked_placements(p), run_check=False, shape=shape,
                              stride=stride).full_tensor()


def _own_rows(whole: torch.Tensor, p: DTensor) -> torch.Tensor:
    """This rank's rows of a whole (n, rows, cols) stack, cut as FSDP cuts p, without communication."""
    return distribute_tensor(whole, p.device_mesh, _stacked_placements(p), src_data_rank=None).to_local()


class CombinedOptimizer:
    """Several optimizers used as one: one `param_groups` list (the underlying groups themselves, so setting a
    group's "lr" reaches its optimizer), one `step`, `zero_grad`, and one `state_dict` for checkpoints."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        """One step of each optimizer; a closure, if given, is evaluated once, by the first."""
        loss = self.optimizers[0].step(closure)
        for opt in self.optimizers[1:]:
            opt.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers],
                "kinds": [type(opt).__name__ for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        kinds = [type(opt).__name__ for opt in self.optimizers]
        if not isinstance(state_dict, dict) or state_dict.get("kinds") != kinds:
            have = state_dict.get("kinds", "a single optimizer") if isinstance(state_dict, dict) else "not a dict"
            raise ValueError(f"optimizer state is for {have}, this run uses {' + '.join(kinds)}; "
                             f"resume with the --optimizer the run was trained with")
        for opt, sd in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(sd)
