#!/usr/bin/env python3
"""Synthetic agent conversations for the tiny tool-calling model (issue 23).

Deterministic from --seed. Each conversation is an OpenAI-shaped request
(`tools` + `messages`): a user asks for something an agent does with a tool
(read a file, list a directory, write or edit a file, run a command), the
assistant calls a tool, the tool's result comes back, and the assistant
answers briefly (edits read the file first, as Claude Code requires). Tool
sets are the shapes real clients send: Claude Code (`Read`, `Write`, `Edit`,
`Bash`, `Glob`, `LS`, ... with absolute `file_path`s), Codex CLI (`shell`
with an argv array, `apply_patch`) and generic ones with varied names
(`read_file`, `list_dir`, `write_file`, `run_command`, ...), plus unrelated
distractor tools, in shuffled order.

Each conversation is rendered with one of two chat templates:
  * templates/qwen3-coder.jinja (Qwen3-Coder XML calls) -- the template
    shipped with the model, so mfx detects the XML form from its prompt;
  * templates/hermes.jinja (Hermes JSON calls, the Qwen2.5/Qwen3 tool
    prompt) -- so the model also answers a Hermes-style prompt in kind.
Loss spans are the assistant turns (what the template renders after the
generation prompt, through `<|im_end|>`), found by rendering each prefix.

Some rows are plain code/prose text from the base model's training mix
(`--code-dir`, default .toolmodel/data with ../shared/data's *.val.txt, or
the repository's own *.py/*.rs files when that is missing) with loss on all
tokens, so the fine-tune keeps the model's coding ability.

Writes OUT/train.jsonl ({"text", "spans"}) and OUT/eval.jsonl (held-out
first-turn prompts with the expected tool name and required arguments).
"""
import argparse
import json
import os
import random
from pathlib import Path

import jinja2

HERE = Path(__file__).resolve().parent
TEMPLATES = {"xml": HERE / "templates" / "qwen3-coder.jinja", "hermes": HERE / "templates" / "hermes.jinja"}


# --------------------------------------------------------------- tool shapes
def tool(name, desc, props, required):
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {"type": "object", "properties": props, "required": required},
        },
    }


def s(desc):
    return {"type": "string", "description": desc}


CLAUDE_DISTRACT = [
    tool("Task", "Launch a new agent to handle complex, multi-step tasks autonomously.",
         {"description": s("A short (3-5 word) description of the task"), "prompt": s("The task for the agent to perform"),
          "subagent_type": s("The type of specialized agent to use for this task")}, ["description", "prompt", "subagent_type"]),
    tool("Grep", "A powerful search tool built on ripgrep. Supports full regex syntax.",
         {"pattern": s("The regular expression pattern to search for in file contents"),
          "path": s("File or directory to search in. Defaults to current working directory."),
          "glob": s("Glob pattern to filter files (e.g. \"*.js\")")}, ["pattern"]),
    tool("TodoWrite", "Use this tool to create and manage a structured task list for your current coding session.",
         {"todos": {"type": "array", "description": "The updated todo list", "items": {"type": "object"}}}, ["todos"]),
    tool("WebFetch", "Fetches content from a specified URL and processes it using an AI model.",
         {"url": s("The URL to fetch content from"), "prompt": s("The prompt to run on the fetched content")}, ["url", "prompt"]),
    tool("WebSearch", "Allows Claude to search the web and use the results to inform responses.",
         {"query": s("The search query to use")}, ["query"]),
    tool("NotebookEdit", "Completely replaces the contents of a specific cell in a Jupyter notebook.",
         {"notebook_path": s("The absolute path to the Jupyter notebook file to edit"), "new_source": s("The new source for the cell")},
         ["notebook_path", "new_source"]),
    tool("ExitPlanMode", "Use this tool when you are in plan mode and have finished presenting your plan.",
         {"plan": s("The plan you came up with")}, ["plan"]),
    tool("BashOutput", "Retrieves output from a running or completed background bash shell.",
         {"bash_id": s("The ID of the background shell to retrieve output from")}, ["bash_id"]),
    tool("KillShell", "Kills a running background bash shell by its ID.", {"shell_id": s("The ID of the background shell to kill")}, ["shell_id"]),
    tool("MultiEdit", "Makes multiple edits to a single file in one operation.",
         {"file_path": s("The absolute path to the file to modify"), "edits": {"type": "array", "description": "Array of edit operations", "items": {"type": "object"}}},
         ["file_path", "edits"]),
]
GENERIC_DISTRACT = [
    tool("get_weather", "Get the current weather in a city.", {"city": s("City name"), "unit": s("celsius or fahrenheit")}, ["city"]),
    tool("search_web", "Search the web and return the top results.", {"query": s("What to search for")}, ["query"]),
    tool("get_time", "Get the current time in a timezone.", {"timezone": s("IANA timezone, e.g. Europe/Paris")}, ["timezone"]),
    tool("calculator", "Evaluate an arithmetic expression.", {"expression": s("The expression, e.g. 2*(3+4)")}, ["expression"]),
    tool("send_email", "Send an email.", {"to": s("Recipient address"), "subject": s("Subject line"), "body": s("Message body")}, ["to", "subject", "body"]),
    tool("fetch_url", "Download a web page and return its text.", {"url": s("The URL")}, ["url"]),
]


class Family:
    """A client's tool set: which tool does each job, and how its call and
    result look. `abs_paths`: paths are absolute (Claude Code requires it)."""


def claude_family(r):
    f = Family()
    f.name = "claude"
    f.abs_paths = True
    read = tool("Read", "Reads a file from the local filesystem. The file_path parameter must be an absolute path, not a relative path.",
                {"file_path": s("The absolute path to the file to read"),
                 "offset": {"type": "number", "description": "The line number to start reading from"},
                 "limit": {"type": "number", "description": "The number of lines to read"}}, ["file_path"])
    write = tool("Write", "Writes a file to the local filesystem. This tool will overwrite the existing file if there is one at the provided path.",
                 {"file_path": s("The absolute path to the file to write (must be absolute, not relative)"),
                  "content": s("The content to write to the file")}, ["file_path", "content"])
    edit = tool("Edit", "Performs exact string replacements in files. You must use your Read tool at least once before editing.",
                {"file_path": s("The absolute path to the file to modify"), "old_string": s("The text to replace"),
                 "new_string": s("The text to replace it with (must be different from old_string)"),
                 "replace_all": {"type": "boolean", "default": False, "description": "Replace all occurences of old_string (default false)"}},
                ["file_path", "old_string", "new_string"])
    bash = tool("Bash", "Executes a given bash command in a persistent shell session with optional timeout.",
                {"command": s("The command to execute"), "timeout": {"type": "number", "description": "Optional timeout in milliseconds (max 600000)"},
                 "description": s("Clear, concise description of what this command does in 5-10 words.")}, ["command"])
    glob = tool("Glob", "Fast file pattern matching tool that works with any codebase size.",
                {"pattern": s("The glob pattern to match files against"), "path": s("The directory to search in.")}, ["pattern"])
    ls = tool("LS", "Lists files and directories in a given path. The path parameter must be an absolute path, not a relative path.",
              {"path": s("The absolute path to the directory to list (must be absolute, not relative)")}, ["path"])
    core = [read, write, edit, bash, glob] + ([ls] if r.random() < 0.6 else [])
    n = r.choice([0, 2, 4, 6, len(CLAUDE_DISTRACT)])
    f.tools = core + r.sample(CLAUDE_DISTRACT, n)
    has_ls = ls in core

    def do_read(p, content):
        return "Read", {"file_path": p}, "\n".join(f"{i + 1:>6}\t{l}" for i, l in enumerate(content.split("\n")))

    def do_list(d, entries):
        if has_ls and r.random() < 0.7:
            lines = [f"- {d.rstrip('/')}/"] + [f"  - {e}" for e in entries]
            return "LS", {"path": d}, "\n".join(lines)
        if r.random() < 0.5:
            return "Glob", {"pattern": "*", "path": d}, "\n".join(f"{d.rstrip('/')}/{e}" for e in entries)
        args = {"command": f"ls {d}"}
        if r.random() < 0.5:
            args["description"] = f"List files in {d.rsplit('/', 1)[-1] or d}"
        return "Bash", args, "\n".join(entries)

    def do_write(p, content):
        return "Write", {"file_path": p, "content": content}, f"File created successfully at: {p}"

    def do_edit(p, old, new, content_after):
        snippet = "\n".join(f"{i + 1:>6}\t{l}" for i, l in enumerate(content_after.split("\n")[:6]))
        return "Edit", {"file_path": p, "old_string": old, "new_string": new}, (
            f"The file {p} has been updated. Here's the result of running `cat -n` on a snippet of the edited file:\n{snippet}")

    def do_run(cmd, out):
        args = {"command": cmd}
        if r.random() < 0.5:
            args["description"] = r.choice(["Run the command", f"Run {cmd.split()[0]}", "Execute shell command", "Check output"])
        return "Bash", args, out

    f.read, f.list, f.write, f.edit_call, f.run = do_read, do_list, do_write, do_edit, do_run
    f.edit_needs_read = True
    return f


def codex_family(r):
    f = Family()
    f.name = "codex"
    f.abs_paths = False
    shell = tool("shell", "Runs a shell command and returns its output.",
                 {"command": {"type": "array", "items": {"type": "string"}, "description": "The command to execute"},
                  "workdir": s("The working directory to execute the command in"),
                  "timeout_ms": {"type": "number", "description": "The timeout for the command in milliseconds"}}, ["command"])
    patch = tool("apply_patch", "Use the `apply_patch` tool to edit files.",
                 {"input": s("The entire contents of the apply_patch command")}, ["input"])
    plan = tool("update_plan", "Updates the task plan.",
                {"explanation": s("Why the plan changed"), "plan": {"type": "array", "description": "The list of steps", "items": {"type": "object"}}}, ["plan"])
    f.tools = [shell, patch] + ([plan] if r.random() < 0.7 else []) + r.sample(GENERIC_DISTRACT, r.choice([0, 0, 1, 2]))

    def argv(cmd):
        return ["bash", "-lc", cmd] if r.random() < 0.75 else cmd.split()

    def shell_out(out):
        if r.random() < 0.5:
            return out
        return f"Exit code: 0\nWall time: 0.{r.randint(0, 9)} seconds\nOutput:\n{out}"

    def do_read(p, content):
        cmd = r.choice([f"cat {p}", f"sed -n '1,200p' {p}", f"head -n 50 {p}"])
        return "shell", {"command": argv(cmd)}, shell_out(content)

    def do_list(d, entries):
        return "shell", {"command": argv(r.choice([f"ls {d}", f"ls -1 {d}"]))}, shell_out("\n".join(entries))

    def do_write(p, content):
        body = "\n".join("+" + l for l in content.split("\n"))
        return "apply_patch", {"input": f"*** Begin Patch\n*** Add File: {p}\n{body}\n*** End Patch"}, f"Success. Updated the following files:\nA {p}"

    def do_edit(p, old, new, content_after):
        minus = "\n".join("-" + l for l in old.split("\n"))
        plus = "\n".join("+" + l for l in new.split("\n"))
        return "apply_patch", {"input": f"*** Begin Patch\n*** Update File: {p}\n@@\n{minus}\n{plus}\n*** End Patch"}, f"Success. Updated the following files:\nM {p}"

    def do_run(cmd, out):
        return "shell", {"command": argv(cmd)}, shell_out(out)

    f.read, f.list, f.write, f.edit_call, f.run = do_read, do_list, do_write, do_edit, do_run
    f.edit_needs_read = True
    if STAGE["n"] >= 2 and r.random() < 0.6:
        return codex_exec_family(r, f, patch)
    return f


def codex_exec_family(r, f, patch):
    """Codex CLI since late 2026: `exec_command` takes the command as one
    string, and its result is a PTY chunk report."""
    num = lambda d: {"type": "number", "description": d}
    exe = tool("exec_command", "Runs a command in a PTY, returning output or a session ID for ongoing interaction.",
               {"cmd": s("Shell command to execute."), "justification": s("User-facing approval question; omit otherwise."),
                "login": {"type": "boolean", "description": "Request login-shell startup. Omit to inherit."},
                "max_output_tokens": num("Output token budget. Defaults to 10000 tokens."),
                "shell": s("Shell binary to launch. Defaults to the user's default shell."),
                "tty": {"type": "boolean", "description": "True allocates a PTY for the command."},
                "workdir": s("Working directory for the command. Defaults to the turn cwd."),
                "yield_time_ms": num("Wait before yielding output. Defaults to 10000 ms.")}, ["cmd"])
    stdin = tool("write_stdin", "Writes characters to an existing unified exec session and returns recent output.",
                 {"session_id": num("Identifier of the running unified exec session."), "chars": s("Bytes to write to stdin (may be empty to poll).")},
                 ["session_id"])
    f.tools = [exe, patch] + ([stdin] if r.random() < 0.7 else []) + r.sample(GENERIC_DISTRACT, r.choice([0, 0, 1, 2]))

    def out(text):
        n = max(1, len(text) // 4)
        return (f"Chunk ID: {r.getrandbits(24):06x}\nWall time: 0.{r.randint(0, 9999):04d} seconds\nProcess exited with code 0\n"
                f"Original token count: {n}\nOutput:\n{text}\n")

    def do_read(p, content):
        return "exec_command", {"cmd": r.choice([f"cat {p}", f"sed -n '1,200p' {p}", f"head -n 1 {p}", f"head -n 50 {p}"])}, out(content)

    def do_list(d, entries):
        return "exec_command", {"cmd": r.choice([f"ls {d}", f"ls -1 {d}", f"ls -la {d}"])}, out("\n".join(entries))

    def do_run(cmd, o):
        return "exec_command", {"cmd": cmd}, out(o)

    f.read, f.list, f.run = do_read, do_list, do_run
    return f


def generic_family(r):
    f = Family()
    f.name = "generic"
    f.abs_paths = r.random() < 0.2
    pk = r.choice(["path", "path", "file_path", "filename"])
    rn, ln, wn, cn = (r.choice(["read_file", "read_file", "view_file", "open_file", "cat_file"]),
                      r.choice(["list_dir", "list_dir", "list_directory", "list_files", "ls"]),
                      r.choice(["write_file", "write_file", "create_file", "save_file"]),
                      r.choice(["run_command", "run_command", "execute_command", "run_shell", "bash"]))
    ck = r.choice(["command", "command", "cmd"])
    en = r.choice(["edit_file", "replace_in_file", "str_replace"])
    ok_, nk = r.choice([("old_text", "new_text"), ("old_str", "new_str"), ("search", "replace")])
    read = tool(rn, "Read the contents of a file.", {pk: s("Path of the file to read")}, [pk])
    ls = tool(ln, "List the files and folders in a directory.", {"path": s("Directory to list")}, ["path"])
    write = tool(wn, "Write text to a file, creating or overwriting it.", {pk: s("Path of the file to write"), "content": s("The full text to write")}, [pk, "content"])
    run = tool(cn, "Run a shell command and return its output.", {ck: s("The shell command to run")}, [ck])
    edit = tool(en, "Replace text in a file.", {pk: s("Path of the file"), ok_: s("Exact text to find"), nk: s("Replacement text")}, [pk, ok_, nk])
    core = [read, ls, write, run] + ([edit] if r.random() < 0.5 else [])
    has_edit = edit in core
    f.tools = core + r.sample(GENERIC_DISTRACT, r.choice([0, 1, 2, 3]))

    def do_read(p, content):
        return rn, {pk: p}, content

    def do_list(d, entries):
        return ln, {"path": d}, "\n".join(entries) if r.random() < 0.6 else json.dumps(entries)

    def do_write(p, content):
        return wn, {pk: p, "content": content}, r.choice(["OK", f"Wrote {len(content.encode())} bytes to {p}", json.dumps({"ok": True})])

    def do_edit(p, old, new, content_after):
        if has_edit:
            return en, {pk: p, ok_: old, nk: new}, r.choice(["OK", f"Replaced 1 occurrence in {p}"])
        return wn, {pk: p, "content": content_after}, r.choice(["OK", f"Wrote {len(content_after.encode())} bytes to {p}"])

    def do_run(cmd, out):
        return cn, {ck: cmd}, out

    f.read, f.list, f.write, f.edit_call, f.run = do_read, do_list, do_write, do_edit, do_run
    f.edit_needs_read = r.random() < 0.7
    return f


FAMILIES = [(claude_family, 0.4), (codex_family, 0.2), (generic_family, 0.4)]

# --stage 2 (context extension, run on the stage-1 checkpoint): a share of
# the conversations carries an agent-sized prompt (a long system prompt,
# many tools with paragraph-long descriptions; 4-22K tokens, where the base
# was trained on 4K), and the clients' current shapes appear: Codex's
# `exec_command` ({"cmd": "..."}) beside `shell`, its environment as a user
# message of its own, Claude Code's environment section appended to the
# user's message (how mfx folds a mid-conversation system message).
STAGE = {"n": 1, "long_frac": 0.0, "long_chars": (12000, 90000)}


# ------------------------------------------------------------------ contents
WORDS = ("alpha beta gamma delta apple river stone cloud build test cache route token server client model data "
         "value index queue stack parser kernel driver config hello world note todo fix bug release draft "
         "green blue red orange small large quick slow first last north south").split()
DIRS = ["src", "lib", "tests", "docs", "app", "scripts", "pkg/util", "src/core", "examples", "bin", "tools", "web", "api", "config"]
STEMS = ["main", "utils", "config", "notes", "hello", "todo", "app", "server", "index", "test_api", "setup", "data",
         "lib", "mod", "helpers", "parser", "cli", "readme", "greeting", "output", "log", "report", "version", "Makefile"]
EXTS = [".py", ".rs", ".txt", ".md", ".json", ".toml", ".js", ".c", ".h", ".sh", ".yaml", ".txt", ".py"]
ROOTS = ["/home/user/project", "/home/dev/app", "/workspace", "/tmp/demo", "/Users/sam/code/tool", "/srv/repo", "/home/ana/src/site"]


def phrase(r, lo=1, hi=5):
    return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))


class Corpus:
    def __init__(self, code_dir, repo_root, r):
        docs = []
        p = Path(code_dir)
        if p.is_dir() and list(p.glob("*.txt")):
            for f in sorted(p.glob("*.txt")):
                docs += [d for d in f.read_text(errors="replace").split("\n<|endoftext|>\n") if d.strip()]
            self.source = f"{p}/*.txt"
        else:
            for ext in ("py", "rs"):
                for f in sorted(Path(repo_root).rglob(f"*.{ext}")):
                    if any(x in f.parts for x in ("target", ".git", ".toolmodel", "node_modules")):
                        continue
                    t = f.read_text(errors="replace")
                    docs += [t[i:i + 6000] for i in range(0, min(len(t), 60000), 6000)]
            self.source = f"{repo_root}/**/*.py,*.rs"
        r.shuffle(docs)
        self.docs = docs

    def snippet(self, r, max_lines):
        d = r.choice(self.docs).split("\n")
        i = r.randint(0, max(0, len(d) - max_lines))
        lines = [l.rstrip()[:100] for l in d[i:i + r.randint(2, max_lines)]]
        lines = [l for l in lines if "<|" not in l]
        return "\n".join(lines).strip("\n") or "pass"


def file_content(r, corpus, path):
    ext = os.path.splitext(path)[1]
    k = r.random()
    if ext in (".txt", ".md") or k < 0.25:
        lines = []
        if ext == ".md" and r.random() < 0.6:
            lines.append("# " + phrase(r, 1, 3).title())
        for _ in range(r.randint(1, 6)):
            lines.append(phrase(r, 2, 9).capitalize() + r.choice([".", "", "!", ":"]))
        return "\n".join(lines)
    if ext == ".json":
        return json.dumps({r.choice(WORDS): r.choice([r.randint(0, 999), phrase(r, 1, 2), True]) for _ in range(r.randint(1, 4))}, indent=2)
    if ext in (".toml", ".yaml"):
        sep = " = " if ext == ".toml" else ": "
        return "\n".join(f"{r.choice(WORDS)}{sep}{json.dumps(phrase(r, 1, 2)) if r.random() < 0.5 else r.randint(0, 99)}" for _ in range(r.randint(1, 5)))
    return corpus.snippet(r, 12)


def new_content(r, corpus, path):
    """Something a user asks to have written."""
    k = r.random()
    if k < 0.4:
        return r.choice(["hi", "hello", "hello world", "Hello, World!", "ok", "test", "done", "42", "TODO", "hi there"]) if r.random() < 0.5 else phrase(r, 1, 6)
    if k < 0.7:
        return file_content(r, corpus, path)
    return "\n".join(phrase(r, 1, 6) for _ in range(r.randint(2, 4)))


def rand_path(r, fam_abs, root):
    name = r.choice(STEMS)
    name = name if name == "Makefile" else name + r.choice(EXTS)
    if name == "readme.md" or (r.random() < 0.15):
        name = r.choice(["README.md", "README.md", "CHANGELOG.md", "LICENSE", "Cargo.toml", "package.json", "setup.py", "requirements.txt"])
    d = r.choice(DIRS) if r.random() < 0.45 else ""
    rel = f"{d}/{name}" if d else name
    return rel, (f"{root}/{rel}" if fam_abs else rel)


def rand_entries(r):
    n = r.randint(1, 8)
    out = set()
    while len(out) < n:
        e = r.choice(STEMS)
        e = e if e == "Makefile" else (e + r.choice(EXTS) if r.random() < 0.8 else r.choice(DIRS).split("/")[-1] + "/")
        out.add(e)
    return sorted(out)


COMMANDS = [
    ("pwd", lambda r, root: root),
    ("python3 --version", lambda r, root: f"Python 3.{r.randint(8, 13)}.{r.randint(0, 12)}"),
    ("node --version", lambda r, root: f"v{r.randint(16, 24)}.{r.randint(0, 12)}.{r.randint(0, 9)}"),
    ("whoami", lambda r, root: r.choice(["user", "dev", "ana", "sam", "root"])),
    ("uname -s", lambda r, root: r.choice(["Linux", "Darwin"])),
    ("date +%Y", lambda r, root: str(r.randint(2020, 2027))),
    ("git status --short", lambda r, root: "\n".join(f" M {rand_path(r, False, root)[0]}" for _ in range(r.randint(1, 3)))),
    ("git log --oneline -3", lambda r, root: "\n".join(f"{r.getrandbits(28):07x} {phrase(r, 2, 5)}" for _ in range(3))),
    ("git branch --show-current", lambda r, root: r.choice(["main", "master", "dev", "feature/" + r.choice(WORDS)])),
    ("pytest -q", lambda r, root: f"{r.randint(1, 40)} passed in {r.randint(0, 9)}.{r.randint(10, 99)}s"),
    ("cargo test", lambda r, root: f"test result: ok. {r.randint(1, 60)} passed; 0 failed; 0 ignored"),
    ("npm test", lambda r, root: f"Tests: {r.randint(1, 30)} passed, {r.randint(1, 30)} total"),
    ("make", lambda r, root: "make: Nothing to be done for 'all'."),
    ("df -h .", lambda r, root: f"Filesystem Size Used Avail Use% Mounted on\n/dev/sda1 {r.randint(20, 500)}G {r.randint(5, 19)}G {r.randint(1, 400)}G {r.randint(5, 95)}% /"),
    ("nproc", lambda r, root: str(r.choice([2, 4, 8, 16, 32]))),
]


def run_task(r, root):
    k = r.random()
    if k < 0.3:
        word = phrase(r, 1, 3)
        return f"echo {word}", word
    if k < 0.45:
        a, b = r.randint(1, 99), r.randint(1, 99)
        return f"python3 -c \"print({a}+{b})\"", str(a + b)
    if k < 0.55:
        p = rand_path(r, False, root)[0]
        return f"wc -l {p}", f"{r.randint(1, 400)} {p}"
    cmd, out = r.choice(COMMANDS)
    return cmd, out(r, root)


# ------------------------------------------------------------- conversations
def call_msg(r, name, args, text=None):
    tc = {"id": f"call_{r.getrandbits(40):010x}", "type": "function", "function": {"name": name, "arguments": args}}
    return {"role": "assistant", "content": text or "", "tool_calls": [tc]}


def preamble(r, what):
    return r.choice(["", "", "", "", f"I'll {what}.", f"Let me {what}.", f"First I'll {what}."])


def system_prompt(r, fam, root, corpus):
    k = r.random()
    env = f"<env>\nWorking directory: {root}\nIs directory a git repo: {r.choice(['Yes', 'No'])}\nPlatform: {r.choice(['linux', 'darwin'])}\n</env>"
    if fam.name == "claude" and k < 0.7:
        sp = ("You are Claude Code, Anthropic's official CLI for Claude.\nYou are an interactive CLI tool that helps users with software "
              "engineering tasks. Use the instructions below and the tools available to you to assist the user.\n") + env
    elif fam.name == "codex" and k < 0.7:
        sp = ("You are a coding agent running in the Codex CLI, a terminal-based coding assistant. You are expected to be precise, safe, "
              f"and helpful.\n<environment_context>\n  <cwd>{root}</cwd>\n  <shell>bash</shell>\n</environment_context>")
    elif k < 0.85:
        sp = r.choice(["You are a helpful coding assistant.", "You are a helpful assistant with access to tools.",
                       "You are an AI agent that can read and write files and run commands.", f"You are a coding agent. The working directory is {root}."])
    else:
        sp = None
    if sp and r.random() < 0.12:
        # A long system prompt, as agent clients send: the call must still
        # come from the tool list at the start and the question at the end.
        sp += "\n\n" + "\n".join(corpus.snippet(r, 40) for _ in range(r.randint(1, 4)))
    return sp


def claude_env_section(r, root):
    """Claude Code's environment, sent as a system message after the user's
    (mfx appends it to that user message)."""
    return (f"# Environment\nYou have been invoked in the following environment: \n - Primary working directory: {root}\n"
            f" - Is a git repository: {r.choice(['true', 'false'])}\n - Platform: {r.choice(['linux', 'darwin'])}\n - Shell: {r.choice(['bash', 'zsh'])}")


def prose(r, corpus, n):
    """n paragraphs of instruction-like filler from the corpus."""
    out = []
    for _ in range(n):
        head = r.random()
        if head < 0.3:
            out.append("# " + phrase(r, 1, 4).title())
        elif head < 0.5:
            out.append("\n".join(f" - {phrase(r, 3, 12).capitalize()}." for _ in range(r.randint(2, 6))))
        out.append(corpus.snippet(r, 30))
    return "\n\n".join(out)


def synth_tool(r, corpus):
    """A distractor tool the size real clients send: a long description and
    typed, sometimes nested, parameters."""
    w = [r.choice(WORDS) for _ in range(r.randint(1, 3))]
    name = "".join(x.title() for x in w) if r.random() < 0.5 else "_".join(w)
    props, req = {}, []
    for _ in range(r.randint(1, 7)):
        k = "_".join(r.choice(WORDS) for _ in range(r.randint(1, 2)))
        t = r.choice(["string", "string", "number", "integer", "boolean", "enum", "array", "object"])
        d = phrase(r, 3, 14).capitalize() + "."
        if t == "enum":
            props[k] = {"type": "string", "enum": r.sample(WORDS, r.randint(2, 4)), "description": d}
        elif t == "array":
            props[k] = {"type": "array", "items": {"type": r.choice(["string", "object"])}, "description": d}
        elif t == "object":
            props[k] = {"type": "object", "properties": {r.choice(WORDS): {"type": "string"}}, "description": d}
        else:
            props[k] = {"type": t, "description": d}
        if r.random() < 0.4:
            req.append(k)
    return tool(name, prose(r, corpus, r.randint(1, 4)), props, sorted(set(req)))


def lengthen(r, conv, corpus):
    """Grows a conversation's prompt to an agent's size: paragraph-long tool
    descriptions, extra tools, a long system prompt."""
    target = r.randint(*STAGE["long_chars"])
    # A copy: the distractor tools are shared module-level dicts.
    conv["tools"] = tools = json.loads(json.dumps(conv["tools"]))
    msgs = conv["messages"]
    size = lambda: len(json.dumps(tools)) + sum(len(m.get("content") or "") for m in msgs)
    for t in tools:
        if r.random() < 0.6:
            t["function"]["description"] += "\n\n" + prose(r, corpus, r.randint(1, 3))
    names = {t["function"]["name"] for t in tools}
    sys_msg = msgs[0] if msgs and msgs[0]["role"] == "system" else None
    if sys_msg is None:
        sys_msg = {"role": "system", "content": "You are a coding agent."}
        msgs.insert(0, sys_msg)
    while size() < target:
        if r.random() < 0.45 and len(tools) < 40:
            t = synth_tool(r, corpus)
            if t["function"]["name"] not in names:
                names.add(t["function"]["name"])
                tools.insert(r.randint(0, len(tools)), t)
        else:
            sys_msg["content"] += "\n\n" + prose(r, corpus, r.randint(2, 6))
    conv["family"] += "-long"


def rand_root(r):
    """A working directory never seen twice (test harnesses run in mktemp
    folders): the model must copy it from the prompt."""
    tmp = "".join(r.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(6))
    return r.choice([f"/tmp/{r.choice(WORDS)}-{r.choice(WORDS)}.{tmp}/{r.choice(WORDS)}/repo", f"/tmp/tmp.{tmp}",
                     f"/home/{r.choice(WORDS)}/{r.choice(WORDS)}-{r.randint(1, 99)}", f"/var/folders/{tmp.lower()}/T/{r.choice(WORDS)}"])


def user_text(r, text):
    if STAGE["n"] >= 2 and r.random() < 0.15:
        return ("<system-reminder>\n" + phrase(r, 8, 30).capitalize() + ":\n- " + phrase(r, 4, 12) + "\n- " + phrase(r, 4, 12)
                + "\n</system-reminder>\n" + text)
    if r.random() < 0.08:
        return f"<system-reminder>\nThis is a reminder that your todo list is currently empty.\n</system-reminder>\n{text}"
    return text


WHOLE_RULES = [
    "To change a file, reply with the entire content of the updated file, as a *file listing*:\n\n"
    "path/to/filename.ext\n```\n// entire file content ...\n```\n\n"
    "Every *file listing* starts with a line holding just the file's path, then an opening ```, "
    "the whole content of the file, and a closing ```. Never elide content. To create a new file, "
    "reply with a *file listing* of it.",
    "Edit files by returning each changed file in full using this format:\n\nrelative/path.txt\n```\n"
    "full new contents\n```\n\nThe first line is only the path. Then ``` on its own line, the complete "
    "file, and ``` again. New files are created the same way.",
]


def whole_file_conversation(r, corpus):
    """An editor that takes no tools but whole-file listings (aider's
    `whole` edit format): the files are shown in the chat, the request
    comes with the format's rules, the reply is a short plan and a
    *file listing* of every changed or new file."""
    rules = r.choice(WHOLE_RULES)
    sp = r.choice(["Act as an expert software developer.\nTake requests for changes to the supplied code.\n"
                   "If the request is ambiguous, ask questions.\n\n",
                   "You are a careful coding assistant that edits files.\n\n", ""]) + rules
    msgs = [{"role": "system", "content": sp}]
    if r.random() < 0.5:
        ex_rel = rand_path(r, False, "")[0]
        ex_c = new_content(r, corpus, ex_rel)
        msgs += [{"role": "user", "content": f"Change {ex_rel} to say something else"},
                 {"role": "assistant", "content": f"Ok, I will rewrite {ex_rel}.\n\n{ex_rel}\n```\n{ex_c}\n```"},
                 {"role": "user", "content": "I switched to a new code base. Please don't consider the above files any longer."},
                 {"role": "assistant", "content": "Ok."}]
    rel = rand_path(r, False, "")[0]
    old = "" if r.random() < 0.5 else file_content(r, corpus, rel)
    new = new_content(r, corpus, rel)
    if r.random() < 0.6:
        msgs += [{"role": "user", "content": f"I have *added these files to the chat* so you can go ahead and edit them.\n\n{rel}\n```\n{old + chr(10) if old else ''}```"},
                 {"role": "assistant", "content": "Ok, any changes I propose will be to those files."}]
    short = "\n" not in new and len(new) < 40
    q = r.choice([f"Create a new file {rel} whose whole content is the single word: {new}" if short and " " not in new else f"Create {rel} containing {new}",
                  f"Make {rel} contain exactly: {new}" if short else f"Replace the contents of {rel} with:\n{new}",
                  f"Write {new} to {rel}" if short else f"Put this in {rel}:\n{new}"])
    msgs.append({"role": "user", "content": q + "\n\n" + rules})
    msgs.append({"role": "assistant", "content": r.choice(["", f"Ok, I will write {rel}.\n\n", f"I'll create {rel} with that content.\n\n"])
                 + f"{rel}\n```\n{new}\n```"})
    return {"tools": [], "messages": msgs, "family": "whole", "task": "write", "expect": None}


def make_conversation(r, corpus, fmt_hint=None):
    if STAGE["n"] >= 2 and r.random() < 0.06:
        return whole_file_conversation(r, corpus)
    famf = r.choices([f for f, _ in FAMILIES], [w for _, w in FAMILIES])[0]
    fam = famf(r)
    r.shuffle(fam.tools)
    root = r.choice(ROOTS) if STAGE["n"] < 2 or r.random() < 0.5 else rand_root(r)
    msgs = []
    sp = system_prompt(r, fam, root, corpus)
    if sp:
        msgs.append({"role": "system", "content": sp})
    task = r.choices(["read", "list", "write", "edit", "run", "chat", "write2"], [0.25, 0.15, 0.2, 0.13, 0.17, 0.05, 0.05])[0]
    expect = None  # (tool, args) of the first call

    if task == "read":
        rel, p = rand_path(r, fam.abs_paths, root)
        content = file_content(r, corpus, rel)
        lines = content.split("\n")
        q, ans = r.choice([
            (f"What is the first line of {rel}?", f"The first line of {rel} is:\n{lines[0]}"),
            (f"what's the first line of {rel}", f"{lines[0]}"),
            (f"Read {rel}", f"{rel} has {len(lines)} line{'s' if len(lines) > 1 else ''}. It starts with:\n{lines[0]}"),
            (f"Show me the contents of {rel}.", f"Here is {rel}:\n{content}" if len(content) < 400 else f"{rel} starts with:\n" + "\n".join(lines[:3])),
            (f"How many lines are in {rel}?", f"{rel} has {len(lines)} line{'s' if len(lines) > 1 else ''}."),
            (f"What does {rel} say?", f"It says:\n{content}" if len(content) < 300 else f"It begins with:\n{lines[0]}"),
            (f"What is the last line of {rel}?", f"The last line of {rel} is:\n{lines[-1]}"),
        ])
        msgs.append({"role": "user", "content": user_text(r, q)})
        name, args, result = fam.read(p, content)
        expect = (name, args)
        msgs.append(call_msg(r, name, args, preamble(r, f"read {rel}")))
        msgs.append({"role": "tool", "content": result})
        msgs.append({"role": "assistant", "content": ans})
    elif task == "list":
        d = r.choice(DIRS + [".", ".", "."])
        dp = root if (d == "." and fam.abs_paths) else (f"{root}/{d}" if fam.abs_paths else d)
        entries = rand_entries(r)
        q = r.choice([f"What files are in {d}?", f"List the files in {d}", f"ls {d}", f"What's in the {d} directory?",
                      "List the current directory." if d == "." else f"Which files does {d} contain?",
                      "What files are here?" if d == "." else f"Show the contents of the {d} folder."])
        msgs.append({"role": "user", "content": user_text(r, q)})
        name, args, result = fam.list(dp, entries)
        expect = (name, args)
        msgs.append(call_msg(r, name, args, preamble(r, "list the directory")))
        msgs.append({"role": "tool", "content": result})
        msgs.append({"role": "assistant", "content": r.choice([f"{'The current directory' if d == '.' else d} contains: " + ", ".join(entries) + ".",
                                                               "Files:\n" + "\n".join(f"- {e}" for e in entries),
                                                               f"There {'is' if len(entries) == 1 else 'are'} {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: " + ", ".join(entries) + "."])})
    elif task in ("write", "write2"):
        rel, p = rand_path(r, fam.abs_paths, root)
        c = new_content(r, corpus, rel)
        short = "\n" not in c and len(c) < 40
        q = r.choice([f"Create {rel} containing {c}" if short else f"Create {rel} with this content:\n{c}",
                      f"create a file {rel} with the text {c}" if short else f"Write the following to {rel}:\n{c}",
                      f"Write \"{c}\" to {rel}" if short else f"Save this as {rel}:\n{c}",
                      f"Make a file called {rel} that says {c}" if short else f"Put this in {rel}:\n{c}"])
        if task == "write2":
            rel2, p2 = rand_path(r, fam.abs_paths, root)
            c2 = r.choice(["hi", "ok", phrase(r, 1, 3)])
            q = f"Create {rel} containing {c.splitlines()[0]} and {rel2} containing {c2}"
            c = c.splitlines()[0]
        msgs.append({"role": "user", "content": user_text(r, q)})
        name, args, result = fam.write(p, c)
        expect = (name, args)
        if task == "write2" and r.random() < 0.5:
            # Both calls in one turn (parallel calls).
            n2, a2, res2 = fam.write(p2, c2)
            m = call_msg(r, name, args, preamble(r, "create both files"))
            m["tool_calls"].append(call_msg(r, n2, a2)["tool_calls"][0])
            msgs += [m, {"role": "tool", "content": result}, {"role": "tool", "content": res2}]
        elif task == "write2":
            n2, a2, res2 = fam.write(p2, c2)
            msgs += [call_msg(r, name, args), {"role": "tool", "content": result}, call_msg(r, n2, a2), {"role": "tool", "content": res2}]
        else:
            msgs.append(call_msg(r, name, args, preamble(r, f"create {rel}")))
            msgs.append({"role": "tool", "content": result})
        msgs.append({"role": "assistant", "content": r.choice([f"Created {rel}.", f"Done: {rel} now contains the requested text.", f"I wrote {rel}.", "Done."])
                     if task == "write" else f"Created {rel} and {rel2}."})
    elif task == "edit":
        rel, p = rand_path(r, fam.abs_paths, root)
        content = file_content(r, corpus, rel)
        lines = content.split("\n")
        i = r.randrange(len(lines))
        old = lines[i] if lines[i].strip() else (lines[0] or "x")
        new = r.choice([old.replace(w, r.choice(WORDS), 1) for w in old.split()[:3]] or [old + " " + r.choice(WORDS)])
        if new == old:
            new = old + " " + r.choice(WORDS)
        after = content.replace(old, new, 1)
        q = r.choice([f"In {rel}, change `{old.strip()}` to `{new.strip()}`", f"Replace \"{old.strip()}\" with \"{new.strip()}\" in {rel}",
                      f"Edit {rel}: replace the line\n{old}\nwith\n{new}", f"update {rel} so that {old.strip()} becomes {new.strip()}"])
        msgs.append({"role": "user", "content": user_text(r, q)})
        if fam.edit_needs_read:
            name, args, result = fam.read(p, content)
            expect = (name, args)
            msgs += [call_msg(r, name, args, preamble(r, f"read {rel}")), {"role": "tool", "content": result}]
        n2, a2, res2 = fam.edit_call(p, old, new, after)
        if expect is None:
            expect = (n2, a2)
        msgs += [call_msg(r, n2, a2), {"role": "tool", "content": res2},
                 {"role": "assistant", "content": r.choice([f"Updated {rel}.", f"Done: {rel} now has `{new.strip()}`.", f"Changed the line in {rel}."])}]
    elif task == "run":
        cmd, out = run_task(r, root)
        q = r.choice([f"Run `{cmd}`", f"run {cmd}", f"What does `{cmd}` print?", f"Execute {cmd} and tell me the output.",
                      f"Can you run `{cmd}` for me?"])
        msgs.append({"role": "user", "content": user_text(r, q)})
        name, args, result = fam.run(cmd, out)
        expect = (name, args)
        msgs.append(call_msg(r, name, args, preamble(r, "run it")))
        msgs.append({"role": "tool", "content": result})
        msgs.append({"role": "assistant", "content": r.choice([f"It printed:\n{out}", f"Output:\n{out}", out if "\n" not in out else f"The command printed:\n{out}"])})
    else:
        q, a = r.choice([("What does `len` do in Python?", "`len(x)` returns the number of items in `x`."),
                         ("Say hello in one short sentence.", "Hello! How can I help you today?"),
                         ("hi", "Hi! What would you like to do?"),
                         ("What is 2+2?", "4."),
                         ("How do I reverse a list in Python?", "Use `items.reverse()` in place, or `items[::-1]` for a reversed copy."),
                         ("What is a Rust `Vec`?", "A growable array type: `Vec<T>` owns a heap buffer of `T` values."),
                         ("Thanks!", "You're welcome!")])
        msgs.append({"role": "user", "content": q})
        msgs.append({"role": "assistant", "content": a})
    conv = {"tools": fam.tools, "messages": msgs, "family": fam.name, "task": task, "expect": expect}
    if STAGE["n"] >= 2:
        client_shapes(r, conv, root)
        if r.random() < STAGE["long_frac"]:
            lengthen(r, conv, corpus)
    return conv


def client_shapes(r, conv, root):
    """Stage 2: where the clients now put their environment."""
    msgs = conv["messages"]
    first_user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
    if conv["family"] == "claude" and r.random() < 0.5:
        msgs[first_user]["content"] += "\n\n" + claude_env_section(r, root)
    elif conv["family"] == "codex" and r.random() < 0.5:
        env = (f"<environment_context>\n  <cwd>{root}</cwd>\n  <shell>{r.choice(['bash', 'zsh'])}</shell>\n"
               f"  <current_date>2026-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}</current_date>\n</environment_context>")
        msgs.insert(first_user, {"role": "user", "content": env})


# ----------------------------------------------------------------- rendering
def load_template(fmt):
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False,
                             undefined=jinja2.Undefined, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda v, **k: json.dumps(v, ensure_ascii=False)
    return env.from_string(TEMPLATES[fmt].read_text())


def for_template(messages, fmt):
    """Tool-call arguments as each template expects them: Hermes gets the
    JSON text the model should write; the XML template gets each value as
    text (strings as-is, anything else as JSON, as vLLM and mfx type it back
    from the schema)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = dict(m)
            tcs = []
            for tc in m["tool_calls"]:
                a = tc["function"]["arguments"]
                if fmt == "hermes":
                    a = json.dumps(a, ensure_ascii=False)
                else:
                    a = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in a.items()}
                tcs.append({**tc, "function": {"name": tc["function"]["name"], "arguments": a}})
            m["tool_calls"] = tcs
        out.append(m)
    return out


def render(tmpl, conv, fmt):
    """The full text and the character spans of the assistant turns."""
    msgs = for_template(conv["messages"], fmt)
    full = tmpl.render(messages=msgs, tools=conv["tools"], add_generation_prompt=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = tmpl.render(messages=msgs[:i], tools=conv["tools"], add_generation_prompt=True)
        upto = tmpl.render(messages=msgs[:i + 1], tools=conv["tools"], add_generation_prompt=False)
        assert full.startswith(upto) and upto.startswith(head), f"template {fmt} does not render prefixes stably"
        end = upto.index("<|im_end|>", len(head)) + len("<|im_end|>")
        spans.append([len(head), end])
    prompt = tmpl.render(messages=msgs[:next(i for i, m in enumerate(msgs) if m["role"] == "assistant")], tools=conv["tools"], add_generation_prompt=True)
    return full, spans, prompt


CHUNK = 250  # conversations per work unit: the output depends on --seed, not on --jobs
_G = {}


def gen_chunk(job):
    """The rows of one chunk, from its own seeded stream."""
    i, n, code_frac, xml_frac, seed = job
    r = random.Random(f"{seed}/{i}")
    corpus, tmpls = _G["corpus"], _G["tmpls"]
    rows = ["conv"] * n + ["code"] * int(round(n * code_frac / (1 - code_frac)))
    r.shuffle(rows)
    out, counts = [], {}
    for kind in rows:
        if kind == "code":
            d = r.choice(corpus.docs)
            j = r.randint(0, max(0, len(d) - 3000))
            text = d[j:j + 3000] + ("<|endoftext|>" if j + 3000 >= len(d) else "")
            out.append(json.dumps({"text": text, "spans": [[0, len(text)]], "kind": "code"}, ensure_ascii=False))
            continue
        conv = make_conversation(r, corpus)
        fmt = "xml" if r.random() < xml_frac else "hermes"
        full, spans, _ = render(tmpls[fmt], conv, fmt)
        key = f"{fmt}/{conv['family']}/{conv['task']}"
        counts[key] = counts.get(key, 0) + 1
        out.append(json.dumps({"text": full, "spans": spans, "kind": key}, ensure_ascii=False))
    return out, counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (train.jsonl, eval.jsonl)")
    ap.add_argument("--n", type=int, default=20000, help="training conversations")
    ap.add_argument("--n-eval", type=int, default=200, help="held-out first-turn prompts")
    ap.add_argument("--code-frac", type=float, default=0.15, help="fraction of rows that are plain code/prose text")
    ap.add_argument("--xml-frac", type=float, default=0.65, help="fraction of conversations in the shipped (XML) format")
    ap.add_argument("--code-dir", default=".toolmodel/data", help="folder of *.txt documents separated by <|endoftext|>")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--stage", type=int, default=1, choices=[1, 2], help="2: context extension and current client shapes (see STAGE)")
    ap.add_argument("--long-frac", type=float, default=0.35, help="stage 2: share of conversations with an agent-sized prompt")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    repo = HERE.parent.parent
    STAGE["n"] = a.stage
    STAGE["long_frac"] = a.long_frac if a.stage >= 2 else 0.0
    _G["corpus"] = corpus = Corpus(a.code_dir if os.path.isabs(a.code_dir) else repo / a.code_dir, repo, random.Random(a.seed + 1))
    _G["tmpls"] = tmpls = {f: load_template(f) for f in TEMPLATES}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(i, min(CHUNK, a.n - i * CHUNK), a.code_frac, a.xml_frac, a.seed) for i in range((a.n + CHUNK - 1) // CHUNK)]
    counts, n_rows = {}, 0
    if a.jobs > 1:
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(a.jobs)
        results = pool.imap(gen_chunk, jobs)
    else:
        results = map(gen_chunk, jobs)
    with open(out / "train.jsonl", "w") as f:
        for rows, c in results:
            for line in rows:
                f.write(line + "\n")
            n_rows += len(rows)
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
    if a.jobs > 1:
        pool.close()
    er = random.Random(a.seed + 7919)  # held out: another stream of the same generator
    with open(out / "eval.jsonl", "w") as f:
        k = 0
        while k < a.n_eval:
            conv = make_conversation(er, corpus)
            if conv["expect"] is None:
                continue
            fmt = "xml" if er.random() < a.xml_frac else "hermes"
            _, _, prompt = render(tmpls[fmt], conv, fmt)
            name, args = conv["expect"]
            tool_def = next(t["function"] for t in conv["tools"] if t["function"]["name"] == name)
            f.write(json.dumps({"prompt": prompt, "format": fmt, "name": name, "args": args,
                                "required": tool_def["parameters"]["required"], "kind": f"{fmt}/{conv['family']}/{conv['task']}",
                                "schema": tool_def["parameters"]}, ensure_ascii=False) + "\n")
            k += 1
    print(f"gen_data: {a.n} conversations, {n_rows} rows with code/prose from {corpus.source} -> {out}/train.jsonl; {a.n_eval} eval prompts")
    for key in sorted(counts):
        print(f"  {key}: {counts[key]}")


if __name__ == "__main__":
    main()
