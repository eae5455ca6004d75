"""Forward-mode AD through DeepSpeed ZeRO-3's per-module hooks (SPEC §9.1).

ZeRO-3 applies two autograd Functions to every hooked module's inputs and outputs, even under
`no_grad` (deepspeed/runtime/zero/parameter_offload.py: `PreBackwardFunctionForModule`,
`PostBackwardFunctionModule`, created per module and stored as `module.pre_bwd_fn` / `post_bwd_fn`).
Their forward is `detach()` (they only count backward passes) and they have no forward-mode rule,
so dual tensors stop there. Their exact tangent rule is the identity, which this module installs.
With `zero_optimization.memory_efficient_linear: false` (checked in
`distributed.strategies.check_zero_config_for_jvp`) nothing else in the path lacks a rule, and the
parameters are gathered one module (or ZeRO-3 leaf block) at a time, as in a normal forward.
"""
from __future__ import annotations

from torch import nn

ZERO_HOOK_FUNCTIONS = ("pre_bwd_fn", "post_bwd_fn")


def _identity_jvp(ctx, *tangents):
    return tangents[0] if len(tangents) == 1 else tangents


def enable_forward_ad_through_zero_hooks(module: nn.Module) -> int:
    """Give every ZeRO-3 hook Function under `module` the identity jvp; returns how many were patched
    (0 when the module is not under a ZeRO-3 engine). Idempotent."""
    patched = 0
    for m in module.modules():
        for attr in ZERO_HOOK_FUNCTIONS:
            fn = m.__dict__.get(attr)
            if fn is not None and fn.__dict__.get("jvp") is not _identity_jvp_static:
                fn.jvp = _identity_jvp_static
                patched += 1
    return patched


_identity_jvp_static = staticmethod(_identity_jvp)
