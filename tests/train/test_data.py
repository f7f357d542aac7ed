"""Data: row formats, chat templates, completion-only labels, truncation, malformed rows, batching."""

import json

import pytest
import torch
from trainhelp import write_jsonl

from fastalign.train.data import (
    BatchStream,
    DataError,
    Encoder,
    Skipped,
    collate_pref,
    encode_pref_row,
    encode_sft_row,
    load_examples,
)
from fastalign.train.model import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_text_row_masks_the_prompt(tok):
    ids, labels = encode_sft_row(Encoder(tok, 64), {"prompt": "12+34=", "completion": "46"}, "x:1")
    assert ids == [tok.bos_token_id] + ids_of(tok, "12+34=46") + [tok.eos_token_id]
    n_prompt = 1 + len("12+34=")
    assert labels == [-100] * n_prompt + ids_of(tok, "46") + [tok.eos_token_id]


def test_chat_template_rendering_and_masking(tok):
    msgs = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    ids, labels = encode_sft_row(Encoder(tok, 64), {"messages": msgs}, "x:1")
    # the template: <bos><|user|>1+2=<|assistant|>3<eos>, the loss only on "3<eos>"
    assert tok.decode(ids) == "<bos><|user|>1+2=<|assistant|>3<eos>"
    scored = [t for t in labels if t != -100]
    assert tok.decode(scored) == "3<eos>"
    assert labels.index(scored[0]) == len(ids) - 2


def test_preference_chat_rows_with_implicit_prompt(tok):
    user = {"role": "user", "content": "5+5="}
    row = {"chosen": [user, {"role": "assistant", "content": "10"}],
           "rejected": [user, {"role": "assistant", "content": "11"}]}
    c_ids, c_lab, r_ids, r_lab = encode_pref_row(Encoder(tok, 64), row, "x:1")
    assert tok.decode([t for t in c_lab if t != -100]) == "10<eos>"
    assert tok.decode([t for t in r_lab if t != -100]) == "11<eos>"
    assert c_ids[:len(c_ids) - 3] == r_ids[:len(r_ids) - 3]  # the same rendered prompt


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation(tok, mode):
    row = {"prompt": "abcde", "completion": "xyz"}  # 6 + 4 tokens
    ids, labels = encode_sft_row(Encoder(tok, 8, mode), row, "x:1")
    full, full_labels = encode_sft_row(Encoder(tok, 64), row, "x:1")
    assert len(ids) == 8
    expect = slice(-8, None) if mode == "keep_end" else slice(None, 8)
    assert ids == full[expect] and labels == full_labels[expect]


def test_truncating_away_the_completion_is_an_error(tok):
    with pytest.raises(DataError, match=r"f\.jsonl:3: no completion token .* max_length=5"):
        encode_sft_row(Encoder(tok, 5, "keep_start"), {"prompt": "abcdefghij", "completion": "x"}, "f.jsonl:3")


def test_malformed_rows_name_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "completion": "2"}, "{not json",
                                                {"prompt": "1+2="}, [1, 2], {"prompt": 3, "completion": "4"}])
    enc = Encoder(tok, 64)
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON.*--skip-bad-rows"):
        load_examples(path, encode_sft_row, enc, skip_bad_rows=False)
    skipped = Skipped()
    rows = load_examples(path, encode_sft_row, enc, skip_bad_rows=True, skipped=skipped)
    assert len(rows) == 1
    assert [s.split(": ")[0] for s in skipped.rows] == [f"{path}:{i}" for i in (2, 3, 4, 5)]
    assert "missing field 'completion'" in skipped.rows[1] and "JSON object" in skipped.rows[2]
    assert skipped.report().startswith("skipped 4 bad row(s)")


def test_parquet_and_datasets_directory(tmp_path, tok):
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(5)]
    enc = Encoder(tok, 64)
    expect = load_examples(write_jsonl(tmp_path / "a.jsonl", rows), encode_sft_row, enc, False)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert load_examples(str(tmp_path / "a.parquet"), encode_sft_row, enc, False) == expect
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_examples(str(tmp_path / "ds"), encode_sft_row, enc, False) == expect


def test_collate_pref_stacks_chosen_over_rejected(tok):
    ex = [encode_pref_row(Encoder(tok, 64), {"prompt": "1+1=", "chosen": "2", "rejected": "30"}, "x:1")] * 2
    batch = collate_pref(ex, tok.pad_token_id)
    assert batch["input_ids"].shape == (4, len(ex[0][2]))
    assert batch["attention_mask"][:2].sum() == 2 * len(ex[0][0])
    assert (batch["labels"][:2, len(ex[0][0]):] == -100).all()


def test_batch_stream_resumes_and_splits_ranks():
    full = BatchStream(10, seed=3)
    seq = [full.next(4) for _ in range(5)]  # crosses two epoch boundaries
    resumed = BatchStream(10, seed=3, consumed=8)
    assert [resumed.next(4) for _ in range(3)] == seq[2:]
    for epoch in range(2):
        assert sorted(sum(seq, [])[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    ranks = [BatchStream(10, seed=3, rank=r, world=2) for r in range(2)]
    for k in range(5):
        a, b = ranks[0].next(2), ranks[1].next(2)
        assert sorted(a + b) == sorted(seq[k])
    assert torch.equal(torch.tensor(seq[0]), torch.tensor(BatchStream(10, seed=3).next(4)))


def test_undecodable_and_pathological_json_lines_name_file_and_line(tmp_path, tok):
    path = tmp_path / "odd.jsonl"
    good = json.dumps({"prompt": "1+1=", "completion": "2"}).encode()
    path.write_bytes(b"\n".join([good, b'{"prompt": "1+1=\xff", "completion": "2"}',  # not UTF-8
                                 b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # nested too deep
                                 b'{"prompt": ' + b"7" * 5000 + b"}",  # an int too long for Python
                                 b'{"prompt": "1+1=\\ud800", "completion": "2"}',  # a lone surrogate
                                 b'{"prompt": "1+1=\\ud83d\\ude00", "completion": "2"}',  # a surrogate pair: fine
                                 good]) + b"\n")
    enc = Encoder(tok, 64)
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8 \(byte 0xff at column 17\).*--skip-bad-rows"):
        load_examples(str(path), encode_sft_row, enc, skip_bad_rows=False)
    skipped = Skipped()
    assert len(load_examples(str(path), encode_sft_row, enc, skip_bad_rows=True, skipped=skipped)) == 3
    assert [s.split(": ")[0] for s in skipped.rows] == [f"{path}:{i}" for i in (2, 3, 4, 5)]
    assert "nested too deeply" in skipped.rows[1] and "not valid JSON" in skipped.rows[2]
    assert "unpaired surrogate" in skipped.rows[3]


def test_a_corrupt_parquet_row_group_or_file_is_a_data_error(tmp_path, tok):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1) * 9} for i in range(40)]
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(rows), good, row_group_size=20)
    data = bytearray(good.read_bytes())
    chunk = pq.ParquetFile(good).metadata.row_group(1).column(1)  # the second row group's completions
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    for i in range(start + 30, start + chunk.total_compressed_size - 30):
        data[i] = (data[i] * 7 + 13) % 256
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(data))
    enc = Encoder(tok, 64)
    with pytest.raises(DataError, match=rf"{bad}\[row group 1\]: unreadable Parquet row group \(.*\).*--skip-bad"):
        load_examples(str(bad), encode_sft_row, enc, skip_bad_rows=False)
    skipped = Skipped()
    assert len(load_examples(str(bad), encode_sft_row, enc, skip_bad_rows=True, skipped=skipped)) == 20
    assert [s.split(": ")[0] for s in skipped.rows] == [f"{bad}[row group 1]"]
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-30])
    for skip in (False, True):
        with pytest.raises(DataError, match=rf"{cut}: not a readable Parquet file \("):
            load_examples(str(cut), encode_sft_row, enc, skip_bad_rows=skip)
