"""Chat templating, the reference truncation rule, packing, and `spin-jax score` vs transformers."""

import json

import pytest

from spin_jax.data import tokenize

CHATS = [
    [{"role": "user", "content": "Hello 12345, what is 2+2?  Tabs\tand  spaces"},
     {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "Thanks! Ünïcödé ✓"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name three colours."},
     {"role": "assistant", "content": "Red, green, blue."}],
]


@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_ids_equal_transformers(smollm2, smollm2_torch_tokenizer, chat):
    for gen in (True, False):
        ours = smollm2.tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen,
                                                     return_dict=False)
        ref = smollm2_torch_tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen,
                                                          return_dict=False)
        assert list(ours) == list(ref)


def test_prompt_and_response_ids(smollm2):
    tok = smollm2.tokenizer
    p = tokenize.prompt_ids(tok, "Hi")
    assert tok.decode(p).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    r = tokenize.response_ids(tok, "Hello there")
    assert r[-1] == tok.convert_tokens_to_ids("<|im_end|>") and tok.decode(r[:-1]) == "Hello there"


def test_truncation_keeps_last_prompt_tokens_then_cuts_responses():
    prompt = list(range(100, 110))  # 10 tokens
    real, gen = [1, 2, 3, 4, 5, 6], [7, 8]
    # fits: untouched
    assert tokenize.truncate(prompt, [real, gen], 16, 8) == (prompt, [real, gen])
    # 10 + 6 > 14: keep the last 8 prompt tokens -> 8 + 6 = 14 fits
    assert tokenize.truncate(prompt, [real, gen], 14, 8) == (prompt[-8:], [real, gen])
    # 10 + 6 > 12: prompt -> last 8, still 14 > 12: responses cut to 12 - 8 = 4
    assert tokenize.truncate(prompt, [real, gen], 12, 8) == (prompt[-8:], [[1, 2, 3, 4], [7, 8]])


def test_pack_layout_written_out():
    b = tokenize.pack([[11, 12], [21]], [[31, 32, 2], [41, 2]], prompt_len=4, response_len=4, pad_id=0)
    assert b["tokens"].tolist() == [[0, 0, 11, 12, 31, 32, 2, 0], [0, 0, 0, 21, 41, 2, 0, 0]]
    assert b["valid"].astype(int).tolist() == [[0, 0, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0, 0]]
    assert b["positions"].tolist() == [[0, 0, 0, 1, 2, 3, 4, 4], [0, 0, 0, 0, 1, 2, 2, 2]]
    # position t predicts token t+1; the mask is on for response tokens only
    assert b["labels"].tolist() == [[0, 11, 12, 31, 32, 2, 0, 0], [0, 0, 21, 41, 2, 0, 0, 0]]
    assert b["loss_mask"].astype(int).tolist() == [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]]


def test_bucket_powers_of_two():
    assert [tokenize.bucket(n) for n in (1, 16, 17, 100, 129)] == [16, 16, 32, 128, 256]
    assert tokenize.bucket(1000, maximum=512) == 512


def test_score_cli_matches_transformers(tmp_path, smollm2, smollm2_torch, smollm2_torch_tokenizer):
    import torch

    from spin_jax.cli import main

    rows = [{"prompt": "What is the capital of France?", "response": "The capital of France is Paris.", "id": 7},
            {"prompt": "Write a haiku about the sea.",
             "response": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."},
            {"prompt": "Give me one tip for sleeping better.",
             "response": "Keep a regular schedule: go to bed and wake up at the same time every day."}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["score", "--input", str(src), "--output", str(out), "--batch-size", "2", "--vocab-chunk", "8192"])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got if "id" in g] == [7]
    ref_tok = smollm2_torch_tokenizer
    for row, g in zip(rows, got):
        p = ref_tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False)
        r = ref_tok(row["response"], add_special_tokens=False)["input_ids"] + [ref_tok.eos_token_id]
        ids = torch.tensor([list(p) + r])
        with torch.no_grad():
            logp = torch.log_softmax(smollm2_torch(ids).logits[0].double(), -1)
        ref = sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(r))
        assert g["n_tokens"] == len(r)
        assert abs(g["logp"] - ref) <= 1e-3 * abs(ref)


def test_read_jsonl_errors_name_file_line_field(tmp_path):
    from spin_jax.scoring import read_jsonl

    cases = {b'{"prompt": "a", "response": 3}\n': "field 'response' is a int",
             b'{"prompt": "a"\n': "malformed JSON", b'{"prompt": "a"}\n': "field 'response' is missing",
             b'{"prompt": "\xff", "response": "b"}\n': "not UTF-8"}
    for raw, msg in cases.items():
        f = tmp_path / "bad.jsonl"
        f.write_bytes(b'{"prompt": "ok", "response": "ok"}\n' + raw)
        with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{msg}"):
            read_jsonl(str(f), ("prompt", "response"))
