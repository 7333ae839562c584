"""SFT: the masked token loss and its gradient against transformers (multi-turn, assistant and all,
packed and unpacked), the assistant mask against HF's {% generation %} mask, the step on 8 devices
against 1, and data that leaves nothing to train on."""

import dataclasses

import jax
import numpy as np
import pytest

from spin_jax import sft, sharding, train
from spin_jax.config import TrainSection
from spin_jax.io import names
from spin_jax.io.load import load_tokenizer
from spin_jax.model.config import tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."},
     {"role": "user", "content": "And times 3?"}, {"role": "assistant", "content": "12."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue"}],
    [{"role": "user", "content": "Write a haiku about rain."},
     {"role": "assistant",
      "content": "Soft rain on the roof,\nthe gutters hum their old song,\nthe street turns to glass."},
     {"role": "user", "content": "Now one about snow."},
     {"role": "assistant", "content": "White hush on the fields,\nfootprints fill before dawn comes."},
     {"role": "user", "content": "Thanks!"}],  # a last user turn: nothing to learn, dropped
    [{"role": "user", "content": "def f(x): return x * 2 — what does f(21) give?"},
     {"role": "assistant", "content": "f(21) returns 42."}],
]

# ChatML with HF's {% generation %} markers around each assistant turn and its <|im_end|>
GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def reference(tok, tmp_path_factory):
    """A random 2-layer Llama built by transformers, and ours loaded from its saved files."""
    from spin_jax.io import hf

    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=512, tie_word_embeddings=False, attn_implementation="eager")
    m = transformers.LlamaForCausalLM(c).eval()
    d = str(tmp_path_factory.mktemp("ref") / "model")
    m.save_pretrained(d)
    cfg, params = hf.read_hf_dir(d)
    return m, cfg.replace(attn_block=0), params


def torch_loss_and_grads(m, cfg, encoded):
    """transformers' token-mean cross-entropy over the supervised tokens of unpadded rows (one
    forward per conversation), and its gradient in our layout."""
    m.zero_grad()
    total = sum(sum(mask[1:]) for _, mask in encoded)
    loss = 0.0
    for ids, mask in encoded:
        labels = torch.tensor([t if s else -100 for t, s in zip(ids, mask)])
        logits = m(torch.tensor([ids])).logits[0]
        loss = loss + torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100,
                                                        reduction="sum") / total
    loss.backward()
    grads = {n: p.grad.double().numpy() for n, p in m.named_parameters()}
    return loss.item(), names.params_from_torch(cfg, lambda name, key: grads[name], "hf")


def ours_loss_and_grads(cfg, params, batch):
    objective = sft.SftObjective(cfg, TrainSection())

    def f(p):
        return objective.micro_loss(p, None, batch, objective.normaliser(batch))[0]

    return jax.value_and_grad(f)(params)


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_loss_and_gradient_match_transformers_packed_and_unpacked(tok, reference, loss_on):
    m, cfg, params = reference
    encoded = [sft.encode_conversation(tok, c, loss_on) for c in CONVERSATIONS]
    ref_loss, ref_grads = torch_loss_and_grads(m, cfg, encoded)
    lengths = [len(ids) for ids, _ in encoded]
    for packing, width in ((False, max(lengths)), (True, 128)):
        plan = sft.row_plan(lengths, range(len(encoded)), width, packing)
        assert len(plan) == 4 if not packing else 1 < len(plan) < 4, plan  # packed: conversations share rows
        loss, grads = ours_loss_and_grads(cfg, params, sft.make_rows(encoded, plan, width))
        assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss), (packing, float(loss), ref_loss)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            r = ref_grads
            for k in path:
                r = r[k.key]
            np.testing.assert_allclose(np.asarray(g), r, rtol=2e-3, atol=2e-5 * np.abs(r).max(),
                                       err_msg=f"{loss_on} packing={packing} {jax.tree_util.keystr(path)}")


def test_assistant_mask_equals_hf_generation_mask(tok):
    """Every assistant turn and its <|im_end|> are supervised, and the tokens are those of the
    whole rendered conversation, as HF's return_assistant_tokens_mask gives them."""
    import copy

    t = copy.deepcopy(tok)  # the loaded tokenizer is cached and shared by other tests: leave it as it is
    t.chat_template = GENERATION_TEMPLATE
    for conv in CONVERSATIONS:
        kept = conv[:max(i for i, msg in enumerate(conv) if msg["role"] == "assistant") + 1]
        ref = t.apply_chat_template(kept, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = sft.encode_conversation(t, conv)
        ref_ids = list(ref["input_ids"])  # HF's ends with the template's "\n" after the last <|im_end|>
        assert ref_ids[len(ids):] == tok("\n", add_special_tokens=False)["input_ids"]
        assert ids == ref_ids[:len(ids)]
        assert mask == [bool(x) for x in ref["assistant_masks"][:len(ids)]]


def test_first_turn_is_spins_prompt_and_response(tok):
    from spin_jax.data import tokenize

    ids, mask = sft.encode_conversation(tok, CONVERSATIONS[0], first_turn_only=True)
    p, r = tokenize.prompt_ids(tok, "What is 2 + 2?"), tokenize.response_ids(tok, "2 + 2 = 4.")
    assert ids == p + r and mask == [False] * len(p) + [True] * len(r)


def test_turns_past_max_length_are_dropped_whole(tok):
    full, _ = sft.encode_conversation(tok, CONVERSATIONS[0])
    first, _ = sft.encode_conversation(tok, CONVERSATIONS[0], first_turn_only=True)
    ids, mask = sft.encode_conversation(tok, CONVERSATIONS[0], max_length=len(full) - 1)
    assert ids == first and len(mask) == len(first)
    assert sft.encode_conversation(tok, CONVERSATIONS[0], max_length=len(first) - 1) is None


def test_nothing_to_train_on_is_one_error_naming_counts_and_key(tok):
    rows = [{"id": "a", "messages": CONVERSATIONS[0]}, {"id": "b", "messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(sft.SftDataError, match=r"none of 2 conversations .*\(1 end their first assistant turn past 8 "
                                               r"tokens, 1 have no assistant turn.*raise sft.max_length"):
        sft.encode_conversations(tok, rows, loss_on="assistant", max_length=8, first_turn_only=False, where="x")
    with pytest.raises(sft.SftDataError, match="none of 0 conversations"):
        sft.encode_conversations(tok, [], loss_on="assistant", max_length=64, first_turn_only=False, where="x")
    encoded = [sft.encode_conversation(tok, c) for c in CONVERSATIONS]
    with pytest.raises(sft.SftDataError, match="not one full batch of sft.global_batch_size=8"):
        sft.Schedule(encoded, 256, False, 8, seed=0)


def test_schedule_packs_fixed_batches_and_counts_updates(tok):
    encoded = [sft.encode_conversation(tok, c) for c in CONVERSATIONS] * 8
    s = sft.Schedule(encoded, 256, True, 2, seed=1, epochs=2)
    assert s.steps == len(s.batches) > 0 and s.epochs_read == 2
    again = sft.Schedule(encoded, 256, True, 2, seed=1, epochs=2)
    assert again.batches == s.batches  # a rerun reads the same batches
    assert sft.Schedule(encoded, 256, True, 2, seed=1, updates=3 * s.steps).steps == 3 * s.steps
    for batch in s.host_batches(0):
        seg = batch.segments  # segments 1, 2, ... in order, then padding (0) to the end
        assert batch.tokens.shape[1] <= 256 and ((np.diff(seg, axis=1) >= 0) | (seg[:, 1:] == 0)).all()
        assert (seg.max(1) > 1).any() and not (seg[:, :-1] == 0)[seg[:, 1:] > 0].any()
    host = [list(s.host_batches(0, i, 2)) for i in range(2)]
    assert all(b.tokens.shape[0] == 1 for b in host[0] + host[1])


def test_step_on_8_devices_equals_one_device(tok):
    """The SFT step (fsdp 4 x data 2, two micro-batches) against the same step on one device."""
    cfg = tiny_config("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    from spin_jax.model import transformer

    params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(0)))
    encoded = [sft.encode_conversation(tok, c) for c in CONVERSATIONS] * 4
    tcfg = dataclasses.replace(TrainSection(), optimizer="adamw", learning_rate=1e-3, grad_accum=2,
                               global_batch_size=16)
    objective = sft.SftObjective(cfg, tcfg)
    batch = next(sft.Schedule(encoded, 256, False, 16, seed=0).host_batches(0))
    out = {}
    for name, (data, fsdp) in {"one": (1, 1), "eight": (2, 4)}.items():
        mesh = sharding.make_mesh(data, fsdp, 1, devices=jax.devices()[:data * fsdp])
        tx, _ = train.make_optimizer(tcfg, 4, 1e-3)
        shapes = jax.eval_shape(lambda p: train.init_state(p, tx), params)
        sh = train.state_shardings(cfg, mesh, shapes, tx)
        state = jax.jit(lambda p: train.init_state(p, tx), out_shardings=sh)(jax.device_put(params, sh.params))
        step = train.make_train_step(cfg, tcfg, tx, mesh, shapes, objective=objective)
        state, metrics = step(state, None, train.device_batch(batch, mesh, tcfg, objective))
        out[name] = (jax.device_get(state.params), {k: float(v) for k, v in jax.device_get(metrics).items()})
    assert out["one"][1]["supervised_tokens"] == out["eight"][1]["supervised_tokens"] > 0
    np.testing.assert_allclose(out["eight"][1]["loss"], out["one"][1]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out["eight"][0]), jax.tree.leaves(out["one"][0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_untrained_end_of_turn_token_starts_from_the_end_of_text_embedding(tok):
    """A chat token whose embedding many unused tokens share starts as the end-of-document token
    (SmolLM2: <|im_end|> from <|endoftext|>); a trained one and every other row are left alone."""
    rng = np.random.default_rng(0)
    v, d = len(tok), 16
    eot, end = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    embed = rng.standard_normal((v, d)).astype(np.float32)
    untrained = rng.standard_normal(d).astype(np.float32)
    cluster = [eot, *range(100, 140)]
    embed[cluster] = untrained + 1e-4 * rng.standard_normal((len(cluster), d)).astype(np.float32)
    head = rng.standard_normal((d, v)).astype(np.float32)
    params = {"embed": embed.copy(), "lm_head": head.copy()}
    encoded = [sft.encode_conversation(tok, c) for c in CONVERSATIONS]
    assert sft.fix_untrained_tokens(params, None, tok, encoded) == [f"<|im_end|> (id {eot}, from <|endoftext|>)"]
    np.testing.assert_array_equal(params["embed"][eot], embed[end])
    np.testing.assert_array_equal(params["lm_head"][:, eot], head[:, end])
    others = np.arange(v) != eot
    np.testing.assert_array_equal(params["embed"][others], embed[others])
    np.testing.assert_array_equal(params["lm_head"][:, others], head[:, others])
    trained = {"embed": rng.standard_normal((v, d)).astype(np.float32)}
    assert sft.fix_untrained_tokens(trained, None, tok, encoded) == []
