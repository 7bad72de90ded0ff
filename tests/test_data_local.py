"""The local generator backend (transformers) on the tiny random model: batched greedy and seeded sampled
generation, JSON openings, the disk cache, and `mule data qa` end to end (a random model writes no valid JSON:
every chunk must be re-asked, then skipped and counted, and nothing kept)."""

from __future__ import annotations

import json

import pytest

from mule.cli import main
from mule.generators import GeneratorConfig, LocalGenerator
from mule.records import QARecord, read_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHATS = [[{"role": "user", "content": "Who wrote the Moomin books?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do the Moomins live?"}],
         [{"role": "user", "content": "Who is Snufkin?"}]]


def local(tiny_model, cache, **kw) -> LocalGenerator:
    return LocalGenerator(GeneratorConfig(backend="local", model=str(tiny_model), max_tokens=8, batch_size=2, **kw),
                          cache)


def test_greedy_batched_and_cached(tiny_model, tmp_path):
    gen = local(tiny_model, tmp_path / "c.jsonl", temperature=0.0)
    done = []
    first = gen.generate(CHATS, progress=False, on_done=lambda i, r: done.append(i))
    assert len(first) == 3 and all(isinstance(r, str) for r in first) and sorted(done) == [0, 1, 2]
    assert gen.generated == 3
    alone = local(tiny_model, None, temperature=0.0).generate(CHATS[:1], progress=False)
    assert alone[0] == first[0]  # greedy: the batch it ran in does not change the text
    again = local(tiny_model, tmp_path / "c.jsonl", temperature=0.0)
    assert again.generate(CHATS, progress=False) == first
    assert again.generated == 0 and again._model is None  # all from the cache: the model was never loaded
    assert again.cache.hits == 3


def test_sampling_is_seeded(tiny_model):
    gen = local(tiny_model, None, temperature=1.0, seed=1)  # no disk cache; one model load for every call
    one = gen.generate(CHATS, progress=False)
    gen.cache._answers.clear()
    assert gen.generate(CHATS, progress=False) == one
    gen.config.seed = 2  # the seed is part of the cache key
    other = gen.generate(CHATS, progress=False)
    gen.config.temperature = 0.0
    greedy = gen.generate(CHATS, progress=False)
    assert one != other and one != greedy and gen.generated == 12


def test_an_opening_is_continued(tiny_model):
    gen = local(tiny_model, None, temperature=0.0)
    chat = CHATS[0] + [{"role": "assistant", "content": '{"qa": [{"question": "'}]
    (reply,) = gen.generate([chat], progress=False)
    assert reply.startswith('{"qa": [{"question": "') and len(reply) > len('{"qa": [{"question": "')


def test_data_qa_with_the_local_backend(tiny_model, tmp_path, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("Tove Jansson wrote the Moomin books. The Moomins live in Moominvalley. " * 3)
    (texts / "b.txt").write_text("Snufkin plays the harmonica.")
    bench = tmp_path / "bench"
    args = ["data", "qa", "-o", str(bench), "--source", str(texts), "generator.backend=local",
            f"generator.model={tiny_model}", "generator.max_tokens=12", "generator.json_retries=1",
            "qa.chunk_tokens=20", "progress=false"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    n = out["chunks"]
    assert n >= 3  # a.txt is cut by the tiny model's tokenizer into chunks of <= 20 tokens
    assert out["counts"]["requests"] == out["counts"]["reasked"] == out["counts"]["skipped_bad_json"] == n
    assert out["written"] == {"train/forget.jsonl": 0}
    assert read_jsonl(bench / "train" / "forget.jsonl", QARecord, allow_empty=True) == []
    manifest = json.loads((bench / "manifest.json").read_text())["files"]["train/forget.jsonl"]
    assert manifest["generator"] == {"backend": "local", "model": str(tiny_model), "temperature": 0.2,
                                     "max_tokens": 12, "seed": 0}
    assert manifest["chunking"]["counted_by"] == str(tiny_model)
    assert main(args) == 0  # the rerun asks nothing: every answer and re-ask from the cache
    assert json.loads(capsys.readouterr().out)["cached_answers_used"] == 2 * n


@pytest.mark.slow
def test_data_qa_keeps_valid_pairs_from_the_embedded_model(tmp_path, capsys):
    """The real SmolLM2-135M-Instruct with configs/data_qa_local.yaml (one request per passage here, to be quick):
    shown a worked example, it writes pairs that pass every check (measured: 2 of the 3 passages)."""
    from pathlib import Path

    from mule.datagen import qa_problem
    from mule.dedup import normalise

    root = Path(__file__).parents[1]
    bench = tmp_path / "bench"
    assert main(["data", "qa", "-c", str(root / "configs" / "data_qa_local.yaml"), "-o", str(bench),
                 f"qa.sources=[{root / 'tests' / 'fixtures' / 'data_texts' / 'hp'}]", "qa.requests_per_passage=1",
                 "progress=false"]) == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    records = read_jsonl(bench / "train" / "forget.jsonl", QARecord, allow_empty=True)
    assert counts["requests"] == 3 and counts["kept"] == len(records) >= 1
    for r in records:
        passage = (root / "tests" / "fixtures" / "data_texts" / "hp" / r.source).read_text()
        assert qa_problem(r.question, r.answer, 30) is None
        assert set(normalise(r.answer).split()) <= set(normalise(passage).split())
    dropped = (bench / "data" / "qa_dropped.jsonl").read_text().splitlines()
    assert len(dropped) == sum(counts["dropped"].values())  # every pair not kept is written with its reason


def test_serve_answers_chat_completions_with_a_local_model(tiny_model, tmp_path):
    """`python -m mule.serve`'s handler behind a real loopback socket, asked by mule's endpoint generator."""
    import threading
    from http.server import HTTPServer

    from mule.generators import EndpointGenerator
    from mule.serve import make_handler

    server = HTTPServer(("127.0.0.1", 0), make_handler(local(tiny_model, None), threading.Lock()))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        gen = EndpointGenerator(GeneratorConfig(base_url=url, model="tiny", temperature=0.0, max_tokens=8), None)
        shot = [CHATS[1][0], {"role": "user", "content": "Who wrote Anne of Green Gables?"},
                {"role": "assistant", "content": "Lucy Maud Montgomery."}, CHATS[0][0]]  # a worked example first
        replies = gen.generate([*CHATS, shot], progress=False)
        assert replies == local(tiny_model, None, temperature=0.0).generate([*CHATS, shot], progress=False)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
