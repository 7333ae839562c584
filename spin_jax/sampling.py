"""The opponent's generator: prefill + one jitted `lax.while_loop` of one-token decode steps.

`Sampler(params, cfg, mesh).generate(prompts, params)` takes token-id prompts, pads them into
fixed (batch, power-of-two prompt length) buckets, and runs `sample_batch` under `jax.jit` with
explicit shardings; the KV cache buffer is donated and reused between calls of the same bucket.

The sampler decodes in a layout of its own, chosen once per `Sampler` (`decode_mesh`): the weights
in the compute dtype, tensor-parallel over the host's chips along heads, kv heads, MLP and vocab
(the KV cache split along kv heads), or replicated with the batch split when the kv heads do not
divide. No weight is gathered inside the decode loop, as it would be in the training (FSDP) layout.

Each sampled token's log-prob is returned under the model at temperature 1 with no top-k/top-p
masking. When sampling itself uses temperature 1, top_p 1 and top_k 0 (SPIN's setting), this is
exactly log p_opponent(token | prefix), so the opponent's summed log-prob of its own response comes
for free; with any other setting it is still the model's log-prob but not the sampling law's.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spin_jax import sharding
from spin_jax.data import tokenize
from spin_jax.errors import UsageError
from spin_jax.model import cache as cache_lib
from spin_jax.model import quant, transformer
from spin_jax.model.cache import KVCache
from spin_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False
    stop_ids: tuple[int, ...] = ()  # EOS / end-of-turn ids; empty = run to max_new_tokens

    @property
    def logps_are_model_logps(self) -> bool:
        """True when the sampling law is the model's own distribution (see module docstring)."""
        return not self.greedy and self.temperature == 1.0 and self.top_k == 0 and self.top_p >= 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, s, tokenizer) -> "SamplingParams":
        """The config's `sampling` section, stopping at the tokenizer's end-of-turn token."""
        return cls(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                   top_p=s.top_p, greedy=s.greedy, stop_ids=(tokenize.end_of_turn_id(tokenizer),))


def derive_seed(*parts) -> int:
    """A 32-bit seed derived from `parts` (e.g. the config's sampling.seed, the iteration and the
    chunk), the same on every host and every run."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


@struct.dataclass
class DecodeState:
    tokens: jax.Array  # [B, N] sampled ids (pad after a row is done)
    logps: jax.Array  # [B, N] fp32 log-prob of each sampled token at temperature 1
    last: jax.Array  # [B] the token to feed next
    pos: jax.Array  # [B] its position id
    done: jax.Array  # [B] bool: row hit a stop id
    lengths: jax.Array  # [B] tokens generated (stop id included)
    cache: KVCache
    rng: jax.Array
    step: jax.Array  # [] next column of `tokens` to write


@dataclasses.dataclass
class Sample:
    """One sampled response. `n_tokens` counts every generated token, the end-of-turn token
    included when the response ended with it: the tokens whose log-probs make up `logp`. The text
    (`text_ids`, `text`) never holds the end-of-turn token."""
    tokens: list[int]  # generated ids, stop id included when the row stopped on one
    logps: list[float]  # per-token log-probs (temperature 1, unmasked)
    finish_reason: str  # "eos" | "length"

    @property
    def logp(self) -> float:
        return float(np.sum(self.logps, dtype=np.float64))

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def text_ids(self) -> list[int]:
        return self.tokens[:-1] if self.finish_reason == "eos" else self.tokens

    def text(self, tokenizer) -> str:
        return tokenizer.decode(self.text_ids)


def sample_batch(params, cfg: ModelConfig, sp: SamplingParams, cache: KVCache, prompt, valid, rng,
                 pad_id: int = 0, phases: int = 4):
    """Sample up to sp.max_new_tokens for a left-padded batch. prompt/valid [B, P].

    The decode loop runs in `phases` consecutive while loops, each attending to a static window of
    the cache that just covers its steps (`decode_windows`), so early steps skip the empty slots.
    Returns (tokens [B, N], logps [B, N], lengths [B], done [B], cache).
    """
    b, p = prompt.shape
    n = sp.max_new_tokens
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    cache = cache_lib.reset(cache)  # reuse the donated buffers
    hidden, cache = transformer.forward_hidden(params, cfg, prompt, positions, valid, cache=cache)
    rng, key = jax.random.split(rng)  # logits of the last prompt position only (left padding)
    first, first_logp = choose(transformer.logits_from_hidden(params, cfg, hidden[:, -1]), key, sp)
    stop = jnp.asarray(sp.stop_ids or (-1,), jnp.int32)
    done = jnp.isin(first, stop)
    state = DecodeState(
        tokens=jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first),
        logps=jnp.zeros((b, n), jnp.float32).at[:, 0].set(first_logp),
        last=first, pos=positions[:, -1] + 1, done=done, lengths=jnp.ones((b,), jnp.int32),
        cache=cache, rng=rng, step=jnp.ones((), jnp.int32))
    cache_len = cache.pos.shape[1]

    def cond(s: DecodeState, window: int):
        return (s.step < n) & ~jnp.all(s.done) & (s.cache.index < window)

    def body(s: DecodeState, window: int):
        # Rows already done feed an invalid slot: they no longer write to the cache or the output.
        logits, cache = transformer.forward(params, cfg, s.last[:, None], s.pos[:, None], ~s.done[:, None],
                                      cache=s.cache, window=window)
        rng, key = jax.random.split(s.rng)
        tok, tok_logp = choose(logits[:, 0], key, sp)
        tok = jnp.where(s.done, pad_id, tok)
        tok_logp = jnp.where(s.done, 0.0, tok_logp)
        return DecodeState(
            tokens=jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step)),
            logps=jax.lax.dynamic_update_slice(s.logps, tok_logp[:, None], (0, s.step)),
            last=tok, pos=s.pos + 1, done=s.done | jnp.isin(tok, stop),
            lengths=s.lengths + (~s.done).astype(jnp.int32), cache=cache, rng=rng, step=s.step + 1)

    s = state
    for w in decode_windows(p, cache_len, phases):
        s = jax.lax.while_loop(functools.partial(cond, window=w), functools.partial(body, window=w), s)
    return s.tokens, s.logps, s.lengths, s.done, s.cache


def decode_windows(prompt_len: int, cache_len: int, phases: int) -> list[int]:
    """Static attention windows of the decode phases: slot counts growing from just past the prompt
    to the whole cache in `phases` steps (multiples of 8), the last one always `cache_len`."""
    span = cache_len - prompt_len
    steps = [-(-span * j // phases) for j in range(1, phases + 1)]  # ceil(span * j / phases)
    return sorted({min(cache_len, prompt_len + -(-c // 8) * 8) for c in steps} | {cache_len})


def choose(logits, key, sp: SamplingParams):
    """Next tokens [B] from logits [B, V] under sp, and their log-prob at temperature 1."""
    logits = logits.astype(jnp.float32)
    if sp.greedy:
        tok = jnp.argmax(logits, axis=-1)
    else:
        tok = categorical(key, masked_logits(logits, sp))
    logp = jnp.take_along_axis(logits, tok[:, None], -1)[:, 0] - jax.nn.logsumexp(logits, -1)
    return tok.astype(jnp.int32), logp


def categorical(key, logits, block: int = 256):
    """One draw per row from softmax(logits) [B, V] by inverse CDF in two levels (a block of
    `block` tokens, then a token in it): two uniforms per row instead of jax.random.categorical's
    B x V Gumbel noise, which dominates a decode step on CPU at large vocabularies."""
    b, v = logits.shape
    nb = -(-v // block)
    w = jnp.exp(logits - logits.max(-1, keepdims=True))  # unnormalised probabilities
    w = jnp.pad(w, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)
    u = jax.random.uniform(key, (2, b, 1), jnp.float32)
    block_cdf = jnp.cumsum(w.sum(-1), axis=-1)  # [B, nb]
    bi = jnp.minimum(jnp.sum(block_cdf <= u[0] * block_cdf[:, -1:], axis=-1), nb - 1)
    in_block = jnp.take_along_axis(w, bi[:, None, None], axis=1)[:, 0]  # [B, block]
    cdf = jnp.cumsum(in_block, axis=-1)
    wi = jnp.minimum(jnp.sum(cdf <= u[1] * cdf[:, -1:], axis=-1), block - 1)
    # an empty block cannot be drawn (its cdf step is 0), so `wi` lands on a token of mass > 0
    return (bi * block + wi).astype(jnp.int32)


def masked_logits(logits, sp: SamplingParams):
    """logits / T with everything outside top-k and the top-p nucleus set to -inf."""
    logits = logits / sp.temperature
    neg = jnp.finfo(jnp.float32).min
    if sp.top_k and sp.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sp.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sp.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, -1)
        probs = jax.nn.softmax(sorted_logits, -1)
        before = jnp.cumsum(probs, -1) - probs  # mass strictly ahead of each token
        keep_sorted = before < sp.top_p  # always keeps the top token
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return logits


def decode_mesh(cfg: ModelConfig, mesh, layout: str = "auto", weight_bytes: float = 0.0,
                memory_bytes: Optional[float] = None):
    """(layout chosen, mesh) the sampler decodes on, over `mesh`'s devices (one host's), by `layout`:
        tensor      data n/t x tensor t, t the most of the n chips that divides the kv heads: each
                    chip holds 1/t of every layer's heads, kv heads, MLP and vocab
        replicated  data n: every chip holds all the weights and decodes its share of the rows
        train       `mesh` itself (weights split over fsdp: gathered at every decode step)
        auto        tensor where t > 1 and 1/t of the weights fits, else replicated where they fit,
                    else train
    The rule table is the same on every mesh; the decode meshes have no fsdp axis, so nothing is
    gathered. Fitting means at most DECODE_WEIGHT_SHARE of a chip's memory (`memory_bytes`; None:
    unknown, e.g. CPU devices, taken as fitting), leaving the rest to the KV cache."""
    if layout == "train":
        return "train", mesh
    devices = list(mesh.devices.flat)
    n = len(devices)
    t = max(d for d in range(1, n + 1) if n % d == 0 and cfg.num_kv_heads % d == 0)

    def fits(share: float) -> bool:
        return memory_bytes is None or weight_bytes * share <= DECODE_WEIGHT_SHARE * memory_bytes

    if layout == "tensor" and t == 1 and n > 1:
        raise UsageError(f"sampling.layout=tensor: the model's {cfg.num_kv_heads} kv head(s) do not divide over "
                         f"any number of this host's {n} chips; use sampling.layout=auto or replicated")
    if layout == "tensor" or (layout == "auto" and t > 1 and fits(1 / t)):
        return "tensor", sharding.make_mesh(n // t, 1, t, devices=devices)
    if layout == "replicated" or fits(1.0):
        return "replicated", sharding.make_mesh(n, 1, 1, devices=devices)
    return "train", mesh


# the share of a chip's memory the decode layout's weights may take (the KV cache needs the rest)
DECODE_WEIGHT_SHARE = 0.6


def decode_shapes(cfg: ModelConfig, shapes):
    """ShapeDtypeStructs of a params tree as the sampler holds it: float weights in the compute
    dtype, quantized weights (a QLoRA base) as they are."""
    dtype = jnp.dtype(cfg.dtype)

    def one(x):
        if quant.is_quantized(x):
            return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in x.items()}
        return jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype)
    return jax.tree.map(one, shapes, is_leaf=quant.is_quantized)


def tree_bytes(shapes) -> float:
    return float(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes)))


def device_memory(device) -> Optional[float]:
    """A device's memory in bytes, where the runtime says (GPU, TPU); None on CPU."""
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend implements it
        return None
    return float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


class Sampler:
    """Compiled, sharded sampling for one model config on one host's mesh, in the decode layout
    (`decode_mesh`); one program per prompt bucket."""

    def __init__(self, cfg: ModelConfig, mesh=None, batch_size: int = 16, pad_id: int = 0,
                 min_prompt_bucket: int = 16, max_prompt_len: Optional[int] = None, decode_phases: int = 4,
                 param_shapes=None, layout: str = "auto", memory_bytes: Optional[float] = None):
        """`param_shapes`: the params tree the programs will take when it is not the plain one (a
        quantized base); arrays or ShapeDtypeStructs. `layout`: sampling.layout (`decode_mesh`);
        `memory_bytes`: a chip's memory (default: what the runtime reports)."""
        self.cfg, self.batch_size, self.pad_id = cfg, batch_size, pad_id
        self.decode_phases = decode_phases  # each phase is one more compiled copy of the decode step
        train_mesh = mesh or sharding.make_mesh()
        shapes = decode_shapes(cfg, transformer.param_shapes(cfg) if param_shapes is None else param_shapes)
        if memory_bytes is None:
            memory_bytes = device_memory(train_mesh.devices.flat[0])
        self.layout, self.mesh = decode_mesh(cfg, train_mesh, layout, tree_bytes(shapes), memory_bytes)
        self.min_bucket, self.max_prompt_len = min_prompt_bucket, max_prompt_len
        self.param_sharding = transformer.param_shardings(cfg, self.mesh, shapes)
        self.param_shapes = sharding.abstract(shapes, self.param_sharding)  # the programs' params argument
        self._caches: dict[tuple, KVCache] = {}
        self.compiled_programs: set[tuple] = set()

    def place(self, params):
        """Params (numpy or jax, in any layout) in the decode layout: float weights cast to the
        compute dtype, on the decode mesh. Done once per generate; the forward's per-layer casts
        are then no-ops, so the results equal those of the training layout."""
        return transformer.shard_params(params, self.cfg, self.mesh, dtype=jnp.dtype(self.cfg.dtype))

    def generate(self, params, prompts: Sequence[Sequence[int]], sp: SamplingParams, seed: int = 0,
                 progress=None) -> list[Sample]:
        """Samples for every prompt (token ids), in input order. Prompts are grouped by length."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[Optional[Sample]] = [None] * len(prompts)
        for bi, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start:start + self.batch_size]
            rng = jax.random.fold_in(jax.random.key(seed), bi)
            for i, s in zip(idx, self.generate_batch(params, [prompts[i] for i in idx], sp, rng)):
                out[i] = s
            if progress is not None:
                progress(len(idx), sum(len(out[i].tokens) for i in idx))
        return out  # type: ignore[return-value]

    def generate_batch(self, params, prompts: Sequence[Sequence[int]], sp: SamplingParams, rng) -> list[Sample]:
        n_real = len(prompts)
        longest = max(len(p) for p in prompts)
        if self.max_prompt_len and longest > self.max_prompt_len:
            raise ValueError(f"a prompt has {longest} tokens, over max_prompt_len={self.max_prompt_len}")
        plen = tokenize.bucket(longest, self.min_bucket)
        rows = list(prompts) + [prompts[0]] * (self.batch_size - n_real)
        packed = tokenize.pack(rows, [[] for _ in rows], plen, 0, self.pad_id)  # left-padded prompts only
        tokens, valid = packed["tokens"], packed["valid"]
        key = (plen, sp)
        cache = self._caches.pop(key, None)
        if cache is None:
            cache = self._new_cache(plen + sp.max_new_tokens)
        self.compiled_programs.add(key)
        # placed explicitly: with several processes, jit refuses sharded numpy inputs
        tokens, valid = jax.device_put((tokens, valid), sharding.batch_sharding(self.mesh, 2, self.batch_size))
        toks, logps, lengths, done, cache = self.program(sp)(params, cache, tokens, valid, rng)
        self._caches[key] = cache
        toks, logps, lengths, done = (np.asarray(x) for x in (toks, logps, lengths, done))
        return [Sample(toks[i, :lengths[i]].tolist(), logps[i, :lengths[i]].tolist(),
                       "eos" if done[i] else "length") for i in range(n_real)]

    def release_caches(self) -> None:
        """Drop the KV caches kept for reuse (one per prompt bucket and sampling law): a caller whose
        every batch has another shape (MT-Bench's long second turns) keeps memory to one batch's."""
        self._caches.clear()

    def _new_cache(self, length: int) -> KVCache:
        return jax.jit(lambda: cache_lib.init_cache(self.cfg, self.batch_size, length),
                       out_shardings=self.cache_shardings(length))()

    def cache_shardings(self, length: int) -> KVCache:
        shapes = jax.eval_shape(lambda: cache_lib.init_cache(self.cfg, self.batch_size, length))
        return KVCache(*sharding.tree_shardings(tuple(cache_lib.CACHE_AXES), tuple(shapes), self.mesh))

    @functools.lru_cache(maxsize=None)
    def program(self, sp: SamplingParams):
        b = self.batch_size
        row = sharding.batch_sharding(self.mesh, 2, b)
        vec = sharding.batch_sharding(self.mesh, 1, b)
        cache_sh = self.cache_shardings(16)  # the specs do not depend on the length
        fn = functools.partial(sample_batch, cfg=self.cfg, sp=sp, pad_id=self.pad_id, phases=self.decode_phases)
        return jax.jit(sharding.traced_on(self.mesh, lambda p, c, t, v, r: fn(p, cache=c, prompt=t, valid=v, rng=r)),
                       in_shardings=(self.param_sharding, cache_sh, row, row, sharding.replicated(self.mesh)),
                       out_shardings=(row, row, vec, vec, cache_sh), donate_argnums=(1,))


def progress_bar(total_rows: int, desc: str = "sample", disable: bool = False):
    """A tqdm bar over rows that shows generated tokens/s; returns (callback, bar)."""
    from tqdm import tqdm

    bar = tqdm(total=total_rows, desc=desc, unit="row", disable=disable)
    t0, count = time.perf_counter(), [0]

    def update(rows: int, tokens: int):
        count[0] += tokens
        bar.update(rows)
        bar.set_postfix(tok_s=f"{count[0] / max(time.perf_counter() - t0, 1e-9):.1f}")

    return update, bar
