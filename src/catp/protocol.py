"""The paper's VQA protocol (BLIP-2's VQAv2 evaluation, as CATP ran it): the one place for its constants."""

#: The prompt of BLIP-2's VQA evaluation; ``{}`` is the question. The reference model is trained with it.
PAPER_PROMPT = "Question: {} Short answer:"
#: Beam search width and new-token bounds of the paper's evaluation.
PAPER_NUM_BEAMS = 5
PAPER_MAX_NEW_TOKENS = 10
PAPER_MIN_NEW_TOKENS = 1
#: Kept query tokens in the paper's tables (1/2, 1/4, 1/8 of 32).
PAPER_KEEPS = (16, 8, 4)


def check_prompt(prompt: str) -> str:
    """A prompt template with exactly one ``{}`` slot, where the question goes.

    Raises:
        ValueError: no slot, two slots, a named or numbered slot (``{0}``, ``{q}``), a format
            spec, or an unmatched brace (``{{`` and ``}}`` write a literal brace).
    """
    import string

    try:
        slots = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(prompt) if name is not None]
    except ValueError as error:
        raise ValueError(f"prompt {prompt!r}: {error} (write a literal brace as {{{{ or }}}})") from None
    if slots != [("", "", None)]:
        raise ValueError(f"prompt must contain exactly one '{{}}' where the question goes (no name, number or format), got {prompt!r}")
    return prompt
