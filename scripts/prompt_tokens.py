#!/usr/bin/env python3
"""Print the first N tokens of a text file, decoded, so that a benchmark prompt
is exactly N tokens long for the given tokenizer.json.

Usage: prompt_tokens.py TOKENIZER_JSON TEXT_FILE N
"""
import sys

from tokenizers import Tokenizer


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    tok = Tokenizer.from_file(sys.argv[1])
    n = int(sys.argv[3])
    text = open(sys.argv[2], encoding="utf-8").read()
    ids = tok.encode(text[: 40 * n]).ids
    if len(ids) < n + 16:
        sys.exit(f"prompt_tokens.py: {sys.argv[2]} has only {len(ids)} tokens, need {n}")
    # A cut can split a merge, so the decoded text may re-encode to a different
    # count; pick the nearby cut whose text re-encodes to exactly N tokens.
    for m in sorted(range(n - 16, n + 16), key=lambda m: abs(m - n)):
        out = tok.decode(ids[:m])
        if len(tok.encode(out).ids) == n:
            sys.stdout.write(out)
            return
    sys.exit(f"prompt_tokens.py: no cut near {n} tokens re-encodes to exactly {n}")


if __name__ == "__main__":
    main()
