"""The local easy-VQA tasks' functions: the image, the question, and catp eval's VQA accuracy."""

from catp.evaluation.metric import vqa_accuracy


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice_index(doc):
    return doc["choices"].index(doc["answer"])


def process_results(doc, results):
    return {"accuracy": vqa_accuracy(results[0], [doc["answer"]])}
