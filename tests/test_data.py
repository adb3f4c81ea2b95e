"""Data sources: BBC News from its package files, users' CSV/JSONL files, stratified splits."""

import json

import pytest

from ubsmoe.data.bbc_news import load_bbc_news
from ubsmoe.data.dataset import TextDataset, stratified_split
from ubsmoe.data.sources import load_train_test
from ubsmoe.data.text_files import load_text_file


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


def test_missing_column_names_the_columns_and_the_fix(tmp_path):
    (tmp_path / "a.csv").write_text("body,topic\nhello,x\n")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['body', 'topic'\].*data.text_column"):
        load_text_file(tmp_path / "a.csv")


def test_separate_test_file_uses_training_label_numbering(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,pos\nb,neg\n")
    (tmp_path / "test.csv").write_text("text,label\nc,pos\n")
    train, test = load_train_test(str(tmp_path / "train.csv"), 0, test_file=str(tmp_path / "test.csv"))
    assert train.label_names == ["neg", "pos"] and test.labels == [1]


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="unknown dataset 'imdb'"):
        load_train_test("imdb", 0)
