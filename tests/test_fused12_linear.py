"""``fused_linear``: the table and default choices, and every path against the reference."""

from __future__ import annotations

import json

import pytest
import torch
import triton_cpu  # selects the interpreter before the kernel modules are imported

from offload_runtime.errors import UsageError
from offload_runtime.native import fused12_format as fmt
from offload_runtime.native import fused12_linear as fl

CPU = torch.device("cpu")
TABLE = {
    "entries": [
        {
            "n": 64,
            "k": 128,
            "m": 1,
            "path": "gemv",
            "config": {"block_pairs": 8, "block_words": 8, "split": 2},
        },
        {
            "n": 64,
            "k": 128,
            "m": 8,
            "path": "dot",
            "config": {"block_m": 16, "block_pairs": 16, "block_words": 8},
        },
        {"n": 64, "k": 128, "m": 512, "path": "decode"},
    ]
}


def test_table_buckets_pick_the_smallest_bucket_at_least_m():
    table = fl.parse_table(TABLE)
    assert fl.choose(1, 64, 128, torch.bfloat16, CPU, table).path == "gemv"
    assert fl.choose(2, 64, 128, torch.bfloat16, CPU, table).path == "dot"
    assert fl.choose(8, 64, 128, torch.bfloat16, CPU, table).path == "dot"
    # between the small buckets and the prefill one: the measured tile of 16 rows, then the default dot
    # (64-row tiles) up to 64 rows, then the prefill bucket
    for m in (9, 16):
        assert fl.choose(m, 64, 128, torch.bfloat16, CPU, table) == fl.choose(
            8, 64, 128, torch.bfloat16, CPU, table
        )
    for m in (17, 64):
        assert fl.choose(m, 64, 128, torch.bfloat16, CPU, table) == fl.default_choice(m, 64, 128, CPU)
        assert fl.default_choice(m, 64, 128, CPU).path == "dot"
    assert fl.choose(65, 64, 128, torch.bfloat16, CPU, table).path == "decode"
    assert fl.choose(4096, 64, 128, torch.bfloat16, CPU, table).path == "decode"  # past the last bucket
    # dot multiplies bf16 x only: fp32 x falls back to the gemv default for few rows
    assert fl.choose(4, 64, 128, torch.float32, CPU, table).path == "gemv"
    assert fl.choose(4, 64, 64, torch.bfloat16, CPU, table).path == "gemv"  # shape not in the table


def test_a_wdot_entry_serves_bf16_x_of_at_most_16_rows():
    config = {"block_pairs": 16, "block_words": 16}
    entries = [{"n": 64, "k": 128, "m": m, "path": "wdot", "config": config} for m in (4, 32)]
    table = fl.parse_table({"entries": entries})
    assert fl.choose(3, 64, 128, torch.bfloat16, CPU, table).path == "wdot"
    assert fl.choose(16, 64, 128, torch.bfloat16, CPU, table).path == "wdot"
    # more rows than one product, or x that tensor cores do not multiply: the default instead
    assert fl.choose(17, 64, 128, torch.bfloat16, CPU, table) == fl.default_choice(17, 64, 128, CPU)
    assert fl.choose(3, 64, 128, torch.float32, CPU, table) == fl.default_choice(3, 64, 128, CPU)


def test_short_splits_give_the_escapes_a_program_of_their_own():
    # 4 SMs on the CPU: 1 row block of 16 pairs, K split 16 ways (4 steps each): short splits
    assert fl.default_choice(1, 32, 8192, CPU).config["escape_program"] == 1
    assert fl.default_choice(1, 4096, 4096, CPU).config["split"] == 1  # no split: nothing to move
    assert fl.default_choice(1, 4096, 4096, CPU).config["escape_program"] == 0
    table = fl.parse_table(
        {"entries": [{"n": 8, "k": 64, "m": 1, "path": "gemv", "config": {"escape_program": 0}}]}
    )
    assert fl.choose(1, 8, 64, torch.bfloat16, CPU, table).config == {"escape_program": 0}


def test_defaults_and_split_k_fill_the_sms():
    assert fl.default_choice(1, 4096, 4096, CPU).path == "gemv"
    assert fl.default_choice(16, 4096, 4096, CPU).path == "dot"
    assert fl.default_choice(512, 4096, 4096, CPU).path == "decode"
    # 4 SMs on the CPU: a 1024 x 8192 weight has 32 row blocks of 16 pairs: no split needed
    assert fl.auto_split(1024, 8192, 16, 32, CPU) == 1
    assert fl.auto_split(32, 8192, 16, 32, CPU) == 16  # one row block: split K 16 ways (4 steps each)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"entries": [{"n": 1, "k": 1, "m": 1, "path": "magic"}]}, "'path' must be one of"),
        ({"entries": [{"n": 1, "k": 0, "m": 1, "path": "decode"}]}, "positive integers"),
        ({"entries": [{"n": 1, "k": 1, "m": 1, "path": "gemv", "config": {"split": -1}}]}, "'config'"),
        ({"entries": [{"n": 1, "k": 1, "m": 1, "path": "gemv", "config": {"split": 0}}]}, "'config'"),
        (
            {"entries": [{"n": 1, "k": 1, "m": 1, "path": "gemv", "config": {"escape_program": -1}}]},
            "'config'",
        ),
        ({"rows": []}, "no 'entries' list"),
    ],
)
def test_malformed_tables_are_refused(table, message):
    with pytest.raises(ValueError, match=message):
        fl.parse_table(table, source="t.json")


def test_a_table_file_that_is_not_json_is_a_usage_error_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    path.write_text("{not json")
    monkeypatch.setenv(fl.TABLE_ENV, str(path))
    fl.load_table.cache_clear()
    try:
        with pytest.raises(UsageError, match=f"{path}: not a fused12 kernel table") as caught:
            fl.load_table()
        assert fl.TABLE_ENV in caught.value.hint
    finally:
        fl.load_table.cache_clear()


def test_table_file_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(TABLE))
    monkeypatch.setenv(fl.TABLE_ENV, str(path))
    fl.load_table.cache_clear()
    try:
        assert fl.load_table()[(64, 128)][0][1].path == "gemv"
    finally:
        fl.load_table.cache_clear()


def test_each_key_is_resolved_once(monkeypatch):
    weight, x, _ = _case(m=4)
    planes = fmt.encode(weight)
    keys = []
    resolve = fl.resolve
    monkeypatch.setattr(fl, "resolve", lambda *key: keys.append((key[0], key[3])) or resolve(*key))
    fl.cached_choice.cache_clear()
    try:
        want = torch.nn.functional.linear(x, weight)
        assert torch.equal(fl.fused_linear(x, planes), want)
        assert torch.equal(fl.fused_linear(x, planes), want)  # same key: the cached choice
        assert keys == [(4, torch.bfloat16)]
        fl.fused_linear(x[:2], planes)  # another m
        fl.fused_linear(x.float(), planes)  # another dtype
        fl.fused_linear(x[:2], planes)
        assert keys == [(4, torch.bfloat16), (2, torch.bfloat16), (4, torch.float32)]
        fl.fused_linear(x, planes, path="decode")  # a forced path resolves nothing
        assert len(keys) == 3
    finally:
        fl.cached_choice.cache_clear()  # no entry made through the counting resolver outlives the test


def test_cached_choice_is_the_tables_choice():
    device = torch.device("meta")  # not the CPU: resolved through choose, as on a GPU
    key = (4000, 3000, torch.bfloat16, device)  # a shape the packaged table lacks: every default path
    fl.cached_choice.cache_clear()
    try:
        choices = [fl.cached_choice(m, *key) for m in (1, 8, 9, 16, 64, 65)]
        assert choices == [fl.choose(m, *key) for m in (1, 8, 9, 16, 64, 65)]
        assert {c.path for c in choices} == {"gemv", "dot", "decode"}  # every path of TABLE
        assert fl.cached_choice(16, *key) is choices[3]
    finally:
        fl.cached_choice.cache_clear()


def _case(rows=37, cols=130, m=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, cols, generator=generator) * 0.02).bfloat16()
    weight[0, 0] = 0.0
    weight[5, 7] = 2.0  # escapes: a zero and an outlier
    x = torch.randn(m, cols, generator=generator).bfloat16()
    return weight, x, torch.randn(rows, generator=generator).bfloat16()


def test_cpu_decode_path_is_f_linear_of_the_decoded_weight():
    weight, x, bias = _case()
    planes = fmt.encode(weight)
    x3 = x.view(1, *x.shape)
    assert torch.equal(fl.fused_linear(x3, planes, bias), torch.nn.functional.linear(x3, weight, bias))
    assert torch.equal(fl.fused_linear(x, planes), torch.nn.functional.linear(x, weight))
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    assert fl.fused_linear(x, planes, out=out).data_ptr() == out.data_ptr()


@pytest.mark.skipif(not triton_cpu.AVAILABLE, reason="triton is not installed")
@pytest.mark.parametrize(
    ("path", "config", "dtype"),
    [
        ("gemv", {"block_pairs": 4, "block_words": 8, "split": 3}, torch.bfloat16),
        ("gemv", {"block_pairs": 4, "block_words": 8, "split": 1}, torch.float32),
        ("dot", {"block_m": 16, "block_pairs": 16, "block_words": 8, "split": 2}, torch.bfloat16),
        ("wdot", {"block_pairs": 16, "block_words": 16, "split": 2}, torch.bfloat16),
        ("decode", None, torch.bfloat16),
    ],
)
def test_forced_kernel_paths_match_the_reference(path, config, dtype):
    weight, x, bias = _case()
    device = triton_cpu.DEVICE
    planes = fmt.encode(weight.to(device))
    x, bias = x.to(device, dtype), bias.to(device)
    reference = x.float() @ weight.to(device).float().T + bias.float()
    # decode runs F.linear's own addmm on the exactly decoded weight: the same arithmetic, the same bits
    oracle = torch.nn.functional.linear(x, weight.to(device, dtype), bias.to(dtype))
    for _ in range(2):  # the second call reuses the split-K workspace: its counters were re-armed
        y = fl.fused_linear(x, planes, bias, path=path, config=config)
        assert y.dtype == dtype and y.shape == reference.shape
        if path == "decode":
            assert torch.equal(y, oracle)
            continue
        tolerance = 2**-7 if dtype == torch.bfloat16 else 2**-20  # bf16 output rounding, else summation
        assert torch.allclose(y.float(), reference, rtol=tolerance, atol=1e-5)


def test_wrong_feature_count_is_refused():
    planes = fmt.encode(torch.zeros(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="features"):
        fl.fused_linear(torch.zeros(2, 9, dtype=torch.bfloat16), planes)
    with pytest.raises(ValueError, match="path must be one of"):
        fl.fused_linear(torch.zeros(2, 8, dtype=torch.bfloat16), planes, path="cublas")


@pytest.mark.skipif(not triton_cpu.AVAILABLE, reason="triton is not installed")
@pytest.mark.parametrize(
    ("path", "config"),
    [
        ("gemv", {"block_pairs": 4, "block_words": 4, "split": 8, "escape_program": 1}),
        ("wdot", {"block_pairs": 16, "block_words": 16, "split": 4}),
        ("dot", {"block_m": 16, "block_pairs": 16, "block_words": 4, "split": 8}),
    ],
)
def test_split_k_partials_stay_within_the_charged_workspace(monkeypatch, path, config):
    """A config whose partials exceed SPLIT_WORKSPACE_BYTES runs with fewer splits (what the plan charges
    is then a bound), and computes the same product."""
    weight, x, bias = _case()
    device = triton_cpu.DEVICE
    planes = fmt.encode(weight.to(device))
    x, bias = x.to(device, torch.bfloat16), bias.to(device)
    cap = 4 * 2 * 3 * x.shape[0] * weight.shape[0]  # partials of 2 programs: split 2, or 1 and the escapes'
    monkeypatch.setattr(fl, "SPLIT_WORKSPACE_BYTES", cap)
    fl.release_buffers()
    y = fl.fused_linear(x, planes, bias, path=path, config=config)
    partials = fl._buffers(torch.device(device)).partials
    assert partials is None or 4 * partials.numel() <= cap
    reference = x.float() @ weight.to(device).float().T + bias.float()
    assert torch.allclose(y.float(), reference, rtol=2**-7, atol=1e-5)
    fl.release_buffers()


def test_the_default_for_5_to_8_rows_of_a_wide_weight_is_wdot_in_whole_waves(monkeypatch):
    """Measured on the H200 (``2026-12-01-h200-fused12-kernels-wdot-waves.json`` and the packaged table):
    at M=8 `wdot` with split-K of whole waves won every shape with N >= 4096, the GEMV the k/v ones."""
    monkeypatch.setattr(fl, "sm_count", lambda device: 132)
    for rows, cols, split in [(8192, 8192, 4), (8192, 28672, 4), (14336, 4096, 2), (4096, 14336, 8)]:
        for m in (5, 8):
            choice = fl.default_choice(m, rows, cols, CPU)
            assert choice.path == "wdot" and choice.config["split"] == split, (rows, m, choice)
            assert (choice.config["block_pairs"], choice.config["block_words"]) == (32, 32)
    assert fl.default_choice(8, 1024, 8192, CPU).path == "gemv"  # k/v: the GEMV
    assert fl.default_choice(4, 8192, 8192, CPU).path == "gemv"  # M=4: the GEMV
    assert fl.default_choice(9, 8192, 8192, CPU).path == "dot"
    assert fl.default_choice(8, 128 * 1024, 8192, CPU).config["split"] == 1  # more blocks than a wave
    # wdot multiplies bf16 x only: fp32 x of 8 rows takes the GEMV
    assert fl.choose(8, 8192, 8192, torch.float32, CPU, fl.parse_table({"entries": []})).path == "gemv"
