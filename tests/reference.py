"""Plain re-implementations that the tests compare the optimized code against."""

import jax
import jax.numpy as jnp

from spin_jax.model import transformer


def whole_row_logps(params, cfg, packed):
    """Summed log-probs of the response tokens of whole [prompt + response] rows
    (data.tokenize.pack's layout): one plain forward, full log_softmax, no shared prefix, no
    vocab chunks, one attention block."""
    logits, _ = transformer.forward(params, cfg.replace(attn_block=0), packed["tokens"], packed["positions"],
                                    packed["valid"])
    lp = jax.nn.log_softmax(logits, -1)
    tok = jnp.take_along_axis(lp, jnp.asarray(packed["labels"])[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(packed["loss_mask"], tok, 0.0), -1)


def _gguf_reference_dir(gguf_path: str):
    """Where transformers' own reading of `gguf_path` is kept between test sessions
    (SPIN_JAX_REFERENCE_CACHE=DIR, or off; conftest sets it to reference-tests-<requirements hash> in
    spin_jax's cache), keyed by the file (path, size, mtime) and the torch, transformers and gguf
    versions that read it; None when off."""
    import hashlib
    import importlib.metadata
    import os

    from spin_jax import rundir

    root = os.environ.get("SPIN_JAX_REFERENCE_CACHE", "off")
    if rundir.cache_off(root):
        return None
    st = os.stat(gguf_path)
    versions = [importlib.metadata.version(p) for p in ("torch", "transformers", "gguf")]
    key = hashlib.sha1(repr((os.path.realpath(gguf_path), st.st_size, st.st_mtime_ns, versions)).encode()).hexdigest()
    return os.path.join(root, f"{os.path.basename(gguf_path)}-{key[:16]}")


def transformers_from_gguf(gguf_path: str, part: str):
    """transformers' PyTorch model (float32, eval) or tokenizer (`part`: "model" or "tokenizer") read
    from a GGUF file by transformers itself: its dequantizer, its un-permuting, its tokenizer builder.
    The first session stores what transformers built (the model's float32 weights as safetensors, the
    tokenizer's files) in the reference cache; later sessions load that instead of dequantizing and
    building again (Gemma 3 270M: ~1 min → seconds). What the tests compare against is unchanged:
    the same transformers output, kept. A folder is published whole (rundir.written_dir), so a worker
    never reads a half-written one."""
    import os

    import torch
    import transformers

    from spin_jax import rundir

    cached = _gguf_reference_dir(gguf_path)
    where = os.path.join(cached, part) if cached else None
    if where and os.path.isdir(where):
        if part == "model":
            return transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32).eval()
        return transformers.AutoTokenizer.from_pretrained(where)
    d, f = os.path.split(gguf_path)
    if part == "model":
        built = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    else:
        built = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    if where:
        with rundir.written_dir(where) as tmp:
            if part == "model":  # save_pretrained refuses a GGUF-loaded model; its weights are plain float32 now
                import safetensors.torch

                safetensors.torch.save_model(built, os.path.join(tmp, "model.safetensors"))
                built.config.to_json_file(os.path.join(tmp, "config.json"))
            else:
                built.save_pretrained(tmp)
    return built
