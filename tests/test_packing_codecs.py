"""The tensor codecs: every codec decodes to the exact bytes, and refuses what it did not make."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from onnxpress.packing import codecs


@st.composite
def _payloads(draw: st.DrawFn) -> tuple[bytes, int]:
    width = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))  # 3 and 16: no numpy uint of that width
    count = draw(st.integers(0, 3000))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["random", "floats", "sparse", "zeros", "runs"]))
    if kind == "floats" and width in (2, 4, 8):
        dtype = {2: np.float16, 4: np.float32, 8: np.float64}[width]
        data = (rng.standard_normal(count) * 0.05).astype(dtype).tobytes()
    elif kind == "sparse":
        elements = rng.integers(0, 256, size=(count, width), dtype=np.uint8)
        elements[rng.random(count) < draw(st.floats(0.3, 1.0))] = 0
        data = elements.tobytes()
    elif kind == "zeros":
        data = bytes(count * width)
    elif kind == "runs":
        data = np.repeat(rng.integers(0, 4, size=count // 16 + 1, dtype=np.uint8), 16)[: count * width].tobytes()
        data = data[: len(data) - len(data) % width]
    else:
        data = rng.integers(0, 256, size=count * width, dtype=np.uint8).tobytes()
    return data, width


@settings(max_examples=150, deadline=None)
@given(payload=_payloads(), codec=st.sampled_from(codecs.CODECS), level=st.sampled_from([1, 5]))
def test_every_codec_round_trips_exactly(payload: tuple[bytes, int], codec: str, level: int) -> None:
    data, width = payload
    encoded = codecs.encode(data, width, level, codecs=(codec,))
    assert encoded.codec in (codec, codecs.CODEC_RAW)
    assert len(encoded.data) <= len(data)
    assert codecs.decode(encoded.codec, encoded.data, len(data), encoded.params) == data


def test_best_codec_is_chosen_per_tensor(rng: np.random.Generator) -> None:
    weights = (rng.standard_normal(50_000) * 0.02).astype(np.float32)
    assert codecs.encode(weights.tobytes(), 4).codec == codecs.CODEC_BYTEGROUP
    weights[rng.random(weights.size) < 0.8] = 0.0
    assert codecs.encode(weights.tobytes(), 4).codec == codecs.CODEC_SPARSE
    noise = rng.integers(0, 256, size=10_000, dtype=np.uint8).tobytes()
    assert codecs.encode(noise, 1).codec == codecs.CODEC_RAW


def test_negative_zero_survives_the_sparse_codec() -> None:
    values = np.array([0.0, -0.0, 0.0, 1.5, 0.0, 0.0, 0.0, -0.0] * 100, dtype=np.float32)
    encoded = codecs.encode(values.tobytes(), 4, codecs=(codecs.CODEC_SPARSE,))
    assert encoded.codec == codecs.CODEC_SPARSE
    back = np.frombuffer(codecs.decode(encoded.codec, encoded.data, values.nbytes, encoded.params), np.float32)
    assert back.tobytes() == values.tobytes() and np.signbit(back[1])


@pytest.mark.parametrize("codec", [codecs.CODEC_ZSTD, codecs.CODEC_BYTEGROUP, codecs.CODEC_SPARSE])
def test_truncated_or_padded_streams_are_refused(codec: str, rng: np.random.Generator) -> None:
    values = (rng.standard_normal(4000) * (rng.random(4000) < 0.2)).astype(np.float32).tobytes()
    encoded = codecs.encode(values, 4, codecs=(codec,))
    assert encoded.codec == codec
    for broken in (encoded.data[: len(encoded.data) // 2], encoded.data[:-1], encoded.data + b"\0"):
        with pytest.raises(codecs.CodecError):
            codecs.decode(codec, broken, len(values), encoded.params)
    with pytest.raises(codecs.CodecError, match="expected"):
        codecs.decode(codec, encoded.data, len(values) + 4, encoded.params)


def test_bad_level_and_params_are_refused() -> None:
    with pytest.raises(ValueError, match="level"):
        codecs.encode(b"abcd", 1, level=23)
    with pytest.raises(codecs.CodecError, match="width"):
        codecs.decode(codecs.CODEC_BYTEGROUP, b"", 6, {"width": 4})


def test_decoding_into_a_buffer_checks_like_decoding_to_bytes(rng: np.random.Generator) -> None:
    """The in-place decoder (chunks of large tensors) refuses what :func:`codecs.decode` refuses."""
    values = rng.integers(-60, 60, 5000, dtype=np.int8).tobytes()
    frame = codecs.encode(values, 1, codecs=(codecs.CODEC_ZSTD,)).data
    out = np.full(len(values), 7, dtype=np.uint8)
    codecs.decode_frame_into(frame, out)
    assert out.tobytes() == values
    second = codecs.encode(b"x" * 10, 1, codecs=(codecs.CODEC_ZSTD,)).data
    for broken in (frame[: len(frame) // 2], frame[:-1], frame + b"\0", frame + second):
        with pytest.raises(codecs.CodecError):
            codecs.decode_frame_into(broken, np.empty(len(values), dtype=np.uint8))
    with pytest.raises(codecs.CodecError, match="expected"):
        codecs.decode_frame_into(frame, np.empty(len(values) + 1, dtype=np.uint8))
