"""The server driven by the official `openai` client, and the logprobs/echo it answers."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from retrolm.serve import Engine, ServeLimits, create_app
from test_generate import tiny_model
from test_serve import PROMPT, running_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")
LIMITS = ServeLimits(max_prompt_tokens=64, max_tokens=48)


@pytest.fixture(scope="module")
def engine(tiny_db):
    return Engine(tiny_model(tiny_db.vocab_size, retro=True, seed=4), tiny_db.tokenizer, tiny_db, name="tiny")


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(create_app(engine=engine, limits=LIMITS))


@pytest.fixture(scope="module")
def oai(engine):
    with running_server(create_app(engine=engine, limits=LIMITS)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_openai_models(oai):
    assert [m.id for m in oai.models.list()] == ["tiny"]
    assert oai.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")


def test_openai_plain_and_streamed(oai):
    plain = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                   user="u1", frequency_penalty=0.0, best_of=1)  # ignored fields
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 12
    chunks = list(oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length"


def test_openai_logprobs_echo(oai, engine):
    r = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=3, temperature=0)
    choice = r.choices[0]
    lp = choice.logprobs
    n = len(engine.tokenizer.encode(PROMPT))
    assert choice.text == PROMPT and "".join(lp.tokens) == PROMPT and len(lp.tokens) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) == 3 and max(t.values()) >= x - 1e-5
               for t, x in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]


def test_openai_n_list_and_token_prompts(oai, engine):
    ids = engine.tokenizer.encode(PROMPT)
    r = oai.completions.create(model="tiny", prompt=[PROMPT, "The heron"], n=2, max_tokens=6, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text != r.choices[1].text  # choice c samples with seed + c
    by_ids = oai.completions.create(model="tiny", prompt=[ids], max_tokens=6, temperature=0)
    by_text = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_openai_errors_are_api_errors(oai):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai.completions.create(model="tiny", prompt="otter", max_tokens=10_000)


# ------------------------------------------------------------------ log-probs are the model's


def test_echo_logprobs_equal_full_forward_gpt(tiny_db):
    model = tiny_model(tiny_db.vocab_size, retro=False).double()
    gpt = TestClient(create_app(engine=Engine(model, tiny_db.tokenizer, None), limits=LIMITS))
    ids = tiny_db.tokenizer.encode(PROMPT)
    r = gpt.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1})
    got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    logits, _ = model(torch.tensor([ids]))
    ref = torch.log_softmax(logits[0, :-1].float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert got[0] is None and torch.allclose(torch.tensor(got[1:]), ref, atol=1e-4)


def test_generated_logprobs_match_generation_and_scoring(client, engine):
    """Greedy tokens are the top-1 of their reported distribution, and re-scoring prompt +
    completion as an echoed prompt gives the same values (causal: later tokens change nothing)."""
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 20, "temperature": 0,
                                              "logprobs": 1}).json()["choices"][0]
    lp = r["logprobs"]
    assert "".join(lp["tokens"]) == r["text"] and len(lp["tokens"]) == 20
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert abs(value - max(top.values())) < 1e-4
    ids = engine.tokenizer.encode(PROMPT) + engine.tokenizer.encode(r["text"])
    n_prompt = len(engine.tokenizer.encode(PROMPT))
    scored = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True,
                                                   "logprobs": 1}).json()["choices"][0]["logprobs"]
    assert torch.allclose(torch.tensor(scored["token_logprobs"][n_prompt:]),
                          torch.tensor(lp["token_logprobs"]), atol=1e-4)
    prefix = client.post("/v1/completions", json={"prompt": ids[:30], "max_tokens": 0, "echo": True,
                                                   "logprobs": 1}).json()["choices"][0]["logprobs"]
    assert torch.allclose(torch.tensor(prefix["token_logprobs"][1:]),
                          torch.tensor(scored["token_logprobs"][1:30]), atol=1e-4)


def test_streamed_logprobs_equal_plain(client):
    payload = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0.9, "seed": 2, "logprobs": 2,
               "echo": True}
    plain = client.post("/v1/completions", json=payload).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**payload, "stream": True}) as resp:
        events = [json.loads(b[6:]) for b in resp.read().decode().split("\n\n")[:-2]]
    text = "".join(e["choices"][0]["text"] for e in events)
    tokens = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
    values = [v for e in events for v in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert text == plain["text"] and tokens == plain["logprobs"]["tokens"]
    assert values[0] is None and plain["logprobs"]["token_logprobs"][0] is None
    assert torch.allclose(torch.tensor(values[1:]), torch.tensor(plain["logprobs"]["token_logprobs"][1:]),
                          atol=1e-4)


def test_seed_is_random_unless_given(client):
    payload = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0}
    texts = {client.post("/v1/completions", json=payload).json()["choices"][0]["text"] for _ in range(3)}
    assert len(texts) > 1


def test_tokenizer_endpoints(client, engine):
    ids = client.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()["tokens"]
    assert ids == engine.tokenizer.encode(PROMPT)
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT
    info = client.get("/tokenizer_info").json()
    assert client.post("/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"] == [
        engine.tokenizer.eos_id]
    assert client.post("/detokenize", json={"tokens": [-1]}).status_code == 400
