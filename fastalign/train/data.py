"""Data: read rows (JSONL, Parquet, a ``datasets`` directory), tokenize them, batch them reproducibly.

Row formats (TRL's):

- SFT: ``{"prompt": str, "completion": str}``, ``{"messages": [{"role", "content"}, ...]}`` (the last message is
  the assistant's completion), or ``prompt``/``completion`` as message lists.
- Preference: ``{"prompt": str, "chosen": str, "rejected": str}``, or ``chosen``/``rejected`` as message lists
  (with ``prompt`` a message list, or absent when the conversations carry it).

Chat messages are rendered with the tokenizer's chat template; the completion is what the full conversation adds
after the prompt rendered with ``add_generation_prompt=True``. Labels are -100 on prompt tokens (loss on the
completion only). A malformed row raises :class:`DataError` naming the file and line, or, with
``skip_bad_rows``, is skipped, counted and reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastalign.assets import ASSETS, EMBEDDED
from fastalign.hf import final_hidden

EMBEDDED_DATA = {"sft": "sft_train.jsonl", "pref": "pref_train.jsonl"}
EMBEDDED_EVAL = {"sft": "eval.jsonl", "pref": "pref_eval.jsonl"}


class DataError(ValueError):
    """A row that cannot be used, with where it is (``file:line``)."""


@dataclass
class Skipped:
    """Rows skipped under ``skip_bad_rows``: their locations and reasons."""

    rows: list[str] = field(default_factory=list)

    def add(self, where: str, why: str) -> None:
        self.rows.append(f"{where}: {why}")

    def report(self) -> str:
        if not self.rows:
            return ""
        head = "\n  ".join(self.rows[:20])
        more = f"\n  ... and {len(self.rows) - 20} more" if len(self.rows) > 20 else ""
        return f"skipped {len(self.rows)} bad row(s):\n  {head}{more}"


def resolve_data(path: str, kind: str, eval_set: bool = False) -> str:
    """``"embedded"`` -> the asset file for ``kind`` ("sft" or "pref"); other paths unchanged."""
    if path == EMBEDDED:
        return str(ASSETS / "data" / (EMBEDDED_EVAL if eval_set else EMBEDDED_DATA)[kind])
    return path


def setup_data(cfg, kind: str, encode_row, say, tok):
    """``(train, held_out, prompts, skipped)`` of a run: its training and held-out examples (``kind`` "sft" or
    "pref", encoded by ``encode_row``), the exact-match prompts, and the record of skipped rows (reported through
    ``say``). With ``data=embedded``, the held-out and exact-match sets default to the embedded ones."""
    enc = Encoder(tok, cfg.max_length, cfg.truncation_mode)
    skipped = Skipped()
    train = load_examples(resolve_data(cfg.data, kind), encode_row, enc, cfg.skip_bad_rows, skipped)
    embedded = cfg.data == EMBEDDED
    eval_path = cfg.eval_data or (resolve_data(EMBEDDED, kind, eval_set=True) if embedded else "")
    held_out = load_examples(eval_path, encode_row, enc, cfg.skip_bad_rows, skipped) if eval_path else []
    gen_path = cfg.gen_eval_data or (resolve_data(EMBEDDED, "sft", eval_set=True) if embedded else "")
    prompts = load_prompts(gen_path, enc) if gen_path else []
    if skipped.rows:
        say(skipped.report())
    return train, held_out, prompts, skipped


def iter_rows(path: str):
    """Yield ``(where, row)`` for every row of a JSONL file, a Parquet file or a ``datasets`` directory.

    A row that cannot be read (a line that is not UTF-8, not JSON, nested too deeply or not an object; a Parquet
    row group that does not decode) is yielded as ``(where, DataError)`` naming ``file:line`` (or
    ``file[row group g]``), so a caller may raise or skip it. A file that cannot be opened at all (a Parquet file
    without a readable footer, a directory that is no saved dataset) raises :class:`DataError`.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if p.is_dir():
        yield from _dataset_rows(path)
    elif p.suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        yield from _jsonl_rows(path)


def _jsonl_rows(path: str):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            except RecursionError:
                yield where, DataError(f"{where}: not valid JSON for fastalign (nested too deeply)")
                continue
            except ValueError as e:  # e.g. an integer of more digits than Python converts
                yield where, DataError(f"{where}: not valid JSON ({e})")
                continue
            if not isinstance(row, dict):
                yield where, DataError(f"{where}: a row must be a JSON object; got {type(row).__name__}")
                continue
            if _SURROGATE_ESCAPE.search(line) and not _is_unicode(row):
                yield where, DataError(f"{where}: not valid Unicode text (an unpaired surrogate escape such as "
                                       f"\\ud800, which no tokenizer can encode)")
                continue
            yield where, row


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _is_unicode(row) -> bool:
    """False when a string of ``row`` holds an unpaired surrogate (JSON's ``\\ud800``: not encodable as UTF-8)."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parquet_rows(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path} needs `pip install pyarrow`") from e
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    first = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        try:
            rows = pf.read_row_group(g).to_pylist()
        except (OSError, ValueError) as e:
            where = f"{path}[row group {g}]"
            yield where, DataError(f"{where}: unreadable Parquet row group ({e}; rows {first} to {first + n - 1})")
        else:
            for i, row in enumerate(rows):
                yield f"{path}[row {first + i}]", row
        first += n


def _dataset_rows(path: str):
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path} is a directory: reading a saved dataset needs `pip install datasets`") from e
    try:
        ds = datasets.load_from_disk(path)
    except (OSError, ValueError) as e:  # FileNotFoundError: no dataset saved there
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    for i, row in enumerate(ds):
        yield f"{path}[row {i}]", row


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                                       isinstance(m.get("content"), str) for m in x)


class Encoder:
    """Tokenize rows into ``(input_ids, labels)`` with completion-only labels and truncation."""

    def __init__(self, tokenizer, max_length: int, truncation_mode: str = "keep_end"):
        self.tok, self.max_length, self.mode = tokenizer, max_length, truncation_mode

    def _text(self, text: str, special: bool) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def _chat(self, messages, generation_prompt: bool) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise DataError("chat messages need a tokenizer with a chat template; this one has none")
        out = self.tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def prompt_ids(self, prompt) -> list[int]:
        """The rendered prompt, as generation starts from it."""
        return self._chat(prompt, True) if _is_messages(prompt) else self._text(prompt, True)

    def encode(self, prompt, completion, where: str) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one prompt + completion; labels are -100 on the prompt."""
        if _is_messages(completion):
            prompt_msgs = prompt if _is_messages(prompt) else ([] if prompt in (None, "") else None)
            if prompt_msgs is None:
                raise DataError(f"{where}: prompt must be chat messages when the completion is; got {prompt!r:.60}")
            if not prompt_msgs:  # the conversation holds its prompt: everything before the last message
                prompt_msgs, completion = completion[:-1], completion[-1:]
            p = self._chat(prompt_msgs, True)
            full = self._chat(prompt_msgs + completion, False)
            if full[:len(p)] != p:
                raise DataError(f"{where}: the chat template does not render the prompt as a prefix of the "
                                f"conversation, so the completion tokens cannot be found")
            c = full[len(p):]
        elif isinstance(completion, str) and isinstance(prompt, str):
            p = self._text(prompt, True)
            c = self._text(completion, False)
            if self.tok.eos_token_id is not None:
                c = c + [self.tok.eos_token_id]
        else:
            raise DataError(f"{where}: prompt and completion must both be strings, or chat messages (lists of "
                            f"{{role, content}}); got {type(prompt).__name__} and {type(completion).__name__}")
        ids, labels = p + c, [-100] * len(p) + c
        if len(ids) > self.max_length:
            cut = slice(None, self.max_length) if self.mode == "keep_start" else slice(-self.max_length, None)
            ids, labels = ids[cut], labels[cut]
        if all(t == -100 for t in labels[1:]):
            raise DataError(f"{where}: no completion token is left after truncation to max_length="
                            f"{self.max_length} ({self.mode}); raise max_length")
        return ids, labels


def _field(row: dict, name: str, where: str):
    if name not in row or row[name] is None:
        raise DataError(f"{where}: missing field {name!r} (fields present: {', '.join(sorted(row)) or 'none'})")
    return row[name]


def encode_sft_row(enc: Encoder, row: dict, where: str):
    if "messages" in row:
        msgs = row["messages"]
        if not _is_messages(msgs) or len(msgs) < 2:
            raise DataError(f"{where}: messages must be a list of at least 2 {{role, content}} messages")
        return enc.encode(msgs[:-1], msgs[-1:], where)
    return enc.encode(_field(row, "prompt", where), _field(row, "completion", where), where)


def encode_pref_row(enc: Encoder, row: dict, where: str):
    prompt = row.get("prompt", "")
    chosen, rejected = _field(row, "chosen", where), _field(row, "rejected", where)
    if _is_messages(chosen) and not prompt:  # implicit prompt: the shared beginning of the two conversations
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    return enc.encode(prompt, chosen, where) + enc.encode(prompt, rejected, where)


def load_examples(path: str, encode_row, enc: Encoder, skip_bad_rows: bool, skipped: Skipped | None = None):
    """Encode every row of ``path`` with ``encode_row(enc, row, where)``; bad rows raise or are skipped."""
    skipped = skipped if skipped is not None else Skipped()
    out = []
    for where, row in iter_rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            out.append(encode_row(enc, row, where))
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(f"{e} (or pass --skip-bad-rows to skip and count bad rows)") from None
            skipped.add(where, str(e).split(": ", 1)[-1])
    if not out:
        raise DataError(f"{path}: no usable rows" + (f"; {skipped.report()}" if skipped.rows else ""))
    return out


def load_prompts(path: str, enc: Encoder):
    """``(prompt_ids, answer)`` pairs of prompt/completion rows (for the exact-match evaluation)."""
    out = []
    for where, row in iter_rows(path):
        if isinstance(row, DataError):
            raise row
        out.append((enc.prompt_ids(_field(row, "prompt", where)), str(_field(row, "completion", where)).strip()))
    return out


def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate_sft(examples, pad_id: int, packing: bool = False, row_tokens: int | None = None) -> dict:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``; with ``packing``, packed rows
    (:func:`pack`) of at most ``row_tokens`` tokens (None: one row)."""
    ids = [e[0] for e in examples]
    if packing:
        return pack(ids, [e[1] for e in examples], row_tokens, pad_id)
    return {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(s) for s in ids], 0),
            "labels": pad([e[1] for e in examples], -100)}


def collate_pref(examples, pad_id: int, packing: bool = False, row_tokens: int | None = None) -> dict:
    """The chosen sequences stacked over the rejected ones: ``[2B, T]`` (rows ``[:B]`` chosen, ``[B:]`` rejected);
    with ``packing``, packed rows whose sequences are numbered the same way (chosen ``0..B-1``, rejected
    ``B..2B-1``)."""
    rows = [(e[0], e[1]) for e in examples] + [(e[2], e[3]) for e in examples]
    return collate_sft(rows, pad_id, packing, row_tokens)


def pack(ids: list[list[int]], labels: list[list[int]], row_tokens: int | None = None, pad_id: int = 0) -> dict:
    """A packed batch: the sequences laid end to end in rows of at most ``row_tokens`` tokens (None: one row, no
    pad token at all), placed first-fit by decreasing length; each row is padded to the longest row.

    Returns, all ``[R, W]``: ``input_ids``, ``labels`` (-100 on padding, and on each sequence's first token,
    which is not the next token of the sequence before it; a padded batch never scores position 0 either),
    ``position_ids`` (restarting at 0 for each sequence and for each row's padding tail: this is how the model
    keeps attention inside each sequence) and ``seq_ids`` (the sequence number of each token, in the order given;
    -1 on padding). Also the attention segments of the flattened rows (the sequences and the padding tails) as
    ``cu_seqlens`` ``[K + 1]`` int32 and ``max_seqlen`` (an int), for flash-attn's varlen kernel, and
    ``seq_last`` ``[S]`` int64: the flattened index of each sequence's last token.

    Example:
        >>> b = pack([[5, 6, 7], [8, 9]], [[-100, 6, 7], [-100, 9]])
        >>> b["input_ids"], b["position_ids"], b["seq_ids"]
        (tensor([[5, 6, 7, 8, 9]]), tensor([[0, 1, 2, 0, 1]]), tensor([[0, 0, 0, 1, 1]]))
    """
    n = len(ids)
    cap = row_tokens if row_tokens is not None else sum(len(s) for s in ids)
    if any(len(s) > cap for s in ids):
        raise ValueError(f"row_tokens must be at least the longest sequence ({max(len(s) for s in ids)}); "
                         f"got {row_tokens}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(n), key=lambda i: -len(ids[i])):  # first fit, decreasing (stable)
        r = next((r for r in range(len(rows)) if room[r] >= len(ids[i])), None)
        if r is None:
            rows.append([])
            room.append(cap)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= len(ids[i])
    W = max(cap - left for left in room)
    out = {k: [] for k in ("input_ids", "labels", "position_ids", "seq_ids")}
    segments, seq_last = [], [0] * n
    for r, row in enumerate(rows):
        tok, lab, pos, sid = [], [], [], []
        for i in row:
            seq_last[i] = r * W + len(tok) + len(ids[i]) - 1
            tok += ids[i]
            lab += [-100] + list(labels[i][1:])
            pos += range(len(ids[i]))
            sid += [i] * len(ids[i])
            segments.append(len(ids[i]))
        tail = W - len(tok)
        if tail:
            tok, lab, pos, sid = tok + [pad_id] * tail, lab + [-100] * tail, pos + list(range(tail)), sid + [-1] * tail
            segments.append(tail)
        for k, v in zip(out, (tok, lab, pos, sid)):
            out[k].append(v)
    batch = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(segments).cumsum(0)
    batch.update(cu_seqlens=cu, max_seqlen=max(segments), seq_last=torch.tensor(seq_last, dtype=torch.long))
    return batch


def to_device(batch: dict, device) -> dict:
    """A batch's tensors moved to ``device`` (its ints, such as ``max_seqlen``, as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass(frozen=True)
class Batcher:
    """Examples -> model inputs: right-padded rows, or with ``packing`` packed rows of at most ``row_tokens``
    tokens (:func:`pack`; None: one row)."""

    pad_id: int
    packing: bool = False
    row_tokens: int | None = None

    def sft(self, examples) -> dict:
        return collate_sft(examples, self.pad_id, self.packing, self.row_tokens)

    def pref(self, examples) -> dict:
        return collate_pref(examples, self.pad_id, self.packing, self.row_tokens)


class BatchStream:
    """Example indices in reproducible shuffled epochs, resumable from the number consumed.

    Epoch ``k`` is ``randperm(n)`` drawn from ``seed + k``. With ``world`` ranks, each takes every
    ``world``-th index of the global batch, so the global order does not depend on the number of ranks.
    """

    def __init__(self, n: int, seed: int, consumed: int = 0, rank: int = 0, world: int = 1):
        self.n, self.seed, self.consumed, self.rank, self.world = n, seed, consumed, rank, world
        self._epoch, self._order = -1, None

    def _index(self, i: int) -> int:
        epoch = i // self.n
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(self._order[i % self.n])

    def next(self, per_device: int) -> list[int]:
        """The next global batch of ``per_device * world`` indices; this rank's share."""
        start = self.consumed
        self.consumed += per_device * self.world
        return [self._index(i) for i in range(start + self.rank, start + per_device * self.world, self.world)]

    @property
    def epoch(self) -> float:
        return self.consumed / self.n


@torch.no_grad()
def check_packing(lm, device, autocast) -> None:
    """Raise when ``lm`` does not keep packed sequences apart.

    Packing relies on the model turning restarting ``position_ids`` into a block-diagonal mask (transformers'
    masking utilities, >= 4.54) or into flash-attn varlen boundaries. A model that ignores them would let each
    packed sequence attend to the ones before it in the row, silently. This runs two short random sequences
    packed and alone, and compares the second one's hidden states.
    """
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(lm.config.vocab_size, (n,), generator=g).tolist() for n in (7, 5))
    # one row: a (the longer: first fit by decreasing length), then b
    batch = to_device(pack([a, b], [a, b]), device)
    alone_ids = torch.tensor([b], device=device)
    was_training = lm.training
    lm.eval()
    try:
        with autocast:
            low_precision = torch.is_autocast_enabled(torch.device(device).type) or lm.dtype != torch.float32
            packed = final_hidden(lm, batch["input_ids"], None, batch["position_ids"], batch["cu_seqlens"],
                                  batch["max_seqlen"])[0, len(a):].float()
            alone = final_hidden(lm, alone_ids, torch.ones_like(alone_ids))[0].float()
    finally:
        lm.train(was_training)
    err, scale = float((packed - alone).abs().max()), float(alone.abs().max())
    tol = 5e-2 if low_precision else 1e-3  # a leak across sequences changes the hidden states by O(scale)
    if not err <= tol * max(scale, 1.0):
        raise RuntimeError(
            f"packing=true needs a model whose attention keeps packed sequences apart: "
            f"{type(lm).__name__} with attn_implementation={getattr(lm.config, '_attn_implementation', '?')} "
            f"gives a packed sequence other hidden states than the same sequence alone (max abs difference "
            f"{err:.3g}, scale {scale:.3g}). Use packing=false, or a transformers >= 4.54 model built on its "
            f"masking utilities, or attn_implementation=flash_attention_2.")
