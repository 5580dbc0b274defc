"""The per-model expert runtime: finds the model folder, opens the store.

mlx-lm never passes the model folder to ``Model(args)``. We find it, in order:
``odmoe.model_path`` in the config (``mlx_lm_odmoe.load`` sets it), the
``MLX_LM_ODMOE_MODEL_PATH`` environment variable, then the ``model_path``
argument of mlx-lm's ``load_model`` on the call stack (checked to hold a
config.json). The store is opened when mlx-lm sanitizes the weights (so a
bad budget fails at load) or, failing that, on the first forward pass.
"""

import sys
from pathlib import Path
from typing import Optional

from .backend import check_experts_run_here
from .budget import BudgetPlan, plan_budget, resolve_budget
from .settings import ENV_PREFIX, Settings
from .telemetry import ExpertStats, LayerStats

_MISSING = object()


def find_model_dir(settings: Settings) -> Optional[Path]:
    if not settings.resolve:
        return None
    if settings.model_path:
        return Path(settings.model_path)
    frame = sys._getframe(1)
    while frame is not None:
        p = frame.f_locals.get("model_path")
        if isinstance(p, (str, Path)) and (Path(p) / "config.json").is_file():
            return Path(p)
        frame = frame.f_back
    return None


class ExpertRuntime:
    """Owns the expert store of one model; blocks reach it lazily."""

    def __init__(self, settings, top_k: int, num_layers: int, expected: Optional[dict] = None):
        self.settings = Settings.from_model_args(settings)
        self.top_k = top_k
        self.num_layers = num_layers
        self.expected = expected
        self.model_dir = find_model_dir(self.settings)
        self._store = None
        self.observers = []  # callables (layer, block input, router ids)
        self.predictor = None  # an ExpertPredictor feeding store.prefetch
        self.model_ref = None  # weakref to the model, for predictors
        self.prefetch_distance = self.settings.prefetch_distance
        self.prefetch_min_prob = self.settings.prefetch_min_prob
        # Predict at every n-th MoE layer only, each time for the next
        # prefetch_distance layers: fewer, wider predictions cost less.
        self.prefetch_stride = self.settings.prefetch_stride
        self.prefetch_state = "off"  # why prediction is or is not running
        self.part = None  # (rank, size) under tensor parallelism
        self.active_layers = None  # callable: this rank's MoE layers (pipeline)
        self.layers_path = None  # where the decoder layers are ("model.layers")
        self.residual = None  # (MoE layer, residual stream) of a one-token pass
        self._pass_caches = _MISSING  # {id(decoder layer): its cache} of the running pass

    def begin_pass(self, cache, layers):
        """A forward pass starts with ``cache`` (mlx-lm's per-layer list for
        ``layers``, or None)."""
        self.residual = None
        self._pass_caches = (
            None if cache is None else {id(layer): c for layer, c in zip(layers, cache)}
        )

    def pass_cache(self, layer) -> tuple:
        """(known, cache) of decoder ``layer`` in the running pass."""
        if self._pass_caches is _MISSING:
            return False, None
        if self._pass_caches is None:
            return True, None
        c = self._pass_caches.get(id(layer), _MISSING)
        return (c is not _MISSING), (None if c is _MISSING else c)

    def shard(self, rank: int, size: int):
        """Hold and read only this rank's slice of every expert."""
        self.part = (rank, size) if size > 1 else None
        self.close()

    def close(self):
        if self._store is not None:
            save = getattr(self, "save_warm_start", None)
            if save is not None:
                save()
            self._store.close()
            self._store = None

    def validate(self):
        """Check the expert files and the budget without reading experts."""
        reader = self._base_reader()
        try:
            self._plan(reader.layout)
        finally:
            reader.close()

    @property
    def store(self):
        if self._store is None:
            self.open()
        return self._store

    def attach(self, store):
        """Use an already built store (tests, custom setups)."""
        self._store = store
        return store

    def attach_predictor(self, predictor):
        """Prefetch with ``predictor`` (research, tests). A store planned
        without prediction gets ``prefetch_staging`` staging slots per layer
        on top of its budget when guesses go to staging slots."""
        self.predictor = predictor
        self.prefetch_state = "on"
        store = self.store
        staging = self.settings.prefetch_into == "staging"
        if predictor is not None and staging and getattr(store, "staging", None) == 0:
            store.set_staging(self.settings.prefetch_staging)
        return predictor

    def open(self):
        if self._store is not None:
            return self._store
        from .store import CachedStore, SlicedReader
        from .telemetry import Telemetry

        reader = self._base_reader()
        if self.part is not None:
            reader = SlicedReader(reader, *self.part)
        layout = reader.layout
        layers = self._layers(layout)
        plan = self._plan(layout, len(layers))
        # Before the predictor's read probe, so that it reads as the store will.
        self.direct_io = self._direct_io(layout, plan)  # staging leaves the total as it is
        reader.set_direct_io(self.direct_io)
        if plan.slots < layout.num_experts and self.predictor is None:
            self.predictor = self._load_predictor(reader)
        if self.predictor is not None and self.settings.prefetch_into == "staging":
            plan = self._plan(layout, len(layers), self.settings.prefetch_staging)
            if plan.staging == 0:
                self.predictor = None
                self.prefetch_state = "off (the budget leaves no staging slots)"
        self.budget = plan.budget_bytes
        telemetry = Telemetry(layout.moe_layers, layout.num_experts, self.settings.log_interval)
        store = CachedStore(
            reader,
            plan.slots,
            policy=self._policy(),
            threads=self.settings.read_threads,
            telemetry=telemetry,
            staging=plan.staging if self.predictor is not None else 0,
        )
        store.prefetch_width = self.top_k
        if store.identity and self.settings.preload:
            store.warm(layers)
        self._store = store
        if not store.identity and self.settings.warm_start:
            self._warm_start(store, layout, plan.slots)
        return store

    def _warm_start(self, store, layout, slots):
        """Preload the experts earlier runs used most; save this run's at exit."""
        import atexit
        import weakref

        from . import warm_start

        path = Path(self.settings.warm_start_file or warm_start.counts_path(self.model_dir))
        counts = warm_start.load_counts(path, layout.moe_layers, layout.num_experts)
        if counts is not None:
            store.prior_counts = counts
            store.preload(warm_start.hottest(counts, slots))
        ref = weakref.ref(store)

        def save():
            s = ref()
            if s is not None:
                warm_start.save_counts(path, s.telemetry.routes_per_layer())

        self.save_warm_start = save
        atexit.register(save)

    def _direct_io(self, layout, plan) -> bool:
        """Around the page cache when it could not keep the experts anyway:
        they and the budget exceed memory (or the memory cgroup's limit).
        Then it would only hold a second copy of what the store holds and,
        under pressure, re-read pages it dropped."""
        choice = self.settings.direct_io
        if choice != "auto":
            return choice == "on"
        from .budget import physical_memory

        if plan.slots >= layout.num_experts:
            return False  # read once, at load
        return layout.total_nbytes + plan.budget_bytes > physical_memory()

    def _policy(self):
        """LFU with decay unless asked for LRU: on the trained models' traces
        it beat LRU by 3-5 points of hit rate at 25% residency."""
        from .store import LRUPolicy
        from .store.policy import LFUDecayPolicy

        return {"lru": LRUPolicy, "lfu-decay": LFUDecayPolicy}[self.settings.policy]()

    def _load_predictor(self, reader):
        """The model folder's shadow model, else the free router lookahead
        (later layers' routers on this layer's input): ``on``, ``off``, or
        ``auto`` (the default), which predicts only when reads are slow
        enough for prefetching to pay for the prediction."""
        choice = self.settings.predictor
        model = self.model_ref() if self.model_ref else None
        if choice == "off" or model is None:
            self.prefetch_state = "off"
            return None
        from .store.readers import probe_read_seconds

        if choice == "auto":
            # Experts that arrive in microseconds (page cache, small experts)
            # leave no read time to hide: prediction would only cost time.
            t = probe_read_seconds(reader)
            floor = self.settings.prefetch_min_read_ms / 1e3
            if t < floor:
                self.prefetch_state = f"off (reads take {t * 1e3:.2f} ms < {floor * 1e3:g} ms)"
                return None
        predictor = self._make_predictor(model, reader.layout)
        self.prefetch_state = "on"
        return predictor

    def _make_predictor(self, model, layout):
        from .predict import load_predictor
        from .predict.baselines import RouterLookahead
        from .predict.next_attention import NextAttention, plain_decoder_layer
        from .switches import module_at

        kind = self.settings.predict_with
        layers = self._layers(layout)
        if kind == "auto":
            decoder = module_at(model, self.layers_path) if self.layers_path else None
            plain = decoder is not None and all(plain_decoder_layer(decoder[i]) for i in layers)
            kind = "next-attention" if plain and self.prefetch_distance == 1 else "shadow"
        if kind == "next-attention" and self.part is None:
            return NextAttention(model, layers, self, self.layers_path, self.prefetch_distance)
        predictor = load_predictor(model, self.model_dir) if kind == "shadow" else None
        if predictor is None and self.settings.predict_with == "shadow":
            raise ValueError(
                f"{self.model_dir}: predict_with is 'shadow' but the folder has no shadow "
                "model; train one (mlx_lm_odmoe.train_shadow) or use predict_with 'auto'"
            )
        return predictor or RouterLookahead(model, layers, self.prefetch_distance)

    def _layers(self, layout):
        active = self.active_layers() if self.active_layers else None
        return [l for l in layout.moe_layers if active is None or l in active]

    def _plan(self, layout, num_layers=None, staging: int = 0) -> BudgetPlan:
        n = num_layers or len(layout.moe_layers)
        budget = resolve_budget(
            self.settings.expert_cache, layout.total_nbytes, self.settings.expert_cache_source
        )
        return plan_budget(budget, layout.record_nbytes, n, layout.num_experts, self.top_k, staging)

    def _base_reader(self):
        if self.model_dir is None:
            raise RuntimeError(
                "odmoe: cannot tell which folder this model was loaded from. Load it "
                "with mlx_lm.load()/mlx_lm_odmoe.load(), or set "
                f"${ENV_PREFIX}MODEL_PATH or config.json's odmoe.model_path."
            )
        from .store import StackedCheckpointReader

        if self.settings.source == "sharded":
            reader = self._sharded_reader()
        else:
            reader = StackedCheckpointReader(
                Path(self.settings.checkpoint or self.model_dir),
                self.num_layers,
                self.settings.quantization,
                drop_cache=self.settings.drop_page_cache,
            )
        if self.expected:
            check_layout(
                reader.layout, self.expected, getattr(reader, "index_path", self.model_dir)
            )
        check_experts_run_here(reader.layout, self.model_dir)
        return reader

    def _sharded_reader(self):
        from .hub import hub_snapshot, shard_resolver
        from .layout import EXPERTS_DIR, load_layout
        from .store import ShardedFolderReader

        drop = self.settings.drop_page_cache
        snapshot = hub_snapshot(self.model_dir)
        if snapshot is None:
            return ShardedFolderReader(self.model_dir, drop_cache=drop)
        layout = load_layout(self.model_dir / EXPERTS_DIR)
        if all((self.model_dir / EXPERTS_DIR / s["file"]).exists() for s in layout.shards):
            return ShardedFolderReader(self.model_dir, drop_cache=drop)  # already in the cache
        reader = ShardedFolderReader(
            self.model_dir, resolve=shard_resolver(snapshot), drop_cache=drop
        )
        if self.settings.hub_download == "all":
            for i in range(len(layout.shards)):
                reader.shard_path(i)
        return reader

    def stats(self) -> ExpertStats:
        store = self.store
        snap = store.telemetry.snapshot()
        per_layer = {l: LayerStats(**v) for l, v in snap.pop("per_layer").items()}
        return ExpertStats(
            budget_bytes=getattr(self, "budget", None),
            resident_bytes=store.resident_nbytes(),
            slots_per_layer=store.capacity(store.layout.moe_layers[0]),
            num_experts=store.layout.num_experts,
            expert_nbytes=store.layout.record_nbytes,
            prefetch=self.prefetch_state,
            per_layer=per_layer,
            **snap,
        )


def check_layout(layout, expected: dict, where) -> None:
    """The experts on disk must be the ones config.json describes."""
    from .layout import LayoutError

    def fail(what):
        raise LayoutError(
            f"{where} does not match {'config.json'}: {what}. The expert files "
            "belong to another model or another conversion; re-convert the model."
        )

    if layout.num_experts != expected["num_experts"]:
        fail(f"{layout.num_experts} experts per layer, config says {expected['num_experts']}")
    if list(layout.moe_layers) != list(expected["moe_layers"]):
        fail(f"MoE layers {layout.moe_layers}, config implies {expected['moe_layers']}")
    D, I = expected["hidden_size"], expected["moe_intermediate_size"]
    q = layout.quantization
    specs = {t.name: t for t in layout.tensors}
    for name, (rows, cols) in {
        "gate_proj.weight": (I, D),
        "up_proj.weight": (I, D),
        "down_proj.weight": (D, I),
    }.items():
        t = specs.get(name)
        if t is None:
            fail(f"no {name} tensor")
        in_dims = t.shape[1] * 32 // q["bits"] if q else t.shape[1]
        if (t.shape[0], in_dims) != (rows, cols):
            fail(f"{name} is {t.dtype}{list(t.shape)}, expected {rows}x{cols} weights")


def runtime_of(model) -> ExpertRuntime:
    rt = getattr(model, "expert_runtime", None)
    if rt is None:
        raise TypeError("not an odmoe model (no expert_runtime)")
    return rt
