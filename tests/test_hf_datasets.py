"""``--dataset hf:NAME``: save_to_disk directories and parquet files in both answer layouts
give the same questions, and the same ``catp eval`` results, as the equivalent JSONL; splits,
columns, lazy images, and bad rows named by dataset, split, row and column. All offline:
the datasets are built here."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import datasets
import pytest
from PIL import Image
from test_eval import FAST, _records, jsonl_dataset, model_dir, said  # noqa: F401 (fixtures)
from typer.testing import CliRunner

from catp.cli.app import app
from catp.evaluation import harness
from catp.evaluation import hf_datasets as hf
from catp.evaluation.datasets import DatasetError, Question, load_dataset
from catp.extras import MissingExtraError

# Two methods at keep 4 and 2 (FAST): enough to compare runs, quick on the tiny model.
SWEEP = [*FAST, "--methods", "catp,random", "--batch-size", "3"]
LAYOUTS = ("strings", "records")
FORMS = ("save_to_disk", "parquet")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep the arrow cache that load_dataset writes for parquet inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def questions(jsonl_dataset) -> list[Question]:  # noqa: F811
    return load_dataset(str(jsonl_dataset))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _table(questions: list[Question], layout: str) -> datasets.Dataset:
    """The JSONL's questions as a dataset.

    ``strings``: ``answers`` a list of str, ``id``. ``records``: the VQAv2 parquet layout,
    ``answers`` a list of ``{"answer", "answer_id"}`` records next to a (here wrong)
    ``multiple_choice_answer`` string that must lose, and ``question_id``.
    """
    images = [q.load_image() for q in questions]
    texts = [q.question for q in questions]
    if layout == "strings":
        features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                      "answers": datasets.List(datasets.Value("string")), "id": datasets.Value("string")})
        columns = {"image": images, "question": texts, "answers": [list(q.answers) for q in questions], "id": [q.id for q in questions]}
    else:
        record = {"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"), "answer_id": datasets.Value("int64")}
        features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                      "multiple_choice_answer": datasets.Value("string"),
                                      "answers": datasets.List(record), "image": datasets.Image()})
        columns = {"question_id": [q.id for q in questions], "question": texts, "multiple_choice_answer": ["wrong"] * len(questions),
                   "answers": [[{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(q.answers)]
                               for q in questions],
                   "image": images}
    return datasets.Dataset.from_dict(columns, features=features)


def _write(table: datasets.Dataset, form: str, folder: Path) -> Path:
    """``save_to_disk`` as a DatasetDict with one ``validation`` split, or one parquet file."""
    folder.mkdir(parents=True, exist_ok=True)
    if form == "save_to_disk":
        path = folder / "saved"
        if path.exists():
            shutil.rmtree(path)
        datasets.DatasetDict(validation=table).save_to_disk(str(path))
    else:
        path = folder / "vqa.parquet"
        table.to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def written(questions, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("hf")
    return {(form, layout): _write(_table(questions, layout), form, root / f"{form}-{layout}") for form in FORMS for layout in LAYOUTS}


@pytest.fixture(scope="module")
def jsonl_run(model_dir, jsonl_dataset, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("jsonl") / "run"
    _eval(model_dir, str(jsonl_dataset), out)
    return out


def _eval(model: Path, dataset: str, out: Path, *extra: str, code: int = 0):
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--dataset", dataset, "--out", str(out), *SWEEP, *extra])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


# -- same questions, same results as the JSONL -------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("form", FORMS)
def test_layouts_give_the_jsonl_questions(written, questions, form, layout):
    loaded = load_dataset(f"hf:{written[form, layout]}")
    assert [(q.id, q.question, q.answers) for q in loaded] == [(q.id, q.question, q.answers) for q in questions]
    assert [q.load_image().tobytes() for q in loaded] == [q.load_image().tobytes() for q in questions]


@pytest.mark.parametrize(("form", "layout"), [("save_to_disk", "strings"), ("parquet", "records")])
def test_eval_summary_equals_the_jsonl_run(written, model_dir, jsonl_run, tmp_path, form, layout):  # noqa: F811
    out = tmp_path / "run"
    _eval(model_dir, f"hf:{written[form, layout]}", out)
    assert _records(out) == _records(jsonl_run)
    mine, theirs = (json.loads((run / "summary.json").read_text()) for run in (out, jsonl_run))
    assert mine["rows"] == theirs["rows"] and mine["comparisons"] == theirs["comparisons"]
    assert mine["run"]["dataset"] == f"hf:{written[form, layout]}"


def test_fraction_and_limit_pick_the_same_questions_as_the_jsonl(written, jsonl_dataset):  # noqa: F811
    from catp.evaluation.datasets import subsample

    for fraction, seed in ((0.5, 0), (0.3, 7)):
        hf_ids = [q.id for q in harness.order_questions(subsample(load_dataset(f"hf:{written['parquet', 'records']}"), fraction, seed), seed)[:2]]
        jsonl_ids = [q.id for q in harness.order_questions(subsample(load_dataset(str(jsonl_dataset)), fraction, seed), seed)[:2]]
        assert hf_ids == jsonl_ids


# -- columns, ids, image encodings, laziness ---------------------------------------------

def test_the_readme_lists_the_default_columns():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for role, names in hf.DEFAULT_COLUMNS.items():
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{role}` |"))
        assert re.findall(r"`([^`]+)`", row.split("|")[2]) == list(names), row


def _parquet(tmp_path: Path, columns: dict, features: datasets.Features | None = None, name: str = "data.parquet") -> str:
    path = tmp_path / name
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return f"hf:{path}"


def test_ids_come_from_question_id_then_id_then_the_row_index(tmp_path):
    base = {"image": [b"x"] * 2, "question": ["a?", "b?"], "answers": [["1"], ["2"]]}
    assert [q.id for q in load_dataset(_parquet(tmp_path, {**base, "question_id": [42, 7], "id": ["u", "v"]}, name="a.parquet"))] == ["42", "7"]
    assert [q.id for q in load_dataset(_parquet(tmp_path, {**base, "id": ["u", "v"]}, name="b.parquet"))] == ["u", "v"]
    assert [q.id for q in load_dataset(_parquet(tmp_path, base, name="c.parquet"))] == ["0", "1"]


def test_single_answer_columns_and_a_column_mapping(tmp_path):
    data = _parquet(tmp_path, {"img": [b"x"], "q": ["what?"], "multiple_choice_answer": ["red"], "label": ["blue"]})
    assert load_dataset(data, columns={"image": "img", "question": "q"})[0].answers == ("red",)
    assert load_dataset(data, columns=hf.parse_columns("image=img, question=q, answers=label"))[0].answers == ("blue",)


def test_images_as_bytes_or_paths_read_lazily(tmp_path, monkeypatch):
    red, blue = Image.new("RGB", (6, 4), "red"), Image.new("RGB", (6, 4), "blue")
    red.save(tmp_path / "red.png")
    rows = {"question": ["a?", "b?"], "answers": [["1"], ["2"]]}
    by_bytes = _parquet(tmp_path, {**rows, "image": [_png(red), _png(blue)]}, name="bytes.parquet")
    # A relative path is relative to the dataset's folder.
    by_path = _parquet(tmp_path, {**rows, "image": ["red.png", str(tmp_path / "red.png")]}, name="paths.parquet")
    decoded: list[int] = []
    real = hf._decode
    monkeypatch.setattr(hf, "_decode", lambda value, folder: decoded.append(1) or real(value, folder))
    loaded = load_dataset(by_bytes)
    assert decoded == [] and callable(loaded[0].image)  # nothing decoded until a batch asks
    assert loaded[1].load_image().getpixel((0, 0)) == (0, 0, 255) and len(decoded) == 1
    assert [q.load_image().getpixel((0, 0)) for q in load_dataset(by_path)] == [(255, 0, 0)] * 2


# -- splits ------------------------------------------------------------------------------

@pytest.fixture
def two_splits(questions, tmp_path) -> str:
    """validation with answers, test without (like VQAv2's test split)."""
    table = _table(questions[:3], "records")
    unanswered = table.map(lambda row: {"answers": []})
    datasets.DatasetDict(validation=table, test=unanswered).save_to_disk(str(tmp_path / "two"))
    return f"hf:{tmp_path / 'two'}"


def test_split_rules(two_splits):
    with pytest.raises(ValueError, match=r"has splits validation, test; choose one with --split"):
        load_dataset(two_splits)
    with pytest.raises(ValueError, match=r"has no split 'train'; its splits: validation, test"):
        load_dataset(two_splits, split="train")
    assert len(load_dataset(two_splits, split="validation")) == 3
    with pytest.raises(DatasetError, match=r"split 'test': column 'answers' holds no answers in any row"):
        load_dataset(two_splits, split="test")


def test_split_errors_from_the_command_line(two_splits, model_dir, tmp_path):  # noqa: F811
    result = _eval(model_dir, two_splits, tmp_path / "run", code=2)
    assert said(result.output, "has splits validation, test; choose one with --split")
    assert "Traceback" not in result.output


# -- bad rows ----------------------------------------------------------------------------

def test_bad_rows_are_named_by_dataset_split_row_and_column(tmp_path):
    rows = {"image": [b"x"] * 3, "question": ["a?", "b?", "c?"], "answers": [["1"], [], ["3"]]}
    data = _parquet(tmp_path, rows)
    where = rf"dataset '{data}', split 'train'"
    with pytest.raises(DatasetError, match=rf"^{where}, row 1, column 'answers': empty answer list$"):
        load_dataset(data)
    no_question = _parquet(tmp_path, {"image": [b"x"], "answers": [["1"]]}, name="no-question.parquet")
    with pytest.raises(DatasetError, match=rf"^dataset '{no_question}', split 'train': no question column \(looked for 'question'\)"):
        load_dataset(no_question)
    with pytest.raises(DatasetError, match=r"no column 'label' \(given for answers\)"):
        load_dataset(data, columns={"answers": "label"})
    unreadable = load_dataset(_parquet(tmp_path, {**rows, "answers": [["1"]] * 3}, name="img.parquet"))
    with pytest.raises(DatasetError, match=r"split 'train', row 2, column 'image': cannot read the image"):
        unreadable[2].load_image()


def test_a_bad_image_stops_the_run_keeps_its_predictions_and_the_rerun_resumes(questions, model_dir, jsonl_run, tmp_path):  # noqa: F811
    order = harness.order_questions(questions, seed=0)
    bad = next(i for i, q in enumerate(questions) if q.id == order[4].id)  # in the 2nd batch of 3
    table = _table(questions, "records")
    broken = table.cast_column("image", datasets.Image(decode=False)).map(
        lambda row, i: {"image": {"bytes": b"not an image", "path": None} if i == bad else row["image"]}, with_indices=True)
    data = _write(broken, "save_to_disk", tmp_path / "data")
    out = tmp_path / "run"
    result = _eval(model_dir, f"hf:{data}", out, code=2)
    assert said(result.output, f"dataset 'hf:{data}', split 'validation', row {bad}, column 'image': cannot read the image: "
                               "not an image file that PIL can read")
    assert "BytesIO" not in result.output
    assert said(result.output, "rerun the same command to resume") and "Traceback" not in result.output
    kept = _records(out)
    assert {question_id for _, question_id in kept} == {q.id for q in order[:3]}  # the first batch, every config
    _write(table, "save_to_disk", tmp_path / "data")  # the row fixed
    _eval(model_dir, f"hf:{data}", out)
    assert _records(out) == _records(jsonl_run)


def test_a_missing_datasets_package_says_how_to_install_it(written, model_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingExtraError, match=r'pip install "catp\[datasets\]"'):
        load_dataset(f"hf:{written['parquet', 'strings']}")
    result = _eval(model_dir, f"hf:{written['parquet', 'strings']}", tmp_path / "run", code=2)
    assert said(result.output, 'pip install "catp[datasets]"')
