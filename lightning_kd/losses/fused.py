r"""Fused linear distillation: the loss from hidden states and output weights, without the full logits.

A language model's logits ``(B·S, V)`` are the memory problem of token-level distillation: at
``B·S = 4096`` and ``V = 32k`` one float32 copy is 512 MiB, and the log-softmaxes, probabilities and
their gradients multiply that. The functions here take both models' last hidden states and output
weights (``lm_head``) instead, and loop over chunks of ``chunk_size`` valid tokens. Per chunk: both
models' logits in float32 (one reused ``(chunk, V)`` buffer each); then, in blocks of rows, the
log-probabilities (the operations of :func:`~lightning_kd.losses.log_probs`, into reused buffers), the
divergence by the loss objects' own per-position code (:func:`~lightning_kd.losses.kl_sum`, the
per-position functions of :mod:`~lightning_kd.losses.divergences`) and its closed-form gradient with respect to the student's logits, written over them; two matrix
products turn that into the gradients of the student's hidden rows, weight and bias. Backward only
multiplies the stored gradients by the incoming one (the design of Liger Kernel's
``LigerFusedLinearDistillationBase``, written here in plain PyTorch).

The value is the loss object's on the materialised logits ``hidden @ weight.T + bias`` with the same
``mask``, float32 math whatever the input dtype; the gradients are its autograd gradients up to float32
rounding (the sums run in another order). Masked positions are skipped, not computed. The teacher's
tensors are constants. Like the loss objects, the mean is over this call's valid positions.

Closed-form gradients per position, with :math:`u = z_s / T`, :math:`p = \mathrm{softmax}(u)` and the
divergence :math:`D`: forward KL :math:`\partial D / \partial u = p_s - p_t`; reverse KL
:math:`p_s \odot (\log p_s - \log p_t - D)`; generalised JSD (:math:`0 < \beta < 1`, mixture :math:`m`)
:math:`(1 - \beta)\, p_s \odot (e - \sum_c p_{s,c} e_c)` with :math:`e = \log p_s - \log m`; skew KL
:math:`-(1 - \lambda)(r - p_s \sum_c r_c)` with :math:`r = p_s \odot p_t / m`; the hard cross-entropy
(at :math:`T = 1`) :math:`\mathrm{softmax}(z_s) - \mathrm{onehot}(y)`. Each times :math:`T^2` (with
``scale_by_t2``), :math:`1 / T`, the term's weight and one over the number of valid positions.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kd._checks import check_number
from lightning_kd.losses._reduction import check_weight, kl_sum
from lightning_kd.losses.base import LogitLoss
from lightning_kd.losses.divergences import (
    JSDLoss,
    ReverseKLLoss,
    SkewKLLoss,
    _log_mixture,
    jsd_per_position,
    reverse_kl_per_position,
    skew_kl_per_position,
)
from lightning_kd.losses.hard import IGNORE_INDEX
from lightning_kd.losses.kd import KDLoss

_FUSABLE = (KDLoss, ReverseKLLoss, JSDLoss, SkewKLLoss)
_compiler_disabled_loop = None


@dataclass(frozen=True)
class _Divergence:
    """What the chunk loop needs of a loss object: which divergence, its mixture weight, ``T`` and the ``T²`` factor."""

    kind: str  # "forward_kl", "reverse_kl", "jsd" or "skew_kl"
    weight: float  # JSD's beta or skew KL's lambda
    temperature: float
    scale: float  # T² with scale_by_t2, else 1


@dataclass(frozen=True)
class _Terms:
    """The settings of one call: the soft divergence, the two weights, the ignore index and the chunk size."""

    div: _Divergence
    soft_weight: float
    hard_weight: float
    ignore_index: int
    chunk_size: int


def _resolve_loss(loss: LogitLoss | None, temperature: float) -> _Divergence:
    """The divergence a loss object computes, or a ValueError saying why it cannot be fused."""
    temperature = check_number(temperature, "temperature")
    if loss is None:
        loss = KDLoss(temperature=temperature)  # checks the temperature
    elif type(loss) not in _FUSABLE:
        raise ValueError(
            "Expected `loss` to be one of KDLoss, ReverseKLLoss, JSDLoss or SkewKLLoss (the divergences the fused "
            f"loss computes chunk by chunk), but got {type(loss).__name__}. Apply it to materialised logits instead."
        )
    if loss.learned:
        raise ValueError(
            f"Expected a {type(loss).__name__} with a number as its temperature, but got a LearnableTemperature: "
            "the fused loss does not learn the temperature. Give the loss a number, or use materialised logits."
        )
    if loss.standardize:
        raise ValueError(
            f"Expected a {type(loss).__name__} with `standardize=False`: logit standardisation needs each position's "
            "full logit vector twice (mean and std) and is not fused. Use materialised logits for it."
        )
    if temperature != 1.0 and temperature != loss.temperature:
        raise ValueError(
            f"Expected `temperature` to be left at 1.0 or to equal the loss's temperature {loss.temperature}, but got "
            f"{temperature}: the loss object's temperature is the one used. Set it on the loss "
            f"({type(loss).__name__}(temperature={temperature}, ...))."
        )
    if isinstance(loss, JSDLoss):  # its ends are exactly forward and reverse KL
        kind, weight = {0.0: ("forward_kl", 0.0), 1.0: ("reverse_kl", 1.0)}.get(loss.beta, ("jsd", loss.beta))
    elif isinstance(loss, SkewKLLoss):
        kind, weight = "skew_kl", loss.skew
    else:
        kind, weight = ("forward_kl", 0.0) if isinstance(loss, KDLoss) else ("reverse_kl", 1.0)
    t = float(loss.temperature)
    return _Divergence(kind, weight, t, t * t if loss.scale_by_t2 else 1.0)


def _log_probs_into(z: Tensor, temperature: float, out: Tensor) -> Tensor:
    """:func:`log_probs` of float32 logits ``z`` (divided by ``T`` in place: the same operations, the same bits),
    written into a reused buffer ``out``."""
    if temperature != 1.0:  # z / 1.0 == z exactly: one pass less
        z.div_(temperature)
    return torch.log_softmax(z, dim=-1, out=out)


def _divergence(log_p_s: Tensor, log_p_t: Tensor, div: _Divergence) -> Tensor:
    """The per-position value, by the loss objects' own per-position code."""
    if div.kind == "forward_kl":
        return kl_sum(log_p_t, log_p_s)  # what kd.kl_per_position computes from the same log-probabilities
    if div.kind == "reverse_kl":
        return reverse_kl_per_position(log_p_s, log_p_t)
    if div.kind == "jsd":
        return jsd_per_position(log_p_s, log_p_t, div.weight)
    return skew_kl_per_position(log_p_s, log_p_t, div.weight)


def _divergence_grad(log_p_s: Tensor, log_p_t: Tensor, per_position: Tensor, div: _Divergence) -> Tensor:
    """``dD/du`` per position (``u = z_s / T``), shape ``(c, V)``. Overwrites ``log_p_s`` and ``log_p_t``.

    Classes that are ``-inf`` in both models get exactly zero, as the loss objects' autograd gives:
    a ``0 · (-inf)`` is filled with zero before it can become NaN.
    """
    if div.kind == "forward_kl":
        return log_p_s.exp_().sub_(log_p_t.exp_())
    if div.kind == "reverse_kl":
        p_s = log_p_s.exp()
        d = log_p_t.neg_().add_(log_p_s).masked_fill_(p_s == 0, 0.0)  # log p_s - log p_t
        return d.sub_(per_position.unsqueeze(-1)).mul_(p_s)
    log_m = _log_mixture(log_p_t, log_p_s, div.weight)
    if div.kind == "jsd":
        p_s = log_p_s.exp()
        e = log_p_s.sub_(log_m).masked_fill_(p_s == 0, 0.0)  # log p_s - log m
        kl_s_m = torch.mul(p_s, e).sum(dim=-1, keepdim=True)
        return e.sub_(kl_s_m).mul_(p_s).mul_(1.0 - div.weight)
    r = log_p_t.add_(log_p_s).sub_(log_m).exp_()  # p_s p_t / m, zero where either is zero
    p_s = log_p_s.exp_()
    return p_s.mul_(r.sum(dim=-1, keepdim=True)).sub_(r).mul_(1.0 - div.weight)


class _FusedLinearDistillation(torch.autograd.Function):
    """Chunked forward that also computes the student's gradients; backward rescales them."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher: tuple, targets: Tensor | None,
                rows: Tensor | None, terms: _Terms) -> tuple[Tensor, Tensor, Tensor]:
        with torch.autocast(hidden.device.type, enabled=False):  # float32 math, also under bf16 autocast
            out = _eager_chunk_loop()(ctx.needs_input_grad[:3], hidden, weight, bias, teacher, targets, rows, terms)
        combined, soft, hard, grads = out
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(soft, hard)
        return combined, soft, hard

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        # in place: no second (V, H) buffer at the end of backward. A second backward through the same graph
        # (retain_graph=True) is then refused by autograd's check of modified saved tensors, not computed wrong.
        grads = [None if g is None else g.mul_(grad_output).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None)


def _eager_chunk_loop() -> Any:
    """:func:`_chunk_loop`, kept out of ``torch.compile``: dynamo would unroll its Python loops over the chunks
    and blocks into one huge graph, for no gain (the time is in the matrix products). Made on first use, and
    only once dynamo is loaded, because importing it costs more than a second."""
    global _compiler_disabled_loop
    if "torch._dynamo" not in sys.modules:  # nothing is being compiled
        return _chunk_loop
    if _compiler_disabled_loop is None:
        _compiler_disabled_loop = torch.compiler.disable(_chunk_loop)
    return _compiler_disabled_loop


# rows per block of the elementwise work: its temporaries are (rows, V) float32 blocks of about 16 MiB, while
# the matrix products run on whole chunks (larger products are faster). On 2 shared CPU cores, V = 32k, chunk
# 256: peak about +200 MiB with 8 MiB blocks, +300 MiB with 16 MiB, +430 MiB with the whole chunk (32 MiB); the
# smaller the blocks, the more (smaller) operations, which on a loaded machine cost time (docs/benchmarks.md)
_BLOCK_ELEMENTS = 1 << 22


def _chunk_loop(needs_grad: tuple[bool, ...], hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher: tuple,
                targets: Tensor | None, rows: Tensor | None, terms: _Terms) -> tuple[Tensor, Tensor, Tensor, tuple]:
    """Value and gradients, chunk by chunk. ``hidden`` ``(N, H_s)``, ``teacher`` ``(hidden (N, H_t), weight, bias)``
    or None, ``targets`` ``(N,)`` or None, ``rows`` the positions to compute (None: all N)."""
    div, soft_weight, hard_weight, chunk_size = terms.div, terms.soft_weight, terms.hard_weight, terms.chunk_size
    soft_on, hard_on = teacher is not None, targets is not None
    teacher_hidden, teacher_weight, teacher_bias = teacher or (None, None, None)
    # upcast once, not per chunk (a no-op for float32 weights)
    w = weight.float()
    b = None if bias is None else bias.float()
    w_t = teacher_weight.float() if soft_on else None
    b_t = None if teacher_bias is None else teacher_bias.float()
    device, vocab = hidden.device, w.shape[0]
    n_rows = hidden.shape[0] if rows is None else rows.numel()
    labeled = None
    if hard_on:
        labeled = (targets if rows is None else targets[rows]) != terms.ignore_index
    count_soft = n_rows
    count_hard = int(labeled.sum()) if hard_on else 0
    need_h, need_w, need_b = needs_grad
    need_b = need_b and bias is not None
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
    any_grad = need_h or need_w or need_b
    # the loss is a mean over valid positions: each position's gradient carries 1/count (and 1/T from z/T)
    soft_coef = soft_weight * div.scale / (div.temperature * max(count_soft, 1))
    hard_coef = hard_weight / max(count_hard, 1)
    soft_total = torch.zeros((), dtype=torch.float64, device=device)
    hard_total = torch.zeros((), dtype=torch.float64, device=device)
    # two (chunk, V) buffers for the whole call: the student's logits (then, block by block, their
    # gradient) and the teacher's. Reused chunk after chunk: no allocation, no page faults
    size = min(chunk_size, n_rows)
    logits = torch.empty(size, vocab, dtype=torch.float32, device=device)
    teacher_logits = torch.empty(size, vocab, dtype=torch.float32, device=device) if soft_on else None
    block = min(size, max(1, _BLOCK_ELEMENTS // max(vocab, 1)))
    # the log-probabilities of a block: reused too, and overwritten by its gradient
    log_p_buffers = [torch.empty(block, vocab, dtype=torch.float32, device=device) for _ in range(2)] if soft_on else None
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        index = None if rows is None else rows[start:end]
        h = (hidden[start:end] if index is None else hidden.index_select(0, index)).float()
        z = logits[: end - start]  # (c, V)
        torch.mm(h, w.t(), out=z) if b is None else torch.addmm(b, h, w.t(), out=z)
        if soft_on:
            h_t = (teacher_hidden[start:end] if index is None else teacher_hidden.index_select(0, index)).float()
            z_t = teacher_logits[: end - start]
            torch.mm(h_t, w_t.t(), out=z_t) if b_t is None else torch.addmm(b_t, h_t, w_t.t(), out=z_t)
        if hard_on:
            y = targets[start:end] if index is None else targets.index_select(0, index)
            ok = labeled[start:end]
            y = torch.where(ok, y, 0).unsqueeze(1)  # (c, 1), any class for the unlabeled rows
        for r in range(0, end - start, block):
            s = slice(r, min(r + block, end - start))
            grad = None
            n = s.stop - s.start
            log_q = log_p_s = None
            if hard_on and not (soft_on and div.temperature == 1.0):  # before z / T overwrites the logits
                log_q = torch.log_softmax(z[s], dim=-1)
            if soft_on:
                log_p_s = _log_probs_into(z[s], div.temperature, log_p_buffers[0][:n])
                log_p_t = _log_probs_into(z_t[s], div.temperature, log_p_buffers[1][:n])
                per_position = _divergence(log_p_s, log_p_t, div)  # (rows,)
                soft_total += per_position.sum(dtype=torch.float64)
            if hard_on:
                log_q = log_p_s if log_q is None else log_q  # at T = 1 the soft term's log-softmax is the hard term's
                hard_total -= torch.where(ok[s], log_q.gather(1, y[s]).squeeze(1), 0.0).sum(dtype=torch.float64)
                if any_grad and hard_weight != 0:
                    # softmax(z) - onehot(y), on the labeled rows only
                    grad = (log_q.exp() if log_q is log_p_s else log_q.exp_()).mul_(ok[s].unsqueeze(1) * hard_coef)
                    grad.scatter_add_(1, y[s], (ok[s] * -hard_coef).to(grad.dtype).unsqueeze(1))
                log_q = None
            # this block's logits are no longer needed: from here the buffer holds their gradient
            if any_grad and soft_on and soft_weight != 0:
                g = _divergence_grad(log_p_s, log_p_t, per_position, div)
                if grad is None:
                    torch.mul(g, soft_coef, out=z[s])
                else:
                    torch.add(grad, g, alpha=soft_coef, out=z[s])
            elif grad is not None:
                z[s].copy_(grad)
            else:
                z[s].zero_()
        if not any_grad:
            continue
        if need_h:
            if index is None:
                torch.mm(z, w, out=grad_h[start:end])
            else:
                grad_h.index_copy_(0, index, z @ w)
        if need_w:
            grad_w.addmm_(z.t(), h)
        if need_b:
            grad_b += z.sum(dim=0)
    soft = (soft_total * (div.scale / max(count_soft, 1))).float()
    hard = (hard_total / max(count_hard, 1)).float()
    combined = soft_weight * soft + hard_weight * hard
    return combined, soft, hard, (grad_h, grad_w, grad_b)


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"Expected `chunk_size` to be an int, but got {chunk_size!r} ({type(chunk_size).__name__}).")
    if chunk_size < 1:
        raise ValueError(f"Expected `chunk_size` to be >= 1, but got {chunk_size}.")


def _check_inputs(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor | None, teacher_weight: Tensor | None,
                  mask: Tensor | None, chunk_size: int, student_bias: Tensor | None, teacher_bias: Tensor | None) -> None:
    _check_chunk_size(chunk_size)
    if student_hidden.dim() < 2:
        raise ValueError(f"Expected `student_hidden` of shape (N, H) or (B, S, H), but got {tuple(student_hidden.shape)}.")
    models = [("student", student_hidden, student_weight, student_bias)]
    if teacher_hidden is not None:
        models.append(("teacher", teacher_hidden, teacher_weight, teacher_bias))
        if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(
                "Expected student and teacher hidden states for the same positions, but got student "
                f"{tuple(student_hidden.shape)} and teacher {tuple(teacher_hidden.shape)} (only the last dimension may differ)."
            )
        if teacher_weight.dim() == 2 and student_weight.dim() == 2 and teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(
                f"Expected student and teacher output weights with the same vocabulary size, but got student "
                f"{student_weight.shape[0]} and teacher {teacher_weight.shape[0]}. Slice both to the shared vocabulary "
                f"first (e.g. `teacher_weight[:{min(student_weight.shape[0], teacher_weight.shape[0])}]`)."
            )
    for name, hidden, weight, bias in models:
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"Expected the {name}'s output weight of shape (V, {hidden.shape[-1]}) (its hidden size), but got "
                f"{tuple(weight.shape)}."
            )
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"Expected the {name}'s bias of shape ({weight.shape[0]},), but got {tuple(bias.shape)}.")
    if mask is not None and mask.shape != student_hidden.shape[:-1]:
        raise ValueError(
            f"Expected `mask` of shape {tuple(student_hidden.shape[:-1])} (the hidden states without their last "
            f"dimension), but got {tuple(mask.shape)}."
        )


def _check_targets(targets: Tensor, lead: torch.Size, vocab: int, ignore_index: int) -> None:
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"Expected integer class indices as `targets`, but got dtype {targets.dtype}.")
    if targets.shape != lead:
        raise ValueError(f"Expected `targets` of shape {tuple(lead)} (the hidden states without their last dimension), "
                         f"but got {tuple(targets.shape)}.")
    valid = targets[targets != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
        raise ValueError(
            f"Expected `targets` in [0, {vocab}) or {ignore_index} (`ignore_index`, unlabeled), but got values in "
            f"[{int(valid.min())}, {int(valid.max())}]."
        )


def _flat(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.reshape(-1, x.shape[-1])


def fused_linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    targets: Tensor,
    *,
    loss: LogitLoss | None = None,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    mask: Tensor | None = None,
    chunk_size: int = 256,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Soft (teacher) and hard (cross-entropy) terms from hidden states and output weights, in one chunked pass.

    .. math::
        \mathcal{L} = w_{\text{soft}} \cdot \mathcal{L}_{\text{soft}}\big(h_s W_s^\top + b_s,\; h_t W_t^\top + b_t\big)
            + w_{\text{hard}} \cdot \frac{1}{|L|} \sum_{i \in L} -\log \mathrm{softmax}(h_{s,i} W_s^\top + b_s)_{y_i}

    where :math:`\mathcal{L}_{\text{soft}}` is ``loss`` (mean over the ``mask`` positions, see
    :func:`fused_linear_kd_loss`) and :math:`L` the positions whose target is not ``ignore_index``
    (and whose ``mask`` is True). The hard term has the value of
    ``F.cross_entropy(logits, targets, ignore_index=ignore_index)``, at :math:`T = 1` whatever the
    loss's temperature. Both share each chunk's student logits (and, at :math:`T = 1`, its log-softmax).

    Shape:
        - student_hidden: :math:`(N, H_s)` or :math:`(B, S, H_s)`; teacher_hidden: the same with :math:`H_t`.
        - student_weight: :math:`(V, H_s)`; teacher_weight: :math:`(V, H_t)`; biases: :math:`(V,)`.
        - targets, mask: the hidden states' shape without :math:`H`.
        - Output: three float32 scalars.

    Args:
        student_hidden: the student's last hidden states (trained).
        student_weight: the student's output projection (``lm_head.weight``, possibly tied to its embedding).
        teacher_hidden: the teacher's last hidden states (constants), or None when ``soft_weight == 0``.
        teacher_weight: the teacher's output projection (a constant), or None with ``teacher_hidden``.
        targets: a class index per position, ``ignore_index`` where unlabeled.
        loss: the soft loss, as for :func:`fused_linear_kd_loss`; None: ``KDLoss(temperature=1.0)``.
        soft_weight: :math:`w_{\text{soft}} \ge 0`.
        hard_weight: :math:`w_{\text{hard}} \ge 0`.
        mask: bool, True where a position counts (in both terms); None: all.
        chunk_size: valid positions per chunk (memory: a few ``(chunk_size, V)`` float32 blocks).
        student_bias: the student's output bias, or None.
        teacher_bias: the teacher's output bias, or None.
        ignore_index: the target value of unlabeled positions.

    Returns:
        ``(combined, soft, hard)``: ``combined`` carries the gradient; ``soft`` and ``hard`` are the
        two terms' detached values (``soft`` is 0 without a teacher, each is 0 without a valid position).

    Raises:
        ValueError: everything :func:`fused_linear_kd_loss` refuses; a ``soft_weight`` or
            ``hard_weight`` that is not a finite number >= 0; no teacher with ``soft_weight != 0``;
            targets of the wrong shape or outside ``[0, V)`` (``ignore_index`` aside).
        TypeError: targets that are not integers, a ``chunk_size`` that is not an int.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> h_s, w_s = torch.randn(6, 8, generator=g), torch.randn(10, 8, generator=g)
        >>> h_t, w_t = torch.randn(6, 4, generator=g), torch.randn(10, 4, generator=g)
        >>> y = torch.tensor([1, 2, 3, -100, 5, 6])
        >>> total, soft, hard = fused_linear_distillation_loss(h_s, w_s, h_t, w_t, y, soft_weight=0.5, hard_weight=0.5)
        >>> bool(torch.isclose(hard, torch.nn.functional.cross_entropy(h_s @ w_s.T, y)))
        True
        >>> bool(torch.isclose(total, 0.5 * soft + 0.5 * hard))
        True
    """
    soft_weight = check_number(soft_weight, "soft_weight")
    hard_weight = check_number(hard_weight, "hard_weight")
    check_weight("soft_weight", soft_weight)
    check_weight("hard_weight", hard_weight)
    if teacher_hidden is None and soft_weight != 0:
        raise ValueError(
            f"Expected `teacher_hidden` and `teacher_weight` for the soft term (soft_weight={soft_weight}), but got None. "
            "Pass soft_weight=0.0 for the hard term alone."
        )
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("Expected `teacher_hidden` and `teacher_weight` both given or both None.")
    div = _resolve_loss(loss, 1.0)
    return _fused(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, div, soft_weight,
                  hard_weight, mask, chunk_size, student_bias, teacher_bias, ignore_index)


def _fused(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor | None, teacher_weight: Tensor | None,
           targets: Tensor | None, div: _Divergence, soft_weight: float, hard_weight: float, mask: Tensor | None,
           chunk_size: int, student_bias: Tensor | None, teacher_bias: Tensor | None, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, chunk_size, student_bias, teacher_bias)
    lead = student_hidden.shape[:-1]
    if targets is not None:
        _check_targets(targets, lead, student_weight.shape[0], ignore_index)
        targets = targets.reshape(-1)
    # the positions to compute: those the mask keeps (for the hard term alone, the labeled ones among them)
    keep = None if mask is None else mask.reshape(-1).to(torch.bool)
    if teacher_hidden is None and targets is not None:
        labeled = targets != ignore_index
        keep = labeled if keep is None else keep & labeled
    rows = None if keep is None or bool(keep.all()) else keep.nonzero().squeeze(1)
    teacher = None
    if teacher_hidden is not None:  # constants: never a gradient
        teacher = (_flat(teacher_hidden.detach()), teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach())
    terms = _Terms(div, soft_weight, hard_weight, ignore_index, chunk_size)
    return _FusedLinearDistillation.apply(_flat(student_hidden), student_weight, student_bias, teacher, targets, rows, terms)


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    temperature: float = 1.0,
    *,
    loss: LogitLoss | None = None,
    mask: Tensor | None = None,
    chunk_size: int = 256,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
) -> Tensor:
    r"""A distillation loss on the logits ``hidden @ weight.T + bias`` of both models, never materialising them.

    Equals ``loss(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t, mask=mask)`` (float32 math, mean over the
    valid positions, the loss's own :math:`T` and :math:`T^2` option) and has its gradients with respect
    to the student's hidden states, weight and bias, but holds only a few ``(chunk_size, V)`` float32
    blocks at a time instead of several ``(N, V)`` ones (the design is in :mod:`lightning_kd.losses.fused`).
    With the default ``KDLoss`` at :math:`T`:

    .. math::
        \mathcal{L} = T^2 \cdot \frac{1}{|M|} \sum_{i \in M} \mathrm{KL}\big(\mathrm{softmax}(z^t_i / T) \,\|\,
            \mathrm{softmax}(z^s_i / T)\big), \qquad z^s = h_s W_s^\top + b_s,\; z^t = h_t W_t^\top + b_t

    The student's weight may be its input embedding (tied embeddings): its gradient from here adds
    to the embedding's through autograd. Teacher tensors are constants. Under bf16 autocast, or with
    bf16 inputs, the math is float32 (weights upcast once) and the gradients come back in the inputs' dtypes.

    Shape:
        - student_hidden: :math:`(N, H_s)` or :math:`(B, S, H_s)`; teacher_hidden: the same positions, :math:`H_t`.
        - student_weight: :math:`(V, H_s)`; teacher_weight: :math:`(V, H_t)` (the same :math:`V`).
        - student_bias, teacher_bias: :math:`(V,)`, optional.
        - mask: the hidden states' shape without :math:`H` (bool, True = counts), optional.
        - Output: scalar, float32.

    Args:
        student_hidden: the student's last hidden states (trained).
        student_weight: the student's output projection.
        teacher_hidden: the teacher's last hidden states.
        teacher_weight: the teacher's output projection.
        temperature: :math:`T` of the default ``KDLoss(temperature=temperature)``; with a ``loss``,
            leave it at 1.0 or give the loss's own temperature.
        loss: :class:`KDLoss` (forward KL), :class:`ReverseKLLoss`, :class:`JSDLoss` (``beta`` in [0, 1])
            or :class:`SkewKLLoss`, with a number as temperature and ``standardize=False``.
        mask: the positions to average over; masked ones are skipped. None, or no valid position:
            a zero that is connected to the graph (zero gradients).
        chunk_size: valid positions per chunk.
        student_bias: the student's output bias, or None.
        teacher_bias: the teacher's output bias, or None.

    Raises:
        ValueError: for another loss (DKDLoss, DISTLoss, SoftMSELoss, ...), a learned temperature
            (LearnableTemperature), ``standardize=True``, a ``temperature`` that differs from the
            loss's, different vocabulary sizes, shapes that do not fit, or a ``chunk_size`` < 1.
        TypeError: for a ``chunk_size`` that is not an int.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> h_s, w_s = torch.randn(6, 8, generator=g), torch.randn(10, 8, generator=g)
        >>> h_t, w_t = torch.randn(6, 4, generator=g), torch.randn(10, 4, generator=g)
        >>> fused = fused_linear_kd_loss(h_s, w_s, h_t, w_t, loss=KDLoss(temperature=2.0), chunk_size=4)
        >>> bool(torch.isclose(fused, KDLoss(temperature=2.0)(h_s @ w_s.T, h_t @ w_t.T)))
        True
    """
    div = _resolve_loss(loss, temperature)
    if (teacher_hidden is None) or (teacher_weight is None):
        raise ValueError("Expected `teacher_hidden` and `teacher_weight`, but got None.")
    combined, _, _ = _fused(student_hidden, student_weight, teacher_hidden, teacher_weight, None, div, 1.0, 0.0, mask,
                            chunk_size, student_bias, teacher_bias, IGNORE_INDEX)
    return combined


class FusedLinearKDLoss(nn.Module):
    """:func:`fused_linear_kd_loss` as a module, with the loss object fixed at construction.

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, *, mask=None,
    student_bias=None, teacher_bias=None)``.

    Args:
        loss: :class:`KDLoss`, :class:`ReverseKLLoss`, :class:`JSDLoss` or :class:`SkewKLLoss`; None:
            ``KDLoss(temperature=1.0)``.
        chunk_size: valid positions per chunk.

    Raises:
        ValueError: for a loss that cannot be fused (see :func:`fused_linear_kd_loss`) or a ``chunk_size`` < 1.
        TypeError: for a ``chunk_size`` that is not an int.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> h_s, w_s = torch.randn(6, 8, generator=g), torch.randn(10, 8, generator=g)
        >>> h_t, w_t = torch.randn(6, 4, generator=g), torch.randn(10, 4, generator=g)
        >>> fused = FusedLinearKDLoss(ReverseKLLoss(), chunk_size=4)(h_s, w_s, h_t, w_t)
        >>> bool(torch.isclose(fused, ReverseKLLoss()(h_s @ w_s.T, h_t @ w_t.T)))
        True
    """

    def __init__(self, loss: LogitLoss | None = None, *, chunk_size: int = 256) -> None:
        super().__init__()
        _resolve_loss(loss, 1.0)
        _check_chunk_size(chunk_size)
        self.loss = loss
        self.chunk_size = chunk_size

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        *,
        mask: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
    ) -> Tensor:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, loss=self.loss, mask=mask,
                                    chunk_size=self.chunk_size, student_bias=student_bias, teacher_bias=teacher_bias)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"
