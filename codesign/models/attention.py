"""Causal attention, one kernel per platform: what `Workload.attention` becomes in the compiled program.

`Workload.attention` names what the step should run (`xla`, `cudnn`, `flash`); `kernel_for` turns it
into the kernel the target platform has:

* ``xla``: `jax.nn.dot_product_attention`'s XLA path, which materializes the B x N x T x S scores
  (MLA, whose value head is narrower than its query/key head: the same math as two einsums).
* ``cudnn`` (``flash`` on NVIDIA GPUs): cuDNN's fused flash attention. `jax.nn.dot_product_attention`
  needs one head dim for q, k and v, so MLA's value head is zero-padded to the query/key head dim
  (DeepSeek-V3: 128 -> 192) and the output sliced back; the kernel really runs the padded PV matmul,
  so the padded FLOPs are counted (`attention_v_head_dim`).
* ``splash`` (``flash`` on TPU): the Pallas TPU splash attention kernel shipped with JAX, wrapped in a
  `shard_map` over the mesh axes that shard the batch, the query sequence (context parallelism: the
  kernel's causal mask is split into `q_seq_shards`) and the heads, as MaxText wraps it. K and V enter
  at full length. Splash takes a value head dim different from the query/key head dim, so MLA runs
  unpadded. It needs the per-device sequence length to be a multiple of 128 (its block size).
* ``reference`` (``flash`` elsewhere, i.e. the CPU): flash attention's math in plain JAX (blockwise
  over K/V with an online softmax, each block recomputed in backward), so the S x S scores are never
  materialized at once. It checks the flash path's numerics; its compiled cost is XLA:CPU's, not a
  kernel's, and compile reports say so (`REFERENCE_NOTE`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from codesign import _compat as C
from codesign import axes as A
from codesign.arithmetic import causal_block_fraction
from codesign.models.dropout import ATTENTION_PROBS, dropout
from codesign.sharding.activation import active_spec

KERNELS = ("xla", "cudnn", "splash", "reference")
REFERENCE_NOTE = (
    "attention: flash reference path (blockwise online softmax in plain JAX, no S x S scores); its "
    "compiled FLOPs, bytes and memory are XLA:CPU's for that code, not a flash kernel's"
)
_FLASH_KERNEL = {"gpu": "cudnn", "tpu": "splash"}
_SPLASH_BLOCK = 512  # the largest block tried (MaxText's default); blocks must be multiples of 128
_REFERENCE_BLOCK = 512


def platform_of(mesh) -> str:
    """`gpu`, `tpu` or `cpu` for the devices of a mesh (deviceless topologies included)."""
    platform = mesh.devices.flat[0].platform.lower()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def kernel_for(attention: str, platform: str) -> str:
    """The kernel `Workload.attention` runs on `platform` (see the module docstring)."""
    if attention == "flash":
        return _FLASH_KERNEL.get(platform, "reference")
    return attention


def attention_v_head_dim(qk_head_dim: int, v_head_dim: int, kernel: str) -> int:
    """The value head dim the kernel computes with: cuDNN pads v to the q/k head dim."""
    return max(qk_head_dim, v_head_dim) if kernel == "cudnn" else v_head_dim


# cuDNN's fused attention tiles: its flash kernels run 64-128 query rows per tile; 128 is assumed.
_CUDNN_BLOCK = 128
# Bytes per query row per head of a flash kernel's f32 softmax statistics in HBM, in the layout the
# kernel writes them: splash's forward writes the logsumexp broadcast over the 128 lanes of a vector
# register ([heads, T, 128] f32; backward reads it, and the row sums of dO*O, as [heads, 8, T]);
# cuDNN writes one f32 per row and its backward one more (the dO*O row sums).
_STATS_BYTES = {"splash": 128 * 4, "cudnn": 2 * 4}


def flash_blocks(kernel: str, q_len: int, kv_len: int) -> tuple[int, int]:
    """(block_q, block_kv) a flash kernel tiles the scores with, for per-device lengths."""
    q_len, kv_len = int(q_len), int(kv_len)
    if kernel == "splash":
        return math.gcd(q_len, _SPLASH_BLOCK), math.gcd(kv_len, _SPLASH_BLOCK)
    if kernel == "cudnn":
        return min(q_len, _CUDNN_BLOCK), min(kv_len, _CUDNN_BLOCK)
    return kv_len, kv_len  # the reference and an unmasked kernel ("full") compute every score


def flash_flops(kernel: str, rows: float, q_len: int, kv_len: int, qk: int, v: int) -> tuple[float, float]:
    """(forward, backward) matmul FLOPs of one flash attention call over `rows` = batch x heads query
    sequences of q_len (per device) against kv_len keys, causal: the tiles the kernel computes
    (`arithmetic.causal_block_fraction`; with the query sequence sharded, the average over the shards).
    Forward QK^T and PV; backward recomputes QK^T and runs dO V^T, P^T dO, dS K and dS^T Q."""
    bq, bkv = flash_blocks(kernel, q_len, kv_len)
    per = 2.0 * rows * q_len * kv_len * causal_block_fraction(kv_len, bq, bkv)
    return per * (qk + v), per * (3 * qk + 2 * v)


def stats_bytes(kernel: str, kv_block: int) -> int:
    """HBM bytes per query row per head of a flash kernel's workspace (row statistics; the reference
    path: one K/V block of f32 scores and probabilities at a time)."""
    return _STATS_BYTES.get(kernel, 2 * 4 * kv_block)


def check_dropout_kernel(rate: float, flash: bool) -> None:
    """Attention dropout drops the materialized probabilities: only the XLA kernel has them."""
    if rate and flash:
        raise ValueError(
            f"attention_dropout={rate} needs XLA attention (it drops the materialized probabilities); "
            "a flash kernel here runs without dropout: use --attention xla, or attention_dropout=0"
        )


def causal_attention(q, k, v, kernel: str, dropout_rate: float = 0.0):
    """q [B,T,N,Hqk], k [B,S,K,Hqk], v [B,S,K,Hv] -> [B,T,N,Hv] with `kernel` (see `KERNELS`).
    `dropout_rate` drops the probabilities (`models.dropout`); only the XLA kernel materializes them."""
    check_dropout_kernel(dropout_rate, kernel != "xla")
    if kernel == "splash":
        return _splash(q, k, v)
    if kernel == "reference":
        return _reference(q, k, v)
    hv = v.shape[-1]
    if kernel == "cudnn":
        pad = q.shape[-1] - hv
        if pad > 0:  # MLA: one head dim for q, k and v (module docstring)
            v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, pad)))
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        return o[..., :hv]
    if kernel != "xla":
        raise ValueError(f"attention kernel {kernel!r}; use one of {KERNELS}")
    if q.shape[-1] == hv and not dropout_rate:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    b, t, n, hq = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, hq)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k).astype(jnp.float32) / jnp.sqrt(hq).astype(jnp.float32)
    mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1).astype(v.dtype), dropout_rate, ATTENTION_PROBS)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, hv)


# -- reference (plain JAX) ---------------------------------------------------------------------------
def _reference(q, k, v):
    """Blockwise causal attention with an online softmax: a scan over K/V blocks carrying the running
    max, denominator and output (f32). The checkpointed body recomputes each block's scores in backward,
    as a flash kernel does, so at most T x block scores exist at a time."""
    b, t, n, hq = q.shape
    s, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
    block = math.gcd(s, _REFERENCE_BLOCK)
    qg = q.reshape(b, t, kh, n // kh, hq).astype(jnp.float32) / math.sqrt(hq)
    kb = k.reshape(b, s // block, block, kh, hq).swapaxes(0, 1)
    vb = v.reshape(b, s // block, block, kh, hv).swapaxes(0, 1)
    q_pos = jnp.arange(t)

    @jax.checkpoint
    def step(carry, xs):
        m, l, acc = carry
        kj, vj, j = xs
        sc = jnp.einsum("btkgh,bskh->bkgts", qg, kj.astype(jnp.float32))
        visible = q_pos[:, None] >= (j * block + jnp.arange(block))[None, :]
        sc = jnp.where(visible, sc, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(-1))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet
        p = jnp.exp(sc - safe[..., None])
        scale = jnp.exp(jnp.where(jnp.isfinite(m), m, safe) - safe)
        l = l * scale + p.sum(-1)
        acc = acc * scale[..., None] + jnp.einsum("bkgts,bskh->bkgth", p, vj.astype(jnp.float32))
        return (m_new, l, acc), None

    g = n // kh
    init = (
        jnp.full((b, kh, g, t), -jnp.inf, jnp.float32),
        jnp.zeros((b, kh, g, t), jnp.float32),
        jnp.zeros((b, kh, g, t, hv), jnp.float32),
    )
    (_, l, acc), _ = jax.lax.scan(step, init, (kb, vb, jnp.arange(s // block)))
    out = acc / l[..., None]  # [b, kh, g, t, hv]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, hv).astype(q.dtype)


# -- splash (Pallas TPU) ------------------------------------------------------------------------------
def _checked(block: int, length: int, what: str) -> int:
    if block % 128:
        raise ValueError(
            f"splash attention needs the per-device {what} length to be a multiple of 128, got {length}; "
            f"use a sequence length (divided by the sequence axis) that is, or --attention xla"
        )
    return block


def _shards(mesh_sizes: dict[str, int], entry) -> int:
    names = (entry,) if isinstance(entry, str) else (entry or ())
    return math.prod(mesh_sizes[a] for a in names)


def _four(spec) -> jax.sharding.PartitionSpec:
    return jax.sharding.PartitionSpec(*(tuple(spec) + (None,) * (4 - len(spec))))


def _splash(q, k, v):
    """The splash kernel over the local shard of each device (module docstring). Outside a plan's
    activation context (one device) it runs on the whole arrays."""
    _, t, n, hq = q.shape
    s = k.shape[1]
    q = (q.astype(jnp.float32) / math.sqrt(hq)).astype(q.dtype)  # splash applies no softmax scale
    q_axes = (A.ACT_BATCH, A.ACT_SEQ, A.ACT_HEADS, None)
    kv_axes = (A.ACT_BATCH, None, A.ACT_HEADS, None)
    placed = active_spec(q_axes, q.shape)
    if placed is not None and _four(active_spec(kv_axes, k.shape)[1])[2] != _four(placed[1])[2]:
        # K/V heads not split like the query heads (kv_heads not divisible by the head shards):
        # give every query head its own K/V head so that each shard holds the groups it needs.
        k, v = (jnp.repeat(x, n // x.shape[2], axis=2) for x in (k, v))
    if placed is None:
        bq, bkv = flash_blocks("splash", t, s)
        kernel = C.make_splash_mha(n, t, s, _checked(bq, t, "query"), _checked(bkv, s, "key"), 1, 1)
        return _splash_local(kernel, q, k, v)
    mesh, q_spec = placed[0], _four(placed[1])
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    kv_spec = _four(active_spec(kv_axes, k.shape)[1])
    seq_shards, head_shards = _shards(sizes, q_spec[1]), _shards(sizes, q_spec[2])
    bq, bkv = flash_blocks("splash", t // seq_shards, s)
    kernel = C.make_splash_mha(
        n, t, s, _checked(bq, t // seq_shards, "query"), _checked(bkv, s, "key"), head_shards, seq_shards
    )
    kernel_spec = C.splash_kernel_spec(kernel, mesh, q_spec[2], q_spec[1])
    out_spec = jax.sharding.PartitionSpec(*q_spec[:3], None)
    f = C.shard_map(
        _splash_local, mesh=mesh, in_specs=(kernel_spec, q_spec, kv_spec, kv_spec), out_specs=out_spec
    )
    return f(kernel, q, k, v)


def _splash_local(kernel, q, k, v):
    """One device's shard: [b,t,n,h] -> the kernel's [n,t,h] per sequence, vmapped over b."""
    o = jax.vmap(kernel)(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)))
    return o.transpose(0, 2, 1, 3)
