"""The language-model head and its cross-entropy, over chunks of rows.

`F.cross_entropy(F.linear(h, weight).float(), targets)` holds the fp32 logits of every row, and autograd keeps
them (and then their gradient, as large) until the backward: 12 GiB for GPT-2's 50,304-token vocab at 64 x 1024
rows. Here the rows go through in chunks; each chunk's logits, softmax and gradient exist only while that
chunk is computed, and the forward already produces the gradients of `h` and of `weight`, which the backward
only scales by the incoming gradient. Same loss and gradients as the plain path, a fraction of the memory.

Precision: the two matmuls (logits and gradients) run in the autocast dtype when autocast is on (as
`F.linear` would), the log-softmax and the loss in fp32, the gradients are accumulated in fp32.

torch.compile: dynamo traces the `autograd.Function` (forward and backward) into the compiled graph, chunk
loop unrolled, so inductor fuses each chunk's softmax/gradient arithmetic; nothing breaks the graph.
DDP: the weight's gradient reaches `weight.grad` through autograd's usual accumulation (and DDP's hooks);
with tied embeddings it adds to the embedding's gradient as usual.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# bytes of one chunk's fp32 logits: small next to the (N, V) logits of a large micro-batch, large enough that
# the matmuls stay efficient and the (V, C) weight gradient is not re-read too often (it is accumulated once per
# chunk).
CHUNK_BYTES = {"cuda": 1024 * 2**20, "cpu": 256 * 2**20}
DEFAULT_CHUNK_BYTES = 128 * 2**20  # other accelerators (mps, xpu, ...)


def default_chunk_rows(vocab_size: int, device: torch.device | str) -> int:
    """Rows per chunk so one chunk's fp32 logits take about CHUNK_BYTES on this device (a multiple of 8)."""
    budget = CHUNK_BYTES.get(torch.device(device).type, DEFAULT_CHUNK_BYTES)
    rows = budget // (4 * vocab_size)
    return max(8, rows - rows % 8)


def matmul_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear(h, weight)` would compute in here: autocast's when it is on."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


def chunk_loss(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap: float, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed loss of a chunk of rows and, with `grad`, d(summed loss)/d(logits) in `h`'s dtype.

    `h` and `weight` already have the matmul dtype; everything after the matmul is fp32 (fp64 for fp64).
    The gradient rows of ignored targets are garbage: the caller masks them out (on (n, C), not (n, V)).
    """
    logits = (h @ weight.t()).to(torch.promote_types(h.dtype, torch.float32))  # (n, V)
    if softcap > 0:
        capped = logits.div_(softcap).tanh_()  # cap * tanh(z / cap): smooth, bounded logits (Gemma 2)
        logits = capped * softcap
    valid = targets != ignore_index
    safe_targets = targets.masked_fill(~valid, 0)[:, None]  # ignored rows read column 0, then count 0
    logp = torch.log_softmax(logits, dim=-1)  # one fused pass; logsumexp is several on CPU
    loss = -(logp.gather(1, safe_targets).squeeze(1) * valid).sum()
    if not grad:
        return loss, None
    g = logp.exp_()  # softmax, in place
    g.scatter_add_(1, safe_targets, torch.full_like(safe_targets, -1, dtype=g.dtype))  # minus the one-hot target
    if softcap > 0:
        g.mul_(capped.square_().neg_().add_(1))  # d(cap * tanh(z / cap))/dz = 1 - tanh^2
    return loss, g.to(h.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` against `targets`; the gradient is computed in the forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, softcap: float, chunk_rows: int, dtype: torch.dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(dtype, torch.float32)  # gradients accumulate in fp32
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            # unnormalised gradients (softmax - onehot): fp16 matmul outputs stay in range; scaled in the backward
            dh = torch.empty(h.shape, dtype=acc, device=h.device) if need_h else None
            dw = None
            total = torch.zeros((), dtype=acc, device=h.device)
            for start in range(0, h.size(0), chunk_rows):
                rows = slice(start, start + chunk_rows)
                loss, g = chunk_loss(hc[rows], wc, targets[rows], ignore_index, softcap, grad=True)
                total += loss
                valid = (targets[rows] != ignore_index)[:, None]
                if need_h:
                    dh[rows] = (g @ wc) * valid
                if need_w:
                    h_valid = hc[rows] * valid  # ignored rows add nothing to the weight's gradient
                    if dw is None:
                        dw = (g.t() @ h_valid).to(acc)
                    elif dtype == acc:
                        dw.addmm_(g.t(), h_valid)  # accumulates inside the GEMM: no (V, C) temporary
                    else:
                        dw += g.t() @ h_valid
        n_valid = (targets != ignore_index).sum().to(acc)  # 0/0 = nan when every row is ignored, as F.cross_entropy
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        ctx.save_for_backward(dh, dw, n_valid)
        return total / n_valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        dh, dw, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid  # the mean's 1/n and the upstream gradient in one pass
        grad_h = (dh * scale).to(ctx.h_dtype) if dh is not None else None
        grad_w = (dw * scale).to(ctx.w_dtype) if dw is not None else None
        return grad_h, grad_w, None, None, None, None, None


def chunked_loss_no_grad(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap: float, chunk_rows: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The same mean loss when no gradient is wanted (evaluation): no gradient work at all."""
    with torch.autocast(h.device.type, enabled=False):
        hc, wc = h.to(dtype), weight.to(dtype)
        total = sum(
            chunk_loss(hc[s : s + chunk_rows], wc, targets[s : s + chunk_rows], ignore_index, softcap, grad=False)[0]
            for s in range(0, h.size(0), chunk_rows)
        )
    return total / (targets != ignore_index).sum().to(total.dtype)


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -1,
    softcap: float = 0.0,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean of `F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=ignore_index)` over the rows
    whose target is not `ignore_index`, without the (N, V) fp32 logits of all rows.

    h: (N, C) hidden states; weight: (V, C) (an `nn.Linear(C, V, bias=False)` weight); targets: (N,) int64.
    softcap > 0 caps the logits first: softcap * tanh(logits / softcap).
    chunk_rows: rows per chunk (default: `default_chunk_rows`; 1 up to N all work).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.size(1) != weight.size(1) or targets.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy: want h (N, C), weight (V, C), targets (N,); got h "
                         f"{tuple(h.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    chunk_rows = chunk_rows or default_chunk_rows(weight.size(0), h.device)
    dtype = matmul_dtype(h, weight)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(h, weight, targets, ignore_index, float(softcap), chunk_rows, dtype)
    return chunked_loss_no_grad(h, weight, targets, ignore_index, float(softcap), chunk_rows, dtype)
