import json

import pytest

from retrolm.errors import RetrolmError
from retrolm.qa.data import (
    Passage,
    load_qa_jsonl,
    rag_prompt,
    reorder_passages,
    retro_plus_plus_template,
)


def test_load_qa_jsonl_roundtrip(tmp_path):
    p = tmp_path / "qa.jsonl"
    rows = [
        {"question": "Who?", "answers": ["A", "B"], "entity": "E"},
        {"question": "When?", "answers": ["1900"], "passages": [{"title": "T", "text": "x"}]},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_qa_jsonl(p)
    assert [i.question for i in items] == ["Who?", "When?"]
    assert items[0].answers == ["A", "B"] and items[0].passages is None
    assert items[0].extra == {"entity": "E"}
    assert items[1].passages == [Passage("T", "x")]


@pytest.mark.parametrize(
    "line",
    [
        "{not json",
        json.dumps({"answers": ["a"]}),
        json.dumps({"question": "q", "answers": []}),
        json.dumps({"question": "q", "answers": "a"}),
        json.dumps({"question": "q", "answers": ["a"], "passages": [{"title": "t"}]}),
        json.dumps(["q"]),
    ],
)
def test_load_qa_jsonl_malformed_line_number(tmp_path, line):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"question": "ok", "answers": ["y"]}) + "\n" + line + "\n")
    with pytest.raises(RetrolmError, match=r"bad\.jsonl:2"):
        load_qa_jsonl(p)


def test_load_qa_jsonl_missing_or_empty(tmp_path):
    with pytest.raises(RetrolmError, match="not found"):
        load_qa_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(RetrolmError, match="no items"):
        load_qa_jsonl(tmp_path / "e.jsonl")


def test_reorder_strongest_at_both_ends():
    assert reorder_passages([1, 2, 3, 4, 5, 6]) == [1, 3, 5, 6, 4, 2]
    assert reorder_passages([1, 2, 3, 4, 5]) == [1, 3, 5, 4, 2]
    assert reorder_passages([1]) == [1]
    assert reorder_passages([]) == []


def test_templates():
    assert (
        retro_plus_plus_template("T", "S", "Q?", "A")
        == "title: T, source: S\n question: Q?\n answer: A"
    )
    assert retro_plus_plus_template("T", "S", "Q?").endswith("answer: ")
    prompt = rag_prompt([Passage("P1", "one"), Passage("P2", "two")], "Q?")
    assert prompt.index("one") < prompt.index("two") < prompt.index("question: Q?")
    assert prompt.endswith("answer:")
