#!/usr/bin/env python3
"""Render conversation.json with transformers' own chat-template code.

The `*.expected.txt` files next to this script are the outside reference for
runtime/src/chat.rs: transformers' `apply_chat_template(tokenize=False)`
(jinja2 with its HF extensions: tojson, raise_exception, strftime_now,
trim_blocks/lstrip_blocks). Run from the repository root with any Python that
has transformers (e.g. the venv of scripts/mlx_reference.py):

    python tests/data/templates/render_reference.py
"""
import json
import os

from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
TOKENIZER = os.path.join(ROOT, "..", "shared", "models", "tiny-qwen3-moe-coder")

conv = json.load(open(os.path.join(HERE, "conversation.json")))
tok = AutoTokenizer.from_pretrained(TOKENIZER)

cases = {
    "qwen3.tools": ("qwen3.jinja", dict(tools=conv["tools"])),
    "qwen3.no_thinking": ("qwen3.jinja", dict(enable_thinking=False)),
    "qwen3-coder.tools": ("qwen3-coder.jinja", dict(tools=conv["tools"])),
    "qwen3-coder.no_tools": ("qwen3-coder.jinja", dict()),
}
for name, (template_file, kwargs) in cases.items():
    template = open(os.path.join(HERE, template_file)).read()
    text = tok.apply_chat_template(
        conv["messages"], chat_template=template, tokenize=False, add_generation_prompt=True, **kwargs
    )
    with open(os.path.join(HERE, f"{name}.expected.txt"), "w") as f:
        f.write(text)
    print(f"{name}: {len(text)} chars")
