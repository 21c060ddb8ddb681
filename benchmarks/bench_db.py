"""Retrieval-database speed and quality figures, one JSON object per line.

Run: `python benchmarks/bench_db.py [--emb-chunks 1024] [--vectors 100000] [--pydocs-build]`.

- tokenize+chunk: BPE (retrolm.tokenizer, trained in-run on builtin:pydocs) + make_chunks.
- embedding: chunks/s of `embed_to_file` (the pipeline: get_texts, length-sorted batches,
  pooling, normalisation, float16 block writes with fsync + progress sidecar) as a ratio of
  the raw encoder (HF tokenizer + model forward on exactly the same batches) in this run.
- index: build time, recall@2 of `choose_factory(n)` at `default_nprobe` against exact
  search, on n >= 100k NOISE-PERTURBED REAL EMBEDDINGS (MiniLM vectors of pydocs chunks,
  each copied with Gaussian noise and renormalised: real geometry, affordable size).
- neighbours: queries/s of `compute_neighbors` (dense, text in → ids out, with same-document
  exclusion) and of BM25 over the pydocs chunks.
- dominant document: BM25 neighbours when one document owns 80% of the chunks, searching
  deeper and deeper (the retry path) vs leaving its chunks out of the search, same run,
  with a check that both give identical neighbours.
- windows vs chunks: how many query windows (m-aligned in the packed stream) are the same
  token span as a database chunk (document-aligned), i.e. could reuse its embedding.
The CPU may be shared: absolute times are noisy, the ratios are the figures to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emb-chunks", type=int, default=1024, help="chunks embedded for the ratio")
    ap.add_argument("--vectors", type=int, default=100_000, help="index size for recall (>= 100k)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--pydocs-build", action="store_true", help="also time `retrolm db build`")
    args = ap.parse_args()

    import faiss
    import torch

    from retrolm.corpora import pydocs
    from retrolm.db.bm25 import BM25Retriever
    from retrolm.db.chunks import make_chunks
    from retrolm.db.embed import Embedder, embed_to_file
    from retrolm.db.index import build_index, choose_factory, default_nprobe
    from retrolm.db.neighbors import compute_neighbors
    from retrolm.db.retriever import DenseRetriever
    from retrolm.tokenizer import Tokenizer

    emit(kind="machine", python=platform.python_version(), cpu=platform.processor() or platform.machine(),
         cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
         faiss=faiss.__version__)
    emit(kind="config", **vars(args))
    tmp = Path(tempfile.mkdtemp(prefix="bench_db_"))

    # 1. tokenize + chunk (m = 64)
    docs = [d.text for d in pydocs.documents()]
    tok = Tokenizer.train_bpe(docs, args.vocab_size)
    t = time.perf_counter()
    ids = tok.encode_batch(docs)
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)  # + EOS
    stream = np.empty(int(lengths.sum()), dtype=np.uint16)
    starts = np.cumsum(lengths) - lengths
    for s, x in zip(starts, ids, strict=True):
        stream[s : s + len(x)] = x
        stream[s + len(x)] = tok.eos_id
    table = make_chunks(np.stack([starts, lengths], axis=1), 64)
    dt = time.perf_counter() - t
    emit(kind="tokenize_chunk", docs=len(docs), tokens=int(lengths.sum()), chunks=len(table),
         seconds=round(dt, 3), chunks_per_s=round(len(table) / dt, 1),
         note="retrolm.tokenizer BPE trained in-run on builtin:pydocs; HF tokenizers encode_batch")
    total, m = len(stream), 64
    same_span = (table[:, 0] % m == 0) & ((table[:, 1] == m) | (table[:, 0] + table[:, 1] == total))
    emit(kind="windows_vs_chunks", m=m, windows=-(-total // m), chunks=len(table),
         windows_equal_to_a_chunk=int(same_span.sum()), share=round(float(same_span.sum()) / -(-total // m), 4),
         note="a window is a chunk's span only where a document starts at a multiple of m")
    texts = [tok.decode(stream[s : s + n]) for s, n, _ in table]
    chunk_doc = table[:, 2]

    # 2. embedding: pipeline vs raw encoder on the same batches
    emb = Embedder(batch_size=args.batch_size)
    sample = texts[: args.emb_chunks]
    order = np.argsort([len(x) for x in sample], kind="stable")
    batches = [[sample[i] for i in order[lo : lo + args.batch_size]]
               for lo in range(0, len(sample), args.batch_size)]

    def raw() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                enc = emb.tokenizer(b, padding=True, truncation=True, max_length=emb.max_length,
                                    return_tensors="pt")
                emb.model(**enc)
        return time.perf_counter() - t0

    def pipeline(i: int) -> float:
        t0 = time.perf_counter()
        embed_to_file(emb, lambda lo, hi: sample[lo:hi], len(sample), tmp / f"e{i}.f16",
                      block_size=1024, progress=False)
        return time.perf_counter() - t0

    with torch.inference_mode():  # warm-up
        emb.encode(batches[0])
    raw_t, pipe_t = [], []
    for i in range(3):  # interleaved so CPU contention hits both alike
        raw_t.append(raw())
        pipe_t.append(pipeline(i))
    # Best of 3: on a shared CPU the least-disturbed run is the closest to the true cost.
    r, p = min(raw_t), min(pipe_t)
    emit(kind="embedding", chunks=len(sample), batch_size=args.batch_size, dtype="fp32",
         raw_chunks_per_s=round(len(sample) / r, 1), pipeline_chunks_per_s=round(len(sample) / p, 1),
         ratio=round(r / p, 3), ratio_median=round(float(np.median(raw_t) / np.median(pipe_t)), 3),
         target=0.9, raw_seconds=[round(x, 2) for x in raw_t],
         pipeline_seconds=[round(x, 2) for x in pipe_t])
    real = np.asarray(np.memmap(tmp / "e0.f16", dtype=np.float16, mode="r",
                                shape=(len(sample), emb.dim)), dtype=np.float32)

    # 3. index over noise-perturbed real embeddings
    rng = np.random.default_rng(0)

    def perturbed(n: int) -> np.ndarray:
        x = real[rng.integers(0, len(real), n)] + 0.04 * rng.standard_normal((n, emb.dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    db, queries = perturbed(args.vectors), perturbed(args.queries)
    factory = choose_factory(len(db), emb.dim)
    t = time.perf_counter()
    index = build_index(db, factory, seed=0)
    build_s = time.perf_counter() - t
    nprobe = default_nprobe(factory)
    ivf = faiss.extract_index_ivf(index) if "IVF" in factory else None
    if ivf is not None:
        ivf.nprobe = nprobe
    t = time.perf_counter()
    exact = build_index(db, "Flat")
    flat_build_s = time.perf_counter() - t
    t = time.perf_counter()
    _, got = index.search(queries, 2)
    search_s = time.perf_counter() - t
    t = time.perf_counter()
    _, truth = exact.search(queries, 2)
    exact_s = time.perf_counter() - t
    recall = float(np.mean([len(set(a) & set(b)) / 2 for a, b in zip(got, truth, strict=True)]))
    emit(kind="index", vectors=len(db), dim=emb.dim, factory=factory, nprobe=nprobe,
         build_seconds=round(build_s, 2), flat_build_seconds=round(flat_build_s, 2),
         recall_at_2=round(recall, 4), target=0.95,
         search_queries_per_s=round(len(queries) / search_s, 1),
         exact_queries_per_s=round(len(queries) / exact_s, 1),
         speedup_vs_exact=round(exact_s / search_s, 2),
         vectors_note="noise-perturbed real MiniLM embeddings of pydocs chunks (sigma 0.04/dim)")

    # 4. neighbour search (text in, ids out, same-document exclusion)
    nq = min(512, len(texts))
    dense = DenseRetriever(emb, index)
    fake_doc = rng.integers(0, len(db) // 5, len(db))  # ~5 chunks per document
    t = time.perf_counter()
    compute_neighbors(dense, lambda lo, hi: texts[lo:hi], nq, lambda lo, hi: [{int(fake_doc[i])} for i in range(lo, hi)],
                      fake_doc, 8, tmp / "nd.npy", progress=False)
    dense_s = time.perf_counter() - t
    t = time.perf_counter()
    bm = BM25Retriever.build(texts)
    bm_build = time.perf_counter() - t
    t = time.perf_counter()
    nb = compute_neighbors(bm, lambda lo, hi: texts[lo:hi], nq,
                           lambda lo, hi: [{int(chunk_doc[i])} for i in range(lo, hi)],
                           chunk_doc, 8, tmp / "nb.npy", progress=False)
    bm_s = time.perf_counter() - t
    emit(kind="neighbors", queries=nq, k=8,
         dense_queries_per_s=round(nq / dense_s, 1), dense_index=factory, dense_db=len(db),
         bm25_queries_per_s=round(nq / bm_s, 1), bm25_db=len(texts), bm25_build_seconds=round(bm_build, 2),
         bm25_filled=round(float((nb >= 0).mean()), 3),
         note="dense includes embedding the query texts with MiniLM")

    # 5. one document owning 80% of the chunks: search deeper (retry) vs exclude in the search
    class RetryOnly:  # the same BM25 without `can_exclude`
        def search(self, q, k):
            return bm.search(q, k)

    merged = np.where(chunk_doc < chunk_doc[int(0.8 * len(chunk_doc))], 0, chunk_doc)  # still sorted
    nq_big = min(1024, int(0.8 * len(texts)))
    found, secs = {}, {}
    for label, r in (("retry", RetryOnly()), ("exclude", bm), ("retry2", RetryOnly()), ("exclude2", bm)):
        t = time.perf_counter()
        found[label] = compute_neighbors(r, lambda lo, hi: texts[lo:hi], nq_big,
                                         lambda lo, hi: [{int(merged[i])} for i in range(lo, hi)],
                                         merged, 8, tmp / "nh.npy", progress=False)
        secs[label] = time.perf_counter() - t
    retry_s, excl_s = min(secs["retry"], secs["retry2"]), min(secs["exclude"], secs["exclude2"])
    emit(kind="dominant_document", retriever="bm25", queries=nq_big, k=8, doc_share=0.8,
         retry_queries_per_s=round(nq_big / retry_s, 1), exclude_queries_per_s=round(nq_big / excl_s, 1),
         speedup=round(retry_s / excl_s, 2), identical=bool(np.array_equal(found["retry"], found["exclude"])))

    if args.pydocs_build:
        out = tmp / "pydocs-db"
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "retrolm", "db", "build", "--corpus", "builtin:pydocs",
                               "--out", str(out)], capture_output=True, text=True)
        emit(kind="pydocs_build", seconds=round(time.perf_counter() - t, 1), exit_code=proc.returncode,
             stderr_tail=proc.stderr[-300:] if proc.returncode else "")


if __name__ == "__main__":
    main()
