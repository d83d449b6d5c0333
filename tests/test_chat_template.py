"""Chat templates: the real models' own templates give transformers' apply_chat_template ids, and a
template (untrusted: it comes from a model file) runs sandboxed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import transformers

from worker_orcd.chat_template import ChatTemplate
from worker_orcd.errors import InvalidParams, ModelLoadError
from worker_orcd.gguf import parse_file
from worker_orcd.tokenizer import GGUFTokenizer

GEMMA3_TEMPLATE = Path(__file__).parent / "data" / "gemma3_chat_template.jinja"  # google/gemma-3-*-it
pytestmark = pytest.mark.slow  # transformers builds a 150k-256k vocabulary from each GGUF

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Write a haiku about <b>tags</b> & \"quotes\"."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Hi! 你好 🎉"},
        {"role": "assistant", "content": "Hello.\nHow can I help?"},
        {"role": "user", "content": "def f(x):\n    return x"},
    ],
]


@pytest.mark.parametrize("model", ["qwen", "gemma"])
def test_template_ids_equal_transformers_apply_chat_template(model: str, qwen05_path: Path, gemma_path: Path) -> None:
    path = qwen05_path if model == "qwen" else gemma_path
    ours = GGUFTokenizer.from_gguf(parse_file(path))
    # The Gemma 3 270M file carries no template: Gemma 3's own one is what --chat-template FILE would give.
    source = ours.chat_template if model == "qwen" else GEMMA3_TEMPLATE.read_text()
    assert source is not None
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    template = ChatTemplate.for_tokenizer(source, ours)
    for messages in CONVERSATIONS:  # Gemma folds a system message into the first user turn
        for gen in (True, False):
            text = template.render(messages, add_generation_prompt=gen)
            want = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, chat_template=source)
            want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
            assert ours.encode(text, add_bos=False, add_eos=False) == list(want), (model, messages, gen)
    if model == "qwen":
        assert text.startswith("<|im_start|>system\n")  # Qwen2.5 adds its default system prompt
    else:
        assert text.startswith(template.bos_token) and template.bos_token == "<bos>"


def test_template_raise_exception_is_a_400_with_its_message() -> None:
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok")
    assert t.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidParams, match="first must be user"):
        t.render([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the classic escape
        "{{ messages.append({'role': 'x'}) }}",  # immutable: no mutation of what we pass in
        "{{ messages[0].update({'a': 1}) }}",
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_template_is_sandboxed(source: str) -> None:
    with pytest.raises(InvalidParams, match="chat template failed"):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_template_helpers_and_compile_errors() -> None:
    t = ChatTemplate("{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ bos_token }}{{ eos_token }}",
                     bos_token="<s>", eos_token="</s>")
    assert t.render([{"role": "user", "content": "<&>"}]) == '[{"role": "user", "content": "<&>"}]|4|<s></s>'
    with pytest.raises(ModelLoadError, match="does not compile"):
        ChatTemplate("{% for %}")
