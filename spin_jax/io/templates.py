"""Chat templates for models that ship none (base models, most GGUF files of them).

`model.chat_template` (and `--chat-template` for `score` and `sample`) is a known family name or a
Jinja file. A template also names the token that ends a turn: SPIN's responses end with it, and
the sampler stops on it, so the tokenizer's end-of-sequence token becomes that token.
"""

from __future__ import annotations

import copy
import os

from spin_jax.config import CHAT_TEMPLATES

# name -> (Jinja template, the token that ends a turn)
KNOWN = {
    # Gemma: BOS, then <start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n, content
    # trimmed; no system role: a system message goes before the first user turn's text, as
    # Google's own template does
    "gemma": (
        "{{ bos_token }}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] | trim + '\n\n' -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{%- endif -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
        "+ message['content'] | trim + '<end_of_turn>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}",
        "<end_of_turn>"),
    "chatml": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}",
        "<|im_end|>"),
    "llama3": (
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim "
        "+ '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}",
        "<|eot_id|>"),
}
assert tuple(KNOWN) == CHAT_TEMPLATES
# the end-of-turn tokens a Jinja file's template is recognised by
_END_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")


def resolve(value: str, where: str) -> tuple[str, str | None]:
    """(Jinja template, end-of-turn token or None) of a known name or a Jinja file."""
    if value in KNOWN:
        return KNOWN[value]
    if not os.path.isfile(value):
        raise ValueError(f"{where} {value!r}: neither a known template ({', '.join(KNOWN)}) nor a Jinja file")
    with open(value, encoding="utf-8") as f:
        text = f.read()
    ends = [t for t in _END_TOKENS if t in text]
    return text, ends[0] if len(ends) == 1 else None


def apply(tokenizer, value: str | None, where: str, model: str):
    """Set the tokenizer's chat template (and end-of-turn token) from `value`; with None, the
    tokenizer must bring its own template."""
    if value is None:
        if tokenizer.chat_template is None:
            raise ValueError(
                f"model {model!r} ships no chat template; set {where} to a Jinja file or one of "
                f"{', '.join(KNOWN)} (e.g. gemma for Gemma models)")
        return tokenizer
    template, end = resolve(value, where)
    tokenizer = copy.deepcopy(tokenizer)  # GGUF tokenizers are cached and shared
    if end is not None:
        if end not in tokenizer.get_vocab():
            raise ValueError(f"{where} {value!r} ends turns with {end}, which the tokenizer of {model!r} does not "
                             "have; pick the template of this model's family")
        tokenizer.eos_token = end
    tokenizer.chat_template = template
    return tokenizer
