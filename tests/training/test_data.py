"""Data pipeline: formats, assistant-only loss masks, errors, packing, split, deterministic
order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.training.data import IGNORE_INDEX, DataConfig, Example, build_dataset, pack
from edge_sdk.training.errors import DataFormatError, EmptyDatasetError
from edge_sdk.training.tokenizer import LlamaCppTokenizer, load_tokenizer
from tests.tiny_models import write_tiny_gguf


@pytest.fixture(scope="module")
def tok(tiny_gguf: Path) -> LlamaCppTokenizer:
    return load_tokenizer(tiny_gguf)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory: pytest.TempPathFactory) -> LlamaCppTokenizer:
    path = write_tiny_gguf(tmp_path_factory.mktemp("plain") / "plain.gguf", chat_template=None)
    return load_tokenizer(path)


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _scored_text(tok: LlamaCppTokenizer, ids: np.ndarray, labels: np.ndarray) -> list[str]:
    """Decoded runs of consecutive scored tokens."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(tok.decode(cur))
                cur = []
        else:
            assert lab == i
            cur.append(int(i))
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_chat_loss_only_on_assistant_turns(tmp_path: Path, tok: LlamaCppTokenizer) -> None:
    messages = [
        {"role": "system", "content": "be short"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "and the world"},
        {"role": "assistant", "content": "is a world"},
    ]
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    ds = build_dataset(data, tok, DataConfig(seq_len=128, val_fraction=0.0))
    assert ds.train_ids.shape == (1, 128) and len(ds.val_ids) == 0
    runs = _scored_text(tok, ds.train_ids[0], ds.train_labels[0])
    # content + end-of-turn marker (+ the template's newline) of each assistant turn, nothing else
    assert [r.replace(" ", "") for r in runs] == ["helloworld<|im_end|>\n", "isaworld<|im_end|>\n"]
    # the sequence is the template's rendering tokenized in one go, then padding
    full_ids = tok.encode(tok.render_chat(messages, add_generation_prompt=False), add_bos=False)
    assert ds.train_ids[0][: len(full_ids)].tolist() == full_ids
    assert (ds.train_ids[0][len(full_ids) :] == tok.eos_id).all()
    assert (ds.train_labels[0][len(full_ids) :] == IGNORE_INDEX).all()


def test_prompt_tokens_match_inference_tokenization(tmp_path: Path, smollm2_path: Path) -> None:
    tok = load_tokenizer(smollm2_path)
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    data = _jsonl(tmp_path / "c.jsonl", [{"prompt": "What is 2+2?", "completion": "4"}])
    ds = build_dataset(data, tok, DataConfig(seq_len=64, val_fraction=0.0))
    # What llama-cpp-python's create_chat_completion feeds the model for this prompt:
    prompt = tok.render_chat(messages[:1], add_generation_prompt=True)
    prompt_ids = tok._llm.tokenize(prompt.encode(), add_bos=False, special=True)
    ids, labels = ds.train_ids[0], ds.train_labels[0]
    assert ids[: len(prompt_ids)].tolist() == prompt_ids
    assert (labels[: len(prompt_ids)] == IGNORE_INDEX).all()
    assert _scored_text(tok, ids, labels) == ["4<|im_end|>\n"]


def test_instruction_without_template(tmp_path: Path, plain_tok: LlamaCppTokenizer) -> None:
    data = _jsonl(tmp_path / "i.jsonl", [{"prompt": "the world", "completion": " is hello"}])
    ds = build_dataset(data, plain_tok, DataConfig(seq_len=64, val_fraction=0.0))
    ids, labels = ds.train_ids[0], ds.train_labels[0]
    assert ids[0] == plain_tok.bos_id and labels[0] == IGNORE_INDEX
    scored = ids[labels != IGNORE_INDEX]
    assert scored[-1] == plain_tok.eos_id
    assert plain_tok.decode(scored[:-1]).strip() == "is hello"


def test_chat_without_template_is_a_bad_line(tmp_path: Path, plain_tok: LlamaCppTokenizer) -> None:
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    data = _jsonl(tmp_path / "c.jsonl", [{"text": "hello world"}, chat])
    with pytest.raises(
        DataFormatError, match=r"c\.jsonl:2: chat records need the model's chat template"
    ):
        build_dataset(data, plain_tok)
    ds = build_dataset(data, plain_tok, DataConfig(skip_bad=True, val_fraction=0.0))
    assert ds.stats.skipped_bad == 1 and ds.stats.formats == {"text": 1}


def test_template_refusal_names_the_line(tmp_path: Path) -> None:
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = load_tokenizer(write_tiny_gguf(tmp_path / "strict.gguf", chat_template=strict))
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "system", "content": "s"}, *ok["messages"]]}
    data = _jsonl(tmp_path / "d.jsonl", [ok, bad])
    with pytest.raises(DataFormatError, match=r"d\.jsonl:2: .*System role not supported"):
        build_dataset(data, tok)
    assert (
        build_dataset(data, tok, DataConfig(skip_bad=True, val_fraction=0.0)).stats.skipped_bad == 1
    )


def test_plain_text_is_scored_everywhere_and_chunked(
    tmp_path: Path, tok: LlamaCppTokenizer
) -> None:
    long_para = " ".join(["the world is hello"] * 40)
    (tmp_path / "t.txt").write_text(f"hello world\n\n\n{long_para}\n")
    ds = build_dataset(tmp_path / "t.txt", tok, DataConfig(seq_len=32, val_fraction=0.0))
    assert ds.stats.formats == {"text": 2} and ds.stats.truncated == 0
    total = sum(len(tok.encode(p, add_bos=True)) + 1 for p in ("hello world", long_para))
    assert ds.stats.train_tokens == total  # chunked, not truncated: nothing lost
    for ids, labels in zip(ds.train_ids, ds.train_labels):
        real = labels != IGNORE_INDEX
        # every non-pad token but BOS and chunk starts is scored
        assert real.sum() >= (ids != tok.eos_id).sum() - 3


def test_malformed_line_names_file_and_line(tmp_path: Path, tok: LlamaCppTokenizer) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "hello", "completion": "world"})
    path.write_text(f"{good}\n\n{{not json\n{good}\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: invalid JSON"):
        build_dataset(path, tok)
    ds = build_dataset(path, tok, DataConfig(skip_bad=True, val_fraction=0.0))
    assert ds.stats.skipped_bad == 2 and ds.stats.examples == 2
    path.write_text(
        good + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: .*no non-empty assistant"):
        build_dataset(path, tok)
    path.write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    with pytest.raises(DataFormatError, match=r":1: expected `messages`.*got keys: input, output"):
        build_dataset(path, tok)
    path.write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2"):
        build_dataset(path, tok)


def test_empty_dataset_is_a_clear_error(tmp_path: Path, tok: LlamaCppTokenizer) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(EmptyDatasetError, match="no usable training examples in .*empty.jsonl"):
        build_dataset(tmp_path / "empty.jsonl", tok)
    (tmp_path / "junk.jsonl").write_text("nope\n[1]\n")
    with pytest.raises(EmptyDatasetError, match="2 malformed lines skipped"):
        build_dataset(tmp_path / "junk.jsonl", tok, DataConfig(skip_bad=True))
    with pytest.raises(EmptyDatasetError, match="no data files given"):
        build_dataset([], tok)


def test_pack_keeps_examples_whole() -> None:
    exs = [Example(np.arange(1, n + 1), np.ones(n, bool), f"e{n}") for n in (5, 4, 3, 6)]
    packed = pack(exs, seq_len=8, pad_id=0)
    ids, labels, positions = packed.ids, packed.labels, packed.positions
    assert ids.shape == labels.shape == positions.shape == (3, 8)
    assert ids[0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]  # 4 more would not fit
    assert ids[1].tolist() == [1, 2, 3, 4, 1, 2, 3, 0]
    assert labels[1].tolist() == [IGNORE_INDEX, 2, 3, 4, IGNORE_INDEX, 2, 3, IGNORE_INDEX]
    assert (labels != IGNORE_INDEX).sum() == sum(n - 1 for n in (5, 4, 3, 6))
    # Positions restart with every example; padding continues the last one's.
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert positions[1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert positions[2].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="exceeds seq_len"):
        pack([Example(np.arange(9), np.ones(9, bool), "long")], seq_len=8, pad_id=0)


def test_truncation_and_dropping(tmp_path: Path, tok: LlamaCppTokenizer) -> None:
    long_prompt = " ".join(["hello"] * 100)
    data = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "hello", "completion": " ".join(["world"] * 100)},  # truncated, still learns
            {"prompt": long_prompt, "completion": "world"},  # truncation leaves no target: dropped
            {"prompt": "a", "completion": "the world"},
        ],
    )
    ds = build_dataset(data, tok, DataConfig(seq_len=48, val_fraction=0.0))
    assert ds.stats.truncated == 2 and ds.stats.dropped_no_target == 1 and ds.stats.examples == 2


def test_split_and_order_are_seeded(tmp_path: Path, tok: LlamaCppTokenizer) -> None:
    words = ["hello", "world", "the", "a", "is", "of", "and", "to", "in"]
    recs = [{"prompt": w, "completion": f"{w} {v}"} for w in words for v in words[:3]]
    data = _jsonl(tmp_path / "d.jsonl", recs)
    cfg = DataConfig(seq_len=128, val_fraction=0.2, seed=7)
    a, b = build_dataset(data, tok, cfg), build_dataset(data, tok, cfg)
    c = build_dataset(data, tok, DataConfig(seq_len=128, val_fraction=0.2, seed=8))
    assert a.stats.truncated == 0
    assert len(a.val_ids) >= 1 and a.stats.examples == len(recs)
    np.testing.assert_array_equal(a.val_ids, b.val_ids)
    np.testing.assert_array_equal(a.train_ids, b.train_ids)
    assert not np.array_equal(a.val_ids, c.val_ids) or not np.array_equal(a.train_ids, c.train_ids)
    # validation rows never appear among the training rows
    train_rows = {r.tobytes() for r in a.train_ids}
    assert not any(r.tobytes() in train_rows for r in a.val_ids)

    n = len(a.train_ids)
    seen = np.concatenate([a.train_batch(k, 1).ids for k in range(n)])
    assert sorted(r.tobytes() for r in seen) == sorted(r.tobytes() for r in a.train_ids)
    # a batch that straddles the epoch boundary equals the per-position batches
    straddle = a.train_batch(n - 1, 3).ids
    singles = np.concatenate([a.train_batch(k, 1).ids for k in (n - 1, n, n + 1)])
    np.testing.assert_array_equal(straddle, singles)
    assert not np.array_equal(a.train_order(0), a.train_order(1))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="`seq_len` should be an integer >= 2, got 1"):
        DataConfig(seq_len=1)
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=1.0)


# --------------------------------------------------------------------------- .json / .csv files
# A user's first data file is often a JSON array or a spreadsheet export. Reading either as
# plain text trained on its syntax ("1 examples (1 text)"); now each is read as what it
# obviously is, or refused with a one-line error that names the file and the fix.

_PAIRS = [{"prompt": f"hello {w}", "completion": f"{w} world"} for w in "abcd"]


def _formats(path: Path, tok: LlamaCppTokenizer) -> dict[str, int]:
    return build_dataset(path, tok, DataConfig(seq_len=64, val_fraction=0.0)).stats.formats


def test_json_array_of_records_is_read_as_records(tmp_path: Path, tok: LlamaCppTokenizer) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(_PAIRS + [{"text": "some text"}], indent=2))
    assert _formats(path, tok) == {"instruction": 4, "text": 1}
    same = tmp_path / "d.jsonl"
    _jsonl(same, _PAIRS + [{"text": "some text"}])
    a = build_dataset(path, tok, DataConfig(seq_len=64, val_fraction=0.0))
    b = build_dataset(same, tok, DataConfig(seq_len=64, val_fraction=0.0))
    assert (a.train_ids == b.train_ids).all() and (a.train_labels == b.train_labels).all()


def test_json_single_record_and_jsonl_named_json(tmp_path: Path, tok: LlamaCppTokenizer) -> None:
    one = tmp_path / "one.json"
    one.write_text(json.dumps(_PAIRS[0], indent=2))
    assert _formats(one, tok) == {"instruction": 1}
    lines = _jsonl(tmp_path / "lines.json", _PAIRS)  # JSONL under a .json name
    assert _formats(lines, tok) == {"instruction": 4}


def test_json_bad_record_names_its_index(tmp_path: Path, tok: LlamaCppTokenizer) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([_PAIRS[0], {"question": "q", "answer": "a"}]))
    with pytest.raises(
        DataFormatError, match=r"d\.json:\[1\]: expected `messages`.*got keys: answer, question"
    ):
        _formats(path, tok)


@pytest.mark.parametrize(
    "content,match",
    [
        (
            '{"data": [1, 2]}',
            (
                r"d\.json: a JSON object with keys data is not a list of training "
                r"records; pass a JSON array or a \.jsonl file"
            ),
        ),
        ('"just a string"', r"d\.json: expected a JSON array of records, got a JSON str"),
        ("[1, 2", r"d\.json: invalid JSON \(.*\); a \.json data file holds one array of records"),
    ],
)
def test_json_that_is_not_records_is_refused(
    tmp_path: Path, tok: LlamaCppTokenizer, content: str, match: str
) -> None:
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=match) as exc:
        _formats(path, tok)
    assert "\n" not in str(exc.value)


def test_csv_with_prompt_completion_header(tmp_path: Path, tok: LlamaCppTokenizer) -> None:
    path = tmp_path / "d.csv"
    path.write_text(
        'id,prompt,completion\n1,hello a,"a, world"\n2,"multi\nline",b world\n\n3,x,y\n'
    )
    ds = build_dataset(path, tok, DataConfig(seq_len=64, val_fraction=0.0))
    assert ds.stats.formats == {"instruction": 3}
    scored = [
        tok.decode(
            [int(i) for i, lab in zip(ds.train_ids[r], ds.train_labels[r]) if lab != IGNORE_INDEX]
        )
        for r in range(len(ds.train_ids))
    ]
    assert any("a, world" in s for s in scored)  # the quoted comma stays inside the field


def test_tsv_with_text_header(tmp_path: Path, tok: LlamaCppTokenizer) -> None:
    path = tmp_path / "d.tsv"
    path.write_text("text\tsource\nfirst document\tweb\nsecond document\tbook\n")
    assert _formats(path, tok) == {"text": 2}


def test_csv_without_known_columns_is_refused(tmp_path: Path, tok: LlamaCppTokenizer) -> None:
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nwhat,this\n")
    with pytest.raises(
        DataFormatError,
        match=(
            r"d\.csv: a \.csv data file needs a header row with `prompt` and `completion` columns "
            r"or a `text` column, got columns 'question', 'answer'; or convert it to JSONL"
        ),
    ):
        _formats(path, tok)


def test_csv_short_row_names_the_line_and_can_be_skipped(
    tmp_path: Path, tok: LlamaCppTokenizer
) -> None:
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nhello,world\nonly one cell\nhi,there\n")
    with pytest.raises(
        DataFormatError, match=r"d\.csv:3: expected 2 columns as in the header, got 1"
    ):
        _formats(path, tok)
    ds = build_dataset(path, tok, DataConfig(seq_len=64, val_fraction=0.0, skip_bad=True))
    assert ds.stats.skipped_bad == 1 and ds.stats.formats == {"instruction": 2}


def test_jsonl_records_in_a_text_file_are_refused(tmp_path: Path, tok: LlamaCppTokenizer) -> None:
    path = _jsonl(tmp_path / "d.txt", _PAIRS)
    with pytest.raises(
        DataFormatError,
        match=(
            r"d\.txt: holds JSON records but is not named \.jsonl, so it would be trained on as "
            r"plain text; rename it to d\.jsonl"
        ),
    ):
        _formats(path, tok)


def test_plain_text_with_braces_is_still_text(tmp_path: Path, tok: LlamaCppTokenizer) -> None:
    path = tmp_path / "code.txt"
    path.write_text("{ not json at all }\n\nint main() { return 0; }\n")
    assert _formats(path, tok) == {"text": 2}
