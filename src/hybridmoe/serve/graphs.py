"""A decode step of static shapes, for CUDA graphs and torch.compile: the engine's decode without host overhead.

The engine's eager decode (`Engine._decode`) builds a batch of dynamic shape every step: the rows' keys 0..S-1 with
S = the longest row + 1, a fresh mask, index gathers; on a GPU that is hundreds of small kernel launches per token,
each paid on the host, and an attention whose key length changes every step. `StaticDecoder` runs the same
arithmetic with shapes fixed per padded batch size B (the buckets 1, 2, 4, 8, ... up to the slots) and key range L
(256, 512, 1024, ... up to the slots' `max_len`: the smallest that holds the longest row and its new token):
  - the inputs live in one static int64 buffer per bucket: token ids, slot rows and lengths (B each); rows past the
    real batch point at the pool's spare scratch slot (`SlotPool(spare=1)`) with length 0, so they read and write
    only that slot;
  - every attention layer writes row r's new key and value at position lengths[r] of its slot and attends over the
    slot's keys 0..L-1 with the mask `key j <= lengths[r]` (the keys past a row's length are masked out, so the
    result is the eager one up to the order of floating-point sums);
  - every Mamba layer gathers its rows' conv window and SSM state, takes one recurrent step on the copies and
    scatters them back (`index_copy_`);
  - the logits land in a static fp32 output buffer (B, vocab).
Nothing in the step reads a tensor back to the host, so it can be captured: mode "graphs" records one
`torch.cuda.CUDAGraph` per bucket (B, L) (warm-up on a side stream, capture, then every step copies the inputs into the
static buffer and replays; the recipe of PyTorch's CUDA Graphs notes, vLLM's `CUDAGraphRunner` and gpt-fast);
mode "compile" runs the step through `torch.compile` (inductor; on CUDA its kernels are then captured the same way);
mode "static" runs the step eagerly (the twin the others are tested against on CPU, itself tested against the
engine's eager decode).

The routed experts: the static step runs the model's own MoE layers; a compiled or captured one does too where
their dispatch reads nothing back to the host (`torch._grouped_mm` on CUDA), and otherwise multiplies every token
copy by its expert's weights gathered by index (`_moe_gathered`), shapes independent of the routing.

Every step runs under `kernels.attention.sdpa_backend("decode", ...)`: on CUDA the masked decode attention uses the
memory-efficient (or math) SDPA kernel, never cuDNN, which builds a new plan for every new key length.

MTP speculative decoding (`serve.speculative`, batch 1) has forwards of a few tokens at a position that moves:
`StaticSequence` runs them (verification, replay, MTP commit and draft) in shapes fixed per kind and token count,
attending over the cache's whole capacity with the keys rolled so that the new ones come last (`_RolledKV`): the
model's left-padding mask then gives exactly the causal attention, with the start a device tensor.

The graphs read the pool's and the model's tensors by address: weights loaded in place (`Engine.load_weights`) are
seen by the next replay; a model moved to another device or dtype needs a new decoder.
"""

from __future__ import annotations

import logging

import torch

from ..cache import KVState, MambaState
from ..kernels.activations import relu_squared_reference
from ..kernels.attention import sdpa_backend
from ..kernels.moe import experts_backend
from ..modeling import ForwardContext, HybridMoEForCausalLM, LatentMoE
from ..utils import prepare_compile

logger = logging.getLogger("hybridmoe.serve")

DECODE_MODES = ("eager", "static", "graphs", "compile")


def batch_buckets(num_slots: int, smallest: int = 1) -> list[int]:
    """Padded sizes: smallest, 2 smallest, 4 smallest, ... below num_slots, then num_slots (batch sizes, and with
    smallest=256 key ranges)."""
    buckets, b = [], smallest
    while b < num_slots:
        buckets.append(b)
        b *= 2
    return buckets + [num_slots]


class _Rows:
    """The part of HybridCache's interface the model's layers use (`layers`), over the bucket's rows of the pool."""

    def __init__(self, layers):
        self.layers = layers


class _StaticKV:
    """An attention layer's KV for a static decode batch: `update` writes row r's new key/value at position
    lengths[r] of slot rows[r] and returns the rows' keys 0..keys-1 (B, kv, keys, d)."""

    def __init__(self, pool_state: KVState, rows: torch.Tensor, lengths: torch.Tensor, keys: int):
        self.pool, self.rows, self.lengths, self.keys = pool_state, rows, lengths, keys

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.pool.key[self.rows, :, self.lengths] = k[:, :, 0]
        self.pool.value[self.rows, :, self.lengths] = v[:, :, 0]
        key, value = self.pool.key[:, :, : self.keys], self.pool.value[:, :, : self.keys]
        return key.index_select(0, self.rows), value.index_select(0, self.rows)


class _Bucket:
    """The static buffers of one padded batch size and key range, and its captured graph (mode "graphs"/"compile" on
    CUDA)."""

    def __init__(self, size: int, keys: int, device: torch.device, vocab_size: int):
        self.size, self.keys = size, keys
        self.inputs = torch.zeros(3, size, dtype=torch.long, device=device)  # token ids, slot rows, lengths
        self.logits = torch.zeros(size, vocab_size, dtype=torch.float32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    @property
    def ids(self) -> torch.Tensor:
        return self.inputs[0].view(self.size, 1)


class StaticDecoder:
    """Decode steps of static shapes over a `SlotPool` built with a spare scratch slot (see the module docstring).

    mode: "static" (eager), "graphs" (CUDA graphs; CUDA only) or "compile" (torch.compile; on CUDA also captured
    in graphs). `decode(slots, tokens, lengths)` feeds tokens[i] to slot slots[i], which holds lengths[i] tokens,
    and returns the logits (b, vocab) fp32; it does not advance the pool's lengths (the engine does). min_keys: the
    smallest key range (a power of two times it up to max_len)."""

    def __init__(self, model: HybridMoEForCausalLM, pool, mode: str = "static", min_keys: int = 256):
        if mode not in DECODE_MODES[1:]:
            raise ValueError(f"StaticDecoder mode must be one of {DECODE_MODES[1:]}, got {mode!r}")
        self.model, self.pool, self.mode = model, pool, mode
        self.device = model.lm_head.weight.device
        if mode == "graphs" and self.device.type != "cuda":
            raise ValueError(f"decode_mode 'graphs' needs a CUDA model (this one is on {self.device}); use 'static' "
                             "or 'compile' on the CPU")  # fmt: skip
        if pool.scratch is None:
            raise ValueError("a static decode needs a SlotPool with a spare scratch slot (SlotPool(..., spare=1))")
        self.num_slots = pool.num_slots
        self.buckets = batch_buckets(self.num_slots)
        self.key_buckets = batch_buckets(pool.max_len, min(min_keys, pool.max_len))
        self._bucket: dict[tuple[int, int], _Bucket] = {}
        self._graph_pool = None
        # The routed experts of a compiled or captured step: through `experts_grouped` where its dispatch reads
        # nothing back to the host (torch._grouped_mm on CUDA), else through `_moe_gathered` (no shape depends on
        # the routing); the static step keeps the engine's own path, so that it stays the eager decode's twin.
        probe = torch.empty(0, dtype=model.lm_head.weight.dtype, device=self.device)
        grouped_ok = self.device.type == "cuda" and experts_backend(probe) == "grouped_mm"
        self.gather_experts = mode != "static" and not grouped_ok
        self._step = self._forward
        if mode == "compile":
            # Inductor's default mode: C++/OpenMP kernels on the CPU, Triton kernels on CUDA, where `_capture` records
            # them in our own graphs (not "reduce-overhead": its graphs would not see the pool tensors this step
            # writes in place as inputs; not "max-autotune": minutes of GEMM tuning per batch size at start-up).
            # one graph per bucket: let dynamo keep them all (its default limit is 8 recompilations)
            limit = len(self.buckets) * len(self.key_buckets) + 1
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
            prepare_compile()
            self._step = torch.compile(self._forward, dynamic=False)

    @property
    def use_graphs(self) -> bool:
        return self.device.type == "cuda" and self.mode in ("graphs", "compile")

    def bucket_for(self, b: int) -> int:
        if not 1 <= b <= self.num_slots:
            raise ValueError(f"a decode batch of {b} rows does not fit {self.num_slots} slots")
        return next(size for size in self.buckets if size >= b)

    @torch.no_grad()
    def decode(self, slots: list[int], tokens: list[int], lengths: list[int]) -> torch.Tensor:
        b = len(slots)
        need = max(lengths) + 1
        if need > self.pool.max_len:
            raise ValueError(f"a slot holds {need - 1} tokens: no room for another in max_len={self.pool.max_len}")
        keys = next(size for size in self.key_buckets if size >= need)
        bucket = self._get_bucket(self.bucket_for(b), keys)
        pad = bucket.size - b
        host = torch.tensor(
            [list(tokens) + [0] * pad, list(slots) + [self.pool.scratch] * pad, list(lengths) + [0] * pad],
            dtype=torch.long,
        )
        bucket.inputs.copy_(host, non_blocking=False)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            with sdpa_backend("decode", self.device):
                self._step(bucket.ids, bucket.inputs[1], bucket.inputs[2], bucket.logits, keys)
        return bucket.logits[:b].clone()

    def _get_bucket(self, size: int, keys: int) -> _Bucket:
        bucket = self._bucket.get((size, keys))
        if bucket is None:
            bucket = self._bucket[size, keys] = _Bucket(size, keys, self.device, self.model.config.vocab_size)
            bucket.inputs[1].fill_(self.pool.scratch)
            if self.use_graphs:
                self._capture(bucket)
        return bucket

    def _capture(self, bucket: _Bucket) -> None:
        """Warm up on a side stream (the inputs point every row at the scratch slot, so this writes nothing real),
        then record the step into the bucket's graph; all buckets share one memory pool."""
        args = (bucket.ids, bucket.inputs[1], bucket.inputs[2], bucket.logits, bucket.keys)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), sdpa_backend("decode", self.device):
            for _ in range(2):
                self._step(*args)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server's event loop thread may touch CUDA while the engine's thread captures
        capture = torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local")
        with capture, sdpa_backend("decode", self.device):
            self._step(*args)
        bucket.graph = graph
        logger.info("captured the decode step for a batch of %d over %d keys in a CUDA graph", bucket.size, bucket.keys)

    def _forward(self, ids: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor, keys: int):
        """One token for each of the B rows over keys 0..keys-1; writes the pool in place and the logits into `out`
        (B, vocab)."""
        model = self.model
        layers, gathered = [], []
        for state in self.pool.cache.layers:
            if isinstance(state, MambaState):
                rows_state = MambaState(state.conv.index_select(0, rows), state.ssm.index_select(0, rows))
                layers.append(rows_state)
                gathered.append((state, rows_state))
            elif isinstance(state, KVState):
                layers.append(_StaticKV(state, rows, lengths, keys))
            else:
                layers.append(None)
        # The new token sits at position `keys` for the causal test (every key is before it, NoPE); its row sees
        # keys 0..lengths[r]: the history and its own new key.
        key_valid = torch.arange(keys, device=ids.device)[None, :] <= lengths[:, None]
        ctx = ForwardContext(start=keys, cache=_Rows(layers), key_valid=key_valid)
        backbone = model.backbone
        h = backbone.embeddings(ids)
        for layer in backbone.layers:
            if self.gather_experts and _gatherable(layer.mixer):
                h = h + _moe_gathered(layer.mixer, layer.norm(h))
            else:
                h = layer(h, ctx)
        h = backbone.norm_f(h)
        out.copy_(model.lm_head(h)[:, -1].float())
        for pool_state, rows_state in gathered:
            pool_state.conv.index_copy_(0, rows, rows_state.conv)
            pool_state.ssm.index_copy_(0, rows, rows_state.ssm)


def _gatherable(mixer) -> bool:
    experts = getattr(mixer, "experts", None)
    return isinstance(mixer, LatentMoE) and experts.ep_group is None and experts.quant is None


def _moe_gathered(moe: LatentMoE, x_btd: torch.Tensor) -> torch.Tensor:
    """`LatentMoE.forward` (inference) with each token copy multiplied by its expert's weights gathered by index:
    m = tokens x top-k small matrix-vector products in one bmm, combined in fp32 (the sum over a token's experts in
    routing order rather than expert order: equal up to rounding). Reads the weights of every copy (an expert chosen
    by two tokens is read twice), the price of shapes that do not depend on the routing."""
    b, t, d = x_btd.shape
    x_TD = x_btd.reshape(-1, d)
    _, topk_w_TK, topk_idx_TK = moe.gate(x_TD)
    h = moe.fc1_latent_proj(x_TD) if moe.fc1_latent_proj is not None else x_TD
    k = topk_idx_TK.shape[1]
    flat_M = topk_idx_TK.reshape(-1)
    x_M1D = h.repeat_interleave(k, dim=0)[:, None, :]
    u_M1I = torch.bmm(x_M1D, moe.experts.up_proj.index_select(0, flat_M).transpose(1, 2))
    y_M1D = torch.bmm(relu_squared_reference(u_M1I), moe.experts.down_proj.index_select(0, flat_M).transpose(1, 2))
    y_TD = (y_M1D[:, 0].float() * topk_w_TK.reshape(-1, 1).float()).view(-1, k, y_M1D.shape[-1]).sum(1)
    h = y_TD.to(x_TD.dtype)
    h = moe.fc2_latent_proj(h) if moe.fc2_latent_proj is not None else h
    return h.view(b, t, d) + moe.shared_experts(x_btd)


# ---------------------------------------------------------------------------------------------- speculative decoding


class _RolledKV:
    """An attention layer's KV for T new tokens at a start m held in a device tensor: `update` writes them at
    m..m+T-1 and returns the whole capacity C of keys rolled by C - T - m, so that the new keys are the last T. With
    the queries at positions C-T..C-1 and the keys before C - T - m masked as left padding, query i sees the keys
    0..m+i: the causal attention of the eager forward, in shapes that do not depend on m."""

    def __init__(self, state: KVState, write: torch.Tensor, read: torch.Tensor):
        self.state, self.write, self.read = state, write, read

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.state.key.index_copy_(2, self.write, k)
        self.state.value.index_copy_(2, self.write, v)
        return self.state.key.index_select(2, self.read), self.state.value.index_select(2, self.read)


class _SeqBucket:
    def __init__(self, n: int, d: int, vocab_size: int, dtype, device):
        self.n = n
        self.ids = torch.zeros(1, n, dtype=torch.long, device=device)
        self.start = torch.zeros(1, dtype=torch.long, device=device)
        self.h_in = torch.zeros(1, n, d, dtype=dtype, device=device)  # the MTP's previous hidden states
        self.logits = torch.zeros(1, n, vocab_size, dtype=torch.float32, device=device)
        self.hidden = torch.zeros(1, n, d, dtype=dtype, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None


class StaticSequence:
    """The forwards of `serve.speculative` (batch 1) in static shapes over one HybridCache (built with
    include_mtp=True): `main(ids)` runs the model on len(ids) tokens at cache.seq_len (the verification of k + 1
    tokens, a replay of 1..k) and advances cache.seq_len like the model's forward; `mtp(h_prev, ids, start)` runs the
    first MTP layer at MTP position `start` (commits, chained drafts). One static shape (and, with mode "graphs",
    one CUDA graph) per kind and token count; the start position is a device tensor. Attention is over the cache's
    whole capacity (`_RolledKV`), which must not grow."""

    def __init__(self, model: HybridMoEForCausalLM, cache, mode: str = "static"):
        if mode not in ("static", "graphs"):
            raise ValueError(f"StaticSequence mode must be 'static' or 'graphs', got {mode!r}")
        self.model, self.cache, self.mode = model, cache, mode
        self.device = model.lm_head.weight.device
        if mode == "graphs" and self.device.type != "cuda":
            raise ValueError(f"mode 'graphs' needs a CUDA model (this one is on {self.device})")
        kv = [s for s in cache.layers if isinstance(s, KVState)]
        if not kv:
            raise ValueError("StaticSequence attends over a KV cache; this model has no attention layer")
        self.capacity = kv[0].key.shape[2]
        self.mtp_blocks = model.mtp.layers[: len(model.config.mtp_hybrid_override_pattern)] if model.mtp else None
        self._buckets: dict[tuple[str, int], _SeqBucket] = {}
        self._graph_pool = None

    def main(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (1, T, v) fp32 and final hidden states (1, T, d) of the model on `ids` at cache.seq_len."""
        start = self.cache.seq_len
        bucket = self._run("main", ids, start, None)
        self.cache.seq_len = start + len(ids)
        return bucket.logits.clone(), bucket.hidden.clone()

    def mtp(self, h_prev: torch.Tensor, ids: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP layer's output x (1, T, d) and logits (1, T, v) for (h_prev, ids) at MTP position `start`."""
        bucket = self._run("mtp", ids, start, h_prev)
        return bucket.hidden.clone(), bucket.logits.clone()

    @torch.no_grad()
    def _run(self, kind: str, ids: list[int], start: int, h_prev) -> _SeqBucket:
        n = len(ids)
        if start + n > self.capacity:
            raise ValueError(f"positions {start}..{start + n - 1} exceed the cache's capacity of {self.capacity}")
        bucket = self._buckets.get((kind, n))
        if bucket is None:
            c = self.model.config
            dtype = self.model.lm_head.weight.dtype
            bucket = self._buckets[kind, n] = _SeqBucket(n, c.hidden_size, c.vocab_size, dtype, self.device)
        bucket.ids.copy_(torch.tensor([ids]))
        bucket.start.fill_(start)
        if h_prev is not None:
            bucket.h_in.copy_(h_prev)
        if self.mode == "graphs" and bucket.graph is None:
            self._capture(kind, bucket)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            with sdpa_backend("decode", self.device):
                self._forward(kind, bucket)
        return bucket

    def _capture(self, kind: str, bucket: _SeqBucket) -> None:
        """As `StaticDecoder._capture`; the warm-up runs write the Mamba states in place, so they are restored."""
        saved = [(s, s.conv.clone(), s.ssm.clone()) for s in self.cache.layers if isinstance(s, MambaState)]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), sdpa_backend("decode", self.device):
            for _ in range(2):
                self._forward(kind, bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for state, conv, ssm in saved:
            state.conv.copy_(conv)
            state.ssm.copy_(ssm)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        capture = torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local")
        with capture, sdpa_backend("decode", self.device):
            self._forward(kind, bucket)
        bucket.graph = graph

    def _forward(self, kind: str, bucket: _SeqBucket) -> None:
        model, n, C = self.model, bucket.n, self.capacity
        ar = torch.arange(C, device=self.device)
        write = bucket.start + torch.arange(n, device=self.device)
        read = (ar + bucket.start + n) % C  # rolled position j holds key (j + m + n) mod C
        layers = [_RolledKV(s, write, read) if isinstance(s, KVState) else s for s in self.cache.layers]
        key_valid = (ar >= C - n - bucket.start)[None, :]
        ctx = ForwardContext(start=C - n, cache=_Rows(layers), key_valid=key_valid)
        if kind == "main":
            h = model.backbone(bucket.ids, ctx)
            bucket.hidden.copy_(h)
            bucket.logits.copy_(model.lm_head(h).float())
            return
        blocks = self.mtp_blocks
        x = blocks[0].mtp_input(model.backbone.embeddings(bucket.ids), bucket.h_in)
        for block in blocks:
            x = block(x, ctx)
        bucket.hidden.copy_(x)
        bucket.logits.copy_(model.lm_head(blocks[-1].final_layernorm(x)).float())
