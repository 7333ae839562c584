"""Layouts by design: what the compiled programs move between devices, read from their HLO.

Activations carry logical axes (rows over data x fsdp, heads / MLP / vocab over tensor), so the
train step and scoring are FSDP (weights gathered per pass, gradients reduced once) and no
collective carries the whole batch's activations; the sampler decodes in its own layout and
gathers no weight inside its decode loop. `python -m tests.layouts` prints the figures.
"""

import jax
import numpy as np
import pytest
from layouts import found, holds_token_count, token_counts, weight_bytes

from spin_jax import collectives, sharding
from spin_jax.config import ConfigError, load_config
from spin_jax.errors import UsageError
from spin_jax.model.config import tiny_config
from spin_jax.sampling import decode_mesh

CASES = [("train", (1, 8, 1), ()), ("train", (1, 8, 1), ("train.opponent_logps=in_step",)),
         ("train", (1, 8, 1), ("model.lora.rank=4",)), ("score", (1, 8, 1), ()), ("sample", (1, 8, 1), ()),
         ("train", (2, 2, 2), ()), ("train", (2, 2, 2), ("train.opponent_logps=in_step", "model.lora.rank=4")),
         ("score", (2, 2, 2), ()), ("sample", (2, 2, 2), ()), ("sft", (1, 8, 1), ()), ("sft", (2, 2, 2), ())]


@pytest.mark.parametrize("program,mesh_shape,overrides", CASES)
def test_no_collective_holds_the_whole_batch(program, mesh_shape, overrides, capfd):
    """No all-gather / all-reduce / all-to-all carries a tensor of the global batch's tokens (the
    defect: projections computed for the whole batch on every device, then all-reduced), and XLA's
    partitioner never falls back to replicating a tensor ("Involuntary full rematerialization")."""
    cs, *_ = found(program, mesh_shape, overrides)
    assert cs, "the program moves nothing at all: not sharded?"
    bad = [collectives.describe(c) for c in cs if holds_token_count(c, token_counts(program))]
    assert not bad, bad
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


@pytest.mark.parametrize("overrides,passes", [((), 2), (("train.opponent_logps=in_step",), 3),
                                              (("model.lora.rank=4",), 2)])
def test_fsdp_train_step_moves_the_weights_per_pass_and_the_gradients_once(overrides, passes):
    """fsdp 8: the bytes moved are within 1.25x of FSDP's count: every weight gathered once per pass
    (forward, backward; the in-step opponent's forward) and the gradients reduced once (LoRA: the
    adapters' only). float32 compute, so weights move in float32."""
    cs, _, cfg, m = found("train", (1, 8, 1), overrides)
    assert_fsdp_bytes(cs, weight_bytes(m, 4), passes, cfg.model.lora.rank)


def test_fsdp_sft_step_moves_the_weights_per_pass_and_the_gradients_once():
    cs, _, cfg, m = found("sft", (1, 8, 1))
    assert_fsdp_bytes(cs, weight_bytes(m, 4), 2, 0)


def assert_fsdp_bytes(cs, w: float, passes: int, lora_rank: int):
    """Within 1.25x of FSDP's count: every weight gathered once per pass, gradients reduced once."""
    expected = passes * w + (0 if lora_rank else w)
    moved = sum(collectives.totals(cs).values())
    assert 0.6 * expected <= moved <= 1.25 * expected, (moved, expected, collectives.totals(cs))


def test_scoring_moves_each_weight_once():
    cs, _, _, m = found("score", (1, 8, 1))
    moved = sum(collectives.totals(cs).values())
    assert 0.8 * weight_bytes(m, 4) <= moved <= 1.25 * weight_bytes(m, 4), collectives.totals(cs)


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_decode_loop_moves_activations_only(mesh_shape):
    """The sampler (tensor-parallel decode layout: 4 kv heads over 4 of the 8 devices, the batch
    over 2) gathers no weight inside its decode loops: each collective there is one step's
    activations, and one step moves within 1.25x of 2 all-reduces of the rows' hidden states per
    layer plus a row's logits."""
    cs, prog, cfg, m = found("sample", mesh_shape)
    decode = [c for c in cs if c.in_data_dependent_loop]
    assert decode
    rows = cfg.sampling.batch_size // 2
    assert not [collectives.describe(c) for c in decode if c.kind == "all-gather" and c.elements >= m.hidden_size ** 2]
    assert all(c.elements <= rows * max(m.vocab_size, m.hidden_size) for c in decode), \
        [collectives.describe(c) for c in decode]
    per_step = sum(c.bytes * c.trips for c in decode) / prog.unknown_trips / len({c.loops[0][0] for c in decode})
    expected = 4 * rows * (2 * m.num_layers * m.hidden_size + m.vocab_size)
    assert per_step <= 1.25 * expected, (per_step, expected)
    assert prog.mesh == {"layout": "tensor", "data": 2, "fsdp": 1, "tensor": 4}


def test_decode_mesh_by_layout_shapes_and_memory():
    devices = jax.devices()[:8]
    train = sharding.make_mesh(1, 8, 1, devices=devices)
    four = tiny_config("llama", num_heads=8, num_kv_heads=4)
    one = tiny_config("llama", num_heads=4, num_kv_heads=1)  # Gemma 3 270M's single kv head
    def shape(chosen):
        name, mesh = chosen
        return name, tuple(mesh.shape[a] for a in sharding.MESH_AXES)

    assert shape(decode_mesh(four, train, "auto")) == ("tensor", (2, 1, 4))
    assert shape(decode_mesh(one, train, "auto")) == ("replicated", (8, 1, 1))  # tensor cannot divide
    assert decode_mesh(four, train, "train") == ("train", train)
    assert shape(decode_mesh(four, train, "replicated")) == ("replicated", (8, 1, 1))
    # 10 GB of weights on 16 GB chips: a quarter fits under tensor parallelism; replicated does not
    assert shape(decode_mesh(four, train, "auto", 10e9, 16e9)) == ("tensor", (2, 1, 4))
    assert shape(decode_mesh(one, train, "auto", 10e9, 16e9)) == ("train", (1, 8, 1))  # neither fits
    assert shape(decode_mesh(one, train, "auto", 1e9, 16e9)) == ("replicated", (8, 1, 1))
    with pytest.raises(UsageError, match="sampling.layout=tensor"):
        decode_mesh(one, train, "tensor")


def test_sampling_layout_is_validated():
    with pytest.raises(ConfigError, match="--set sampling.layout=sideways: .*one of auto, tensor, replicated, train"):
        load_config("configs/tiny_test.yaml", ["sampling.layout=sideways"])


def test_decode_layout_holds_weights_in_the_compute_dtype():
    """Placed once per generate: float weights cast to the compute dtype, split over tensor."""
    from spin_jax.model import transformer
    from spin_jax.sampling import Sampler

    cfg = tiny_config("llama", num_heads=8, num_kv_heads=4, dtype="bfloat16")
    params = transformer.init_params(cfg, jax.random.key(0))
    sampler = Sampler(cfg, sharding.make_mesh(1, 8, 1), batch_size=8)
    placed = sampler.place(params)
    assert sampler.layout == "tensor"
    assert all(x.dtype == np.dtype("bfloat16") for x in jax.tree.leaves(placed))
    assert placed["layers"]["wq"].sharding.spec[2] == "tensor"  # heads
    assert placed["layers"]["wq"].sharding.spec[1] is None  # no fsdp: nothing to gather
