"""The shipped reference model's chat template renders the prompt it was trained on, so chat
clients (vLLM's chat API) give it the same input as ``format_prompt``."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

import catp
from catp.reference.data import format_prompt


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(catp.reference_model_path())


@pytest.mark.parametrize("content", [
    " what shape is in the image? ",  # a string (vLLM's "string" content format)
    [{"type": "image"}, {"type": "text", "text": "what shape is in the image?"}],  # OpenAI parts
])
def test_chat_template_renders_the_training_prompt(tokenizer, content):
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    assert text == tokenizer.bos_token + format_prompt("what shape is in the image?")
    # Chat servers tokenize the rendered text without adding special tokens: the same ids as the HF path.
    assert tokenizer(text, add_special_tokens=False).input_ids == tokenizer(format_prompt("what shape is in the image?")).input_ids
