"""SecAgg+ mask expansion alone: fedshield's ChaCha20 expansion vs Flower 1.39's Mersenne Twister, per million entries.

* ours: :func:`fedshield.crypto.prg.expand_mask` (HKDF-SHA256 of the whole seed -> ChaCha20 keystream -> uint32
  words masked to the field, or rejection-sampled for other moduli);
* AES-CTR: the same pipeline with an AES-256-CTR keystream instead of ChaCha20 (the alternative we did not pick;
  AES-NI makes it faster on most x86 servers, ChaCha20 is constant-time everywhere);
* baseline: ``flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen`` (32-bit seed, numpy RandomState).

Each client expands one self mask and one pairwise mask per neighbour per round, the server one per dropped or
surviving node it unmasks, so a round costs about (neighbours + 1) x model size of this. Usage::

    python benchmarks/mask_prg.py [--entries 1000000] [--repeats 15] [--modulus 4294967296] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def aes_ctr_mask(seed: bytes, modulus: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The ChaCha20 pipeline with AES-256-CTR as the keystream (power-of-two moduli only, as fedshield's fields)."""
    key = HKDF(hashes.SHA256(), 32, salt=None, info=b"benchmark aes-ctr").derive(seed)
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    sizes = [int(np.prod(s)) for s in shapes]
    words = np.frombuffer(enc.update(bytes(4 * sum(sizes))), dtype="<u4").astype(np.int64) & (modulus - 1)
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(words[start:start + size].reshape(shape))
        start += size
    return out


def seconds(fn: Callable[[bytes, int, list[tuple[int, ...]]], Any], entries: int, modulus: int, repeats: int) -> list[float]:
    seed, shapes = os.urandom(32), [(entries,)]
    fn(seed, modulus, shapes)  # warm-up: imports, allocator
    times = []
    for _ in range(repeats):
        seed = os.urandom(32)
        start = time.perf_counter()
        fn(seed, modulus, shapes)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--modulus", type=int, default=2**32)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from fedshield.crypto.prg import expand_mask

    per_m = 1e6 / args.entries
    runs = {name: seconds(fn, args.entries, args.modulus, args.repeats)
            for name, fn in (("mt", pseudo_rand_gen), ("chacha20", expand_mask), ("aes-ctr", aes_ctr_mask))}
    med = {k: statistics.median(v) * per_m * 1e3 for k, v in runs.items()}
    print(f"mask expansion, {args.entries:,} entries mod {args.modulus}, median of {args.repeats} (ms per million):")
    print("expansion                      | ms / 1M entries | vs Mersenne Twister")
    print("------------------------------ | --------------- | -------------------")
    labels = {"mt": "Flower: MT19937, 32-bit seed", "chacha20": "fedshield: HKDF + ChaCha20", "aes-ctr": "HKDF + AES-256-CTR"}
    for key in ("mt", "chacha20", "aes-ctr"):
        print(f"{labels[key]:<30} | {med[key]:>15.2f} | {med[key] / med['mt']:>18.2f}x")
    if args.json:
        rows = [{"name": f"SecAgg+ mask expansion per 1M entries, {key}", "ours": med[key], "baseline": med["mt"],
                 "unit": "ms", "ratio": med[key] / med["mt"],
                 "detail": {"better": "lower", "runs_s": runs[key], "baseline_runs_s": runs["mt"],
                            "entries": args.entries, "modulus": args.modulus}}
                for key in ("chacha20", "aes-ctr")]
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
