"""New weights for a running engine (an RL loop's updated policy), or the first ones for an
engine built on the model's shapes: checked leaf by leaf against the current ones, placed as
they are so the compiled step programs are reused."""

from __future__ import annotations

import jax


class WeightUpdating:
    """Weight updates (jinfer.engine.Engine mixes it in): it uses the engine's runner, settles
    the step in flight first and clears the prefix cache (reset_prefix_cache)."""

    def update_weights(self, state) -> None:
        """Swaps new weights into the running engine in place (an RL loop's updated policy), or
        gives an engine built on the model's shapes (jinfer.models.llama.abstract_model) its
        first weights: no step runs before them (entrypoints.build.build_engine builds the engine,
        compiling its first step bucket, while the weights load).

        state: an nnx.State (or pytree) with the structure, shapes and dtypes of the current
        weights (runner.state, nnx.split of the model); else ValueError naming the first
        mismatching leaf, and nothing changes. The step in flight (async scheduling) is finished
        first, on the old weights; its outputs come with the next step(). New leaves take the
        current leaves' shardings, so the compiled step programs are reused (arrays already in
        place are taken without a copy: do not donate them afterwards). The KV pool is
        kept; the prefix cache is cleared, its pages hold K/V of the old weights (pages that
        running requests hold stay until they finish).
        """
        old, treedef = jax.tree_util.tree_flatten_with_path(self.runner.state)
        new = jax.tree_util.tree_flatten_with_path(state)[0]
        mismatch = _first_mismatch(old, new)
        if mismatch:
            raise ValueError(f"update_weights: {mismatch}")
        self._settle_inflight()
        placed = [_place_like(got, want) for (_, want), (_, got) in zip(old, new)]
        self.runner.set_weights(jax.tree_util.tree_unflatten(treedef, placed))
        self.reset_prefix_cache()


def _first_mismatch(expected: list, given: list) -> str | None:
    """The first leaf where two flattened (path, array) lists differ in path, shape or dtype."""
    def name(path) -> str:  # e.g. layers/0/attn/q_proj/value
        return jax.tree_util.keystr(path, simple=True, separator="/")

    for i, (path, want) in enumerate(expected):
        if i >= len(given):
            return f"leaf {name(path)} is missing from the given state"
        got_path, got = given[i]
        if got_path != path:
            return f"the given state has leaf {name(got_path)} where the engine's weights have {name(path)}"
        if (tuple(got.shape), got.dtype) != (tuple(want.shape), want.dtype):
            return (f"leaf {name(path)} has shape {tuple(got.shape)} and dtype {got.dtype}, expected "
                    f"{tuple(want.shape)} and {want.dtype}")
    if len(given) > len(expected):
        return f"the given state has leaf {name(given[len(expected)][0])}, which the engine's weights lack"
    return None


def _place_like(got, want: jax.Array) -> jax.Array:
    """got with want's sharding and commitment: jit keys its compiled programs on both (a
    model loaded without shardings holds uncommitted arrays on the default device)."""
    if isinstance(want, jax.Array) and want.committed:  # else an array, or a shape (abstract model)
        return jax.device_put(got, want.sharding)
    if isinstance(got, jax.Array) and got.committed:
        got = jax.device_get(got)  # JAX has no on-device way to uncommit an array
    return jax.device_put(got)
