"""The GPU suite's smoke stage: every op of `CudaOps` once, against `CpuOps` (the reference) on the
same stored values, one JSON line per check, so a first run on a new card shows in seconds what works.

    python3 -m tests.gpu.smoke [--device gpu|emu] [--out smoke.jsonl]

Each line is {"check", "dtype", "ok", "ms", ...}: the largest error against the reference and its
tolerance, or the error message. Checks: cuBLAS fp16/bf16 with and without bias, every kernel
(embedding, rms_norm, fused_add_rms_norm, rotary, silu_and_mul, write_kv, copy_blocks, paged attention
on its decode and prefill paths, sample), pinned staging (upload), swap out and back in, graph
capture and replay, and `memory_info`. `--device emu` runs the same checks on the emulation device
(tests/emu/device.py), the dry run CI can do. Exits 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import numpy as np

from cupaged.backend.cpu import CpuOps
from cupaged.backend.cuda import CudaOps
from cupaged.backend.ops import AttnMetadata

CPU = CpuOps()
TOL = {"float16": 1e-2, "bfloat16": 3e-2}  # of the reference's largest |value|, plus the same absolute
HK, HQ, D, BS, NB = 2, 4, 64, 16, 32


def make_device(kind: str):
    if kind == "emu":
        from tests.emu.device import EmuDevice
        return EmuDevice(graphs=True)
    from cupaged.backend.cupy_device import CupyDevice
    return CupyDevice()


class Smoke:
    def __init__(self, device, dtype: str, rng: np.random.Generator):
        self.ops = CudaOps(device, dtype=dtype, partition_size=64)
        self.dtype, self.rng = dtype, rng

    # --- helpers ------------------------------------------------------------------------------------
    def rand(self, *shape) -> np.ndarray:
        return (self.rng.uniform(0.1, 1.0, shape) * self.rng.choice([-1.0, 1.0], shape)).astype(np.float32)

    def put(self, x):
        """Host float32 -> (device array, the float32 values it stores)."""
        a = self.ops.asarray(np.asarray(x, np.float32), self.ops.dtype)
        return a, self.back(a)

    def back(self, a) -> np.ndarray:
        return np.asarray(self.ops.to_numpy(a), np.float32)

    def compare(self, got, want) -> dict:
        got, want = self.back(got), np.asarray(want, np.float32)
        err = float(np.abs(got - want).max()) if got.size else 0.0
        tol = TOL[self.dtype] * (1.0 + float(np.abs(want).max(initial=0.0)))
        if got.shape != want.shape or not np.isfinite(got).all() or err > tol:
            raise AssertionError(f"shape {got.shape} vs {want.shape}, max error {err:.3g} > {tol:.3g}")
        return {"max_err": err, "tol": tol}

    # --- checks -------------------------------------------------------------------------------------
    def linear(self, bias: bool) -> dict:
        x, xs = self.put(self.rand(5, 96))
        w, ws = self.put(self.rand(80, 96))
        b, bs = self.put(self.rand(80)) if bias else (None, None)
        want = xs.astype(np.float64) @ ws.T.astype(np.float64) + (bs if bias else 0.0)
        return self.compare(self.ops.linear(x, w, b), want)

    def embedding(self) -> dict:
        table, ts = self.put(self.rand(50, 32))
        ids = self.rng.integers(0, 50, 7).astype(np.int32)
        return self.compare(self.ops.embedding(self.ops.asarray(ids), table), ts[ids])

    def rms_norm(self) -> dict:
        x, xs = self.put(self.rand(6, 256))
        w, ws = self.put(self.rand(256))
        return self.compare(self.ops.rms_norm(x, w, 1e-5), CPU.rms_norm(xs, ws, 1e-5))

    def fused_add_rms_norm(self) -> dict:
        x, xs = self.put(self.rand(6, 256))
        r, rs = self.put(self.rand(6, 256))
        w, ws = self.put(self.rand(256))
        out = self.ops.fused_add_rms_norm(x, r, w, 1e-5)
        want = CPU.fused_add_rms_norm(xs, rs, ws, 1e-5)  # rs += xs in place
        return {**self.compare(out, want), "residual_err": self.compare(r, rs)["max_err"]}

    def rotary_embedding(self) -> dict:
        pos = self.rng.integers(0, 100, 5).astype(np.int32)
        inv = 1.0 / 10000 ** (np.arange(0, D, 2) / D)
        ang = np.arange(128)[:, None] * inv[None]
        cs = np.concatenate([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
        cache = self.ops.asarray(cs, np.float32)
        q, qs = self.put(self.rand(5, HQ, D))
        k, ks = self.put(self.rand(5, HK, D))
        self.ops.rotary_embedding(self.ops.asarray(pos), q, k, cache, True)
        CPU.rotary_embedding(pos, qs, ks, cs, True)
        return {"q": self.compare(q, qs)["max_err"], "k": self.compare(k, ks)["max_err"]}

    def silu_and_mul(self) -> dict:
        x, xs = self.put(self.rand(4, 2 * 96))
        return self.compare(self.ops.silu_and_mul(x), CPU.silu_and_mul(xs))

    def kv_cache(self) -> tuple:
        """A random pool of NB blocks on both backends (device arrays, host float32 twins)."""
        k, ks = self.put(self.rand(NB, BS, HK, D))
        v, vs = self.put(self.rand(NB, BS, HK, D))
        return k, v, ks, vs

    def write_kv(self) -> dict:
        kc, vc, kcs, vcs = self.kv_cache()
        k, ks = self.put(self.rand(6, HK, D))
        v, vs = self.put(self.rand(6, HK, D))
        slots = self.rng.choice(NB * BS, 6, replace=False).astype(np.int32)
        slots[2] = -1  # padding: skipped
        self.ops.write_kv(k, v, kc, vc, self.ops.asarray(slots))
        CPU.write_kv(ks, vs, kcs, vcs, slots)
        return {"k": self.compare(kc, kcs)["max_err"], "v": self.compare(vc, vcs)["max_err"]}

    def copy_blocks(self) -> dict:
        kc, vc, kcs, vcs = self.kv_cache()
        pairs = np.array([[0, 5], [3, 9], [7, 1]], np.int32)
        self.ops.copy_blocks(kc, vc, self.ops.asarray(pairs))
        CPU.copy_blocks(kcs, vcs, pairs)
        return {"k": self.compare(kc, kcs)["max_err"], "v": self.compare(vc, vcs)["max_err"]}

    def paged_attention(self, q_lens: list[int], ctx: list[int]) -> dict:
        """Sequences of context ctx[b], the last q_lens[b] tokens new: decode (1) or a prefill chunk."""
        kc, vc, kcs, vcs = self.kv_cache()
        tables = np.full((len(ctx), NB), -1, np.int32)
        free = list(self.rng.permutation(NB))
        for b, n in enumerate(ctx):
            blocks = [int(free.pop()) for _ in range(-(-n // BS))]
            tables[b, :len(blocks)] = blocks
        qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        positions = np.concatenate([np.arange(c - q, c) for q, c in zip(q_lens, ctx)]).astype(np.int32)
        meta = dict(positions=positions, slot_mapping=np.zeros(len(positions), np.int32), block_tables=tables,
                    seq_lens=np.array(ctx, np.int32), query_start_loc=qsl,
                    logits_indices=(qsl[1:] - 1).astype(np.int32), max_query_len=max(q_lens), max_seq_len=max(ctx))
        q, qs = self.put(self.rand(int(qsl[-1]), HQ, D))
        dev_meta = AttnMetadata(**{k: self.ops.asarray(v) if isinstance(v, np.ndarray) else v for k, v in meta.items()})
        out = self.ops.paged_attention(q, kc, vc, dev_meta, D ** -0.5)
        return self.compare(out, CPU.paged_attention(qs, kcs, vcs, AttnMetadata(**meta), D ** -0.5))

    def sample(self) -> dict:
        logits, ls = self.put(self.rand(4, 300) * 4)
        temp = np.array([0, 0, 0.7, 1.0], np.float32)
        top_k, top_p = np.array([-1, -1, 20, -1], np.int32), np.array([1, 1, 0.9, 1], np.float32)
        uniform = self.rng.random(4, dtype=np.float32)
        got = np.asarray(self.ops.to_numpy(self.ops.sample(logits, temp, top_k, top_p, uniform)))
        want = np.asarray(CPU.sample(ls, temp, top_k, top_p, uniform))
        if not np.array_equal(got[:2], want[:2]) or not (0 <= got).all() or not (got < 300).all():
            raise AssertionError(f"tokens {got.tolist()} vs the CPU's {want.tolist()}")
        return {"tokens": got.tolist(), "cpu_tokens": want.tolist()}

    def upload(self) -> dict:
        host = self.rng.integers(-2**31, 2**31 - 1, 1000, dtype=np.int64).astype(np.int32)
        outs = [self.ops.upload(host + i) for i in range(4)]  # more uploads than staging slots
        if not all(np.array_equal(self.ops.to_numpy(o), host + i) for i, o in enumerate(outs)):
            raise AssertionError("an upload did not arrive intact")
        return {"bytes": host.nbytes}

    def swap(self) -> dict:
        kc, vc, kcs, vcs = self.kv_cache()
        hk, hv = self.ops.host_zeros((4, BS, HK, D), self.ops.dtype), self.ops.host_zeros((4, BS, HK, D), self.ops.dtype)
        self.ops.swap_blocks(kc, vc, hk, hv, np.array([[2, 0], [3, 1], [11, 3]]))  # out
        self.ops.swap_blocks(hk, hv, kc, vc, np.array([[0, 12], [1, 13], [3, 14]]))  # back in, elsewhere
        self.ops.to_numpy(kc[:1, :1])  # the copies are asynchronous: wait for them
        kcs[[12, 13, 14]], vcs[[12, 13, 14]] = kcs[[2, 3, 11]], vcs[[2, 3, 11]]
        return {"k": self.compare(kc, kcs)["max_err"], "v": self.compare(vc, vcs)["max_err"]}

    def graph(self) -> dict:
        x, xs = self.put(self.rand(4, 256))
        w, ws = self.put(self.rand(256))
        g = self.ops.capture_graph(lambda: self.ops.rms_norm(x, w, 1e-5))
        if g is None:
            raise AssertionError("the device captured no graph")
        want = CPU.rms_norm(xs, ws, 1e-5)
        first = self.compare(g.replay(), want)
        x[...] = self.ops.asarray(-xs, self.ops.dtype)  # replays read the captured buffers' new contents
        return {**first, "second": self.compare(g.replay(), -want)["max_err"]}


def checks(smoke: Smoke) -> list[tuple[str, callable]]:
    return [("linear", lambda: smoke.linear(False)), ("linear_bias", lambda: smoke.linear(True)),
            ("embedding", smoke.embedding), ("rms_norm", smoke.rms_norm),
            ("fused_add_rms_norm", smoke.fused_add_rms_norm), ("rotary_embedding", smoke.rotary_embedding),
            ("silu_and_mul", smoke.silu_and_mul), ("write_kv", smoke.write_kv), ("copy_blocks", smoke.copy_blocks),
            ("paged_attention_decode", lambda: smoke.paged_attention([1, 1, 1], [1, 70, 200])),
            ("paged_attention_prefill", lambda: smoke.paged_attention([20, 1, 33], [20, 90, 60])),
            ("sample", smoke.sample), ("upload", smoke.upload), ("swap", smoke.swap), ("graph", smoke.graph)]


def run(kind: str, out) -> int:
    rng = np.random.default_rng(0)
    failed = 0

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    device = make_device(kind)
    info = device.memory_info()
    emit({"check": "memory_info", "ok": kind == "emu" or info is not None, "device": device.name,
          "free_gib": info and round(info[0] / 2**30, 2), "total_gib": info and round(info[1] / 2**30, 2)})
    failed += kind != "emu" and info is None
    for dtype in ("float16", "bfloat16"):
        smoke = Smoke(device, dtype, rng)
        for name, fn in checks(smoke):
            t0 = time.perf_counter()
            try:
                record = {"check": name, "dtype": dtype, "ok": True, **fn()}
            except Exception as e:
                failed += 1
                record = {"check": name, "dtype": dtype, "ok": False, "error": f"{type(e).__name__}: {e}",
                          "where": traceback.format_exc(limit=-2).strip().splitlines()[-3:]}
            emit({**record, "ms": round((time.perf_counter() - t0) * 1e3, 2)})
    emit({"check": "summary", "ok": failed == 0, "failed": failed})
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["gpu", "emu"], default="gpu")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    with open(args.out, "a") if args.out else open("/dev/null", "w") as out:
        return run(args.device, out if args.out else None)


if __name__ == "__main__":
    sys.exit(main())
