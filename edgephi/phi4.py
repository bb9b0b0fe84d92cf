"""Phi-4's chat conventions, in one place: special tokens, the chat template, roles and the end of a turn.

Source: microsoft/phi-4 on the Hugging Face Hub (``tokenizer_config.json``, ``generation_config.json`` and the
chat template, revision of 2025-01): ``<|endoftext|>`` (id 100257) is BOS and the document separator; a turn is
``<|im_start|>ROLE<|im_sep|>CONTENT<|im_end|>`` and ends at ``<|im_end|>`` (id 100265); the pad token is
``<|dummy_85|>`` (id 100349). The tiny stand-in (:mod:`edgephi.devmodel`) uses the same token strings.
"""

from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_SEP = "<|im_sep|>"
IM_END = "<|im_end|>"
PAD = "<|dummy_85|>"
#: The token that ends a chat turn, and its id in Phi-4's vocabulary (the stand-in's id differs).
END_OF_TURN = IM_END
END_OF_TURN_ID = 100265
ENDOFTEXT_ID = 100257
PAD_ID = 100349

CHAT_ROLES = ("system", "user", "assistant")
#: Chat control tokens: message content that contains one could forge a turn (prompt injection).
CHAT_CONTROL_TOKENS = (IM_START, IM_SEP, IM_END, ENDOFTEXT)
#: Every chat turn renders to at least ``<|im_start|>``, a role, ``<|im_sep|>`` and ``<|im_end|>``.
MIN_TOKENS_PER_CHAT_MESSAGE = 4

#: Phi-4's chat template, verbatim (with the ``add_generation_prompt`` branch of the current revision).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}"
    "{% endif %}"
)
