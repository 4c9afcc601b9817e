"""Streaming detokenization (IncrementalDecoder) on byte-level, BPE and SentencePiece-style
tokenizers, and OpenAI stop strings (StopStrings): never half a character, never a stop."""

from __future__ import annotations

import pytest

tokenizers = pytest.importorskip("tokenizers")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from daemon.serving.text import IncrementalDecoder, ModelText, StopStrings  # noqa: E402
from daemon.shards import model as m  # noqa: E402
from tests.daemon.serving.text_helpers import (  # noqa: E402
    MULTIBYTE,
    decoders,
    make_checkpoints,
    make_spm_dir,
    make_tiny,
    stream,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    return make_spm_dir(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def spm(spm_dir):
    return ModelText.load(spm_dir)


# -- incremental decoding -----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "bpe"])
def test_incremental_decoding_of_multibyte_text(which, tiny, checkpoints):
    text = ModelText.load(checkpoints["chatml"]) if which == "bpe" else None
    if text is None:
        text = ModelText(tokenizer=m.load_tokenizer(tiny), context_length=512)
    split = 0
    for sample in MULTIBYTE:
        ids = text.encode(sample, add_special_tokens=False)
        for decoder in decoders(text):
            pieces, rest = stream(decoder, ids)
            assert not any("\ufffd" in p for p in pieces), (sample, pieces)
            assert "".join(pieces) + rest == text.decode(ids) == sample
            assert rest == ""
            split += pieces.count("")
    assert split > 10  # characters really were split across tokens and held back


def test_byte_level_pieces_split_characters(checkpoints):
    """The BPE has pieces holding part of a character: the decoder holds them back."""
    text = ModelText.load(checkpoints["chatml"])
    ids = text.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1
    for decoder in decoders(text):
        pieces, rest = stream(decoder, ids)
        assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🚀" and rest == ""
    # an incomplete character at the end comes out as U+FFFD, as decode says
    decoder = text.decoder()
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() == text.decode(ids[:-1])


def test_special_tokens_decode_to_nothing(checkpoints, tiny):
    text = ModelText.load(checkpoints["chatml"])
    ids = [*text.encode("hi", add_special_tokens=False), 6, 3]
    pieces, rest = stream(text.decoder(), ids)
    assert pieces[-2:] == ["", ""] and "".join(pieces) + rest == "hi"
    tiny_text = ModelText(tokenizer=m.load_tokenizer(tiny), context_length=512)
    pieces, rest = stream(tiny_text.decoder(), [104, 105, m.BYTE_EOS_ID, 1000])
    assert "".join(pieces) + rest == "hi"


def test_window_decoder_is_bounded(checkpoints):
    """A run of invalid bytes (lone continuation bytes) does not grow the window without end."""
    from daemon.shards.model.tokenizer import _bytes_to_unicode

    text = ModelText.load(checkpoints["chatml"])
    lone = text.tokenizer.token_to_id(_bytes_to_unicode()[0x80])
    assert text.tokenizer.token_bytes(lone) == b"\x80"
    decoder = IncrementalDecoder(text.tokenizer, byte_exact=False)
    ids = [lone] * 100
    pieces, rest = stream(decoder, ids)
    assert "".join(pieces) + rest == text.decode(ids) == "\ufffd" * 100
    decoder.push(lone)
    assert len(decoder._ids) <= 2 * 65


def test_window_decoding_of_a_sentencepiece_tokenizer(spm):
    assert not spm.tokenizer.decodes_bytes
    held = 0
    for sample in MULTIBYTE:
        ids = spm.encode(sample, add_special_tokens=False)
        pieces, rest = stream(spm.decoder(), ids)
        assert not any("\ufffd" in p for p in pieces), (sample, pieces)
        assert "".join(pieces) + rest == spm.decode(ids)
        held += pieces.count("")
    assert held > 20  # byte-fallback pieces were held back until their character was whole
    with pytest.raises(ValueError, match="byte by byte"):
        IncrementalDecoder(spm.tokenizer, byte_exact=True)


def _decode_property(text, ids_strategy):
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ids=ids_strategy)
    def check(ids):
        for decoder in decoders(text):
            pieces, rest = stream(decoder, ids)
            assert "".join(pieces) + rest == text.decode(ids)

    check()


def test_decoder_property_any_ids(checkpoints, tiny, spm_dir):
    """Any id sequence (broken UTF-8, specials, unknown ids): pushes + flush == decode."""
    bpe = ModelText.load(checkpoints["chatml"])
    _decode_property(bpe, st.lists(st.integers(0, 460), max_size=40))
    byte = ModelText(tokenizer=m.load_tokenizer(tiny), context_length=512)
    _decode_property(byte, st.lists(st.integers(0, 260), max_size=40))
    # the window path on SentencePiece byte-fallback pieces, runs up to its bound
    spm_text = ModelText.load(spm_dir)
    _decode_property(spm_text, st.lists(st.integers(0, 560), max_size=16))
    # the byte path is the library's decode too, Rust's lossy UTF-8 included
    library = tokenizers.Tokenizer.from_file(str(tiny / "tokenizer.json"))

    @settings(max_examples=150, deadline=None)
    @given(ids=st.lists(st.integers(0, 257), max_size=40))
    def same_as_library(ids):
        pieces, rest = stream(byte.decoder(), ids)
        assert "".join(pieces) + rest == library.decode(ids, skip_special_tokens=True)

    same_as_library()


def test_decoder_property_texts(checkpoints):
    """Any text, encoded then streamed: no U+FFFD ever emitted, and the text comes back."""
    bpe = ModelText.load(checkpoints["chatml"])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(sample=st.text(st.characters(exclude_categories=("Cs",)), max_size=30))
    def check(sample):
        ids = bpe.encode(sample, add_special_tokens=False)
        for decoder in decoders(bpe):
            pieces, rest = stream(decoder, ids)
            assert not any("\ufffd" in p for p in pieces) or "\ufffd" in sample
            assert "".join(pieces) + rest == bpe.decode(ids)

    check()


# -- stop strings -------------------------------------------------------------------------------


def test_stop_strings_examples():
    stops = StopStrings(["abc", "bd"])
    assert [stops.push(x) for x in ["xa", "b", "b", "dzz"]] == [
        ("x", False),
        ("", False),
        ("ab", False),
        ("", True),
    ]
    assert stops.flush() == "" and stops.push("more") == ("", True)
    held = StopStrings(["</end>"])
    assert held.push("text </e") == ("text ", False)
    assert held.flush() == "</e"
    assert StopStrings([]).push("abc") == ("abc", False)
    assert StopStrings(["", "x"]).stops == ("x",)
    with pytest.raises(ValueError, match="at most"):
        StopStrings(["a"] * 17)
    with pytest.raises(ValueError, match="string"):
        StopStrings([3])


@settings(max_examples=400, deadline=None)
@given(
    text=st.text("abcd🙂", max_size=40),
    stops=st.lists(st.text("abcd🙂", min_size=1, max_size=4), max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_stop_strings_property(text, stops, cuts):
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    want = text[: min(found)] if found else text
    chunks, at = [], 0
    for cut in sorted(cuts):
        chunks.append(text[at:cut])
        at = max(at, cut)
    chunks.append(text[at:])
    stopper = StopStrings(stops)
    out, stopped = "", False
    for chunk in chunks:
        piece, stopped = stopper.push(chunk)
        out += piece
        assert not any(s in out for s in stops)
        if stopped:
            break
    if not stopped:
        out += stopper.flush()
    assert out == want and stopped == bool(found)
