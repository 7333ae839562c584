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
