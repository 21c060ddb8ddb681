"""Retro-fitting: retrieval off == the source model (retrolm GPT and HF GPT-2), training the
new parts makes retrieval lower perplexity, frozen weights stay bit-identical, replay."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from retrolm.errors import RetrolmError

M = 16  # chunk size of the test database


pytestmark = pytest.mark.usefixtures("one_thread")


def _env():
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


def twin_corpus(path, n=400, words=50, seed=0):
    """Documents of 50 words drawn from 3 two-letter words each (of 70), plus a db_only twin
    (one word changed) of every document: the neighbours tell which 3 words a document
    uses, the context alone only slowly (a briefly trained GPT has not learnt to copy)."""
    rng = random.Random(seed)
    pool = [a + b for a in "bdfgklmnprstvz" for b in "aeiou"]
    lines = []
    for i in range(n):
        own = rng.sample(pool, 3)
        text = [rng.choice(own) for _ in range(words)]
        twin = list(text)
        twin[rng.randrange(words)] = rng.choice(own)
        lines.append({"id": f"doc{i}", "text": " ".join(text)})
        lines.append({"id": f"twin{i}", "text": " ".join(twin), "db_only": True})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def twin_db(tmp_path_factory):
    from retrolm.db.database import RetrievalDB

    root = tmp_path_factory.mktemp("twins")
    corpus = twin_corpus(root / "corpus.jsonl")
    return RetrievalDB.build(str(corpus), root / "db", retriever="bm25", chunk_size=M,
                             vocab_size=512, neighbors=2, split=(90, 5, 5), progress=False)  # fmt: skip


def _train_cfg(**kw):
    from retrolm.training.trainer import TrainConfig

    base = dict(batch_size=8, seq_len=64, lr=3e-3, progress=False, checkpoint_every=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def gpt_dir(twin_db, tmp_path_factory):
    """A small GPT pretrained briefly on the twin database (no retrieval)."""
    from retrolm.model.config import RetroConfig
    from retrolm.model.retro import Retro
    from retrolm.training.trainer import train

    torch.manual_seed(0)
    config = RetroConfig.from_name("tiny", vocab_size=twin_db.vocab_size, chunk_size=M, n_layers=3,
                                   max_seq_len=64, cca_layers=[])  # fmt: skip
    out = tmp_path_factory.mktemp("gpt") / "run"
    return train(twin_db.path, Retro(config), out, _train_cfg(retrieval=False, tokens=64 * 8 * 40))


@pytest.fixture(scope="module")
def hf_dir(twin_db, tmp_path_factory):
    """A tiny random GPT-2 (transformers) saved as a local HF directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(vocab_size=twin_db.vocab_size, n_positions=128, n_embd=64, n_layer=3,
                        n_head=4, bos_token_id=0, eos_token_id=0)  # fmt: skip
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _batch(db, n=4, seq_len=64):
    from retrolm.db.dataset import RetroDataset

    data = RetroDataset(db, "valid", seq_len, k=2)
    items = [data[i] for i in range(n)]
    return {key: torch.stack([it[key] for it in items]) for key in items[0]}


# -- retrieval off == source --------------------------------------------------------------------


def test_retrieval_off_equals_retrolm_source(gpt_dir, twin_db):
    from retrolm.retrofitting.pipeline import build_retrofit, load_checkpoint

    src = load_checkpoint(gpt_dir).eval()
    model, _ = build_retrofit(gpt_dir, twin_db.vocab_size, M, seed=3)
    model.eval()
    assert model.config.cca_layers and model.encoder is not None
    b = _batch(twin_db)
    with torch.no_grad():
        want = src(b["tokens"])[0]
        off = model(b["tokens"], b["neighbours"], b["neighbour_mask"], retrieval=False)[0]
        assert torch.equal(off, want)
        assert torch.equal(model(b["tokens"])[0], want)
        # zero-initialised CCA outputs: even with retrieval on it starts as the source
        on = model(b["tokens"], b["neighbours"], b["neighbour_mask"])[0]
        assert torch.equal(on, want)
        # once the CCA output is non-zero, retrieval on differs and off still does not
        for block in model.blocks:
            if block.cca is not None:
                torch.nn.init.normal_(block.cca.out.weight, std=0.02)
        assert not torch.allclose(model(b["tokens"], b["neighbours"], b["neighbour_mask"])[0], want)
        assert torch.equal(model(b["tokens"], retrieval=False)[0], want)


def test_retrieval_off_equals_hf_gpt2_source(hf_dir, twin_db, tmp_path):
    from retrolm.checkpoints import save_model
    from retrolm.retrofitting.hf_gpt2 import GPT2Retro
    from retrolm.retrofitting.pipeline import build_retrofit, load_checkpoint

    model, src = build_retrofit(hf_dir, twin_db.vocab_size, M, seed=0)
    assert isinstance(model, GPT2Retro) and model.config.cca_layers == [3]
    model.eval()
    b = _batch(twin_db, n=2, seq_len=96)
    with torch.no_grad():
        want = src(b["tokens"]).logits
        got = model(b["tokens"], b["neighbours"], b["neighbour_mask"], retrieval=False)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        for block in model.blocks:  # retrieval on really changes something once trained
            if block.cca is not None:
                torch.nn.init.normal_(block.cca.out.weight, std=0.02)
        on = model(b["tokens"], b["neighbours"], b["neighbour_mask"])[0]
        assert (on - want)[:, M:].abs().max() > 1e-4
        torch.testing.assert_close(on[:, : M - 1], want[:, : M - 1], rtol=0, atol=1e-5)  # m-1 shift
        # KV-cached decoding over the wrapped GPT-2 agrees with HF's full forward
        logits, cache = model.step(b["tokens"][:, :40])
        logits2, cache = model.step(b["tokens"][:, 40:41], cache)
        torch.testing.assert_close(logits2[:, 0], want[:, 40], rtol=0, atol=1e-5)
    # checkpoint round trip through the ordinary model directory
    save_model(model, tmp_path / "ckpt")
    again = load_checkpoint(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(again(b["tokens"], retrieval=False)[0], model(b["tokens"], retrieval=False)[0])
    # the stages that read checkpoints (generate/serve, eval) rebuild the GPT-2 decoder too
    from retrolm.generation.decode import load_for_generation

    loaded, _, _ = load_for_generation(tmp_path / "ckpt", db=twin_db.path)
    assert isinstance(loaded, GPT2Retro)


def test_hf_source_errors(hf_dir, twin_db, tmp_path):
    from retrolm.retrofitting.pipeline import build_retrofit

    with pytest.raises(RetrolmError, match="vocabulary"):
        build_retrofit(hf_dir, twin_db.vocab_size + 100, M)
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RetrolmError, match="GPT-2"):
        build_retrofit(other, twin_db.vocab_size, M)
    with pytest.raises(RetrolmError, match="does not exist"):
        build_retrofit(tmp_path / "missing", twin_db.vocab_size, M)


def test_new_parameters_are_about_ten_percent_for_cpu_small():
    from retrolm.model.config import RetroConfig
    from retrolm.model.retro import Retro
    from retrolm.retrofitting.pipeline import build_retrofit, parameter_counts

    gpt = Retro(RetroConfig.from_name("cpu-small").as_gpt())
    model, _ = build_retrofit(gpt, gpt.config.vocab_size, 64)
    counts = parameter_counts(model)
    assert counts["decoder"] == gpt.num_params()
    assert counts["total"] == model.num_params()
    assert 0.08 < counts["retrieval_share_of_decoder"] < 0.15  # docs/reference.md §3: ~10% extra
    with pytest.raises(RetrolmError, match="already has CCA"):
        build_retrofit(model, gpt.config.vocab_size, 64)


# -- training ---------------------------------------------------------------------------------------


def test_freeze_decoder_trains_only_retrieval_and_lowers_perplexity(gpt_dir, twin_db, tmp_path):
    from retrolm.retrofitting.pipeline import is_retrieval_parameter, load_checkpoint, retrofit

    report = retrofit(gpt_dir, twin_db.path, tmp_path / "rf", _train_cfg(tokens=64 * 8 * 250),
                      freeze=True, eval_sequences=16)  # fmt: skip
    ppl = report["valid_perplexity"]
    assert ppl["before"]["retrieval_on"] == pytest.approx(ppl["before"]["source"], rel=1e-6)
    assert ppl["after"]["retrieval_off"] == pytest.approx(ppl["before"]["source"], rel=1e-6)
    assert ppl["after"]["retrieval_on"] < ppl["after"]["retrieval_off"]
    # the gain comes from the neighbours' content: another sequence's neighbours help less
    model = load_checkpoint(report["final"]).eval()
    b = _batch(twin_db, n=16)
    wrong = torch.roll(torch.arange(16), 1)
    with torch.no_grad():
        right = model(b["tokens"], b["neighbours"], b["neighbour_mask"], b["targets"])[1]
        shuffled = model(b["tokens"], b["neighbours"][wrong], b["neighbour_mask"][wrong], b["targets"])[1]
    assert right < shuffled - 0.003  # nats per token
    assert report["parameters"]["trainable"] == report["parameters"]["retrieval"]
    # independently of retrofit()'s own check: decoder tensors bitwise equal to the source
    src = dict(load_checkpoint(gpt_dir).named_parameters())
    trained = dict(load_checkpoint(report["final"]).named_parameters())
    init = dict(load_checkpoint(tmp_path / "rf" / "init").named_parameters())
    for name, p in trained.items():
        if is_retrieval_parameter(name):
            assert not torch.equal(p, init[name]), name  # the new parts did train
        else:
            assert torch.equal(p, src[name]), name
    state = json.loads((tmp_path / "rf" / "final" / "trainer_state.json").read_text())
    assert state["schedule"]["start_lr"] == pytest.approx(3e-4)  # re-warm from the new floor


def test_full_training_changes_the_decoder_and_retrieval_helps(gpt_dir, twin_db, tmp_path):
    from retrolm.checkpoints import load_checkpoint
    from retrolm.retrofitting.pipeline import retrofit

    # Full training moves the pretrained decoder too, so the new parts get 3x its LR (the
    # usual recipe for freshly initialised parts). The margin is small (~0.1% perplexity):
    # on twin documents the decoder itself learns each document's 3 words from context.
    cfg = _train_cfg(tokens=64 * 8 * 120, lr=1e-3, retrieval_lr_scale=3.0)
    report = retrofit(gpt_dir, twin_db.path, tmp_path / "rf", cfg, freeze=False, eval_sequences=16)
    ppl = report["valid_perplexity"]["after"]
    assert ppl["retrieval_on"] < ppl["retrieval_off"]
    assert report["parameters"]["trainable"] == report["parameters"]["total"]
    src = load_checkpoint(gpt_dir)
    trained = load_checkpoint(report["final"])
    assert not torch.equal(trained.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_retrofit_opens_the_database_once_and_builds_eval_data_once(gpt_dir, twin_db, tmp_path,
                                                                  monkeypatch):
    import retrolm.db.database as database
    from retrolm.db.dataset import RetroDataset
    from retrolm.retrofitting.pipeline import retrofit

    hashed, valid_sets = [], []
    real_sha, real_init = database.sha256_file, RetroDataset.__init__

    def counting_sha(path):
        hashed.append(path)
        return real_sha(path)

    def counting_init(self, db, split, *args, **kwargs):
        if split == "valid":
            valid_sets.append(split)
        real_init(self, db, split, *args, **kwargs)

    monkeypatch.setattr(database, "sha256_file", counting_sha)
    monkeypatch.setattr(RetroDataset, "__init__", counting_init)
    retrofit(gpt_dir, twin_db.path, tmp_path / "rf", _train_cfg(tokens=64 * 8), freeze=True,
             eval_sequences=2)  # fmt: skip
    files = database.read_manifest(twin_db.path)["files"]
    assert len(hashed) == len(files)  # one sha256 pass: train() uses the opened database
    assert valid_sets == ["valid"]  # one set of valid sequences for the five perplexities


def test_shared_eval_data_gives_the_same_perplexities(gpt_dir, twin_db):
    from retrolm.checkpoints import load_checkpoint
    from retrolm.retrofitting.pipeline import build_retrofit, split_perplexity, valid_sequences

    # CCA not zeroed and k=1 of the 2 stored: the neighbours count, and must be cut to k
    model, _ = build_retrofit(gpt_dir, twin_db.vocab_size, M, n_neighbors=1, zero_init_cca=False)
    src = load_checkpoint(gpt_dir)
    data = valid_sequences(twin_db, 64)
    for net, retrieval in ((src, False), (model, False), (model, True)):
        alone = split_perplexity(net, twin_db, retrieval=retrieval, seq_len=64, max_sequences=6)
        shared = split_perplexity(net, twin_db, retrieval=retrieval, seq_len=64, max_sequences=6,
                                  data=data)  # fmt: skip
        assert shared == pytest.approx(alone, rel=1e-6)
    with_two = split_perplexity(model, twin_db, k=2, seq_len=64, max_sequences=6, data=data)
    assert with_two != pytest.approx(shared, rel=1e-6)  # k really selects the neighbours used
    with pytest.raises(RetrolmError, match="out of range"):
        split_perplexity(model, twin_db, k=3, max_sequences=6, data=data)


# -- replay ------------------------------------------------------------------------------------------


def test_replay_mixes_neighbour_free_sequences(twin_db):
    from retrolm.db.dataset import RetroDataset
    from retrolm.training.replay import ReplayDataset

    base = RetroDataset(twin_db, "train", 64, k=2)
    replay = RetroDataset(twin_db, "train", 64, retrieval=False)
    mixed = ReplayDataset(base, replay, share=0.3, seed=5)
    again = ReplayDataset(base, replay, share=0.3, seed=5)
    assert np.array_equal(mixed.is_replay, again.is_replay)
    assert 0.2 < mixed.is_replay.mean() < 0.4
    for i in range(40):
        item = mixed[i]
        assert item["neighbours"].shape == (64 // M, 2, 2 * M)
        if mixed.is_replay[i]:
            assert not item["neighbour_mask"].any()
            j = int(mixed.replay_index[i])
            assert torch.equal(item["tokens"], replay[j]["tokens"])
        else:
            assert torch.equal(item["tokens"], base[i]["tokens"])
            assert item["neighbour_mask"].any()
    with pytest.raises(RetrolmError):
        ReplayDataset(base, replay, share=1.5)


def test_trainer_replay_wiring(gpt_dir, twin_db, tmp_path):
    from retrolm.db.database import RetrievalDB
    from retrolm.retrofitting.pipeline import build_retrofit, retrofit
    from retrolm.training.trainer import train

    with pytest.raises(RetrolmError, match="replay"):  # no gradient for encoder + CCA
        retrofit(gpt_dir, twin_db.path, tmp_path / "a", _train_cfg(tokens=64, replay_share=0.2),
                 freeze=True)  # fmt: skip
    report = retrofit(gpt_dir, twin_db.path, tmp_path / "b", _train_cfg(tokens=64 * 8 * 2, replay_share=0.5),
                      freeze=False, eval_sequences=2)  # fmt: skip
    state = json.loads((tmp_path / "b" / "final" / "trainer_state.json").read_text())
    assert state["train_config"]["replay_share"] == 0.5 and report["mode"] == "full"
    # the trainer really builds the replay data: a replay database with another vocabulary is refused
    other = RetrievalDB.build(str(twin_corpus(tmp_path / "other.jsonl", n=40)), tmp_path / "other",
                              retriever="bm25", chunk_size=M, vocab_size=300, neighbors=2,
                              split=(90, 5, 5), progress=False)  # fmt: skip
    assert other.vocab_size != twin_db.vocab_size
    model, _ = build_retrofit(gpt_dir, twin_db.vocab_size, M)
    with pytest.raises(RetrolmError, match="replay-db vocabulary"):
        train(twin_db.path, model, tmp_path / "c",
              _train_cfg(tokens=64, replay_share=0.2, replay_db=str(other.path)))  # fmt: skip


# -- CLI -----------------------------------------------------------------------------------------------


def test_cli_retrofit_from_hf(hf_dir, twin_db, tmp_path):
    out = tmp_path / "rf"
    run = subprocess.run(
        [sys.executable, "-m", "retrolm", "retrofit", "--source", str(hf_dir), "--db", str(twin_db.path),
         "--out", str(out), "--tokens", str(64 * 4 * 3), "--batch-size", "4", "--seq-len", "64",
         "--eval-sequences", "4", "--device", "cpu"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "retrofit.json").read_text())
    assert report["source_kind"] == "hf" and report["mode"] == "full"
    assert (out / "final" / "model.safetensors").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "retrolm", "retrofit", "--source", str(tmp_path / "nope"),
         "--db", str(twin_db.path), "--out", str(tmp_path / "x"), "--tokens", "64"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
