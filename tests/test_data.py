"""Data sources: BBC News from its package files, users' CSV/JSONL files, stratified splits."""

import json
import re

import pytest
import torch

from ubsmoe.data.bbc_news import load_bbc_news
from ubsmoe.data.dataset import TextDataset, drop_duplicates, duplicate_key, stratified_split
from ubsmoe.data.sources import load_train_test
from ubsmoe.data.text_files import load_text_file
from ubsmoe.config import ConfigError, load_config
from ubsmoe.engine.experiment import build_experiment

from tiny_experiment import tiny_overrides


def test_bbc_news_has_2225_articles_in_5_topics():
    data = load_bbc_news()
    assert len(data) == 2225
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert [data.labels.count(i) for i in range(5)] == [510, 386, 417, 511, 401]
    assert data.texts[0].startswith("Ad sales boost Time Warner profit")


def test_stratified_split_keeps_label_shares_and_is_seeded():
    data = TextDataset([str(i) for i in range(100)], [i % 4 for i in range(100)], list("abcd"))
    train, test = stratified_split(data, 0.2, seed=1)
    assert len(test) == 20 and [test.labels.count(i) for i in range(4)] == [5] * 4
    assert not set(train.texts) & set(test.texts)
    assert stratified_split(data, 0.2, seed=1)[1].texts == test.texts


def test_csv_and_jsonl_files_load_with_named_columns(tmp_path):
    (tmp_path / "a.csv").write_text("body,topic\nhello world,x\nbye now,y\nagain,x\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t, "topic": y}) for t, y in [("p", 2), ("q", 10)]))
    csv_data = load_text_file(tmp_path / "a.csv", "body", "topic")
    assert csv_data.texts == ["hello world", "bye now", "again"] and csv_data.labels == [0, 1, 0]
    jsonl = load_text_file(tmp_path / "b.jsonl", "body", "topic")
    assert jsonl.label_names == ["2", "10"] and jsonl.labels == [0, 1]  # numeric labels in numeric order


def test_parquet_files_and_json_lists_load_like_the_others(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    rows = [("hello world", "x"), ("bye now", "y"), ("again", "x")]
    parquet.write_table(pyarrow.table({"body": [t for t, _ in rows], "topic": [y for _, y in rows]}), tmp_path / "a.parquet")
    (tmp_path / "a.json").write_text(json.dumps([{"body": t, "topic": y} for t, y in rows]))
    for name in ("a.parquet", "a.json"):
        data = load_text_file(tmp_path / name, "body", "topic")
        assert data.texts == ["hello world", "bye now", "again"] and data.labels == [0, 1, 0]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match="bad.parquet is not a readable Parquet file"):
        load_text_file(tmp_path / "bad.parquet")


def test_missing_column_names_the_columns_and_the_fix(tmp_path):
    (tmp_path / "a.csv").write_text("body,topic\nhello,x\n")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['body', 'topic'\].*data.text_column"):
        load_text_file(tmp_path / "a.csv")


def test_separate_test_file_uses_training_label_numbering(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,pos\nb,neg\n")
    (tmp_path / "test.csv").write_text("text,label\nc,pos\n")
    data = load_train_test(str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.csv"))
    train, test = data.train, data.test
    assert train.label_names == ["neg", "pos"] and test.labels == [1]


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="unknown dataset 'imdb'"):
        load_train_test("imdb")


def assert_no_test_text_in_training(train: TextDataset, test: TextDataset, prefix_words: int) -> None:
    train_keys = {duplicate_key(t, prefix_words) for t in train.texts}
    assert not [t for t in test.texts if duplicate_key(t, prefix_words) in train_keys]
    assert not set(test.texts) & set(train.texts)


def test_bbc_news_duplicates_are_removed_before_the_split_and_no_test_text_is_trained_on():
    """Regression: BBC News holds about 100 repeated articles; 30 test articles were in training."""
    data = load_train_test("bbc_news")

    # 101 articles repeat another word for word; 19 more share their first 40 words with another
    assert data.duplicates_removed == 120
    assert len(data.train) + len(data.test) == 2225 - 120
    assert_no_test_text_in_training(data.train, data.test, prefix_words=40)
    assert load_train_test("bbc_news", dedup_prefix_words=0).duplicates_removed == 101


def test_split_depends_on_split_seed_only(tmp_path):
    """The test split is fixed by ``split_seed``, so seeds of a comparison share one test set."""
    rows = [{"text": f"text number {i}", "label": i % 3} for i in range(60)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    first, again = load_train_test(str(tmp_path / "d.jsonl")), load_train_test(str(tmp_path / "d.jsonl"))
    other = load_train_test(str(tmp_path / "d.jsonl"), split_seed=1)

    assert first.test.texts == again.test.texts
    assert first.test.texts != other.test.texts


def test_experiment_seed_leaves_the_test_set_alone(tiny_bert, tiny_task):
    """Regression: the test split used to move with the training seed, mixing test-set variance into
    the spread over seeds."""
    def test_ids(*extra):
        return build_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task) + list(extra),
                                            method="smoe")).test.input_ids

    assert torch.equal(test_ids("seed=0"), test_ids("seed=3"))
    assert not torch.equal(test_ids("seed=0"), test_ids("seed=0", "data.split_seed=1"))


def test_user_file_duplicates_and_test_file_leaks_are_removed(tmp_path):
    """Whitespace and case variants are one text; a training text that is also in the test file is dropped."""
    texts = ["alpha beta gamma", "alpha  beta\tgamma", "ALPHA beta gamma", "delta epsilon", "zeta eta",
             "theta iota", "kappa lambda", "mu nu", "xi omicron", "pi rho"]
    rows = [{"text": t, "label": ["x", "y"][i % 2]} for i, t in enumerate(texts)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "Delta   epsilon", "label": "y"}))

    split = load_train_test(str(tmp_path / "train.jsonl"), test_fraction=0.25)
    with_file = load_train_test(str(tmp_path / "train.jsonl"), test_file=str(tmp_path / "test.jsonl"))

    assert split.duplicates_removed == 2 and len(split.train) + len(split.test) == 8
    assert_no_test_text_in_training(split.train, split.test, prefix_words=40)
    assert with_file.duplicates_removed == 3 and "delta epsilon" not in with_file.train.texts
    assert with_file.test.texts == ["Delta   epsilon"]
    assert_no_test_text_in_training(with_file.train, with_file.test, prefix_words=40)


def test_drop_duplicates_by_prefix_keeps_the_first():
    data = TextDataset(["a b c d", "a b c e", "a b x"], [0, 1, 0], ["p", "q"])

    whole, removed_whole = drop_duplicates(data)
    prefix, removed_prefix = drop_duplicates(data, prefix_words=3)

    assert removed_whole == 0 and whole.texts == data.texts
    assert removed_prefix == 1 and prefix.texts == ["a b c d", "a b x"] and prefix.labels == [0, 0]


@pytest.mark.parametrize("content, message", [
    ("text,label\n", "holds no records"),
    ("text,label\nhello,a\nbye,a\n", "holds a single class ('a'): a classifier needs at least two"),
    ("text,label\nhello,a\nbye,\nmore,b\n", "1 rows have no 'label' (data rows [2])"),
    ("text,label\nhello,a\n  ,b\nmore,b\n", "1 rows have an empty 'text' (data rows [2])"),
])
def test_bad_user_files_are_refused_naming_the_rows(tmp_path, content, message):
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_test(str(tmp_path / "d.csv"))


def test_tsv_files_a_byte_order_mark_and_non_utf8_bytes(tmp_path):
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"row {i}\t{'ab'[i % 2]}\n" for i in range(10)))
    (tmp_path / "bom.csv").write_bytes("\ufefftext,label\nhello,a\nbye,b\n".encode("utf-8"))
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,a\nbye,b\n".encode("latin-1"))

    assert len(load_train_test(str(tmp_path / "d.tsv")).train) == 8
    assert load_text_file(tmp_path / "bom.csv").texts == ["hello", "bye"]  # the mark is not part of 'text'
    with pytest.raises(ConfigError, match=r"latin.csv is not UTF-8 .*convert it"):
        load_text_file(tmp_path / "latin.csv")


def test_an_empty_test_split_is_refused(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhello,a\nbye,b\n")
    with pytest.raises(ConfigError, match="test split of .* came out empty"):
        load_train_test(str(tmp_path / "d.csv"))


def test_over_long_cells_load_and_are_truncated_by_tokenising(tmp_path):
    """Regression: a cell over csv's default 131,072-character limit stopped the run with a traceback."""
    long_text = "word " * 40_000
    (tmp_path / "d.csv").write_text(f"text,label\n\"{long_text}\",a\nshort,b\n")

    data = load_text_file(tmp_path / "d.csv")

    assert len(data.texts[0]) == len(long_text) and data.labels == [0, 1]


def test_headerless_files_take_column_numbers_and_one_flag_reads_label_tab_sentence(tmp_path):
    (tmp_path / "sst.tsv").write_text("".join(f"{i % 2}\tsentence number {i}\n" for i in range(10)))
    (tmp_path / "other.csv").write_text("".join(f"x,text {i},{'ab'[i % 2]}\n" for i in range(10)))

    glue = load_text_file(tmp_path / "sst.tsv", header=False)
    numbered = load_text_file(tmp_path / "other.csv", text_column="1", label_column="2", header=False)

    assert glue.texts[3] == "sentence number 3" and glue.label_names == ["0", "1"] and glue.labels[3] == 1
    assert numbered.texts[0] == "text 0" and numbered.label_names == ["a", "b"]
    with pytest.raises(ConfigError, match="set data.text_column and data.label_column to numbers"):
        load_text_file(tmp_path / "other.csv", text_column="body", header=False)
