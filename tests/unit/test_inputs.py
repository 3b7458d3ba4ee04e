"""Input listing for sora-encode: folder + .txt captions, jsonl and csv manifests."""
import json

import pytest

from sora_dist.data.inputs import list_inputs


def test_folder_with_sibling_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.mp4", "a.png", "sub/c.webm", "notes.md", ".hidden.mp4"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "b.txt").write_text("  a caption \n")
    (tmp_path / "sub" / "c.txt").write_text("")
    items = list_inputs(str(tmp_path))
    assert [i.source.split("/")[-1] for i in items] == ["a.png", "b.mp4", "c.webm"]
    assert [i.caption for i in items] == [None, "a caption", ""]


def test_jsonl_relative_paths_and_duplicates(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"path": "v/x.mp4", "caption": "one"}) + "\n\n"
                 + json.dumps({"path": str(tmp_path / "v" / "x.mp4"), "caption": "dup"}) + "\n"
                 + json.dumps({"path": "/abs/y.mp4"}) + "\n")
    items = list_inputs(str(m))
    assert [(i.source, i.caption) for i in items] == [("/abs/y.mp4", None), (str(tmp_path / "v" / "x.mp4"), "one")]


def test_csv(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text('path,caption\nclip.mp4,"a red ball, bouncing"\n')
    [item] = list_inputs(str(m))
    assert item.source == str(tmp_path / "clip.mp4") and item.caption == "a red ball, bouncing"


@pytest.mark.parametrize("name,text,match", [
    ("bad.jsonl", '{"path": "a.mp4"}\n{not json\n', "bad.jsonl:2"),
    ("nopath.jsonl", '{"caption": "x"}\n', "nopath.jsonl:1.*'path'"),
    ("nohdr.csv", "a.mp4,cap\n", "header"),
    ("empty.jsonl", "\n", "lists no inputs"),
])
def test_manifest_errors_name_the_line(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        list_inputs(str(tmp_path / name))


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no video/image files"):
        list_inputs(str(tmp_path))
