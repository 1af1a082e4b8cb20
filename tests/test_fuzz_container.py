"""Property-based fuzzing of the container reader and index validator, and replay of ``tests/corpus``.

Property: whatever is done to a valid container's bytes, opening it and decoding every group either raises
an ``OffloadError`` subclass, or yields exactly the original tensors. Never another exception type, never
a crash, never a hang (a per-example alarm turns a hang into a failure). Bounded for CI: 200 examples.
"""

import json
import signal
import struct
from pathlib import Path

import pytest
import torch
from container_surgery import join, split, write_tiny_container, write_tiny_moe_container
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload_runtime import errors
from offload_runtime.errors import OffloadError
from offload_runtime.loaders import ContainerReader, load_state_dict

CORPUS = Path(__file__).parent / "corpus"
EXAMPLE_SECONDS = 10  # one open + decode of the tiny container takes milliseconds


def _tiny_container(path: Path, codec_name: str) -> dict[str, torch.Tensor]:
    if codec_name == "moe":  # expert groups (format version 2), decoded reassembled into whole blocks
        write_tiny_moe_container(path)
    else:
        write_tiny_container(path, codec_name)
    with ContainerReader(path) as reader:
        return load_state_dict(reader)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """codec -> (container bytes, decoded state dict)."""
    root = tmp_path_factory.mktemp("fuzz")
    result = {}
    for codec in ("zstd", "raw", "moe"):
        state = _tiny_container(root / f"{codec}.ort", codec)
        result[codec] = ((root / f"{codec}.ort").read_bytes(), state)
    return result


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


_EDGE_INTS = [
    0,
    1,
    -1,
    255,
    256,
    4095,
    4096,
    2**31,
    2**32 - 1,
    2**32,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
]
_INTS = st.one_of(st.sampled_from(_EDGE_INTS), st.integers(-(2**70), 2**70), st.integers(-10, 10**6))
_SWAPS = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.just([]),
    st.just({}),
    st.lists(_INTS, max_size=5),
    _INTS,
)


@st.composite
def _json_edit(draw, tree):
    """One edit of a JSON tree: a number replaced by an int, a key deleted, or a value's type swapped."""
    paths = [p for p, _ in _paths(tree) if p]
    path = draw(st.sampled_from(paths))
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    value = parent[path[-1]]
    choices = ["swap", "delete"] + (
        ["int"] * 3 if isinstance(value, int) and not isinstance(value, bool) else []
    )
    action = draw(st.sampled_from(choices))
    if action == "int":
        parent[path[-1]] = draw(_INTS)
    elif action == "swap":
        parent[path[-1]] = draw(_SWAPS)
    elif isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])
    return action, path


@st.composite
def mutations(draw, raw: bytes):
    """A damaged copy of ``raw`` (a valid container)."""
    kind = draw(st.sampled_from(["index", "index", "header", "data", "data", "length", "header_bytes"]))
    if kind in ("index", "header"):
        header, index, data = split(raw)
        for _ in range(draw(st.integers(1, 3))):
            if kind == "index":
                draw(_json_edit(index))
            else:
                metadata = header.pop("__metadata__")
                if header:
                    draw(_json_edit(header))
                header["__metadata__"] = metadata
        return join(header, index, data, align=draw(st.sampled_from([True, True, True, False])))
    out = bytearray(raw)
    (n,) = struct.unpack("<Q", raw[:8])
    if kind == "length":
        out[:8] = struct.pack(
            "<Q", draw(st.integers(0, 2**64 - 1) | st.sampled_from([n - 1, n + 1, n + 4096]))
        )
        return bytes(out)
    if kind == "header_bytes":
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(8, 8 + n - 1))] = draw(st.integers(0, 255))
        return bytes(out)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip", "truncate", "extend"]))
        if op == "flip" and len(out) > 8 + n:
            out[draw(st.integers(8 + n, len(out) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del out[draw(st.integers(0, len(out))) :]
        else:
            out += draw(st.binary(min_size=1, max_size=5000))
    return bytes(out)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"open + decode took over {EXAMPLE_SECONDS} s")


def open_and_decode(path: Path) -> dict[str, torch.Tensor]:
    """Open ``path`` and decode every group; a hang becomes :class:`_Hang`."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(EXAMPLE_SECONDS)
    try:
        with ContainerReader(path) as reader:
            return load_state_dict(reader)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _same(state: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> bool:
    return state.keys() == original.keys() and all(
        state[k].dtype == original[k].dtype
        and state[k].shape == original[k].shape
        and torch.equal(state[k].view(-1).view(torch.uint8), original[k].reshape(-1).view(torch.uint8))
        for k in state
    )


@pytest.mark.parametrize("codec", ["zstd", "raw", "moe"])
def test_fuzz_open_and_decode(originals, codec, tmp_path):
    raw, original = originals[codec]
    path = tmp_path / "fuzzed.ort"
    outcomes = {"error": 0, "original": 0}

    @settings(
        max_examples=200,
        deadline=None,
        derandomize=True,  # the same examples on every CI run; the corpus covers what we know to be nasty
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(st.data())
    def check(data):
        path.write_bytes(data.draw(mutations(raw)))
        try:
            state = open_and_decode(path)
        except OffloadError as exc:
            assert exc.file == str(path) and str(path) in str(exc), exc  # every error names the file
            outcomes["error"] += 1
            return
        # the index carries its own CRC-32: even an edit that keeps it self-consistent (a last tensor's
        # shape within its alignment padding) is refused, so whatever loads is the original
        assert _same(state, original), "a damaged container loaded as other values"
        outcomes["original"] += 1

    check()
    assert outcomes["error"] > 50  # the mutations do damage; most must be caught


# -- corpus ---------------------------------------------------------------------------------------------


def _corpus_cases():
    expected = json.loads((CORPUS / "expected.json").read_text())
    return sorted(expected.items())


def test_corpus_is_complete_and_small():
    cases = dict(_corpus_cases())
    files = {p.name for p in CORPUS.iterdir() if p.name.endswith(".ort") or p.name.endswith(".tmp")}
    assert files == set(cases) and len(cases) >= 12
    assert all((CORPUS / name).stat().st_size < 50_000 for name in cases)


@pytest.mark.parametrize("name, expected", _corpus_cases(), ids=[n for n, _ in _corpus_cases()])
def test_corpus_replay(name, expected):
    """Each malformed container raises its exact error type (never crashes, hangs or loads)."""
    path = CORPUS / name
    with pytest.raises(OffloadError) as info:
        open_and_decode(path)
    assert type(info.value) is getattr(errors, expected["error"]), info.value
    assert expected["fragment"] in str(info.value), info.value
    assert info.value.file == str(path)
