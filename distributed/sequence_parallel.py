"""Ulysses sequence parallelism (SPEC §10.3): S ranks share one sample's video tokens.

Each rank of a sequence-parallel (SP) group of S ranks holds 1/S of the video (image) tokens; the
text tokens of the joint attention stay whole on every rank. Around every attention call one
all-to-all turns (this rank's image tokens, all heads) into (all image tokens, this rank's heads),
the unchanged local attention runs, and one all-to-all turns the result back (DeepSpeed
`deepspeed/sequence/layer.py` `DistributedAttention`; FastVideo `fastvideo/attention/layer.py`):

    q, k, v (B, h, N/S + L, D)  --a2a-->  (B, h/S, N + L, D)  --attention-->  --a2a-->  (B, h, N/S + L, D)

The text part needs no collective on the way in (each rank takes its head slice of the text q, k, v)
and is gathered over heads on the way out in the same all-to-all as the image part.

The only communication code is `SeqAllToAll`, a new-style `torch.autograd.Function`: an all-to-all is
linear, so `backward` is the inverse all-to-all of the gradient and `jvp` the same all-to-all of the
tangent: the ordinary backward and stage 2's forward-mode JVP (`torch.autograd.forward_ad`,
`torch.func.jvp`) both pass through it (NVIDIA rCM carries tangents the same way, `rcm/utils/a2a_cp.py`).
Gathering the image tokens at the output is the same all-to-all applied to S copies of the shard.

Gradients. Every rank of an SP group computes the same loss L from the gathered output. With exact
adjoints for every collective, rank r's backward gives the gradient of sum_j L_j = S * L with respect to
its own copy of each parameter, so the S ranks' gradients sum to S * dL/dtheta: averaging over all
world-size ranks (DDP, FSDP2 over all ranks, ZeRO-3's reduce-scatter) is exactly the data-parallel average
over the world / S groups (distributed/sequence_parallel_strategy.py).

Where it runs. `ComposedBackbone.run` (models/protocol.py) shards the tokens after `embed` (`shard`) and
gathers the hidden state before `head` (`gather`); the stage-3 predictor does the same; the blocks mark
their joint attention calls with the number of leading (sharded) image tokens
(`models.layers.attention(..., sharded_tokens=n)`). Nothing happens unless a `SequenceParallel` state is
active (`activate`): the strategies activate theirs around the training / validation steps and the
backward (distributed/strategies.py), so a model run anywhere else (samplers, callbacks) is unsplit.
A length that S does not divide is padded to a multiple of S; padded tokens are masked as keys and
dropped at the gather. RoPE tables are sliced with the tokens, so positions stay the global ones.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


# --- the collective -------------------------------------------------------------------------------------
def _all_to_all(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split x into S chunks along `scatter_dim`, send chunk j to rank j of `group`, and concatenate the
    chunks received from ranks 0..S-1 along `gather_dim`."""
    s = dist.get_world_size(group)
    if x.shape[scatter_dim] % s:
        raise ValueError(f"all-to-all over {s} ranks: dim {scatter_dim} of shape {tuple(x.shape)} is not divisible "
                         f"by {s}")
    send = torch.stack(x.tensor_split(s, dim=scatter_dim)).contiguous()  # (S, ...chunk)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class SeqAllToAll(torch.autograd.Function):
    """All-to-all (scatter `scatter_dim`, gather `gather_dim`) with its adjoint as backward and itself as jvp."""

    @staticmethod
    def forward(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, ctx.group, ctx.scatter_dim, ctx.gather_dim = inputs

    @staticmethod
    def backward(ctx, grad: Tensor):
        # the adjoint of a permutation of chunks is the inverse permutation
        return SeqAllToAll.apply(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None

    @staticmethod
    def jvp(ctx, tangent: Tensor, *_):
        # linear: the tangent takes the same route as the value
        return _all_to_all(tangent, ctx.group, ctx.scatter_dim, ctx.gather_dim)


def all_to_all(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    """`SeqAllToAll`; a dual tensor without autograd (stage 2's JVP pass, `torch.no_grad()` + forward AD) sends
    its value and tangent stacked, in one collective instead of two."""
    primal, tangent = fwAD.unpack_dual(x)
    if tangent is not None and not torch.is_grad_enabled():
        d = x.ndim
        both = _all_to_all(torch.stack([primal, tangent]), group, scatter_dim % d + 1, gather_dim % d + 1)
        return fwAD.make_dual(both[0], both[1])
    return SeqAllToAll.apply(x, group, scatter_dim, gather_dim)


# --- the state: the group and this step's token layout ---------------------------------------------------
@dataclass
class Layout:
    """How the image tokens of the current sequences are split: each rank holds `local` of them (the
    last rank's tail is padding when S does not divide `total`)."""

    local: int  # image tokens per rank, padding included
    total: int  # real image tokens of the whole sequence


class SequenceParallel:
    """One rank's view of its SP group (a process group of `size` ranks; this rank is `rank` in it), and
    the token layout of the sequences it is running (set by `shard`, kept for a recomputing backward)."""

    def __init__(self, group, size: int | None = None, rank: int | None = None):
        self.group = group
        self.size = dist.get_world_size(group) if size is None else size
        self.rank = dist.get_rank(group) if rank is None else rank
        self.layout: Layout | None = None

    def __repr__(self) -> str:
        return f"SequenceParallel(size={self.size}, rank={self.rank})"


_ACTIVE: list[SequenceParallel] = []


@contextmanager
def activate(state: SequenceParallel | None):
    """Run the enclosed model calls sequence-parallel over `state`'s group (no-op for None or size 1)."""
    if state is None or state.size == 1:
        yield
        return
    _ACTIVE.append(state)
    try:
        yield
    finally:
        _ACTIVE.pop()


def current() -> SequenceParallel | None:
    """The active state, or None (models run unsplit)."""
    return _ACTIVE[-1] if _ACTIVE else None


def groups(sequence_parallel_size: int, device_type: str = "cpu"):
    """A (data-parallel, sequence-parallel) `DeviceMesh` over all ranks: rank = dp_rank * S + sp_rank, so
    each SP group is S consecutive ranks (DeepSpeed's `parallel_state_sp` layout). Collective: every rank
    calls it once, after the default process group exists."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    check_size(sequence_parallel_size, world)
    return init_device_mesh(device_type, (world // sequence_parallel_size, sequence_parallel_size),
                            mesh_dim_names=("dp", "sp"))


def check_size(sequence_parallel_size: int, world_size: int) -> None:
    """S >= 1 and S divides the number of processes, else a clear error naming the setting and the fix."""
    s = sequence_parallel_size
    if not isinstance(s, int) or s < 1:
        raise ValueError(f"--sequence_parallel_size must be a positive integer, got {s!r}")
    if world_size % s:
        raise ValueError(f"--sequence_parallel_size {s} does not divide the number of processes {world_size} "
                         f"(trainer.devices x trainer.num_nodes): choose a divisor of {world_size}, or change the "
                         f"number of devices")


def check_heads(name: str, heads: int, sequence_parallel_size: int) -> None:
    if heads % sequence_parallel_size:
        raise ValueError(f"--sequence_parallel_size {sequence_parallel_size}: {name} has {heads} attention heads, "
                         f"not divisible by {sequence_parallel_size} (Ulysses gives each rank heads/S heads): "
                         f"choose a sequence_parallel_size that divides {heads}")


def data_parallel(trainer) -> tuple[int, int]:
    """(data-parallel size, data-parallel rank) of a Lightning trainer: world / S groups; the S ranks of an
    SP group are one data-parallel replica (they read the same samples and draw the same noise)."""
    s = int(getattr(trainer.strategy, "sequence_parallel_size", 1) or 1)
    return trainer.world_size // s, trainer.global_rank // s


# --- tokens in and out ---------------------------------------------------------------------------------------
def _pad_rows(x: Tensor, dim: int, n: int) -> Tensor:
    if n == 0:
        return x
    pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, n]
    return F.pad(x, pad)


def shard_rows(x: Tensor, dim: int, state: SequenceParallel) -> Tensor:
    """This rank's slice of x along `dim` (padded with zeros to a multiple of S)."""
    n = x.shape[dim]
    local = -(-n // state.size)
    x = _pad_rows(x, dim, local * state.size - n)
    return x.narrow(dim, state.rank * local, local)


def shard(tokens):
    """`models.protocol.Tokens` with this rank's image tokens and RoPE rows (global positions); the text
    tokens whole. Records the layout in the active state. Unchanged when no SP state is active."""
    state = current()
    if state is None:
        return tokens
    n = tokens.num_img
    state.layout = Layout(local=-(-n // state.size), total=n)
    rope = None if tokens.rope is None else tuple(shard_rows(r, 0, state) for r in tokens.rope)
    return replace(tokens, img=shard_rows(tokens.img, 1, state), rope=rope)


def shard_joint(x: Tensor, num_img: int) -> Tensor:
    """(B, N_img + N_txt, H) whole on every rank -> (B, N_img/S + N_txt, H): this rank's image tokens then
    the text tokens (the layout of a sharded backbone's hidden state)."""
    state = current()
    if state is None:
        return x
    return torch.cat([shard_rows(x[:, :num_img], 1, state), x[:, num_img:]], dim=1)


def gather_rows(x: Tensor, state: SequenceParallel) -> Tensor:
    """(B, N_img/S, ...) shards -> (B, N_img, ...) on every rank (padding dropped). It is the all-to-all of S
    copies of the shard, so its backward sums the S ranks' gradients of this rank's rows (exact adjoint)."""
    layout = state.layout
    copies = x.unsqueeze(1).expand(x.shape[0], state.size, *x.shape[1:])  # (B, S, n, ...)
    full = all_to_all(copies, state.group, scatter_dim=1, gather_dim=2)  # (B, 1, S * n, ...)
    return full.squeeze(1)[:, : layout.total]


def gather_image(x: Tensor) -> Tensor:
    """Image-token rows (B, N_img/S, ...) -> (B, N_img, ...) on every rank; unchanged when no SP state is active."""
    state = current()
    return x if state is None else gather_rows(x, state)


def gather(hidden: Tensor, features: list[Tensor] = ()) -> tuple[Tensor, list[Tensor]]:
    """Inverse of `shard` for a hidden state (B, N_img/S + N_txt, H) and image-token features
    (B, N_img/S, H): whole sequences on every rank. Unchanged when no SP state is active."""
    state = current()
    if state is None:
        return hidden, list(features)
    n = state.layout.local
    hidden = torch.cat([gather_rows(hidden[:, :n], state), hidden[:, n:]], dim=1)
    return hidden, [gather_rows(f, state) for f in features]


# --- the attention wrapper ------------------------------------------------------------------------------------
def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, sharded_tokens: int,
                      local_attention: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]) -> Tensor:
    """Joint attention over q, k, v (B, h, n + L, D) whose first n = `sharded_tokens` tokens are this rank's
    image tokens and whose L last tokens (text) are whole on every rank; `key_mask` (B, n + L) bool or
    None. Runs `local_attention(q, k, v, mask)` (the backend in use, its JVP rule included) on
    (all image tokens + text, h/S heads) and returns this rank's (B, h, n + L, D)."""
    state = current()
    layout = state.layout if state is not None else None
    if layout is None or sharded_tokens != layout.local:
        raise RuntimeError(f"sequence-parallel attention got {sharded_tokens} sharded tokens but the active layout is "
                           f"{layout}: the model path calling it did not shard its tokens with "
                           f"distributed.sequence_parallel.shard")
    s, n, h = state.size, sharded_tokens, q.shape[1]
    check_heads("this attention call", h, s)
    hs = slice(state.rank * (h // s), (state.rank + 1) * (h // s))
    # in: image tokens (B, h, n, D) -> (B, h/S, S*n, D) in one collective for q, k, v; text: this rank's heads
    img = all_to_all(torch.stack([q[:, :, :n], k[:, :, :n], v[:, :, :n]]), state.group, scatter_dim=2, gather_dim=3)
    q2, k2, v2 = (torch.cat([img[i], x[:, hs, n:]], dim=2) for i, x in enumerate((q, k, v)))
    mask = None
    if key_mask is not None or layout.total != s * n:
        b = q.shape[0]
        img_mask = (torch.arange(s * n, device=q.device) < layout.total).expand(b, s * n)
        txt_mask = key_mask[:, n:] if key_mask is not None else img_mask.new_ones(b, q.shape[2] - n)
        mask = torch.cat([img_mask, txt_mask.bool()], dim=1)
    out = local_attention(q2, k2, v2, mask)  # (B, h/S, S*n + L, D)
    # out: per destination rank j, [its image rows, the text rows] -> (B, h, n + L, D) on every rank
    n_txt = out.shape[2] - s * n
    img_out = out[:, :, : s * n].unflatten(2, (s, n))  # (B, h/S, S, n, D)
    txt_out = out[:, :, s * n:].unsqueeze(2).expand(-1, -1, s, -1, -1)  # (B, h/S, S, L, D)
    send = torch.cat([img_out, txt_out], dim=3).flatten(2, 3)  # (B, h/S, S * (n + L), D)
    return all_to_all(send, state.group, scatter_dim=2, gather_dim=1).reshape(q.shape[0], h, n + n_txt, -1)
