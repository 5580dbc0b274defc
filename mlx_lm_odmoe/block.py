"""OnDemandSwitchGLU: mlx-lm's switch layer with experts from an ExpertStore.

The router runs as usual and hands its top-k ids to this block. The block
asks the store for those experts, gets a pool (stacked weights, one slot per
resident expert) plus each expert's slot, and runs the model's *own* switch
layer (SwitchGLU or SwitchMLP, see kernel.py) on the pool with the ids
rewritten to slots. Every slot is an exact copy of
its expert, and the gather kernels compute each (token, expert) row from that
row's weights alone, so the output is bit-identical to stock mlx-lm.

When more distinct experts are routed in one pass than the store can hold
(long prompts at small budgets), routes are sorted by expert and run
expert-major, so every expert is read at most once per layer per forward
pass, reads streaming into free slots while landed experts compute
(expert_pass.py).
"""

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from . import expert_pass
from .kernel import expert_tensors, make_kernel, projections, unbind, weightless_copy
from .switches import STOCK_SWITCHES, switch_layers_of


def _distinct(ids: np.ndarray) -> np.ndarray:
    """Sorted distinct ids; a decode step's handful without numpy's sort."""
    if ids.size <= 64:
        return np.array(sorted(set(ids.ravel().tolist())), dtype=ids.dtype)
    return np.unique(ids)


def moe_layers_of(model) -> list:
    """Indices of the layers that route to experts (hold a switch layer)."""
    return list(switch_layers_of(model, STOCK_SWITCHES + (OnDemandSwitchGLU,)))


def _slot_ids(store, experts: np.ndarray, slots: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Routes ``ids`` (expert ids) rewritten to the experts' pool slots."""
    remap = np.zeros(store.layout.num_experts, dtype=np.int32)
    remap[experts] = slots
    return remap[ids]


class OnDemandSwitchGLU(nn.Module):
    def __init__(
        self,
        runtime,
        layer: int,
        input_dims: int = None,
        hidden_dims: int = None,
        num_experts: int = None,
        switch: nn.Module = None,
    ):
        """Replaces ``switch`` (a stock SwitchGLU/SwitchMLP, whose shapes and
        configuration it takes), or a plain ``SwitchGLU(input_dims,
        hidden_dims, num_experts)``."""
        super().__init__()
        if switch is None:
            switch = SwitchGLU(input_dims, hidden_dims, num_experts)
        specs = expert_tensors(switch)
        names = list(projections(switch))
        out_dims, in_dims = specs[f"{names[0]}.weight"][0]
        object.__setattr__(self, "_specs", specs)
        object.__setattr__(self, "_shell", weightless_copy(switch))
        # Plain attributes: the block owns no parameters, so mlx-lm's strict
        # load_weights sees nothing of the experts.
        object.__setattr__(self, "_runtime", runtime)
        object.__setattr__(self, "_kernel", None)
        object.__setattr__(self, "_bound", None)
        object.__setattr__(self, "_early", None)
        self.layer = layer
        self.dims = (in_dims, out_dims, projections(switch)[names[0]].weight.shape[0])
        # Parameter-free stand-ins for the switch layer's projections, so
        # code that addresses them (mlx-lm's shard()) finds them; the store
        # holds the weights and slices them per rank.
        for name in names:
            setattr(self, name, nn.Module())

    def start_early(self, shared):
        """``shared.start(x)`` will be called with this block's input right
        after the host sync (see models/common.py)."""
        object.__setattr__(self, "_early", shared)

    @property
    def expert_tensors(self):
        """``{"gate_proj.weight": (per-expert shape, dtype), ...}`` unquantized."""
        return self._specs

    def _get_kernel(self, store) -> nn.Module:
        if self._kernel is None:
            kernel = make_kernel(self._shell, self._specs, store.layout.quantization)
            object.__setattr__(self, "_kernel", kernel)
        return self._kernel

    def _bind(self, glu, pool):
        for name, arr in pool.items():
            proj, part = name.split(".")
            getattr(glu, proj)[part] = arr

    def _run(self, store, pool, x, indices, keep=False):
        glu = self._get_kernel(store)
        if keep:  # a complete pool never changes: bind it once
            if self._bound is not pool:
                self._bind(glu, pool)
                object.__setattr__(self, "_bound", pool)
            return glu(x, indices)
        object.__setattr__(self, "_bound", None)
        self._bind(glu, pool)
        try:
            return glu(x, indices)
        finally:
            # Drop references so the store can update its pool in place.
            unbind(glu)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        store = self._runtime.store
        for observe in self._runtime.observers:  # trace collection
            observe(self.layer, x, indices)
        pool = store.resident_pool(self.layer)
        if pool is not None:
            store.telemetry.record_routes_lazy(self.layer, indices)
            return self._run(store, pool, x, indices, keep=True)

        predictor = self._runtime.predictor
        pending, guesses_of = (
            self._timed(store, self._predict, predictor, x, indices)
            if predictor is not None
            else ([], None)
        )
        mx.eval(indices, *pending)  # the one host sync per layer
        if self._early is not None:  # the shared expert computes while we fetch
            self._early.start(x)
        ids = np.array(indices)
        experts = _distinct(ids)
        store.telemetry.record_routes(self.layer, ids)
        store.telemetry.score_prediction(self.layer, experts)
        if len(experts) <= store.capacity(self.layer):
            # Guesses for the next layers are read once this layer's own
            # misses are queued and its resident experts are computing.
            then = (
                None
                if guesses_of is None
                else lambda: self._prefetch(store, self._timed(store, guesses_of, ids))
            )
            return self._routed(store, x, ids, experts, then)
        return self._expert_major(store, x, ids, experts)

    def _routed(self, store, x, ids, experts, then=None):
        """The routed experts' outputs [..., k, D] for routes ``ids``;
        ``then()`` runs once the outputs that need no read are started.
        The outputs are started before returning: they compute while Python
        builds the rest of the layer and the next one up to its router's
        sync."""
        then = then or (lambda: None)
        begin = getattr(store, "begin_fetch", None)
        if begin is None:
            pool, slots = store.fetch(self.layer, experts)
            y = self._run(store, pool, x, mx.array(_slot_ids(store, experts, slots, ids)))
            mx.async_eval(y)
            then()
            return y
        f = begin(self.layer, experts)
        slot_ids = _slot_ids(store, experts, f.slots, ids)
        if not f.pending or ids.size != ids.shape[-1] or not store.streams_reads():
            f.wait_all()
            y = self._run(store, f.pool, x, mx.array(slot_ids))
            mx.async_eval(y)
            then()
            return y
        # One token whose reads are still landing: each expert computes as
        # soon as its weights are in, the resident ones first, while the
        # rest are read. Every route's output still comes from its expert's
        # full weights; putting the routes back in order is a copy, so the
        # combine sees exactly what one call would have produced.
        route_pos = np.searchsorted(experts, ids.reshape(-1))
        parts, order = [], []

        def run(routes):
            sel = slot_ids.reshape(-1)[routes].reshape(ids.shape[:-1] + (len(routes),))
            y = self._run(store, f.pool, x, mx.array(sel))
            mx.async_eval(y)
            parts.append(y)
            order.extend(routes)

        try:
            for i in [i for i in f.pending if f.ready(i)]:
                f.wait(i)
            resident = [j for j, i in enumerate(route_pos) if i not in f.pending]
            if resident:
                run(resident)
            then()
            while f.pending:
                i = f.wait_any()
                run([j for j, p in enumerate(route_pos) if p == i])
        except BaseException:
            for i in list(f.pending):  # as in _expert_major: no read left in flight
                f.wait_quietly(i)
            raise
        y = mx.concatenate(parts, axis=-2)
        y = mx.take(y, mx.array(np.argsort(order)), axis=-2)
        mx.async_eval(y)
        return y

    def _predict(self, predictor, x, indices):
        """Guesses for the next layers from each row's newest token, as
        (arrays to evaluate in the router's sync, fn(host ids) -> guesses)."""
        rt = self._runtime
        if x.shape[1] != 1:  # prefill runs expert-major; a new prompt resets state
            if self.layer == rt.store.layout.moe_layers[0]:
                predictor.reset()
            return [], None
        skip = (
            rt.prefetch_stride > 1
            and rt.store.layout.moe_layers.index(self.layer) % rt.prefetch_stride
        )
        if predictor.on_host:
            newest = x[:, -1]

            def on_host(ids):
                if skip:
                    predictor.host_observe(self.layer, ids[:, -1])
                    return {}
                return predictor.host_guesses(
                    self.layer,
                    np.array(newest),
                    ids[:, -1],
                    rt.prefetch_distance,
                    rt.prefetch_min_prob,
                )

            return ([] if skip else [newest]), on_host
        if skip:
            predictor.observe(self.layer, indices[:, -1])  # keeps its per-layer state current
            return [], None
        guesses = predictor.guesses(
            self.layer, x[:, -1], indices[:, -1], rt.prefetch_distance, rt.prefetch_min_prob
        )
        return list(guesses.values()), lambda ids: guesses

    @staticmethod
    def _timed(store, fn, *args):
        """``fn(*args)``, its CPU time on this thread counted as the predictor's."""
        t0 = time.thread_time()
        out = fn(*args)
        store.telemetry.record_predictor(time.thread_time() - t0)
        return out

    @staticmethod
    def _prefetch(store, guesses):
        for target, ids in guesses.items():
            experts = np.unique(np.array(ids))
            experts = experts[experts >= 0]
            store.telemetry.record_prediction(target, experts)
            store.prefetch(target, experts)

    def _expert_major(self, store, x, ids, experts):
        """Run routes expert-major, each expert's routes in one call (see
        expert_pass.py for the order and, where the store reads in the
        background, how reads and compute overlap)."""
        k = ids.shape[-1]
        flat = ids.reshape(-1)
        order = np.argsort(flat, kind="stable")
        tokens = x.reshape(-1, x.shape[-1])
        member = np.zeros(store.layout.num_experts, dtype=bool)

        def compute(pool, chunk, slots):
            member[:] = False
            member[chunk] = True
            routes = order[member[flat[order]]]  # the chunk's routes, by expert
            y = self._run_routes(
                store, pool, _slot_ids(store, chunk, slots, flat[routes]), tokens, routes // k
            )
            mx.async_eval(y)
            return routes, y

        cap = store.capacity(self.layer)
        keep, here, todo = expert_pass.plan(store, self.layer, experts, cap)
        if hasattr(store, "begin_fetch"):
            outs, done = expert_pass.stream(store, self.layer, keep, here, todo, cap, compute)
        else:
            outs, done = [], []
            for chunk in expert_pass.chunks(keep, here, todo, cap):
                pool, slots = (
                    store.fetch(self.layer, chunk, keep=keep)
                    if len(keep)
                    else store.fetch(self.layer, chunk)
                )
                routes, y = compute(pool, chunk, slots)
                mx.eval(y)  # later chunks may overwrite these slots
                outs.append(y)
                done.append(routes)
        back = np.argsort(np.concatenate(done), kind="stable")
        y = mx.concatenate(outs, axis=0)[mx.array(back)]
        return y.reshape(*ids.shape, -1)

    def _run_routes(self, store, pool, slot_ids, tokens, rows):
        """[R, D] outputs of routes to pool slots ``slot_ids`` for the
        ``tokens`` at ``rows``, one route per call row."""
        xs = tokens[mx.array(rows)]
        return self._run(store, pool, xs, mx.array(slot_ids)[:, None]).squeeze(-2)
