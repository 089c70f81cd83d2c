#!/usr/bin/env python3
"""Check a GGUF of tiny-qwen3-moe-coder against the transformers reference.

Why: the peer numbers are only meaningful if llama.cpp runs the same model we
run. This feeds each reference prompt to llama-completion (greedy, 48 tokens),
checks that llama.cpp tokenized the prompt to the reference ids, and reports how
many of the reference greedy tokens (shared/.../reference/reference.json,
transformers float32) it reproduced before diverging. bf16 GGUFs are expected to
match all or nearly all (bf16 activations can flip near-ties late in a run);
quantized ones diverge earlier, which is the point of measuring it.

Usage: check_llamacpp_reference.py MODEL.gguf [--min-match N]
       check_llamacpp_reference.py --mfx target/release/mfx MODEL_DIR_OR_PACK
With --mfx the same check runs `mfx run` instead (it prints no prompt ids, so
only the greedy tokens are compared), putting mfx in the same column as the peer.
Exit 1 if a prompt's ids differ or fewer than --min-match tokens match on average.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REF = REPO.parent / "shared" / "models" / "tiny-qwen3-moe-coder"
PEERS = Path(os.environ.get("MFX_PEERS_DIR", "/work/.peers"))


def matched_tokens(tok, ref_ids: list[int], out_text: str) -> int:
    """Number of leading reference tokens whose decoded text is a prefix of out_text."""
    n = 0
    for i in range(1, len(ref_ids) + 1):
        if out_text.startswith(tok.decode(ref_ids[:i], skip_special_tokens=False)):
            n = i
        else:
            break
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", type=Path, help="GGUF for llama.cpp, or with --mfx a model dir / .mfx pack")
    ap.add_argument("--mfx", type=Path, help="run this mfx binary instead of llama-completion")
    ap.add_argument("--bin", type=Path, default=PEERS / "llama.cpp" / "bin" / "llama-completion")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-match", type=float, default=0.0, help="required mean matched tokens (of 48)")
    a = ap.parse_args()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(REF / "tokenizer.json"))
    ref = json.loads((REF / "reference" / "reference.json").read_text())
    ok = True
    results = {}
    for name, p in ref["prompts"].items():
        if a.mfx:
            r = subprocess.run([str(a.mfx), "run", str(a.gguf), "-p", p["text"], "-n", str(len(p["greedy_48"])),
                                "--temp", "0", "--ignore-eos"], capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                sys.exit(f"{name}: mfx run failed ({r.returncode}):\n{r.stderr[-2000:]}")
            n = matched_tokens(tok, p["greedy_48"], r.stdout)
            results[name] = {"greedy_matched": n, "of": len(p["greedy_48"])}
            print(f"{name:7s} greedy tokens matched {n}/{len(p['greedy_48'])}")
            continue
        cmd = [str(a.bin), "-m", str(a.gguf), "-p", p["text"], "-n", str(len(p["greedy_48"])),
               "--temp", "0", "--top-k", "1", "-no-cnv", "--no-display-prompt", "--verbose-prompt",
               "-t", str(a.threads), "--seed", "0", "--simple-io", "-c", "512"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            sys.exit(f"{name}: llama-completion failed ({r.returncode}):\n{r.stderr[-2000:]}")
        ids = [int(m.group(1)) for m in re.finditer(r"^\S+ I\s+(\d+) -> '", r.stderr, re.M)]
        ids = ids[: len(p["ids"])] if ids[: len(p["ids"])] == p["ids"] else ids
        ids_ok = ids == p["ids"]
        out = r.stdout
        n = matched_tokens(tok, p["greedy_48"], out)
        results[name] = {"prompt_ids_match": ids_ok, "greedy_matched": n, "of": len(p["greedy_48"])}
        ok &= ids_ok
        print(f"{name:7s} prompt ids {'match' if ids_ok else 'DIFFER'}; greedy tokens matched "
              f"{n}/{len(p['greedy_48'])}")
        if not ids_ok:
            print(f"   llama.cpp ids {ids}\n   reference ids {p['ids']}")
    mean = sum(v["greedy_matched"] for v in results.values()) / len(results)
    print(f"mean matched {mean:.1f}/48")
    print(json.dumps({"model": str(a.gguf), "runner": "mfx" if a.mfx else "llama.cpp",
                      "results": results, "mean_matched": mean}))
    if not ok or mean < a.min_match:
        sys.exit(1)


if __name__ == "__main__":
    main()
