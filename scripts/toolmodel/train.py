#!/usr/bin/env python3
"""Fine-tune the shared tiny Qwen3-MoE coder into a tiny tool-calling model.

  python3 scripts/toolmodel/train.py --base .toolmodel/base --data DIR --out CKPT \
      [--steps N] [--time-budget SECONDS] [--batch-tokens T] [--max-len L]

Reads DIR/train.jsonl ({"text", "spans"}: loss only on the characters in
spans, the assistant turns, or all of a plain-text code row) and
DIR/eval.jsonl (held-out first-turn prompts) written by gen_data.py.
Trains with AdamW in float32 master weights under bf16 autocast on CUDA
(float32 on CPU), batches of similar-length rows padded to the longest, up
to --batch-tokens tokens each. The learning-rate schedule runs on
max(step/steps, elapsed/time_budget), so a run stopped by the wall-clock
guard still ends with a decayed learning rate, and saves.

Writes CKPT as a Hugging Face checkpoint (config.json, model.safetensors in
bf16 with the base's per-expert tensor names, tokenizer.json,
tokenizer_config.json, generation_config.json, chat_template.jinja: the
Qwen3-Coder XML template the XML half of the data was rendered with) and
CKPT/train_log.json (loss curve, self-eval). At the end it greedily
completes the held-out prompts and prints the fraction that parse as a
well-formed call (in the format the prompt asked for) to the expected tool
with every required argument, and the fraction whose arguments equal the
expected ones.
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------ data
def encode_rows(tok, path, max_len):
    """(ids, loss mask, is_code) per row, as numpy arrays: a token carries
    loss if its first character lies in one of the row's spans."""
    rows, dropped = [], 0
    with open(path) as f:
        lines = [json.loads(l) for l in f]
    for c in range(0, len(lines), 4096):
        part = lines[c:c + 4096]
        encs = tok.encode_batch([l["text"] for l in part], add_special_tokens=False)
        for l, e in zip(part, encs):
            ids = np.asarray(e.ids, dtype=np.int64)
            starts = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
            mask = np.zeros(len(ids), dtype=bool)
            for a, b in l["spans"]:
                mask |= (starts >= a) & (starts < b)
            if len(ids) > max_len:
                if l.get("kind") != "code":
                    dropped += 1  # a cut conversation would teach a cut call
                    continue
                ids, mask = ids[:max_len], mask[:max_len]
            if not mask[1:].any():
                continue
            rows.append((ids, mask, l.get("kind") == "code"))
    return rows, dropped


def batches(rows, batch_tokens, r):
    """Lists of row indices, rows of similar length together, each batch at
    most batch_tokens tokens once padded; shuffled order."""
    order = list(range(len(rows)))
    r.shuffle(order)
    out = []
    chunk = 2048
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: len(rows[i][0]))
        cur, longest = [], 0
        for i in part:
            n = len(rows[i][0])
            if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
                out.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, n)
        if cur:
            out.append(cur)
    r.shuffle(out)
    return out


def collate(rows, idx, pad_id, device):
    L = max(len(rows[i][0]) for i in idx)
    ids = np.full((len(idx), L), pad_id, dtype=np.int64)
    labels = np.full((len(idx), L), -100, dtype=np.int64)
    att = np.zeros((len(idx), L), dtype=np.int64)
    for b, i in enumerate(idx):
        x, m = rows[i][0], rows[i][1]
        ids[b, :len(x)] = x
        att[b, :len(x)] = 1
        labels[b, :len(x)] = np.where(m, x, -100)
    return (torch.from_numpy(ids).to(device, non_blocking=True), torch.from_numpy(att).to(device, non_blocking=True),
            torch.from_numpy(labels).to(device, non_blocking=True))


# -------------------------------------------------------------- self-eval
XML_CALL = re.compile(r"<tool_call>\n<function=([^>\n]+)>\n(.*?)</function>\n</tool_call>", re.S)
XML_PARAM = re.compile(r"<parameter=([^>\n]+)>\n(.*?)\n</parameter>\n", re.S)
HERMES_CALL = re.compile(r"<tool_call>\n(\{.*?\})\n</tool_call>", re.S)


def parse_call(text, fmt, schema):
    """(name, args) of the first call in text, or None if it is not
    well-formed in fmt. XML values are typed from the schema as mfx does."""
    if fmt == "xml":
        m = XML_CALL.search(text)
        if not m:
            return None
        body = m.group(2)
        args = {}
        pos = 0
        for pm in XML_PARAM.finditer(body):
            if body[pos:pm.start()].strip():
                return None
            pos = pm.end()
            k, v = pm.group(1), pm.group(2)
            ty = schema.get("properties", {}).get(k, {}).get("type", "string")
            if ty != "string":
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            args[k] = v
        if body[pos:].strip():
            return None
        return m.group(1), args
    m = HERMES_CALL.search(text)
    if not m:
        return None
    try:
        obj = json.loads(m.group(1))
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(obj.get("arguments"), dict):
        return None
    return obj["name"], obj["arguments"]


@torch.no_grad()
def val_loss(model, rows, pad_id, device, batch_tokens):
    """Mean loss per loss token over fixed held-out rows."""
    model.eval()
    tot, n = 0.0, 0
    for idx in batches(rows, batch_tokens, random.Random(0)):
        ids, att, labels = collate(rows, idx, pad_id, device)
        k = int((labels[:, 1:] != -100).sum())
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tot += model(input_ids=ids, attention_mask=att, labels=labels).loss.item() * k
        n += k
    model.train()
    return tot / max(n, 1)


@torch.no_grad()
def self_eval(model, tok, evals, device, max_new, batch=32, batch_tokens=65536):
    model.eval()
    im_end = tok.token_to_id("<|im_end|>")
    eot = tok.token_to_id("<|endoftext|>")
    res = {"n": 0, "wellformed": 0, "name_and_required": 0, "exact_args": 0, "by_format": {}}
    samples = []
    # Similar lengths together, and fewer rows per batch for long prompts:
    # the padded attention mask grows with rows x length^2.
    encs = [tok.encode(e["prompt"], add_special_tokens=False).ids for e in evals]
    order = sorted(range(len(evals)), key=lambda i: len(encs[i]))
    groups, cur = [], []
    for i in order:
        if cur and (len(cur) >= batch or (len(cur) + 1) * len(encs[i]) > batch_tokens):
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    for g in groups:
        chunk = [evals[i] for i in g]
        enc = [encs[i] for i in g]
        L = max(len(x) for x in enc)
        ids = torch.full((len(enc), L), eot, dtype=torch.long)
        att = torch.zeros((len(enc), L), dtype=torch.long)
        for b, x in enumerate(enc):  # left padding for batched generation
            ids[b, L - len(x):] = torch.tensor(x)
            att[b, L - len(x):] = 1
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new,
                                 do_sample=False, eos_token_id=[im_end, eot], pad_token_id=eot)
        for b, e in enumerate(chunk):
            gen = out[b, L:].tolist()
            if im_end in gen:
                gen = gen[:gen.index(im_end)]
            text = tok.decode(gen, skip_special_tokens=False)
            call = parse_call(text, e["format"], e["schema"])
            f = res["by_format"].setdefault(e["format"], {"n": 0, "name_and_required": 0})
            g = res.setdefault("by_length", {}).setdefault("long" if "-long" in e["kind"] else "short", {"n": 0, "name_and_required": 0})
            res["n"] += 1
            f["n"] += 1
            g["n"] += 1
            ok = exact = False
            if call is not None:
                res["wellformed"] += 1
                name, args = call
                ok = name == e["name"] and all(k in args for k in e["required"])
                exact = ok and args == e["args"]
            res["name_and_required"] += ok
            res["exact_args"] += exact
            f["name_and_required"] += ok
            g["name_and_required"] += ok
            if len(samples) < 12:
                samples.append({"kind": e["kind"], "expected": e["name"], "ok": ok, "output": text[:400]})
    model.train()
    n = max(res["n"], 1)
    res["frac_wellformed"] = res["wellformed"] / n
    res["frac_name_and_required"] = res["name_and_required"] / n
    res["frac_exact_args"] = res["exact_args"] / n
    return res, samples


# ------------------------------------------------------------------ model
def load_model(cls, base, device, rows, pad_id, impl):
    """The base in float32 on device, with an experts implementation that
    runs a training step here: transformers' default grouped_mm kernel is
    not autocast-aware and, depending on the torch build, may refuse float32
    weights; then batched_mm, then the per-expert eager loop."""
    cands = [impl] if impl != "auto" else ([None, "batched_mm", "eager"] if device.type == "cuda" else [None, "eager"])
    probe = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))[:2]
    last = None
    for c in cands:
        kw = {} if c is None else {"experts_implementation": c}
        try:
            model = cls.from_pretrained(base, dtype=torch.float32, **kw)
            model.config.use_cache = False
            model.to(device).train()
            ids, att, labels = collate(rows, probe, pad_id, device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            got = getattr(model.config, "_experts_implementation", c)
            log(f"experts implementation: {got or 'default'} (probe step loss {loss.item():.3f})")
            return model
        except (RuntimeError, ValueError, NotImplementedError, ImportError) as e:
            last = e
            log(f"experts implementation {c or 'default'} failed a training step here: {str(e).splitlines()[0][:200]}; trying the next")
    raise SystemExit(f"no experts implementation could run a training step: {last}")


# ----------------------------------------------------------------- saving
def save(model, base, out, template, max_positions=0):
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16)
    # Shards under the device tool's 16 MiB per-file limit on what comes back
    # (a first run lost its 48 MB single-file checkpoint to it).
    model.save_pretrained(out, safe_serialization=True, max_shard_size="12MB")
    model.float()
    from safetensors import safe_open
    names = []
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            names += list(s.keys())
    base_names = set(json.load(open(base / "model.safetensors.index.json"))["weight_map"]) \
        if (base / "model.safetensors.index.json").exists() else None
    if base_names is not None and set(names) != base_names:
        # A transformers that saves fused experts: mfx reads both, but the
        # shipped model keeps the base's (hub) layout; say so rather than guess.
        log(f"note: saved tensor names differ from the base's ({len(set(names) ^ base_names)} differ), e.g. {sorted(set(names) - base_names)[:3]}")
    # The architecture is the base's: its config.json (hub spellings:
    # num_experts, rope_theta, which mlx-lm and older readers expect) is the
    # exact description, rather than transformers 5's rewritten one.
    cfg = json.load(open(base / "config.json"))
    cfg["torch_dtype"] = "bfloat16"
    cfg["use_cache"] = True
    if max_positions:
        # Trained on rows this long (stage 2, context extension): the
        # positions the model is good for, which mfx reads as its context.
        cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], max_positions)
    json.dump(cfg, open(out / "config.json", "w"), indent=2)
    for name in ("tokenizer.json",):
        shutil.copy(base / name, out / name)
    tc = json.load(open(base / "tokenizer_config.json"))
    tc["chat_template"] = template
    json.dump(tc, open(out / "tokenizer_config.json", "w"), indent=2, ensure_ascii=False)
    (out / "chat_template.jinja").write_text(template)
    gc = json.load(open(base / "generation_config.json")) if (base / "generation_config.json").exists() else {}
    gc.update({"eos_token_id": [2, 0], "pad_token_id": 0})
    json.dump(gc, open(out / "generation_config.json", "w"), indent=2)
    # save_pretrained may have written its own generation_config; ours wins.


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=".toolmodel/base", help="HF checkpoint dir of the base model")
    ap.add_argument("--data", required=True, help="folder with train.jsonl and eval.jsonl from gen_data.py")
    ap.add_argument("--out", required=True, help="output checkpoint folder")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--time-budget", type=float, default=0, help="stop training after this many seconds (0: no limit)")
    ap.add_argument("--batch-tokens", type=int, default=32768, help="padded tokens per batch")
    ap.add_argument("--max-len", type=int, default=3072)
    ap.add_argument("--max-positions", type=int, default=0, help="write this max_position_embeddings (the length trained on) into the saved config; 0 keeps the base's")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--val-n", type=int, default=128, help="held-out training-style rows for a validation loss")
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=200, help="held-out prompts to self-evaluate (0: skip)")
    ap.add_argument("--eval-max-new", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts-impl", default="auto", help="transformers experts_implementation (auto: the first that runs)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    base, out, data = Path(a.base), Path(a.out), Path(a.data)
    template = (HERE / "templates" / "qwen3-coder.jinja").read_text()
    import transformers
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if cuda else ""))

    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    pad_id = tok.token_to_id("<|endoftext|>")
    rows, dropped = encode_rows(tok, data / "train.jsonl", a.max_len)
    val_rows, rows = rows[:a.val_n], rows[a.val_n:]  # the file is already shuffled
    ntok = sum(len(x[0]) for x in rows)
    nloss = sum(int(x[1].sum()) for x in rows)
    log(f"{len(rows)} rows ({dropped} conversations over {a.max_len} tokens dropped), {ntok} tokens, {nloss} with loss")
    evals = [json.loads(l) for l in open(data / "eval.jsonl")][:a.eval_n]

    model = load_model(AutoModelForCausalLM, base, device, rows, pad_id, a.experts_impl)
    nparam = sum(p.numel() for p in model.parameters())
    log(f"model {nparam / 1e6:.1f}M params from {base}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    nodecay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": nodecay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda)

    def lr_at(step, elapsed):
        prog = step / a.steps
        if a.time_budget:
            prog = max(prog, elapsed / a.time_budget)
        warm = min(1.0, (step + 1) / a.warmup)
        cos = a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))
        return a.lr * warm * cos

    vals = []

    def do_val(step):
        # Separately: the conversations (what is learned) and the plain
        # code/prose rows (what should be kept).
        if not val_rows:
            return
        res = {"step": step}
        for name, sub in (("conv", [x for x in val_rows if not x[2]]), ("code", [x for x in val_rows if x[2]])):
            if sub:
                res[name] = val_loss(model, sub, pad_id, device, a.batch_tokens)
        vals.append(res)
        log(f"step {step:5d}  validation loss " + ", ".join(f"{k} {v:.4f}" for k, v in res.items() if k != "step")
            + f" ({len(val_rows)} held-out rows)")

    do_val(0)
    r = random.Random(a.seed)
    plan = []
    curve = []
    step, t_train, ema = 0, time.time(), None
    toks_seen = 0
    while step < a.steps:
        if not plan:
            plan = batches(rows, a.batch_tokens, r)
        idx = plan.pop()
        ids, att, labels = collate(rows, idx, pad_id, device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, time.time() - t_train)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        toks_seen += int(att.sum())
        if step % a.log_every == 0 or step == 1 or step == a.steps:
            lv = loss.item()
            ema = lv if ema is None else 0.8 * ema + 0.2 * lv
            el = time.time() - t_train
            curve.append({"step": step, "loss": lv, "loss_ema": ema, "lr": opt.param_groups[0]["lr"], "grad_norm": float(gn), "elapsed_s": el})
            log(f"step {step:5d}  loss {lv:.4f}  ema {ema:.4f}  lr {opt.param_groups[0]['lr']:.2e}  gnorm {float(gn):.2f}  "
                f"batch {ids.shape[0]}x{ids.shape[1]}  {toks_seen / el:,.0f} tok/s  {el / step:.3f} s/step")
        if a.val_every and step % a.val_every == 0 and step < a.steps:
            do_val(step)
        if a.time_budget and time.time() - t_train > a.time_budget:
            log(f"time budget {a.time_budget:.0f}s reached at step {step}; stopping")
            break
    train_s = time.time() - t_train
    log(f"trained {step} steps in {train_s:.0f}s ({toks_seen} tokens)")
    do_val(step)

    save(model, base, out, template, a.max_positions)
    log(f"saved {out}")
    result = {"steps": step, "train_seconds": train_s, "tokens_seen": toks_seen, "rows": len(rows), "args": vars(a), "curve": curve, "val": vals}
    if evals:
        res, samples = self_eval(model, tok, evals, device, a.eval_max_new)
        result["self_eval"] = res
        result["self_eval_samples"] = samples
        log(f"self-eval on {res['n']} held-out prompts: well-formed {res['frac_wellformed']:.3f}, "
            f"right tool + required args {res['frac_name_and_required']:.3f}, exact args {res['frac_exact_args']:.3f}; "
            + ", ".join(f"{k}: {v['name_and_required']}/{v['n']}" for k, v in [*res["by_format"].items(), *res["by_length"].items()]))
        for s in samples[:4]:
            log(f"sample [{s['kind']}] ok={s['ok']}: {s['output'][:200]!r}")
    json.dump(result, open(out / "train_log.json", "w"), indent=1)
    log("done")


if __name__ == "__main__":
    main()
