"""Incremental detokenization never splits a multi-byte character; stop-string search."""

from __future__ import annotations

from forkllm.engine.detokenizer import IncrementalDetokenizer, find_stop_string


def test_stream_never_splits_multibyte_characters(tiny):
    tok = tiny.get_tokenizer()
    text = "Snow \u2603 falls on caf\u00e9s \U0001f600\U0001f680 and \u4e2d\u6587 too."
    prompt = tok.encode("Say:", add_special_tokens=False)
    out = tok.encode(text, add_special_tokens=False)
    ids = list(prompt)
    det = IncrementalDetokenizer.for_prompt(len(prompt))
    deltas = []
    for t in out:
        ids.append(t)
        deltas.append(det.step(tok, ids, skip_special=True))
    assert "".join(deltas) == text == det.text
    assert not any("\ufffd" in d for d in deltas)
    # The emoji are several byte-level tokens each: some steps must have emitted nothing.
    assert len(out) > len([d for d in deltas if d])


def test_find_stop_string_only_looks_at_new_text():
    assert find_stop_string("hello world", 5, ["world"]) == (6, "world")
    assert find_stop_string("hello world", 1, ["hello"]) is None
    assert find_stop_string("abXYcd", 3, ["Y", "XYc"]) == (2, "XYc")
    # a stop string straddling old and new text is found
    assert find_stop_string("abcdef", 2, ["cde"]) == (2, "cde")
