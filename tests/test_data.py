import json

import pytest

from dyco_probe.data import DataError, read_jsonl, synthetic_examples, write_jsonl
from dyco_probe.rewards import accuracy_reward, answers_match, extract_answer, format_reward


def test_export_and_import_round_trip(tmp_path):
    examples = synthetic_examples("test", 4)
    path = write_jsonl(examples, tmp_path / "test.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    record = json.loads(lines[0])
    assert record["conversations"][0]["from"] == "human" and "<image>" in record["conversations"][0]["value"]
    assert (tmp_path / record["image"]).exists()
    back = read_jsonl(path)
    assert [e.id for e in back] == [e.id for e in examples]
    assert [e.answer for e in back] == [e.answer for e in examples]
    assert back[0].problem is not None and back[0].problem.completion == examples[0].completion
    assert back[0].load_images()[0].size == examples[0].load_images()[0].size


def _write(tmp_path, lines):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def _good(tmp_path, name="a.png"):
    from PIL import Image

    Image.new("RGB", (56, 56)).save(tmp_path / name)
    return json.dumps(
        {
            "id": "x",
            "image": name,
            "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "1"}],
        }
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        (
            json.dumps(
                {
                    "id": 1,
                    "image": "missing.png",
                    "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "1"}],
                }
            ),
            "does not exist",
        ),
        (
            json.dumps(
                {
                    "id": 1,
                    "image": "a.png",
                    "conversations": [{"from": "human", "value": "no tag"}, {"from": "gpt", "value": "1"}],
                }
            ),
            "no <image> tag",
        ),
        (json.dumps({"id": 1, "conversations": []}), "no 'image' field"),
        (
            json.dumps(
                {
                    "id": 1,
                    "image": ["a.png", "a.png"],
                    "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "1"}],
                }
            ),
            "1 <image> tags but 2 images",
        ),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [_good(tmp_path), bad])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert f"{path}:2" in str(err.value) and message in str(err.value)
    with pytest.warns(UserWarning, match="skipped 1 bad line"):
        examples = read_jsonl(path, skip_bad=True)
    assert len(examples) == 1 and len(read_jsonl.last_skipped) == 1


def test_answer_extraction_and_rewards():
    good = "<think> a b </think> <answer> 12 </answer>"
    assert extract_answer(good) == "12"
    assert extract_answer("no tags") is None
    assert extract_answer("<answer>1</answer> <answer> 2 </answer>") == "2"
    assert answers_match("12.0", "12") and answers_match(" Red ", "red") and not answers_match("13", "12")
    assert answers_match("-3", "<answer> -3 </answer>")
    assert accuracy_reward([good, "<answer>13</answer>", "x"], ["12", "12", "12"]) == [1.0, 0.0, 0.0]
    assert format_reward([good, "<answer> 12 </answer>", good + " extra"]) == [1.0, 0.0, 0.0]
