"""The data layer: sources, TFDS builders (array_record, no TensorFlow), SPIN examples and batches,
iteration stores (atomic shards, kill -9 resume), bad-input handling."""

import collections
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from spin_jax import rundir
from spin_jax.data import builders, examples, sources, store, tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    from spin_jax.io.load import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


# ------------------------------------------------------------------------------ encoding, batches

def test_encode_pair_truncation_written_out(tok):
    # prompt "Hi there" = 32 template tokens; real = 10 tokens (9 + <|im_end|>); generated = 3
    p_full = tokenize.prompt_ids(tok, "Hi there")
    real, gen = "Hello, how can I help you today?", "No."
    assert len(p_full) == 32
    # fits: nothing cut
    p, r, g = examples.encode_pair(tok, "Hi there", real, gen, max_length=64, max_prompt_length=16)
    assert p == p_full and tok.decode(r) == real + "<|im_end|>" and tok.decode(g) == "No.<|im_end|>"
    # 32 + 10 > 40: keep the LAST 12 prompt tokens; 12 + 10 fits, responses untouched
    p, r, g = examples.encode_pair(tok, "Hi there", real, gen, max_length=40, max_prompt_length=12)
    assert tok.decode(p) == "\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(r) == real + "<|im_end|>" and tok.decode(g) == "No.<|im_end|>"
    # 32 + 10 > 34: prompt -> last 30 tokens; 30 + 10 > 34 still: responses cut to 34 - 30 = 4
    # tokens (the real one loses its end-of-turn, as in the reference)
    p, r, g = examples.encode_pair(tok, "Hi there", real, gen, max_length=34, max_prompt_length=30)
    assert tok.decode(p) == ("\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                             "<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(r) == "Hello, how can" and tok.decode(g) == "No.<|im_end|>"
    # a templated prompt longer than max_length is bad input, not silently cut
    with pytest.raises(ValueError, match="field 'prompt': 32 tokens, longer than max_length=20"):
        examples.encode_pair(tok, "Hi there", real, gen, max_length=20, max_prompt_length=12)

    # the batch: 1 pair -> the 30-token prompt once, left-padded to P = 32; responses: row 0 real,
    # row 1 generated, right-padded to R = 4
    ((_, batch),) = examples.make_batches([examples.Encoded(p, r, g)], 1, seed=0, min_bucket=4)
    pad = 0
    assert batch.prompt_tokens.tolist() == [[pad] * 2 + p]
    assert batch.prompt_valid.astype(int).tolist() == [[0] * 2 + [1] * 30]
    assert batch.prompt_positions[0].tolist() == [0, 0] + list(range(30))
    assert batch.tokens.tolist() == [r, g + [pad]]
    assert batch.valid.astype(int).tolist() == [[1] * 4, [1] * 3 + [0]]
    # responses continue the prompt's positions (padding repeats the last one)
    assert batch.positions.tolist() == [[30, 31, 32, 33], [30, 31, 32, 32]]
    assert batch.opponent_logps is None


def test_batch_layout_hand_built():
    exs = [examples.Encoded([11, 12], [31, 32, 2], [41, 2], "a", -1.5, -2.5),
           examples.Encoded([21], [51, 2], [61, 62, 63, 2], "b", -3.0, -4.0)]
    ((index, batch),) = examples.make_batches(exs, 2, seed=0, min_bucket=4)
    order = index.tolist()
    assert sorted(order) == [0, 1]
    prompts = {0: [0, 0, 11, 12], 1: [0, 0, 0, 21]}
    responses = {0: ([31, 32, 2, 0], [41, 2, 0, 0]), 1: ([51, 2, 0, 0], [61, 62, 63, 2])}
    assert batch.prompt_tokens.tolist() == [prompts[i] for i in order]
    # pairs interleaved: real, generated, real, generated
    assert batch.tokens.tolist() == [x for i in order for x in responses[i]]
    starts = {0: 2, 1: 1}
    assert batch.positions[:, 0].tolist() == [starts[i] for i in order for _ in (0, 1)]
    logps = {0: (-1.5, -2.5), 1: (-3.0, -4.0)}
    assert batch.opponent_logps.tolist() == [x for i in order for x in logps[i]]


def _toy_examples(n=37, seed=0):
    rng = np.random.default_rng(seed)
    return [examples.Encoded(list(rng.integers(3, 99, rng.integers(1, 40))),
                             list(rng.integers(3, 99, rng.integers(1, 70))),
                             list(rng.integers(3, 99, rng.integers(1, 70))), f"id{i}", float(-i), float(-2 * i))
            for i in range(n)]


def test_two_hosts_disjoint_union_whole_same_shapes():
    exs = _toy_examples()
    whole = list(examples.make_batches(exs, 8, seed=3, epoch=1))
    h0 = list(examples.make_batches(exs, 8, seed=3, epoch=1, process_index=0, process_count=2))
    h1 = list(examples.make_batches(exs, 8, seed=3, epoch=1, process_index=1, process_count=2))
    assert len(whole) == len(h0) == len(h1) == 37 // 8
    for (iw, w), (ia, a), (ib, b) in zip(whole, h0, h1):
        ia, ib = set(ia.tolist()), set(ib.tolist())
        assert not ia & ib and ia | ib == set(iw.tolist()) and len(ia) == len(ib) == 4
        assert a.tokens.shape == b.tokens.shape == (8, w.tokens.shape[1])  # one program
        assert a.prompt_tokens.shape == b.prompt_tokens.shape == (4, w.prompt_tokens.shape[1])
        for k in ("prompt_tokens", "prompt_positions", "tokens", "valid", "positions", "opponent_logps"):
            np.testing.assert_array_equal(np.concatenate([getattr(a, k), getattr(b, k)]), getattr(w, k))
    seen = np.concatenate([iw for iw, _ in whole])
    assert len(set(seen.tolist())) == len(seen) == 32  # an epoch never repeats a pair


def test_resume_and_epoch_shuffle():
    exs = _toy_examples()
    full = list(examples.make_batches(exs, 4, seed=7, epoch=0))
    resumed = list(examples.make_batches(exs, 4, seed=7, epoch=0, start_step=5))
    assert len(resumed) == len(full) - 5
    for (ia, a), (ib, b) in zip(full[5:], resumed):
        np.testing.assert_array_equal(ia, ib)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    other_epoch = list(examples.make_batches(exs, 4, seed=7, epoch=1))
    assert [i.tolist() for i, _ in other_epoch] != [i.tolist() for i, _ in full]
    # global steps across epochs: resuming at step 11 (epoch 1, step 2) continues the same stream
    stream = list(examples.iter_batches(exs, 4, seed=7, num_epochs=3))
    tail = list(examples.iter_batches(exs, 4, seed=7, num_epochs=3, start_step=11))
    assert [s for s, *_ in stream] == list(range(27)) and [s for s, *_ in tail] == list(range(11, 27))
    assert [i.tolist() for _, _, i, _ in stream[11:]] == [i.tolist() for _, _, i, _ in tail]
    assert stream[11][1] == 1


def test_prompt_ids_equal_transformers_template(tok):
    pytest.importorskip("torch")
    from spin_jax.io.load import resolve_model_path
    from tests.reference import transformers_from_gguf

    ref = transformers_from_gguf(resolve_model_path("smollm2-135m-instruct"), "tokenizer")
    prompt, real = "Summarize: ünïcödé ✓ 12345\n\tTabs  and spaces", "A short answer.\n\nWith 2 lines."
    p, r, g = examples.encode_pair(tok, prompt, real, "", max_length=1024, max_prompt_length=512)
    want_p = ref.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                     add_generation_prompt=True, return_dict=False)
    assert p == list(want_p)
    # the templated [user, assistant] conversation = prompt ids + response ids (+ the template's "\n")
    convo = ref.apply_chat_template([{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": real}], tokenize=True,
                                    return_dict=False)
    assert list(convo)[:len(p) + len(r)] == p + r
    assert g == [ref.convert_tokens_to_ids("<|im_end|>")]


def test_encode_rows_bad_input(tok):
    good = {"id": "a", "prompt": "Hi", "real": "Hello", "generated": "Yo"}
    rows = [good, dict(good, id="b", prompt=""), dict(good, id="c", real=7),
            dict(good, id="d", prompt="word " * 300), dict(good, id="e", generated="\udcff"),
            {"id": "f", "prompt": "x", "real": "y"}]
    for k, field in [(1, "prompt"), (2, "real"), (3, "prompt"), (4, "generated"), (5, "generated")]:
        with pytest.raises(ValueError, match=rf"^store.jsonl: row 1: field '{field}': "):
            examples.encode_rows(tok, [good, rows[k]], 128, 64, source="store.jsonl")
    stats = collections.Counter()
    out = examples.encode_rows(tok, rows, 128, 64, max_bad_fraction=0.9, stats=stats)
    assert [e.id for e in out] == ["a"] and stats["bad"] == 5
    with pytest.raises(ValueError, match="5 of 6 rows are bad"):
        examples.encode_rows(tok, rows, 128, 64, max_bad_fraction=0.5)
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        examples.encode_pair(tok, "a", "b", "c", 64, 64)


# ---------------------------------------------------------------------------------------- sources

def test_sharegpt_embedded_file_counts():
    stats = collections.Counter()
    rows = list(sources.iter_sharegpt(stats=stats))
    assert stats["parsed"] == 17671 and stats["truncated_tail"] == 1  # the file ends mid-record
    assert len(rows) == stats["kept"] == 11156
    assert stats["first_turn_not_human"] == 6358 and stats["empty"] == 138
    assert stats["no_assistant_answer"] == 12 and stats["empty_prompt_or_response"] == 7
    assert sum(v for k, v in stats.items() if k not in ("parsed", "kept")) == 17671 - 11156 + 1
    assert len({r["id"] for r in rows}) == len(rows)
    r = rows[0]
    assert r["messages"][0] == {"role": "user", "content": r["prompt"]}
    assert r["messages"][1] == {"role": "assistant", "content": r["response"]}


def _sharegpt_file(path, records, tail=""):
    text = "[\n" + ",\n".join(json.dumps(r) for r in records) + tail
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return str(path)


GOOD = {"id": "g1", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}


def test_sharegpt_filters_and_tail(tmp_path):
    records = [GOOD, {"id": "s", "conversations": [{"from": "system", "value": "be nice"},
                                                   {"from": "human", "value": "Q2"},
                                                   {"from": "gpt", "value": "A2"}]},
               {"id": "e", "conversations": []},
               {"id": "f", "conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "x"}]},
               {"id": "n", "conversations": [{"from": "human", "value": "Q"}]},
               {"id": "w", "conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "A"}]},
               dict(GOOD)]  # repeated id
    path = _sharegpt_file(tmp_path / "s.json", records, ',\n  {"id": "cut", "conversations": [{"from": "hu')
    stats = collections.Counter()
    rows = list(sources.iter_sharegpt(path, stats))
    assert [r["id"] for r in rows] == ["g1", "s"]
    assert rows[1]["prompt"] == "Q2" and rows[1]["messages"][0] == {"role": "system", "content": "be nice"}
    assert dict(stats) == {"parsed": 7, "kept": 2, "empty": 1, "first_turn_not_human": 1,
                           "no_assistant_answer": 1, "empty_prompt_or_response": 1,
                           "duplicate_id": 1, "truncated_tail": 1}
    # a complete file (closing bracket) has no truncated tail
    stats = collections.Counter()
    assert len(list(sources.iter_sharegpt(_sharegpt_file(tmp_path / "c.json", [GOOD], "\n]\n"), stats))) == 1
    assert stats["truncated_tail"] == 0


def test_sharegpt_bad_rows(tmp_path):
    good = [dict(GOOD, id=f"g{i}") for i in range(6)]
    text = ("[\n" + json.dumps(good[0]) + ",\n" + '{"id": "m", "conversations": [{"from": "human" "value": 1}]}'
            + ",\n" + json.dumps(dict(GOOD, id="v", conversations=[{"from": "human", "value": 5}]))
            + ",\n" + json.dumps(good[1]) + ",\n").encode()
    text += b'{"id": "u", "conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "A"}]}'
    text += ("".join(",\n" + json.dumps(g) for g in good[2:]) + "\n]").encode()
    path = tmp_path / "bad.json"
    path.write_bytes(text)
    with pytest.raises(ValueError, match=r"bad.json: row 1: field '<record>': malformed JSON"):
        list(sources.iter_sharegpt(str(path)))
    stats = collections.Counter()
    rows = list(sources.iter_sharegpt(str(path), stats, max_bad_fraction=0.4))
    assert [r["id"] for r in rows] == [f"g{i}" for i in range(6)]
    assert stats["malformed_json"] == 1 and stats["bad_field"] == 1 and stats["non_utf8"] == 1
    with pytest.raises(ValueError, match=r"3 of 9 rows are bad.*row 1: field '<record>'"):
        list(sources.iter_sharegpt(str(path), max_bad_fraction=0.2))
    # each kind alone, strict: one line naming file, row and field
    for rec, field in [(b'{"conversations": []}', "'id'"),
                       (json.dumps(dict(GOOD, conversations=[{"from": "human", "value": 5}])).encode(),
                        r"'conversations\[0\].value'"),
                       (b'{"id": "x", "conversations": [{"from": "human", "value": "\xff"}]}',
                        r"'conversations\[0\].value': not valid UTF-8")]:
        path.write_bytes(b"[" + json.dumps(GOOD).encode() + b"," + rec + b"]")
        with pytest.raises(ValueError, match=rf"^{path}: row 1: field {field}"):
            list(sources.iter_sharegpt(str(path)))


def test_unknown_names():
    with pytest.raises(ValueError, match="known: sharegpt, ultrachat_200k$"):
        builders.load_split("alpaca", "/nonexistent", "train")


# ---------------------------------------------------------------------------------- ultrachat/TFDS

def _ultrachat_dir(root, n_train=12, n_test=3, content_type=None, extra_rows=()):
    import pyarrow as pa
    import pyarrow.parquet as pq

    content_type = content_type or pa.string()
    schema = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()),
                        ("messages", pa.list_(pa.struct([("content", content_type), ("role", pa.string())])))])
    os.makedirs(root / "data", exist_ok=True)
    for split, n in (("train_sft", n_train), ("test_sft", n_test)):
        rows = [{"prompt": f"{split} question {i}?", "prompt_id": f"{split}-{i:04d}",
                 "messages": [{"content": f"{split} question {i}?", "role": "user"},
                              {"content": f"answer {i} ✓", "role": "assistant"},
                              {"content": "thanks", "role": "user"},
                              {"content": "welcome", "role": "assistant"}]} for i in range(n)]
        if split == "train_sft":
            rows += list(extra_rows)
        if content_type != pa.string():
            for r in rows:
                for m in r["messages"]:
                    m["content"] = m["content"] if isinstance(m["content"], bytes) else m["content"].encode()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                       root / "data" / f"{split}-00000-of-00001.parquet")
    return str(root)


def test_ultrachat_builder_prepared_twice(tmp_path):
    manual = _ultrachat_dir(tmp_path / "uc")
    data_dir = str(tmp_path / "tfds")
    train = builders.load_split("ultrachat_200k", data_dir, "train_sft", manual_dir=manual)
    assert len(train) == 12
    by_id = {r["id"]: r for r in train}
    r = by_id["train_sft-0003"]
    assert r["prompt"] == "train_sft question 3?" and r["response"] == "answer 3 ✓"
    assert r["messages"][2:] == [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": "welcome"}]
    assert all(isinstance(v, str) for row in train for k, v in row.items() if k != "messages")
    files = sorted(p for p in (tmp_path / "tfds").rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    # a second builder over the same data_dir reuses the prepared files (even without manual_dir)
    again = builders.load_split("ultrachat_200k", data_dir, "train_sft")
    assert [again[i] for i in range(len(again))] == [train[i] for i in range(len(train))]
    assert sorted(p for p in (tmp_path / "tfds").rglob("*") if p.is_file()) == files
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert any(p.name.startswith("ultrachat_200k-train_sft.array_record") for p in files)
    assert not any("tfrecord" in p.name for p in files)
    test = builders.load_split("ultrachat_200k", data_dir, "test_sft")
    assert sorted(r["id"] for r in test) == [f"test_sft-{i:04d}" for i in range(3)]
    stats = builders.make_builder("ultrachat_200k", data_dir).info.metadata["stats"]
    assert stats["train_sft"]["kept"] == 12 and stats["test_sft"]["kept"] == 3
    # the source directly: same rows, in file order
    assert [r["id"] for r in sources.iter_ultrachat(manual, "train_sft")] == [f"train_sft-{i:04d}" for i in range(12)]


def test_ultrachat_missing_files_and_bad_rows(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*data/train_sft-\*\.parquet.*huggingface-cli download"):
        list(sources.iter_ultrachat(str(empty), "train_sft"))
    with pytest.raises(FileNotFoundError, match=r"train_sft-\*\.parquet"):
        builders.load_split("ultrachat_200k", str(tmp_path / "tfds"), "train_sft", manual_dir=str(empty))
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        list(sources.iter_ultrachat(str(empty), "validation"))

    def msgs(user, answer):
        return [{"content": user, "role": "user"}, {"content": answer, "role": "assistant"}]

    bad = [{"prompt": "p", "prompt_id": "b0", "messages": msgs("q", "")},
           {"prompt": "p", "prompt_id": "b1", "messages": [{"content": "q", "role": "assistant"}]},
           {"prompt": "p", "prompt_id": None, "messages": msgs("q", "a")}]
    manual = _ultrachat_dir(tmp_path / "uc", n_train=7, extra_rows=bad)
    msg = r"train_sft-00000-of-00001.parquet: row 7: field 'messages\[1\].content': empty"
    with pytest.raises(ValueError, match=msg):
        list(sources.iter_ultrachat(manual, "train_sft"))
    stats = collections.Counter()
    rows = list(sources.iter_ultrachat(manual, "train_sft", stats, max_bad_fraction=0.3))
    assert len(rows) == 7 and stats["bad"] == 3 and stats["empty_prompt_or_response"] == 1
    with pytest.raises(ValueError, match="3 of 10 rows are bad"):
        list(sources.iter_ultrachat(manual, "train_sft", max_bad_fraction=0.2))
    # bytes that are not UTF-8 (a binary content column)
    import pyarrow as pa

    raw = [{"prompt": "p", "prompt_id": "nb", "messages": [{"content": b"caf\xe9", "role": "user"},
                                                           {"content": b"a", "role": "assistant"}]}]
    manual = _ultrachat_dir(tmp_path / "uc2", n_train=2, content_type=pa.binary(), extra_rows=raw)
    with pytest.raises(ValueError, match=r"row 2: field 'messages\[0\].content': not valid UTF-8"):
        list(sources.iter_ultrachat(manual, "train_sft"))


def test_sharegpt_builder_real_file(tmp_path):
    rows = builders.load_split("sharegpt", str(tmp_path), "train")
    assert len(rows) == 11156
    held_out = builders.load_split("sharegpt", str(tmp_path), "train[98%:]")
    assert 0 < len(held_out) < 400 and isinstance(held_out[0]["prompt"], str)
    stats = builders.make_builder("sharegpt", str(tmp_path)).info.metadata["stats"]["train"]
    assert stats["kept"] == 11156 and stats["truncated_tail"] == 1


# ------------------------------------------------------------------------------------------ store

def _row(i, gen="g", **kw):
    return dict({"id": f"p{i:03d}", "prompt": f"prompt {i}", "real": f"real {i}", "generated": f"{gen} {i}",
                 "sampling": {"temperature": 1.0, "top_p": 1.0, "seed": 0}, "opponent_logp_real": None,
                 "opponent_logp_generated": None, "model_hash": "abc"}, **kw)


def test_store_shards_manifest_dedup_and_logps(tmp_path):
    s = store.SyntheticStore(str(tmp_path / "syn"))
    ids = [f"p{i:03d}" for i in range(6)]
    s.set_expected(ids)
    assert s.manifest()["expected"] == 6 and not s.manifest()["complete"] and s.missing_count() == 6
    s.write_shard(0, 0, [_row(i) for i in range(3)])
    s.write_shard(1, 1, (_row(i) for i in range(3, 6)))  # a generator is streamed
    s.write_shard(0, 7, [_row(i, gen="again") for i in range(2, 4)])  # the same prompts, another shard
    assert s.missing_count() == 0 and s.manifest()["complete"]
    rows = s.rows()
    assert [r["id"] for r in rows] == ids and rows[2]["generated"] == "g 2"  # first shard by name wins
    assert s.manifest()["shards"]["shard-00001-000001.jsonl"]["ids"] == ids[3:]
    assert s.update_logps({"p001": (-1.25, -7.5), "p004": (-2.0, -3.0)}) == 2
    rows = s.rows()
    assert (rows[1]["opponent_logp_real"], rows[1]["opponent_logp_generated"]) == (-1.25, -7.5)
    assert rows[0]["opponent_logp_real"] is None
    # a shard renamed into place by a writer killed before its manifest update still counts
    os.remove(os.path.join(s.dir, store.MANIFEST))
    assert s.done_ids() == set(ids) and s.manifest()["complete"]
    with pytest.raises(ValueError, match=r"shard-00000-000009.jsonl: row 1: field 'sampling'"):
        s.write_shard(0, 9, [_row(7), _row(8, sampling=None)])
    assert "shard-00000-000009.jsonl" not in s.shard_names()
    assert not [n for n in os.listdir(s.dir) if ".tmp" in n]
    with pytest.raises(KeyError):
        s.update_logps({"nope": (0.0, 0.0)})


WRITER = r"""
import os, sys, time
from spin_jax.data.store import SyntheticStore, pending_chunks

store_dir, mode = sys.argv[1], sys.argv[2]
ids = [f"p{i:03d}" for i in range(100)]
s = SyntheticStore(store_dir)
s.set_expected(ids)
for chunk, chunk_ids in pending_chunks(ids, 10, s.done_ids()):
    def rows():
        for k, i in enumerate(chunk_ids):
            if mode == "pause" and chunk == 3 and k == 5:
                open(os.path.join(store_dir, "..", "marker"), "w").close()
                time.sleep(120)
            if mode == "slow":
                time.sleep(0.01)
            yield {"id": i, "prompt": "prompt " + i, "real": "r", "generated": "g", "sampling": {"t": 1.0},
                   "opponent_logp_real": None, "opponent_logp_generated": None, "model_hash": "h"}
    s.write_shard(0, chunk, rows())
"""


def _writer(store_dir, mode):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-c", WRITER, store_dir, mode], env=env, cwd=REPO)


def _exactly_once(store_dir):
    s = store.SyntheticStore(store_dir)
    ids = [f"p{i:03d}" for i in range(100)]
    lines = []
    for name in s.shard_names():
        with open(os.path.join(store_dir, name)) as f:
            lines += [json.loads(line)["id"] for line in f]
    assert sorted(lines) == ids  # on disk: each prompt exactly once, none missing
    assert [r["id"] for r in s.rows()] == ids and s.manifest()["complete"]
    assert sorted(i for e in s.manifest()["shards"].values() for i in e["ids"]) == ids


def test_store_kill_9_mid_shard_then_resume(tmp_path):
    d = str(tmp_path / "syn")
    proc = _writer(d, "pause")
    deadline = time.time() + 60
    while not (tmp_path / "marker").exists():
        assert proc.poll() is None and time.time() < deadline, "writer died or never reached chunk 3"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # a real kill -9 in the middle of shard 3
    assert proc.wait() == -signal.SIGKILL
    s = store.SyntheticStore(d)
    assert s.shard_names() == [store.shard_name(0, c) for c in range(3)]
    assert [n for n in os.listdir(d) if n.startswith(".shard-00000-000003.jsonl.tmp")]  # the half shard
    assert len(s.done_ids()) == 30 and not s.manifest()["complete"]
    before = {n: os.stat(os.path.join(d, n)).st_ino for n in s.shard_names()}
    assert _writer(d, "resume").wait(60) == 0
    assert {n: os.stat(os.path.join(d, n)).st_ino for n in before} == before  # done chunks not redone
    assert not [n for n in os.listdir(d) if ".tmp" in n]
    _exactly_once(d)


def test_store_repeated_random_kills(tmp_path):
    d = str(tmp_path / "syn")
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(8):  # kill -9 at random moments (mid-row, mid-rename, mid-manifest)
        proc = _writer(d, "slow")
        time.sleep(float(rng.uniform(0.1, 0.6)))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    assert _writer(d, "resume").wait(60) == 0
    _exactly_once(d)


def test_training_rows_mix_iterations(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"iter0.*make generate ITER=0"):
        store.training_rows(run, 0)
    s0 = store.SyntheticStore(rundir.store_dir(run, 0))
    s0.set_expected([f"p{i:03d}" for i in range(4)])
    s0.write_shard(0, 0, [_row(i, gen="zero", opponent_logp_real=-1.0 * i, opponent_logp_generated=-2.0)
                          for i in range(4)])
    assert [r["iteration"] for r in store.training_rows(run, 0)] == [0] * 4
    with pytest.raises(FileNotFoundError, match="make generate ITER=1"):
        store.training_rows(run, 1)
    s1 = store.SyntheticStore(rundir.store_dir(run, 1))
    s1.set_expected([f"p{i:03d}" for i in range(4)])
    s1.write_shard(0, 0, [_row(i, gen="one") for i in range(3)])
    with pytest.raises(ValueError, match=r"iter1.*incomplete \(1 prompts missing\)"):
        store.training_rows(run, 1)
    s1.write_shard(0, 1, [_row(3, gen="one")])
    mixed = store.training_rows(run, 1)
    assert [(r["iteration"], r["generated"]) for r in mixed] == [(1, f"one {i}") for i in range(4)] + [
        (0, f"zero {i}") for i in range(4)]
    assert len(store.training_rows(run, 1, mix_previous=False)) == 4
