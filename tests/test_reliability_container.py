"""Container reliability: exhaustive truncation, checksums before decoders, verify policies, changes after
open, pack killed mid-write, and concurrent readers. Single failures with their messages live in
``test_container_errors.py``; this module sweeps whole classes of them."""

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import pytest
import torch
from container_surgery import rewrite_header

from offload_runtime.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    UsageError,
)
from offload_runtime.loaders import ContainerReader, ContainerWriter, check_compatible, load_state_dict, pack
from offload_runtime.loaders import reader as reader_module
from offload_runtime.loaders.format import PAYLOAD_ALIGN
from offload_runtime.loaders.groups import find_groups
from offload_runtime.native import chunking as chunking_module
from offload_runtime.native.layout import GroupLayout
from offload_runtime.native.raw import RawCodec
from offload_runtime.native.zstd import ZstdCodec
from offload_runtime.tiny import tiny_model

CHUNK = 16 << 10  # small chunks: several per group, so there are many chunk boundaries to cut at


def write_small_container(path, codec_name="zstd", num_layers=2, seed=0):
    """A tiny llama packed with 16 KiB chunks (``pack`` uses 1 MiB ones: one chunk per tiny group)."""
    model = tiny_model("llama", num_layers=num_layers, seed=seed)
    codec = {"zstd": ZstdCodec(chunk_size=CHUNK), "raw": RawCodec(chunk_size=CHUNK)}[codec_name]
    state = model.state_dict()
    with ContainerWriter(path) as writer:
        writer.set_model_info(model_class=type(model).__name__, config=model.config.to_dict())
        for spec in find_groups(model):
            layout = GroupLayout.from_tensors((name, state[name]) for name in spec.tensors)
            writer.add_group(spec, layout, codec.encode(layout, layout.pack(state)), codec.name)
    return path, model


def decode_all(reader):
    """Every group decoded on the CPU: name -> bytes."""
    out = {}
    for group in reader.groups:
        buffer = torch.empty(group.layout.size, dtype=torch.uint8)
        out[group.name] = bytes(reader.decode_cpu(group.name, buffer).numpy())
    return out


def payload_file_offsets(path):
    """group name -> (absolute file offset of its payload, chunk table)."""
    with ContainerReader(path, verify="never") as reader:
        return {g.name: (reader._offsets[g.name], g.chunks, g.padded_size) for g in reader.groups}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    path, model = write_small_container(root / "small.ort")
    with ContainerReader(path) as reader:
        reference = decode_all(reader)
    return path, model, reference


@pytest.fixture
def copy_of(small, tmp_path):
    def copy(data=None):
        target = tmp_path / "c.ort"
        target.write_bytes(small[0].read_bytes() if data is None else data)
        return target

    return copy


def test_small_container_has_many_chunks(small):
    with ContainerReader(small[0]) as reader:
        assert sum(len(g.chunks) for g in reader.groups) >= 20
        assert max(len(g.chunks) for g in reader.groups) >= 5


# -- 1. truncation at every boundary ------------------------------------------------------------------


def _boundaries(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data_start = 8 + n
    cuts = {0, 1, 7, 8, 9, 100, data_start - 1, data_start, data_start + 1, len(raw) - 1}
    for start, chunks, padded in payload_file_offsets(path).values():
        cuts |= {start, start + padded - 1}
        for chunk in chunks:
            for edge in (start + chunk.offset, start + chunk.offset + chunk.size):
                cuts |= {edge - 1, edge, edge + 1}
    return raw, sorted(c for c in cuts if 0 <= c < len(raw))


def test_truncated_at_every_boundary_and_random_offsets(copy_of, small):
    raw, cuts = _boundaries(small[0])
    cuts += random.Random(0).sample(range(len(raw)), 60)
    assert len(cuts) > 150
    offsets = payload_file_offsets(small[0])
    path = copy_of()
    for cut in cuts:
        with open(path, "r+b") as fh:  # rewrite in place: fast, and the same path every time
            fh.seek(0)
            fh.write(raw[:cut])
            fh.truncate(cut)
        with pytest.raises(CorruptCheckpointError) as info:
            ContainerReader(path)
        error = info.value
        assert type(error) is CorruptCheckpointError and error.file == str(path), (cut, error)
        assert any(w in str(error) for w in ("too short", "beyond the end", "truncated")), (cut, error)
        inside = [name for name, (s, _, padded) in offsets.items() if s <= cut < s + padded]
        if inside:  # a cut in the data names the group, and the chunk when it cuts into one
            start, chunks, _ = offsets[inside[0]]
            assert error.group == inside[0], (cut, error)
            expected_chunk = next((i for i, c in enumerate(chunks) if c.offset + c.size > cut - start), None)
            assert error.chunk == expected_chunk, (cut, error)


# -- 2./3. appended bytes, header length ---------------------------------------------------------------


@pytest.mark.parametrize("extra", [1, 15, PAYLOAD_ALIGN, 3 * PAYLOAD_ALIGN + 5])
def test_bytes_appended_any_amount(copy_of, small, extra):
    path = copy_of(small[0].read_bytes() + b"\x00" * extra)
    with pytest.raises(CorruptCheckpointError, match="bytes after the end of its data") as info:
        ContainerReader(path)
    assert info.value.actual == f"{path.stat().st_size} bytes"


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 100_000_001, 99_999_999, 10**7])
def test_header_length_rejected_before_allocating(copy_of, small, length):
    raw = bytearray(small[0].read_bytes())
    raw[:8] = struct.pack("<Q", length)
    path = copy_of(bytes(raw))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match=r"too large|beyond the end"):
            ContainerReader(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"opening allocated {peak} bytes for a {length}-byte header claim"


# -- 4./5. forged offsets and decoded sizes --------------------------------------------------------------


def _set_offsets(tensor, begin=None, end=None):
    def edit(header):
        offsets = header[tensor]["data_offsets"]
        header[tensor]["data_offsets"] = [offsets[0] if begin is None else begin, end or offsets[1]]

    return edit


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (_set_offsets("group.0001", begin=-PAYLOAD_ALIGN), "not a sane non-negative integer"),
        (_set_offsets("group.0001", begin=2**64 - 1), "not a sane non-negative integer"),
        (_set_offsets("group.0004", end=2**62), "offsets disagree with its shape"),
        (lambda h: h["group.0004"].update(shape=[2**40], data_offsets=[0, 2**40]), "overlaps"),
    ],
)
def test_tensor_offsets_forged(copy_of, edit, fragment):
    path = copy_of()
    rewrite_header(path, edit_header=edit)
    with pytest.raises(CorruptCheckpointError, match=fragment) as info:
        ContainerReader(path)
    assert info.value.file == str(path) and info.value.group is not None


@pytest.mark.parametrize(
    "column, value, fragment",
    [
        (0, -1, "not a sane non-negative integer"),
        (0, 2**64 - 1, "not a sane non-negative integer"),
        (1, 2**62, "beyond the group payload"),
        (2, -5, "not a sane non-negative integer"),
        (3, 2**32, "not 32-bit"),
        (1, "12", "not a sane non-negative integer"),
        (1, 1.5, "not a sane non-negative integer"),
        (1, True, "not a sane non-negative integer"),
    ],
)
def test_chunk_fields_forged(copy_of, column, value, fragment):
    path = copy_of()
    rewrite_header(path, edit_index=lambda ix: ix["groups"][1]["chunks"][2].__setitem__(column, value))
    with pytest.raises(CorruptCheckpointError, match=fragment) as info:
        ContainerReader(path)
    assert (info.value.file, info.value.group, info.value.chunk) == (str(path), "model.layers.0", 2)


def test_decoded_size_forged_is_rejected_before_any_allocation(copy_of, monkeypatch):
    path = copy_of()

    def huge(index):
        group = index["groups"][1]
        group["layout"]["tensors"][-1]["shape"] = [2**30, 2**10]
        group["layout"]["size"] = group["layout"]["tensors"][-1]["offset"] + 2**42
        group["chunks"][-1][2] += 2**42

    rewrite_header(path, edit_index=huge)

    def no_allocation(*args, **kwargs):
        raise AssertionError(f"allocated {args} before validation finished")

    monkeypatch.setattr(torch, "empty", no_allocation)
    monkeypatch.setattr(torch, "zeros", no_allocation)
    with pytest.raises(CorruptCheckpointError, match="implausibly large") as info:
        ContainerReader(path)
    assert info.value.group.startswith("model.layers.0")


# -- 6./7. checksums before decoders ---------------------------------------------------------------------


@pytest.fixture
def decoder_calls(monkeypatch):
    """Count calls of the zstd and raw CPU decoders."""
    calls = []
    for cls in (ZstdCodec, RawCodec):
        original = cls.decode_cpu

        def counted(self, *args, _original=original, **kwargs):
            calls.append(self.name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "decode_cpu", counted)
    return calls


def test_every_flipped_compressed_chunk_is_caught_before_the_decoder(copy_of, small, decoder_calls):
    raw = small[0].read_bytes()
    path = copy_of()
    rng = random.Random(1)
    checked = 0
    for name, (start, chunks, _) in payload_file_offsets(small[0]).items():
        for i, chunk in enumerate(chunks):
            at = start + chunk.offset + rng.randrange(chunk.size)
            damaged = bytearray(raw)
            damaged[at] ^= 1 << rng.randrange(8)
            with open(path, "r+b") as fh:
                fh.write(damaged)
            with ContainerReader(path) as reader:
                out = torch.empty(reader.group(name).layout.size, dtype=torch.uint8)
                with pytest.raises(CorruptCheckpointError, match="chunk CRC-32 mismatch") as info:
                    reader.decode_cpu(name, out)
            assert (info.value.file, info.value.group, info.value.chunk) == (str(path), name, i)
            checked += 1
    assert checked >= 20
    assert decoder_calls == []  # no decoder ever saw a damaged chunk


def test_flip_that_still_decodes_is_caught_by_the_decoded_crc(copy_of, small):
    """zstd: flip bytes of a frame (forging its compressed CRC) until one still decodes to the right size."""
    raw = small[0].read_bytes()
    start, chunks, _ = payload_file_offsets(small[0])["model.layers.1"]
    path = copy_of()
    rng = random.Random(2)
    for _ in range(200):
        i = rng.randrange(len(chunks))
        chunk = chunks[i]
        damaged = bytearray(raw)
        damaged[start + chunk.offset + rng.randrange(20, chunk.size)] ^= 0x01
        frame = bytes(damaged[start + chunk.offset : start + chunk.offset + chunk.size])
        forged = __import__("zlib").crc32(frame) & 0xFFFFFFFF
        path.write_bytes(damaged)
        rewrite_header(
            path, edit_index=lambda ix, i=i, f=forged: ix["groups"][2]["chunks"][i].__setitem__(3, f)
        )
        with ContainerReader(path) as reader:
            out = torch.empty(reader.group("model.layers.1").layout.size, dtype=torch.uint8)
            with pytest.raises(CorruptCheckpointError) as info:
                reader.decode_cpu("model.layers.1", out)
        assert (info.value.file, info.value.group, info.value.chunk) == (str(path), "model.layers.1", i)
        if "decoded chunk CRC-32 mismatch" in str(info.value):
            return
        assert "decode" in str(info.value)  # the other outcome: the frame does not decode at all
    pytest.fail("no single-bit flip decoded; the decoded CRC path was not exercised")


# -- verification policy ---------------------------------------------------------------------------------


@pytest.fixture
def crc_calls(monkeypatch):
    """Every CRC-32 computed: the reader's of compressed chunks, the codecs' one check of decoded chunks."""

    calls = []
    original = reader_module.crc32

    def counted(data):
        calls.append(len(data))
        return original(data)

    monkeypatch.setattr(reader_module, "crc32", counted)  # compressed chunks
    monkeypatch.setattr(chunking_module, "crc32", counted)  # decoded chunks (check_decoded_crcs)
    return calls


@pytest.mark.parametrize("policy, reads_checked", [("once", [True, False, False]), ("always", [True] * 3)])
def test_verify_policy_counts_crc_calls(small, crc_calls, policy, reads_checked):
    path, _, reference = small
    with ContainerReader(path, verify=policy) as reader:
        for checked in reads_checked:
            for group in reader.groups:
                crc_calls.clear()
                out = torch.empty(group.layout.size, dtype=torch.uint8)
                assert bytes(reader.decode_cpu(group.name, out).numpy()) == reference[group.name]
                # compressed CRC of each chunk, then decoded CRC of each chunk
                assert len(crc_calls) == (2 * len(group.chunks) if checked else 0), (policy, group.name)
                crc_calls.clear()
                reader.read_into(group.name, torch.empty(group.stored_size, dtype=torch.uint8))
                reader.payload(group.name)
                assert len(crc_calls) == (2 * len(group.chunks) if policy == "always" else 0)


def test_verify_never_skips_every_check(copy_of, small, crc_calls):
    with ContainerReader(small[0], verify="never") as reader:
        assert decode_all(reader) == small[2]
    assert crc_calls == []
    raw = bytearray(small[0].read_bytes())
    start, chunks, _ = payload_file_offsets(small[0])["model.layers.0"]
    raw[start + chunks[0].offset + chunks[0].size // 2] ^= 0x40
    with ContainerReader(copy_of(bytes(raw)), verify="never") as reader:
        reader.read_into(
            "model.layers.0", torch.empty(reader.group("model.layers.0").stored_size, dtype=torch.uint8)
        )
    assert crc_calls == []  # the damage goes unnoticed: that is what "never" means


def test_verify_once_checks_a_group_again_after_a_failure(copy_of, small):
    """A failed check must not mark the group verified: the next read fails again."""
    raw = bytearray(small[0].read_bytes())
    start, chunks, _ = payload_file_offsets(small[0])["model.norm"]
    raw[start + chunks[0].offset + 3] ^= 0x02
    with ContainerReader(copy_of(bytes(raw)), verify="once") as reader:
        for _ in range(2):
            with pytest.raises(CorruptCheckpointError, match="chunk CRC-32 mismatch"):
                reader.payload("model.norm")


def test_unknown_verify_policy(small):
    with pytest.raises(ValueError, match="verify must be one of"):
        ContainerReader(small[0], verify="sometimes")


def test_unknown_granularity_is_refused_before_the_file_is_opened(tmp_path):
    with pytest.raises(UsageError, match="granularity must be one of block, expert, got 'experts'"):
        ContainerReader(tmp_path / "absent.ort", granularity="experts")


# -- 9. attached to another model ------------------------------------------------------------------------


def test_attached_to_another_model_lists_every_difference(small):
    other = tiny_model("llama", num_layers=3, hidden_size=32, intermediate_size=96)
    with ContainerReader(small[0]) as reader, pytest.raises(CheckpointMismatchError) as info:
        check_compatible(reader, other)
    stored = {s.name: (s.shape, s.dtype) for g in ContainerReader(small[0]).groups for s in g.layout.tensors}
    wanted = other.state_dict()
    differing = {n for n in wanted.keys() & stored.keys() if tuple(wanted[n].shape) != stored[n][0]}
    expected = len(differing) + len(wanted.keys() - stored.keys()) + len(stored.keys() - wanted.keys())
    assert expected > 10 and len(info.value.mismatches) == expected
    for name in sorted(wanted.keys() - stored.keys()):
        assert any(line.startswith(f"missing from the container: {name}") for line in info.value.mismatches)


# -- 10. changed after open -------------------------------------------------------------------------------


def test_modified_in_place_after_open(copy_of):
    path = copy_of()
    with ContainerReader(path) as reader:
        name = reader.groups[1].name
        time.sleep(0.01)
        with open(path, "r+b") as fh:  # same size, same inode: only mtime tells
            fh.seek(-1, os.SEEK_END)
            fh.write(b"\x00")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        for call in (
            lambda: reader.payload(name),
            lambda: reader.read_into(name, torch.empty(reader.group(name).stored_size, dtype=torch.uint8)),
            lambda: reader.decode_cpu(name, torch.empty(reader.group(name).layout.size, dtype=torch.uint8)),
        ):
            with pytest.raises(CorruptCheckpointError, match="modified after it was opened") as info:
                call()
            assert (info.value.file, info.value.group) == (str(path), name)


def test_deleted_after_open(copy_of):
    path = copy_of()
    with ContainerReader(path) as reader:
        path.unlink()
        with pytest.raises(CorruptCheckpointError, match="replaced, truncated or modified"):
            reader.payload(reader.groups[0].name)


def test_truncated_between_check_and_read_is_a_python_error_not_sigbus(copy_of):
    """Force the race the identity check cannot close (truncation right after it): decode_cpu must still
    raise a typed error, so it must not read through the mmap."""
    path = copy_of()
    script = textwrap.dedent(
        f"""
        import os, torch
        from offload_runtime.errors import CorruptCheckpointError
        from offload_runtime.loaders import ContainerReader
        reader = ContainerReader({str(path)!r})
        check = reader._check_unchanged
        def check_then_truncate(entry):
            check(entry)
            os.truncate({str(path)!r}, 4096)  # after the check passed
        reader._check_unchanged = check_then_truncate
        last = reader.groups[-1]
        try:
            reader.decode_cpu(last.name, torch.empty(last.layout.size, dtype=torch.uint8))
        except CorruptCheckpointError as exc:
            print("TYPED", exc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode} (-7 is SIGBUS): {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("TYPED") and "file ended inside a group payload" in proc.stdout
    assert "group=lm_head" in proc.stdout and str(path) in proc.stdout


# -- 11. pack killed mid-write ----------------------------------------------------------------------------

_PACK_SCRIPT = """
import sys, torch
from torch import nn
from offload_runtime.loaders import pack
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(12)])  # 190 MB: ~1 s of zstd
print("ready", flush=True)
sys.stdin.readline()
pack(model, sys.argv[1], codec="zstd", progress=False, overwrite=True)  # replaces a previous container
print("done", flush=True)
"""


def _start_pack(out):
    return subprocess.Popen(
        [sys.executable, "-c", _PACK_SCRIPT, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _wait_for_temporary(folder, name, proc, timeout):
    """Return once a temporary file of ``name`` exists in ``folder`` (or ``proc`` ended, or ``timeout``)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline and proc.poll() is None:
        if any(p.name.startswith(f".{name}.") for p in folder.iterdir()):
            return
        time.sleep(0.002)


def _go(proc):
    assert proc.stdout.readline().strip() == "ready"
    proc.stdin.write("go\n")
    proc.stdin.flush()


def test_pack_killed_mid_write_leaves_no_valid_looking_file(tmp_path):
    out = tmp_path / "model.ort"
    previous, _ = write_small_container(tmp_path / "previous.ort")
    previous_bytes = previous.read_bytes()
    # how long one pack takes here, measured the way the victims run (a process told to go), so the kills
    # spread over the pack itself and not over work done before it (imports on first use, checks)
    timing = _start_pack(tmp_path / "timing.ort")
    _go(timing)
    began = time.perf_counter()
    assert timing.stdout.readline().strip() == "done"
    duration = time.perf_counter() - began
    timing.wait(timeout=60)
    victims = [_start_pack(out) for _ in range(3)]  # all start (import, build) at once; pack when told
    try:
        rng = random.Random(3)
        strays_seen = 0
        for attempt, proc in enumerate(victims):
            with_previous = attempt > 0
            if with_previous:
                out.write_bytes(previous_bytes)
            _go(proc)
            if attempt == 1:  # surely mid-write: as soon as its temporary file exists
                _wait_for_temporary(tmp_path, out.name, proc, timeout=10 * duration + 30)
            else:  # anywhere in the pack (a kill before the temporary exists or after the rename too)
                time.sleep(rng.uniform(0.05, 0.9) * duration)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            finished = "done" in proc.stdout.read()  # a random kill may come after the pack (a faster run)
            if with_previous and not finished:
                assert out.read_bytes() == previous_bytes, f"attempt {attempt}: previous container changed"
            elif out.exists():  # the kill came after the atomic rename: then it is complete
                ContainerReader(out).close()
            strays = [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]
            strays_seen += len(strays)
            for stray in strays:
                assert stray.name.endswith(".tmp"), stray
                with pytest.raises(CheckpointError, match="temporary file") as info:
                    ContainerReader(stray)
                assert info.value.hint and str(out) in info.value.hint
        assert strays_seen, "no kill landed mid-pack, not even the one timed by the temporary file"
    finally:
        for proc in victims:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # a later pack of the same path removes the stale temporaries of dead writers and succeeds
    pack(tiny_model("llama", num_layers=1), out, codec="raw", progress=False, overwrite=True)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")] == []
    ContainerReader(out).close()


def test_temporaries_of_live_writers_are_kept(tmp_path):
    out = tmp_path / "m.ort"
    live = tmp_path / f".m.ort.{os.getppid()}.data.tmp"  # the parent process is alive
    other = tmp_path / ".other.ort.999999999.tmp"  # another container's temporary
    live.write_bytes(b"x")
    other.write_bytes(b"x")
    with ContainerWriter(out):
        pass
    assert live.exists() and other.exists()


# -- 15. concurrent readers -------------------------------------------------------------------------------


def _digests(decoded):
    return {name: hashlib.sha256(data).hexdigest() for name, data in decoded.items()}


@pytest.mark.parametrize("policy", ["once", "always"])
def test_two_threads_share_one_reader(small, policy):
    path, _, reference = small
    barrier = threading.Barrier(2)
    results, errors = [None, None], []
    interval = sys.getswitchinterval()

    def work(slot):
        try:
            barrier.wait()
            decoded = [decode_all(reader) for _ in range(3)]
            results[slot] = decoded
        except Exception as exc:  # reported below with the thread's slot
            errors.append((slot, exc))

    sys.setswitchinterval(1e-6)  # interleave as much as possible
    try:
        with ContainerReader(path, verify=policy) as reader:
            threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    for decoded in results:
        assert all(d == reference for d in decoded)


def test_two_processes_read_one_container(small):
    path, _, reference = small
    script = textwrap.dedent(
        f"""
        import hashlib, json, torch
        from offload_runtime.loaders import ContainerReader
        with ContainerReader({str(path)!r}) as reader:
            for _ in range(3):
                digests = {{}}
                for g in reader.groups:
                    out = torch.empty(g.layout.size, dtype=torch.uint8)
                    data = bytes(reader.decode_cpu(g.name, out).numpy())
                    digests[g.name] = hashlib.sha256(data).hexdigest()
                print(json.dumps(digests), flush=True)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    expected = _digests(reference)
    for output in outputs:
        lines = output.strip().splitlines()
        assert len(lines) == 3 and all(json.loads(line) == expected for line in lines)


def test_decoded_reference_matches_the_model(small):
    """The oracle the tests above compare against is itself the model's weights, bit for bit."""
    path, model, _ = small
    with ContainerReader(path) as reader:
        state = load_state_dict(reader)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
