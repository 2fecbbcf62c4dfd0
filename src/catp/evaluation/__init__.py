"""Evaluation harness: the VQA accuracy, datasets and the ``catp eval`` sweep."""

from catp.evaluation.metric import normalize_answer, vqa_accuracy

__all__ = ["normalize_answer", "vqa_accuracy"]
