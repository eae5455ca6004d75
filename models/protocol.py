"""The backbone protocol every stage and sampler talks to.

A backbone maps a noisy video latent to a velocity (stage 0/1) or a mean velocity (stage 2):

    run(x, t, text, r=None, guidance=None) -> BackboneOutput(velocity, hidden, features)

and exposes its pieces so the learned predictor (stage 3) and the training-free caches can reuse
them:

    embed(x, text, t=None)            -> Tokens   (image tokens, text tokens, RoPE, grid;
                                                   t is used by HunyuanVideo's token refiner)
    condition(t, r, guidance, pooled) -> vec      (B, H) adaLN conditioning vector
    transformer(tokens, vec, hook)    -> hidden   (B, N_img + N_txt, H), features
    head(hidden, vec, tokens)         -> velocity (B, C, F, H, W)

`run` is exactly `head(transformer(embed(...), condition(...)))`; tests check the recomposition.

Conventions (SPEC §2): t and r are float32 in [0, 1], t = 1 is noise; guidance is the raw CFG scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from distributed import sequence_parallel


@dataclass
class TextCond:
    """Text conditioning for a batch: token embeddings, their padding mask and a pooled vector."""

    tokens: Tensor  # (B, L, D_txt)
    mask: Tensor  # (B, L) bool, True = real token
    pooled: Tensor  # (B, D_pool)

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise ValueError(f"text tokens must be (B, L, D), got shape {tuple(self.tokens.shape)}")
        if self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"text mask shape {tuple(self.mask.shape)} does not match tokens {tuple(self.tokens.shape[:2])}"
            )
        if self.pooled.ndim != 2 or self.pooled.shape[0] != self.tokens.shape[0]:
            raise ValueError(f"pooled text must be (B, D) with B={self.tokens.shape[0]}, got {tuple(self.pooled.shape)}")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def to(self, *args, **kwargs) -> "TextCond":
        return TextCond(self.tokens.to(*args, **kwargs), self.mask.to(kwargs.get("device", self.mask.device)),
                        self.pooled.to(*args, **kwargs))

    def cat(self, other: "TextCond") -> "TextCond":
        """Batch-concatenate two conditions (used to run cond and uncond in one call)."""
        return TextCond(torch.cat([self.tokens, other.tokens]), torch.cat([self.mask, other.mask]),
                        torch.cat([self.pooled, other.pooled]))

    def index(self, idx: Tensor | slice) -> "TextCond":
        return TextCond(self.tokens[idx], self.mask[idx], self.pooled[idx])


@dataclass
class Tokens:
    """Embedded inputs of one forward pass."""

    img: Tensor  # (B, N_img, H)
    txt: Tensor  # (B, N_txt, H)
    txt_mask: Tensor  # (B, N_txt) bool
    grid: tuple[int, int, int]  # (F', H', W') patch grid of the image tokens
    rope: tuple[Tensor, Tensor] | None = None  # cos, sin for image tokens, (N_img, head_dim)
    extra: dict = field(default_factory=dict)  # backbone-specific (e.g. diffusers attention masks)

    @property
    def num_img(self) -> int:
        return self.img.shape[1]


@dataclass
class BackboneOutput:
    velocity: Tensor  # (B, C, F, H, W)
    hidden: Tensor | None = None  # (B, N_img + N_txt, H): final hidden state before the output norm
    features: list[Tensor] = field(default_factory=list)  # image-token hidden states after chosen blocks


class FeatureHook:
    """Block-level interception point used by the training-free caches (FORA, PAB, TeaCache, ...).

    Backbones call `observe` with cheap signals (e.g. block 0's modulated input) and route every
    cacheable output through `delta(key, fn)`: a plain forward calls `fn()`; a cache may instead
    return a stored or forecast tensor. Keys:

    - `blocks` (the whole stack's residual) and `single_blocks` (the single-stream stack's
      residual): residuals, added to the stack's input as they are;
    - `double{i}.attn`, `double{i}.mlp`, `single{i}.attn`, `single{i}.mlp` (Wan also
      `double{i}.cross`, its ungated cross-attention): the block's attention / MLP output BEFORE
      its adaLN gate. The block multiplies the returned tensor by the gate of the CURRENT step
      outside the hook, so a cache that reuses or forecasts these keys reuses the pre-gate output
      and applies the current gate, as the references do (FORA `src/models.py`, TaylorSeer
      `TaylorSeer-HunyuanVideo`, and diffusers' `hooks/pyramid_attention_broadcast.py` /
      `hooks/taylorseer_cache.py`, which hook the attention and feed-forward modules);
    - the observed `modulated_input` of block 0.
    """

    def begin_step(self, step: int, t: float) -> None:
        """Called by the sampler before each sampling step (step index and its start time)."""

    def observe(self, key: str, value: Tensor) -> None:
        """Receives cheap signals such as block 0's modulated input."""

    def delta(self, key: str, fn: Callable[[], Tensor]) -> Tensor:
        return fn()


PLAIN = FeatureHook()


def observes(hook: FeatureHook) -> bool:
    """Whether `hook` uses `observe` signals: backbones skip computing them otherwise (they read a
    block's weights outside that block's forward, which per-block sharding does not gather)."""
    return type(hook).observe is not FeatureHook.observe


@runtime_checkable
class VideoBackbone(Protocol):
    """What stages and samplers require of a backbone (see module docstring)."""

    config: dict
    hidden_size: int
    num_blocks: int

    def run(self, x: Tensor, t: Tensor, text: TextCond, r: Tensor | None = None, guidance: Tensor | None = None,
            *, return_hidden: bool = False, feature_layers: Sequence[int] = (), hook: FeatureHook = PLAIN
            ) -> BackboneOutput: ...

    def embed(self, x: Tensor, text: TextCond, t: Tensor | None = None) -> Tokens: ...

    def condition(self, t: Tensor, r: Tensor | None, guidance: Tensor | None, pooled: Tensor) -> Tensor: ...

    def transformer(self, tokens: Tokens, vec: Tensor, *, hook: FeatureHook = PLAIN,
                    feature_layers: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]: ...

    def head(self, hidden: Tensor, vec: Tensor, tokens: Tokens) -> Tensor: ...

    def enable_guidance_embedding(self) -> None: ...

    def enable_r_embedding(self, mode: str) -> None: ...


class ComposedBackbone(nn.Module):
    """Base of the backbones: `run` = head(transformer(embed(x, text, t), condition(t, r, guidance, pooled)))
    from the four parts a subclass implements, and `forward` = the velocity alone."""

    def run(self, x: Tensor, t: Tensor, text: TextCond, r: Tensor | None = None, guidance: Tensor | None = None,
            *, return_hidden: bool = False, feature_layers: Sequence[int] = (), hook: FeatureHook = PLAIN
            ) -> BackboneOutput:
        check_time("t", t, x.shape[0])
        tokens = self.embed(x, text, t)
        vec = self.condition(t, r, guidance, text.pooled)
        # sequence parallel (when active): this rank's image tokens through the blocks, whole sequences out
        hidden, features = self.transformer(sequence_parallel.shard(tokens), vec, hook=hook,
                                            feature_layers=feature_layers)
        hidden, features = sequence_parallel.gather(hidden, features)
        return BackboneOutput(self.head(hidden, vec, tokens), hidden if return_hidden else None, features)

    def forward(self, x: Tensor, t: Tensor, text: TextCond, r: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        return self.run(x, t, text, r, guidance).velocity


def check_time(name: str, value: Tensor | None, batch: int) -> Tensor | None:
    """Validate a per-sample time/guidance tensor: 1-D, float32, batch-sized."""
    if value is None:
        return None
    if value.ndim != 1 or value.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(value.shape)}")
    if value.dtype != torch.float32:
        raise ValueError(f"{name} must be float32 (SPEC §2: timesteps stay float32), got {value.dtype}")
    return value
