"""LoRA against PEFT (its LoRA model's logits, its loading of our exported adapter, its
merge_and_unload), the LoRA train step against a plain jax.grad, the step-0 opponent identity,
sharding of adapters and a quantized base, and the driver's LoRA and QLoRA iterations."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spin_jax import sharding, train
from spin_jax.config import TrainSection
from spin_jax.data import tokenize
from spin_jax.io import hf
from spin_jax.model import lora, quant, transformer
from spin_jax.model.config import tiny_config
from tests.test_model_parity import rel_err, torch_logits, torch_tiny
from tests.test_train import full_rows, make_batch, make_pairs, plain_loss

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TARGETS = lora.DEFAULT_TARGETS
PEFT_MODULES = [lora.HF_MODULES[t].split(".")[-1] for t in TARGETS]


def random_adapters(cfg, rank, seed):
    """Adapters with A and B both random (a trained adapter, not a new one)."""
    adapters = lora.init_adapters(cfg, TARGETS, rank, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return {n: {"a": ad["a"], "b": (0.05 * rng.standard_normal(ad["b"].shape)).astype(np.float32)}
            for n, ad in adapters.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_forward_equals_peft_lora_model(arch, tmp_path):
    """PEFT's LoRA model (random A and B: init_lora_weights=False) against our forward with the same
    adapter tensors, read through from_peft."""
    m = torch_tiny(arch)
    m.save_pretrained(tmp_path / "base")
    cfg, params = hf.read_hf_dir(str(tmp_path / "base"))
    rank, alpha = 4, 8.0
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 12))
    base = torch_logits(m, tokens)  # before get_peft_model, which changes m in place
    pm = peft.get_peft_model(m, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_MODULES,
                                                lora_dropout=0.0, init_lora_weights=False)).eval()
    tensors = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(pm).items()}
    adapters = lora.from_peft(tensors, cfg, TARGETS, rank)
    ours, _ = transformer.forward(lora.attach(params, adapters), cfg.replace(lora_scale=alpha / rank), tokens)
    ref = torch_logits(pm, tokens)
    assert rel_err(ref, base) > 1e-2  # the adapters change the logits: the comparison means something
    err = rel_err(ours, ref)
    print(f"\n{arch}: logits vs PEFT LoRA model, worst relative error {err:.2e}")
    assert err <= 1e-4


def test_exported_adapter_loads_in_peft_and_merge_equals_merge_and_unload(tmp_path):
    import transformers

    m = torch_tiny("llama")
    m.save_pretrained(tmp_path / "base")
    cfg, params = hf.read_hf_dir(str(tmp_path / "base"))
    rank, alpha = 8, 16.0
    scale = alpha / rank
    adapters = random_adapters(cfg, rank, seed=3)
    lora.export_peft(adapters, cfg, str(tmp_path / "adapter"), TARGETS, rank, alpha, 0.0, str(tmp_path / "base"))
    conf = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert conf["r"] == rank and conf["lora_alpha"] == alpha and sorted(conf["target_modules"]) == sorted(PEFT_MODULES)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    tokens = np.random.default_rng(1).integers(0, 128, size=(2, 12))
    ours, _ = transformer.forward(lora.attach(params, adapters), cfg.replace(lora_scale=scale), tokens)
    loaded = rel_err(ours, torch_logits(pm, tokens))
    # PEFT's merge against ours: the merged weights, read back through our HF reader
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    _, peft_merged = hf.read_hf_dir(str(tmp_path / "merged"))
    merged = lora.merge(params, adapters, scale)
    worst = max(rel_err(merged["layers"][n], peft_merged["layers"][n]) for n in adapters)
    logits_merged, _ = transformer.forward(merged, cfg, tokens)
    print(f"\nexported adapter loaded by PEFT: logits {loaded:.2e}; merge vs merge_and_unload: weights {worst:.2e}, "
          f"logits {rel_err(logits_merged, ours):.2e}")
    assert loaded <= 1e-4 and worst <= 1e-6 and rel_err(logits_merged, ours) <= 1e-4
    back = lora.from_peft(__import__("safetensors.numpy").numpy.load_file(
        str(tmp_path / "adapter" / "adapter_model.safetensors")), cfg, TARGETS, rank)
    for n in adapters:
        np.testing.assert_array_equal(back[n]["a"], adapters[n]["a"])
        np.testing.assert_array_equal(back[n]["b"], adapters[n]["b"])


def explicit_merge(base, adapters, scale):
    """W + scale * A @ B written out with einsums per weight layout (not lora.project/merge)."""
    layers = dict(base["layers"])
    for n, ad in adapters.items():
        eq = "lhek,lkd->lhed" if n == "wo" else "ldk,lk...->ld..."
        layers[n] = layers[n] + scale * jnp.einsum(eq, ad["a"], ad["b"])
    return {**base, "layers": layers}


@pytest.mark.parametrize("arch", ["gemma2"])  # the family with the most paths (soft caps, local layers)
def test_lora_train_step_gradient_equals_plain_jax_grad(arch):
    """The step's adapter gradients (exposed by SGD with lr 1) against jax.grad of the plain loss
    over explicitly merged weights; the opponent is the base (in_step)."""
    cfg = tiny_config(arch)
    base = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(0)))
    adapters = random_adapters(cfg, 4, seed=1)
    scale = 0.5
    lcfg = cfg.replace(lora_scale=scale)
    tcfg = TrainSection(beta=0.1, opponent_logps="in_step")
    tx = optax.sgd(1.0)
    state = train.init_state(adapters, tx)
    new, metrics = jax.jit(lambda s, b, base: train.train_step(s, None, b, base, cfg=lcfg, tcfg=tcfg, tx=tx))(
        state, make_batch(cfg, n_pairs=4, grad_accum=2), base)
    ref_loss, ref = jax.value_and_grad(lambda ad: plain_loss(explicit_merge(base, ad, scale), base,
                                                               cfg.replace(attn_block=0), full_rows(cfg, 4), 0.1))(
        adapters)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
    got = jax.tree.map(lambda a, b: a - b, adapters, new.params)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert np.abs(np.asarray(g) - np.asarray(r)).max() <= 1e-4 * np.abs(np.asarray(r)).max() + 1e-9


def test_new_adapter_opponent_equals_policy_at_step_0():
    """B = 0: the in-step opponent (the base alone) gives exactly the policy's log-probs, so the
    first loss is log 2 and every reward 0."""
    cfg = tiny_config("qwen3")
    base = transformer.init_params(cfg, jax.random.key(0))
    adapters = lora.init_adapters(cfg, TARGETS, 8, jax.random.key(1))
    lcfg = cfg.replace(lora_scale=2.0)
    batch = make_batch(cfg, n_pairs=4)
    flat = jax.tree.map(lambda v: v[0], batch)
    policy = train.scoring.batch_logps(lora.attach(base, adapters), lcfg, flat)
    opponent = train.scoring.batch_logps(base, lcfg, flat)
    np.testing.assert_array_equal(np.asarray(policy), np.asarray(opponent))
    tx = optax.sgd(1e-3)
    _, m = jax.jit(lambda s, b, base: train.train_step(s, None, b, base, cfg=lcfg,
                                                       tcfg=TrainSection(opponent_logps="in_step"), tx=tx))(
        train.init_state(adapters, tx), batch, base)
    assert float(m["loss"]) == pytest.approx(np.log(2.0), abs=1e-7)
    assert abs(float(m["rewards/margins"])) <= 1e-6  # one program, other fusions: to rounding


def test_sharded_lora_step_on_a_quantized_base_equals_one_device():
    """A (data 2, fsdp 2, tensor 2) mesh: adapters sharded like their weights' input/output axes,
    the base nf4; two updates equal the one-device result."""
    cfg = tiny_config("llama", num_heads=4, num_kv_heads=2, hidden_size=64, intermediate_size=128)
    base = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(0)))
    base = {**base, "layers": quant.quantize_tree(base["layers"], ["wq", "wk", "wv", "wo", "w_gate", "w_up",
                                                                    "w_down"], "nf4")}
    adapters = random_adapters(cfg, 4, seed=2)
    lcfg = cfg.replace(lora_scale=2.0)
    tcfg = TrainSection(opponent_logps="in_step", global_batch_size=8)
    tx = optax.adamw(1e-3)
    batch = tokenize.pack_grouped(*make_pairs(cfg, 8, 0), 8, 8)
    results = []
    for shape in ((1, 1, 1), (2, 2, 2)):
        mesh = sharding.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        placed = transformer.shard_params(base, lcfg, mesh)
        if shape == (2, 2, 2):
            assert placed["layers"]["w_gate"]["nf4"].sharding.spec[-1] == "tensor"
        shapes = jax.eval_shape(lambda p: train.init_state(p, tx), adapters)
        state_sh = train.state_shardings(lcfg, mesh, shapes, tx)
        if shape == (2, 2, 2):
            assert state_sh.params["wq"]["a"].spec[1] == "fsdp" and state_sh.params["wq"]["b"].spec[2] == "tensor"
        step = train.make_train_step(lcfg, tcfg, tx, mesh, shapes, jax.eval_shape(lambda b: b, placed))
        state = jax.device_put(train.init_state(adapters, tx), state_sh)
        for _ in range(2):
            state, m = step(state, None, train.device_batch(batch, mesh, tcfg), placed)
        results.append((float(m["loss"]), jax.device_get(state.params)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_driver_qlora_iteration_exports_a_peft_adapter_equal_to_the_merged_model(tiny_model_dir, tmp_path):
    """`spin-jax train` with LoRA on an nf4 base (in-step opponent): iteration 0 writes adapter/
    (PEFT's format) and model/ (merged at full precision). PEFT's LoRA model of θ0 + adapter gives
    the merged model's logits, θ0 itself is untouched, and the margins rise."""
    import transformers

    from tests.test_driver import final_tensors, overrides, run_ok

    runs = str(tmp_path / "runs")
    run_ok(["train", "--config", "configs/tiny_test.yaml", "--iter", "0", "--set", "model.lora.rank=4",
            "--set", "model.base_dtype=nf4", "--set", "train.opponent_logps=in_step",
            "--set", "train.learning_rate=3e-3", *overrides(tiny_model_dir, str(tmp_path / "tfds"), runs)])
    it = tmp_path / "runs" / "r" / "iter0"
    conf = json.load(open(it / "adapter" / "adapter_config.json"))
    assert conf["r"] == 4 and conf["base_model_name_or_path"] == tiny_model_dir
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, str(it / "adapter")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(it / "model"), dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 1000, size=(2, 16))
    with_adapter, from_merged = torch_logits(pm, tokens), torch_logits(merged, tokens)
    assert rel_err(from_merged, with_adapter) <= 1e-4
    assert rel_err(torch_logits(base.get_base_model() if hasattr(base, "get_base_model") else base, tokens),
                   from_merged) > 0  # the adapter moved the model
    assert final_tensors(runs, "r")  # model.safetensors readable
    rows = [json.loads(line) for line in open(it / "metrics.jsonl")]
    first, last = rows[0], rows[-1]
    assert abs(first["rewards/margins"]) <= 1e-5  # step 0: the policy is its opponent
    assert last["rewards/margins"] > first["rewards/margins"]
    # export --adapter-only: the adapter and a card saying how PEFT loads it on its base
    from spin_jax import cli

    out = str(tmp_path / "adapter_export")
    cli.main(["export", "--config", "configs/tiny_test.yaml", *overrides(tiny_model_dir, str(tmp_path / "tfds"), runs),
              "--iter", "0", "--out", out, "--adapter-only"])
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "PeftModel.from_pretrained(base, DIR)" in open(os.path.join(out, "README.md")).read()


def test_lora_dropout_is_inverted_dropout_on_the_adapter_input():
    """transformer.project (LoRA) with dropout p: each draw zeroes about p of the adapter's inputs and scales the
    rest by 1/(1-p), so the mean over draws is the update without dropout; the base term is untouched."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 16)).astype(np.float32)
    w = rng.standard_normal((16, 12)).astype(np.float32)
    ad = {"a": rng.standard_normal((16, 4)).astype(np.float32), "b": rng.standard_normal((4, 12)).astype(np.float32)}
    keys = jax.random.key_data(jax.random.split(jax.random.key(1), 4000))
    draws = jax.vmap(lambda k: transformer.project(x, w, ad, 0.5, dropout=0.25, key_data=k, index=3))(keys)
    exact = x @ w + 0.5 * (x @ ad["a"]) @ ad["b"]
    one = np.asarray(draws[0])
    assert not np.allclose(one, exact)  # a draw differs ...
    np.testing.assert_allclose(np.asarray(draws.mean(0)), exact, atol=0.05 * np.abs(exact).max())  # ... on average not
    no_dropout = transformer.project(x, w, ad, 0.5, dropout=0.25, key_data=None)  # scoring and sampling: no key
    np.testing.assert_allclose(np.asarray(no_dropout), exact, rtol=1e-5, atol=1e-5)


def test_train_step_with_lora_dropout_is_finite_seeded_and_differs_from_none():
    cfg = tiny_config("llama")
    base = transformer.init_params(cfg, jax.random.key(0))
    adapters = random_adapters(cfg, 4, seed=4)
    tx = optax.sgd(1.0)
    batch = make_batch(cfg, n_pairs=2)
    tcfg = TrainSection(opponent_logps="in_step")

    steps = {p: jax.jit(lambda s, b, base, p=p: train.train_step(
        s, None, b, base, cfg=cfg.replace(lora_scale=2.0, lora_dropout=p), tcfg=tcfg, tx=tx)) for p in (0.0, 0.3)}

    def grads(dropout):
        new, m = steps[dropout](train.init_state(adapters, tx), batch, base)
        assert np.isfinite(float(m["loss"]))
        return np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(new.params))])

    with_dropout = grads(0.3)
    np.testing.assert_array_equal(with_dropout, grads(0.3))  # the masks follow the step: reruns agree
    assert not np.allclose(with_dropout, grads(0.0))


def test_qlora_sft_exports_a_peft_adapter_equal_to_the_merged_model_and_lowers_the_loss(tiny_model_dir, tmp_path):
    """`spin-jax sft` with LoRA on an nf4 base: sft/adapter (PEFT's format) on the base gives the
    merged sft/model's logits, and the SFT loss falls."""
    import transformers

    from tests.test_driver import SFT, overrides, run_ok

    runs = str(tmp_path / "runs")
    run_ok(["sft", "--config", "configs/tiny_test.yaml", *SFT, "--set", "model.lora.rank=4",
            "--set", "model.base_dtype=nf4", "--set", "sft.learning_rate=1e-2", "--set", "sft.epochs=6",
            *overrides(tiny_model_dir, str(tmp_path / "tfds"), runs)])
    out = tmp_path / "runs" / "r" / "sft"
    assert json.load(open(out / "adapter" / "adapter_config.json"))["r"] == 4
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 1000, size=(2, 16))
    assert rel_err(torch_logits(merged, tokens), torch_logits(pm, tokens)) <= 1e-4
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
