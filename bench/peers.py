"""Peer rows of the end-to-end benchmark: the strongest other ways to run a model whose weights do not stay in
VRAM, measured in the same process as offload_runtime's rows and scored against the same resident tokens.

Every peer starts from the one CPU copy of the reference weights (``model``, moved off the GPU):

* diffusers' group offloading (``diffusers.hooks.apply_group_offloading``), which works on any ``nn.Module``.
  ``leaf_level`` with ``use_stream=True`` keeps each leaf's (Linear, Embedding; the norms and rotary buffers
  go with their parent module) weights in pinned RAM and copies the next leaf on a side stream while the
  current one runs: its fastest on a Llama. Then the same with ``record_stream=True`` (no synchronisation at
  each offload). Then ``block_level`` with ``num_blocks_per_group=1``: a ``LlamaForCausalLM``'s children hold
  no ``ModuleList`` (the layers sit one level down), so the whole model is one group, copied in from pageable
  RAM and back at every forward. Each row runs on its own deep copy of ``model``, made before the row's
  counters are reset: its peak RSS includes the source copy.
* AirLLM: the model saved with ``save_pretrained`` (before the row's counters are reset), split by AirLLM
  into one safetensors file per layer, and run by its hooks layer by layer from those files, one worker
  thread reading the next layer ahead. Its reads mostly hit the page cache, as offload_runtime's disk rows do.
* accelerate's ``cpu_offload`` then ``disk_offload`` (CUDA only, last: they consume ``model``).

Every peer moves all weights to the GPU once per token: its ``h2d_bytes_per_token`` is the weight bytes and,
on the GPU, ``fraction_of_h2d`` says how much of the measured pinned H2D rate that is. The diffusers leaf
rows are timed like offload_runtime's (``tokens``, median of 3); the slow ones (diffusers ``block_level``,
AirLLM, accelerate) generate ``slow_tokens`` once after a warm-up, which makes them look a little slower
(the prompt's forward weighs more). On the CPU (the dry run) streams do not exist: the leaf rows run
without them and say so in ``notes``. A peer library that is not installed gives a row with ``skipped``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import time
import warnings
from pathlib import Path

import torch
from e2e_measure import begin_row, memory_fields, timed_generate

PEER_PLACEMENT = {
    "diffusers leaf_level stream": "pinned CPU RAM",
    "diffusers leaf_level stream+record": "pinned CPU RAM",
    "diffusers block_level": "CPU RAM",
    "airllm": "disk (a file per layer)",
    "accelerate cpu_offload": "CPU RAM",
    "accelerate disk_offload": "disk (memory-mapped)",
}
PEER_ROWS = tuple(PEER_PLACEMENT)
ACCELERATE_ROWS = ("accelerate cpu_offload", "accelerate disk_offload")  # CUDA only
DIFFUSERS_CONFIGS = {
    "diffusers leaf_level stream": {"offload_type": "leaf_level", "use_stream": True},
    "diffusers leaf_level stream+record": {
        "offload_type": "leaf_level",
        "use_stream": True,
        "record_stream": True,
    },
    "diffusers block_level": {"offload_type": "block_level", "num_blocks_per_group": 1},
}
FAST_PEERS = ("diffusers leaf_level stream", "diffusers leaf_level stream+record")  # timed like our rows
AIRLLM_SHIM = (
    "benchmark shim: AutoTokenizer.from_pretrained(model_dir) skipped (get_tokenizer returns None): the "
    "benchmark's model has no tokenizer files and the rows pass token ids"
)


def peer_rows(
    results: dict,
    model,
    ref: dict,
    weight_bytes: int,
    tokens: int,
    slow_tokens: int,
    tmp: Path,
    wanted: list,
    device: str,
) -> None:
    """Append a row to ``results["rows"]`` for each peer in ``wanted``, all from ``model`` (on the CPU).

    Args:
        results (`dict`): the run's results; ``h2d_pinned_GBps`` there, if measured, scores each row.
        model: the reference model, on the CPU; accelerate's rows (last) consume it.
        ref (`dict`): the prompt ``ids`` (on ``device``) and the resident run's ``tokens``.
        weight_bytes (`int`): bytes of all weights, which every peer moves to the GPU once per token.
        tokens (`int`): new tokens of the fast peers' runs (the diffusers leaf rows).
        slow_tokens (`int`): new tokens of the slow peers' single timed run.
        tmp (`Path`): a scratch folder (AirLLM's and accelerate's copies of the weights, removed after).
        wanted (`list`): row names; those not in ``PEER_ROWS`` are ignored.
        device (`str`): ``"cuda"``, or ``"cpu"`` for the dry run (no accelerate rows there).
    """
    h2d = results.get("h2d_pinned_GBps")
    for method in (m for m in DIFFUSERS_CONFIGS if m in wanted):
        fast = method in FAST_PEERS
        row = diffusers_row(model, method, ref, tokens if fast else slow_tokens, 3 if fast else 1, device)
        _append(results, _scored(row, weight_bytes, h2d))
    if "airllm" in wanted:
        row = airllm_row(model, ref, weight_bytes, slow_tokens, tmp, device)
        _append(results, _scored(row, weight_bytes, h2d))
    if device == "cuda":
        accelerate_rows(results, model, ref, weight_bytes, slow_tokens, tmp, wanted)


def _peer_row(method: str) -> dict:
    return {"method": method, "placement": PEER_PLACEMENT[method], "lossless": True, "peer": True}


def _scored(row: dict, weight_bytes: int, h2d: float | None) -> dict:
    """Every peer streams all weights once per token: the bytes and, with a measured H2D rate, its share."""
    if "tok_s" in row:
        row["h2d_bytes_per_token"] = weight_bytes
        if h2d:
            row["effective_GBps"] = weight_bytes * row["tok_s"] / 1e9
            row["fraction_of_h2d"] = row["effective_GBps"] / h2d
    return row


def _append(results: dict, row: dict) -> None:
    results["rows"].append(row)
    print(json.dumps(row), flush=True)


def _generate_fields(model, ref: dict, tokens: int, repeats: int) -> dict:
    out, tok_s = timed_generate(model, ref["ids"], tokens, repeats=repeats)
    return {"tokens": tokens, "tok_s": tok_s, "identical": bool(torch.equal(out, ref["tokens"][: len(out)]))}


def diffusers_row(model, method: str, ref: dict, tokens: int, repeats: int, device: str) -> dict:
    """diffusers' ``apply_group_offloading``, ``DIFFUSERS_CONFIGS[method]``, on a deep copy of ``model``."""
    row = _peer_row(method)
    try:
        import diffusers
        from diffusers.hooks import apply_group_offloading
    except ImportError as exc:
        row["skipped"] = f"diffusers is not importable ({exc}); bench/peer_wheels.sh downloads it"
        return row
    config = dict(DIFFUSERS_CONFIGS[method])
    if device == "cpu":  # diffusers raises for streams without CUDA: the dry run checks the call and tokens
        dropped = [k for k in ("use_stream", "record_stream") if config.pop(k, False)]
        if dropped:
            row["notes"] = f"on the CPU without {' and '.join(dropped)} (streams need CUDA)"
    row.update(version=diffusers.__version__, config=config)
    offloaded = copy.deepcopy(model)
    start = begin_row(device)
    try:
        t0 = time.perf_counter()
        apply_group_offloading(
            offloaded, onload_device=torch.device(device), offload_device=torch.device("cpu"), **config
        )
        row["setup_s"] = time.perf_counter() - t0
        row.update(_generate_fields(offloaded, ref, tokens, repeats))
        row.update(memory_fields(device, start))
    except Exception as exc:  # record the failure and go on with the other rows
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def _airllm_model_class():
    """AirLLM's generic streaming model with the one benchmark shim (``AIRLLM_SHIM``)."""
    with warnings.catch_warnings():  # it warns for each optional model family it cannot import
        warnings.simplefilter("ignore")
        from airllm import AirLLMBaseModel

    class BenchAirLLM(AirLLMBaseModel):
        def get_tokenizer(self, hf_token=None):  # shim: see AIRLLM_SHIM
            return None

    return BenchAirLLM


def airllm_row(model, ref: dict, weight_bytes: int, tokens: int, tmp: Path, device: str) -> dict:
    """AirLLM on ``model`` saved as a Hugging Face folder: split into a file per layer, run from them."""
    row = _peer_row("airllm")
    try:
        from importlib.metadata import version

        model_class = _airllm_model_class()
        row["version"] = version("airllm")
    except ImportError as exc:
        row["skipped"] = f"airllm is not importable ({exc}); bench/peer_wheels.sh downloads it"
        return row
    row["notes"] = AIRLLM_SHIM
    hf_dir = tmp / "airllm_model"
    air = None
    log = io.StringIO()  # AirLLM prints each file it writes and a tqdm bar: kept out of the run's output
    try:
        # in shards with an index, as checkpoints come: AirLLM's splitter reads each shard once (it reads a
        # single-file checkpoint whole again for every layer)
        model.save_pretrained(hf_dir, max_shard_size=max(weight_bytes // 4, 2**20))
        row["checkpoint_shards"] = len(list(hf_dir.glob("*.safetensors")))
        start = begin_row(device)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            air = model_class(str(hf_dir), device=device, dtype=model.dtype)  # splits the checkpoint
        row["setup_s"] = time.perf_counter() - t0
        row.update(_generate_fields(air, ref, tokens, repeats=1))
        row.update(memory_fields(device, start))
        # AirLLM computes the non-persistent buffers (rotary inv_freq) itself, on the CPU; the reference
        # computed them on ``device``: where its tokens differ, this says whether they start there
        row["buffers_identical"] = buffers_identical(air.model, model)
    except Exception as exc:  # record the failure and go on with the other rows
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["log_tail"] = log.getvalue()[-2000:]
    finally:
        executor = getattr(air, "_executor", None)  # its prefetch thread
        if executor is not None:
            executor.shutdown(wait=True)
        del air
        shutil.rmtree(hf_dir, ignore_errors=True)  # two copies of the weights: free the disk now
    return row


def buffers_identical(model, reference) -> bool:
    """Whether every buffer of ``model`` that holds values (not on ``meta``, where AirLLM parks what it
    streams) equals ``reference``'s of the same name, bit for bit."""
    ours = dict(reference.named_buffers())
    held = [(name, b) for name, b in model.named_buffers() if b.device.type != "meta"]
    return all(name in ours and torch.equal(b.cpu(), ours[name].cpu()) for name, b in held)


def accelerate_rows(
    results: dict, model, ref: dict, weight_bytes: int, tokens: int, tmp: Path, wanted: list
) -> None:
    """accelerate's ``cpu_offload`` then ``disk_offload`` of ``model`` (on the CPU), which they consume.

    Both run on the one CPU copy: removing ``cpu_offload``'s hooks puts its weights back on the CPU, and
    ``disk_offload`` (last) writes them to its folder and leaves only memory maps; so its peak RSS includes
    that copy, its ``rss_after_bytes`` does not. Its "disk" reads mostly hit the page cache, as ours do.
    """
    from accelerate import cpu_offload, disk_offload
    from accelerate.hooks import remove_hook_from_module

    cuda = torch.device("cuda")
    offload_dir = tmp / "accelerate_disk"
    offload = {
        "accelerate cpu_offload": lambda: cpu_offload(model, execution_device=cuda),
        "accelerate disk_offload": lambda: disk_offload(model, offload_dir, execution_device=cuda),
    }
    h2d = results.get("h2d_pinned_GBps")
    for method in (m for m in ACCELERATE_ROWS if m in wanted):
        start = begin_row("cuda")
        row = _peer_row(method)
        try:
            offload[method]()
            row.update(_generate_fields(model, ref, tokens, repeats=1))
            row.update(memory_fields("cuda", start))
            if method == "accelerate cpu_offload":  # its weights back on the CPU, for disk_offload
                remove_hook_from_module(model, recurse=True)
        except Exception as exc:  # record the failure and go on with the other rows
            row["error"] = f"{type(exc).__name__}: {exc}"
        shutil.rmtree(offload_dir, ignore_errors=True)  # a full copy of the weights: free the disk now
        _append(results, _scored(row, weight_bytes, h2d))
