"""The per-token streaming chunk rendered from a per-stream prefix/suffix (``_text_chunk``) is
byte-for-byte the dict-rendered chunk (``_chunk``), for every text and both endpoints."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_orcd.http.openai_stream import OpenAIOptions, OpenAIStream


def _stream(kind: str, model_id: str) -> OpenAIStream:
    s = OpenAIStream.__new__(OpenAIStream)  # only the rendering state: no worker, no engine
    s.opts = OpenAIOptions(kind=kind, stream=True, include_usage=False, stops=[], logprobs=False, top_logprobs=0,
                           model_id=model_id, fingerprint="fp_0123", created=1_700_000_000)
    s.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + "job-1"
    s.job = SimpleNamespace(job_id="job-1")
    s.text = []
    s._chunk_frame = None
    return s


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@pytest.mark.parametrize("kind", ["chat", "text"])
@settings(max_examples=150, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=4), model_id=st.sampled_from(["m", 'we"ird\\id', "ünï"]))
def test_text_chunk_equals_dict_chunk(kind: str, texts: list[str], model_id: str) -> None:
    s = _stream(kind, model_id)
    for t in texts:
        fast = s._text_chunk(t)
        assert fast == s._chunk(t)
        body = json.loads(fast.removeprefix(b"data: "))
        got = body["choices"][0]["delta"]["content"] if kind == "chat" else body["choices"][0]["text"]
        assert got == t


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=16))
def test_sse_text_equals_json_dumps(text: str) -> None:
    from worker_orcd.http.openai_stream import _sse_text

    assert _sse_text(text) == json.dumps(text, ensure_ascii=False).encode()
