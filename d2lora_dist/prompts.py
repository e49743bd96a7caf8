"""Prompt texts shared by training data and evaluation, versioned: change the text, bump the version.

Training and evaluation must ask the same question in the same words, so both import from here.
"""

TITLE_PROMPT_VERSION = "titles-v1"
GSM8K_PROMPT_VERSION = "gsm8k-zeroshot-v2"


def title_prompt(abstract: str) -> str:
    return ("Write a concise title for the paper with this abstract. Reply with the title only.\n\n"
            f"Abstract: {abstract.strip()}")


def gsm8k_prompt(question: str) -> str:
    # v1 ended with "as 'The answer is N.'", which small models copied literally.
    return (f"{question.strip()}\n\nSolve the problem step by step. Finish with a last line that says "
            "\"The answer is\" followed by the final number.")
