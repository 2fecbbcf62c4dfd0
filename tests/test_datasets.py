"""Dataset loaders: the official VQA files, JSONL, easy-VQA; subsampling; malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from catp.evaluation.datasets import DATASETS, Question, load_dataset, register_dataset, subsample


@pytest.fixture
def coco(tmp_path: Path) -> dict[str, Path]:
    """A 3-question VQAv2-format dataset on 2 COCO-named images."""
    images = tmp_path / "val2014"
    images.mkdir()
    for image_id in (42, 7):
        Image.new("RGB", (8, 8), "red").save(images / f"COCO_val2014_{image_id:012d}.jpg")
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What color?", "question_id": 420},
        {"image_id": 42, "question": "How many?", "question_id": 421},
        {"image_id": 7, "question": "Is it red?", "question_id": 70},
    ]}
    annotations = {"annotations": [
        {"question_id": qid, "image_id": iid, "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]}
        for qid, iid, answers in ((420, 42, ["red"] * 10), (421, 42, ["2"] * 9 + ["two"]), (70, 7, ["yes"] * 10))
    ]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations, indent=1))
    return {"questions": tmp_path / "q.json", "annotations": tmp_path / "a.json", "images": images}


@pytest.mark.parametrize("name", ["vqav2", "ok-vqa"])
def test_official_vqa_files(coco, name):
    questions = load_dataset(name, **coco)
    assert [q.id for q in questions] == ["420", "421", "70"]
    assert questions[1].answers == ("2",) * 9 + ("two",)
    assert questions[2].load_image().size == (8, 8)


def test_malformed_json_names_file_and_line(coco):
    text = coco["annotations"].read_text().splitlines()
    text[5] = text[5] + ","  # a stray comma on line 6
    coco["annotations"].write_text("\n".join(text))
    with pytest.raises(ValueError, match=r"a\.json:\d+:\d+: invalid JSON"):
        load_dataset("vqav2", **coco)


def test_bad_record_names_file_and_record(coco):
    data = json.loads(coco["questions"].read_text())
    del data["questions"][1]["question"]
    coco["questions"].write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"q\.json: questions\[1\]: missing field 'question'"):
        load_dataset("vqav2", **coco)


def test_missing_image_and_missing_path(coco, tmp_path):
    (coco["images"] / "COCO_val2014_000000000007.jpg").unlink()
    with pytest.raises(ValueError, match=r"questions\[2\]: image_id 7 has no image"):
        load_dataset("vqav2", **coco)
    with pytest.raises(ValueError, match="needs --annotations"):
        load_dataset("vqav2", questions=coco["questions"], images=coco["images"])


def _jsonl(tmp_path: Path, lines: list[str]) -> Path:
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl(tmp_path):
    path = _jsonl(tmp_path, [json.dumps({"image": "img.png", "question": "q?", "answers": ["a"]}), "",
                             json.dumps({"id": "x", "image": str(tmp_path / "img.png"), "question": "r?", "answers": ["b", "c"]})])
    questions = load_dataset(str(path))
    assert [(q.id, q.question, q.answers) for q in questions] == [("1", "q?", ("a",)), ("x", "r?", ("b", "c"))]
    assert questions[0].load_image().mode == "RGB"


@pytest.mark.parametrize(("line", "message"), [
    ('{"image": "img.png", "question": "q?", "answers": ["a"]', "invalid JSON"),
    ('{"image": "img.png", "answers": ["a"]}', "missing field 'question'"),
    ('{"image": "img.png", "question": "q?", "answers": []}', "'answers' must be a non-empty list"),
    ('{"image": "img.png", "question": "q?", "answers": "a"}', "'answers' must be a non-empty list"),
    ('{"image": "nope.png", "question": "q?", "answers": ["a"]}', "does not exist"),
    ('["img.png", "q?"]', "expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"image": "img.png", "question": "q?", "answers": ["a"]})
    path = _jsonl(tmp_path, [good, good, line])
    with pytest.raises(ValueError, match=rf"data\.jsonl:3: .*{message}"):
        load_dataset("jsonl", questions=path)


def test_duplicate_ids(tmp_path):
    line = json.dumps({"id": 1, "image": "img.png", "question": "q?", "answers": ["a"]})
    with pytest.raises(ValueError, match="duplicate question id '1'"):
        load_dataset("jsonl", questions=_jsonl(tmp_path, [line, line]))


def test_easy_vqa_test_split():
    questions = load_dataset("easy-vqa")
    assert len(questions) == 9673
    assert questions[0] == Question("test/0", questions[0].question, questions[0].answers, questions[0].image, "test/0")
    assert questions[1].image_key == "test/0"  # about 10 questions per image
    validation = load_dataset("easy-vqa", split="validation")
    assert len(validation) == 3888 and {q.image_key for q in validation} == {f"validation/{i}" for i in range(3600, 4000)}
    assert len(questions[0].answers) == 1 and questions[0].load_image().size[0] > 0


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        load_dataset("coco")


def test_subsample_is_deterministic_and_order_free():
    questions = [Question(str(i), "q", ("a",), "x.png") for i in range(1000)]
    tenth = subsample(questions, 0.1, seed=3)
    assert len(tenth) == 100 and tenth == subsample(questions, 0.1, seed=3)
    assert [q.id for q in tenth] == sorted((q.id for q in tenth), key=int)  # original order kept
    assert {q.id for q in subsample(questions[::-1], 0.1, seed=3)} == {q.id for q in tenth}
    assert {q.id for q in subsample(questions, 0.1, seed=4)} != {q.id for q in tenth}
    assert len(subsample(questions[:3], 0.01)) == 1
    with pytest.raises(ValueError):
        subsample(questions, 0.0)
    with pytest.raises(ValueError):
        subsample(questions, 1.5)


def test_a_new_dataset_is_a_few_lines(tmp_path):
    @register_dataset("constant")
    def load_constant(**_):
        return [Question("0", "what?", ("this",), Image.new("RGB", (4, 4)))]

    try:
        assert load_dataset("constant")[0].load_image().size == (4, 4)
    finally:
        del DATASETS["constant"]


def test_a_validation_split_is_carved_by_image():
    from catp.evaluation.datasets import split_by_image

    questions = [Question(f"q{i}", "what?", ("a",), "x.png", f"img{i % 7}") for i in range(70)]
    rest, held = split_by_image(questions, 0.3, seed=1)
    assert len(rest) + len(held) == 70 and held and rest
    assert not {q.image_key for q in rest} & {q.image_key for q in held}  # no image on both sides
    assert split_by_image(questions, 0.3, seed=1) == (rest, held)
    tiny = questions[:2]
    assert [len(part) for part in split_by_image(tiny, 0.01)] == [1, 1]  # one image each side, even at a tiny share
    with pytest.raises(ValueError, match="val fraction must be in"):
        split_by_image(questions, 1.0)
