"""`emgeo serve` with several named variants: requests of different variants share one
generate call (per-row steering) and get what their variant's steering gives alone, a new
mix does not recompile, seeded sampled requests batched with other traffic equal their solo
`generate`, `stream: true` deltas join to the non-streamed reply (through the official
`openai` client too), unknown models get a 404, and `--variant` is checked before the model
loads. Tiny random Llama (`tiny_chat_llama`), a few tokens per request."""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from emgeo_jax.generate import chat_token_ids, generate, generate_ids
from emgeo_jax.generate.loop import decode
from emgeo_jax.models.steering import Steering
from emgeo_jax.serve import ModelServer, serve_in_thread, text_deltas
from tests.cli_util import run_emgeo, start_serve
from tests.tiny_models import LLAMA

NEW = 5
TOP = 20  # the server always computes the top 20; references do too (same compiled program)
CHAT = [{"role": "user", "content": "hello, how are you doing today?"}]
OTHER = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def steerings(tiny_chat_llama):
    lm = tiny_chat_llama
    rng = np.random.default_rng(0)
    up = Steering.addition(lm, rng.normal(size=lm.config.hidden_size), [1], 8.0)
    cut = Steering.ablation(lm, rng.normal(size=(2, lm.config.hidden_size)), [0, 2])
    return {"base": None, "up": up, "cut": cut.at_positions("generated")}


@pytest.fixture(scope="module")
def server(tiny_chat_llama, steerings):
    with serve_in_thread(tiny_chat_llama, variants=steerings, batch_wait=1.0) as s:
        yield s


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def concurrently(*calls):
    """Run the calls on threads at once (they queue within the worker's batch_wait); their
    results in order."""
    out: list = [None] * len(calls)

    def run(i):
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def greedy(server, model, chat=CHAT):
    def call():
        r = client(server).chat.completions.create(
            model=model, messages=chat, max_tokens=NEW, temperature=0
        )
        return r.choices[0].message.content

    return call


def test_variants_batched_in_one_call_equal_solo_and_mix_does_not_recompile(
    tiny_chat_llama, steerings, server
):
    lm = tiny_chat_llama
    ids = chat_token_ids(lm.tokenizer, [CHAT], None)
    solo = {
        name: generate_ids(
            lm, ids, steering, max_new_tokens=NEW, temperature=0.0, top_logprobs=TOP
        ).texts[0]
        for name, steering in steerings.items()
    }
    assert len(set(solo.values())) == 3  # the test can tell the variants apart
    calls = server.worker.generate_calls
    got = concurrently(greedy(server, "base"), greedy(server, "up"))
    assert got == [solo["base"], solo["up"]]
    assert server.worker.generate_calls == calls + 1  # one call for both variants
    programs = decode._cache_size()
    got = concurrently(greedy(server, "cut"), greedy(server, "up"))  # another mix, 2 rows
    assert got == [solo["cut"], solo["up"]]
    assert server.worker.generate_calls == calls + 2
    assert decode._cache_size() == programs  # the new mix reused the compiled program


def test_seeded_sample_batched_with_other_traffic_equals_alone_and_generate(
    tiny_chat_llama, steerings, server
):
    lm = tiny_chat_llama
    kw = dict(max_tokens=NEW, temperature=1.0, top_p=0.9)

    def sample(model, chat, n, seed=None):
        def call():
            r = client(server).chat.completions.create(
                model=model, messages=chat, n=n, seed=seed, **kw
            )
            return [c.message.content for c in r.choices]

        return call

    calls = server.worker.generate_calls
    mine, other, unseeded = concurrently(
        sample("up", CHAT, 2, seed=11), sample("base", OTHER, 3, seed=5), sample("up", CHAT, 1)
    )
    assert server.worker.generate_calls == calls + 1  # three sampled requests, one call
    alone = sample("up", CHAT, 2, seed=11)()
    ref = generate(
        lm, [CHAT, CHAT], steerings["up"], max_new_tokens=NEW, temperature=1.0, top_p=0.9,
        seed=11, top_logprobs=TOP,
    )  # fmt: skip
    assert mine == alone == ref.texts
    assert mine[0] != mine[1]  # each lane draws its own noise
    ref = generate(
        lm, [OTHER] * 3, None, max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=5,
        top_logprobs=TOP,
    )  # fmt: skip
    assert other == ref.texts
    assert len(unseeded) == 1


def collect(chunks, n):
    """Content, logprob entries, finish reasons per choice index, and the usage chunk."""
    text, lps, finish, usage = [""] * n, [[] for _ in range(n)], [None] * n, None
    roles = [0] * n
    for ch in chunks:
        if not ch.choices:
            usage = ch.usage
            continue
        (c,) = ch.choices
        if c.delta.role == "assistant":
            roles[c.index] += 1
        text[c.index] += c.delta.content or ""
        if c.logprobs is not None:
            lps[c.index] += c.logprobs.content
        if c.finish_reason:
            finish[c.index] = c.finish_reason
    assert roles == [1] * n
    return text, lps, finish, usage


@pytest.mark.parametrize("n,temperature", [(1, 0.0), (2, 1.0)])
def test_stream_joins_to_the_completion(server, n, temperature):
    c = client(server)
    kw = dict(
        model="up", messages=CHAT, max_tokens=NEW, temperature=temperature, n=n, seed=3,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    whole = c.chat.completions.create(**kw)
    chunks = list(
        c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert all(ch.object == "chat.completion.chunk" and ch.model == "up" for ch in chunks)
    text, lps, finish, usage = collect(chunks, n)
    assert text == [ch.message.content for ch in whole.choices]
    assert finish == [ch.finish_reason for ch in whole.choices]
    for got, ch in zip(lps, whole.choices, strict=True):
        assert [e.model_dump() for e in got] == [e.model_dump() for e in ch.logprobs.content]
    assert usage.model_dump() == whole.usage.model_dump()
    assert chunks[-1].choices == []  # the usage chunk comes last


def test_stream_wire_format(server):
    body = {"model": "base", "messages": CHAT, "max_tokens": NEW, "temperature": 0, "stream": True}
    req = urllib.request.Request(
        server.base_url + "/chat/completions", json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in ch for ch in chunks)  # include_usage not asked
    code, err = post(server, {**body, "number_logprobs": True, "max_tokens": 1})
    assert code == 400 and "stream" in err["error"]["message"]


def test_text_deltas_hold_back_incomplete_characters(chat_tokenizer):
    tok = chat_tokenizer
    text = "café ☕ and 日本, ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens

    def dec(t):
        return tok.decode(list(t), skip_special_tokens=True)

    assert any(dec(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))  # a split char
    pieces = text_deltas(ids, dec(ids), dec)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert text_deltas([], "", dec) == []
    rng = np.random.default_rng(0)
    for _ in range(20):  # random token soups, special tokens included: still exact
        ids = rng.integers(0, len(tok), size=int(rng.integers(1, 40))).tolist()
        pieces = text_deltas(ids, dec(ids), dec)
        assert "".join(pieces) == dec(ids) and len(pieces) == len(ids)
    calls = []

    def nonlocal_decode(t):  # a decoder whose text of a window disagrees with the whole
        calls.append(len(t))
        return dec(t) if len(t) == len(ids) or t[:1] == ids[:1] else "#" + dec(t)

    ids = tok.encode(text * 3, add_special_tokens=False)
    pieces = text_deltas(ids, dec(ids), nonlocal_decode)
    assert "".join(pieces) == dec(ids) and not any("#" in p for p in pieces)


def post(server, body):
    req = urllib.request.Request(
        server.base_url + "/chat/completions", json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_number_logprobs_of_two_variants_in_one_call(tiny_chat_llama, steerings, server):
    """number_logprobs requests of two variants share one call and equal a direct call with
    each variant's steering."""
    from emgeo_jax.generate import number_logprobs, number_trie
    from emgeo_jax.serve import TokenText

    lm = tiny_chat_llama
    trie = number_trie(lm.tokenizer, lm.config.vocab_size, TokenText(lm.tokenizer).bytes)
    ids = chat_token_ids(lm.tokenizer, [CHAT], None)
    body = {"messages": CHAT, "max_tokens": 1, "temperature": 0, "number_logprobs": True}
    calls = server.worker.number_calls
    replies = concurrently(
        *(lambda m=m: post(server, {**body, "model": m}) for m in ("base", "up"))
    )
    assert server.worker.number_calls == calls + 1
    for (code, reply), name in zip(replies, ("base", "up"), strict=True):
        assert code == 200, reply
        ref = number_logprobs(lm, ids, trie, steerings[name])
        got = [g["logprob"] for g in reply["choices"][0]["number_logprobs"]]
        np.testing.assert_allclose(got, ref.logprobs[0], atol=1e-5)
    assert (
        replies[0][1]["choices"][0]["number_logprobs"]
        != replies[1][1]["choices"][0]["number_logprobs"]
    )


def test_models_list_and_unknown_model(server):
    c = client(server)
    models = c.models.list().data
    assert [m.id for m in models] == ["base", "up", "cut"]
    assert all(m.model_extra["capabilities"] == ["number_logprobs"] for m in models)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=CHAT, max_tokens=1)
    err = e.value.body
    assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
    assert "base, up, cut" in err["message"]


def test_one_variant_accepts_any_model(tiny_chat_llama):
    with serve_in_thread(tiny_chat_llama, variants={"only": None}) as s:
        code, reply = post(s, {"model": "whatever", "messages": CHAT, "max_tokens": 1})
        assert code == 200 and reply["model"] == "only"
    with pytest.raises(ValueError, match="not both"):
        ModelServer(tiny_chat_llama, Steering.none(tiny_chat_llama), variants={"a": None})


# --- the command ----------------------------------------------------------------------------


def test_parse_variant():
    from emgeo_jax.cli.serve import VariantSpec, parse_variant, parse_variants

    assert parse_variant("base=none") == VariantSpec("base")
    assert parse_variant("evil=dir/v.npy:15:-4.5") == VariantSpec("evil", "dir/v.npy", 15, -4.5)
    assert parse_variant("w=C:/v.npy:2:1") == VariantSpec("w", "C:/v.npy", 2, 1.0)
    bad = {
        "evil": "NAME=FILE:LAYER:SCALE",
        "=none": "NAME=FILE:LAYER:SCALE",
        "e=v.npy:4": "NAME=FILE:LAYER:SCALE",
        "e=v.npy:x:1": "LAYER 'x' is not an integer",
        "e=v.npy:1:big": "SCALE 'big' is not a number",
        "e=v.npy:1:inf": "not finite",
        "a b=none": "whitespace",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match="--variant") as e:
            parse_variant(text)
        assert message in str(e.value), text
    with pytest.raises(ValueError, match="'a' is given twice"):
        parse_variants(["a=none", "a=v.npy:1:2"])


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory, chat_tokenizer):
    d = tmp_path_factory.mktemp("serve_cli")
    cfg = {**LLAMA, "vocab_size": len(chat_tokenizer), "architectures": ["LlamaForCausalLM"]}
    (d / "config.json").write_text(json.dumps(cfg))
    np.save(d / "v.npy", np.ones(LLAMA["hidden_size"], np.float32))
    return d


def test_variant_checks_before_model_loads(config_folder):
    """The folder has a config and no weights: each error comes before any model loads."""
    d = config_folder
    model = f"--model={d}"
    err = run_emgeo("serve", model, f"--variant=a={d / 'v.npy'}:7:2", "--port=0", status=2)
    assert "--variant a: layer 7 out of range" in err and err.count("\n") <= 2
    err = run_emgeo("serve", model, "--variant=a=none", f"--steer={d / 'v.npy'}", status=2)
    assert "--variant" in err and "--steer" in err


def test_emgeo_serve_lists_its_variants(tmp_path, chat_tokenizer):
    """`emgeo serve --variant ...` as a real process: /v1/models names the variants."""
    from tests.tiny_models import hf_model, save_hf_folder

    spec = dict(LLAMA, vocab_size=len(chat_tokenizer))
    folder = save_hf_folder(hf_model(spec, seed=2), tmp_path / "m")
    chat_tokenizer.save_pretrained(str(folder))
    np.save(tmp_path / "v.npy", np.ones(LLAMA["hidden_size"], np.float32))
    args = ["--variant=base=none", f"--variant=up={tmp_path / 'v.npy'}:1:4", "--port=0"]
    proc, url = start_serve(f"--model={folder}", *args)
    try:
        with urllib.request.urlopen(url + "/models", timeout=60) as r:
            assert [m["id"] for m in json.load(r)["data"]] == ["base", "up"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
