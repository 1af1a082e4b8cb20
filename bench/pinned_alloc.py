"""How fast can host memory be pinned? Dispatch pins every host-tier payload and every expert's home copy.

Usage: python3 bench/pinned_alloc.py OUT.json [--count 16] [--mb 235]

Ways, each allocating ``count`` buffers of ``mb`` MB (Mixtral's compressed expert is ~235 MB) and then
copying each to the device once (the H2D rate says whether the memory really is pinned):

* ``torch_pinned``: ``torch.empty(pin_memory=True)`` (the caching host allocator's ``cudaHostAlloc``);
* ``torch_register``: the same allocator configured with ``pinned_use_cuda_host_register:True`` (malloc, then
  ``cudaHostRegister`` over ``pinned_num_register_threads`` threads), in a child process since the setting
  is read when the allocator starts;
* ``register``: ``torch.empty`` (pageable) then ``cudaHostRegister`` of its memory, by hand;
* ``pageable``: no pinning, for the copy rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

REGISTER_CONF = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


def measure(way: str, count: int, nbytes: int) -> dict:
    device = torch.device("cuda", 0)
    dest = torch.empty(nbytes, dtype=torch.uint8, device=device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    buffers = []
    for _ in range(count):
        if way in ("torch_pinned", "torch_register"):
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            buf.fill_(0)  # touch the pages first: registering maps them, a real payload is written anyway
            if way == "register":
                rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
                assert int(rc) == 0, f"cudaHostRegister returned {rc}"
        buffers.append(buf)
    alloc_s = time.perf_counter() - start
    torch.cuda.synchronize()
    start = time.perf_counter()
    for buf in buffers:
        dest.copy_(buf, non_blocking=True)
    torch.cuda.synchronize()
    copy_s = time.perf_counter() - start
    if way == "register":
        for buf in buffers:
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
    gb = count * nbytes / 1e9
    return {"way": way, "gb": gb, "alloc_s_per_gb": alloc_s / gb, "h2d_GBps": gb / copy_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--mb", type=int, default=235)
    parser.add_argument("--way", default=None, help="(internal) measure one way and print its JSON")
    args = parser.parse_args()
    nbytes = args.mb * 10**6
    if args.way:
        print(json.dumps(measure(args.way, args.count, nbytes)))
        return
    rows = []
    for way in ("torch_pinned", "torch_register", "register", "pageable"):
        env = dict(os.environ)
        if way == "torch_register":
            env["PYTORCH_CUDA_ALLOC_CONF"] = REGISTER_CONF
        command = [sys.executable, __file__, args.out, "--count", str(args.count), "--mb", str(args.mb)]
        done = subprocess.run([*command, "--way", way], env=env, capture_output=True, text=True)
        row = (
            json.loads(done.stdout.strip().splitlines()[-1])
            if done.returncode == 0
            else {"way": way, "error": done.stderr[-2000:]}
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
