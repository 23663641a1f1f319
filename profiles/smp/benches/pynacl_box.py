#!/usr/bin/env python3
"""libsodium (through PyNaCl) crypto_box seal/open of 16 KiB, for comparison with the
`crypto_box/seal_16384` and `crypto_box/open_16384` criterion benches in crypto.rs.

PyNaCl's `Box` precomputes the shared key (crypto_box_beforenm), so encrypt/decrypt are
crypto_box_afternm/open_afternm, the same work as `cb_encrypt_no_pad`/`cb_decrypt_no_pad`.
Prints one line per operation: name, ns/op (best of several rounds), PyNaCl version
(which bundles its own libsodium).

Run: `pip install pynacl && python3 profiles/smp/benches/pynacl_box.py`
"""

import time

import nacl
from nacl.public import Box, PrivateKey

SIZE = 16 * 1024
ROUNDS = 7
ITERS = 2000


def best_ns_per_op(fn):
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter_ns()
        for _ in range(ITERS):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / ITERS)
    return best


def main():
    a = PrivateKey(bytes([1] * 32))
    b = PrivateKey(bytes([2] * 32))
    box = Box(a, b.public_key)
    nonce = bytes([7] * 24)
    msg = bytes([0x5A] * SIZE)
    # Box.encrypt returns nonce || tag || ct; the SMP layout is tag || ct.
    sealed = box.encrypt(msg, nonce).ciphertext
    assert box.decrypt(sealed, nonce) == msg

    for name, fn in (
        ("crypto_box/seal_16384", lambda: box.encrypt(msg, nonce)),
        ("crypto_box/open_16384", lambda: box.decrypt(sealed, nonce)),
    ):
        ns = best_ns_per_op(fn)
        print(f"pynacl {name}: {ns:.0f} ns/op ({SIZE / ns * 1e9 / 2**20:.0f} MiB/s) pynacl={nacl.__version__}")


if __name__ == "__main__":
    main()
