"""DistilBERT's WordPiece tokenizer on the C++ core (``distilbert_fast._tokenizer``).

    from distilbert_fast import DistilBertTokenizer
    tok = DistilBertTokenizer.from_pretrained("path/to/local/checkpoint")   # vocab.txt or tokenizer.json
    batch = tok(["Hello world!", "Ünïcödé"], padding=True, return_tensors="pt")

The ids, tokens, offsets, masks and overflow windows are those of HuggingFace's
BertTokenizerFast / DistilBertTokenizerFast (the Rust ``tokenizers`` library); the constructor and
``__call__`` take HuggingFace's arguments. Batches are encoded on a C++ thread pool with the GIL
released; the result does not depend on the number of threads.
"""

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Mapping
from typing import NamedTuple

_core = None


def _core_module():
    # Imported on first use so that `import distilbert_fast` does not need this extension.
    global _core
    if _core is None:
        try:
            from . import _tokenizer
        except ImportError as exc:  # pragma: no cover - exercised only on a broken install
            raise ImportError(
                f"distilbert_fast's tokenizer extension (distilbert_fast._tokenizer) failed to load: {exc}. "
                "Build it with `pip install --no-build-isolation -e .` in the repository root."
            ) from exc
        _core = _tokenizer
    return _core


_INPUT_NAMES = ["input_ids", "attention_mask"]
VOCAB_FILES_NAMES = {"vocab_file": "vocab.txt", "tokenizer_file": "tokenizer.json"}
_SPECIAL_NAMES = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# the named special tokens of HF's add_special_tokens, in the order all_special_tokens lists them
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_PADDING = {True: "longest", "longest": "longest", "max_length": "max_length", False: "none", "do_not_pad": "none",
            None: "none"}
VERY_LARGE_INTEGER = int(1e30)  # HF's model_max_length for "no limit"
LARGE_INTEGER = int(1e20)  # above this, model_max_length means "no limit" (HF)
# The most rows one call with return_overflowing_tokens=True may produce (a tokenizer's
# max_rows_per_call; None: no cap). A pair's overflow windows combine as a cross product, so two
# 600-token texts at max_length=6 already give 40,000 rows: a cap turns a runaway request into a
# clear ValueError instead of gigabytes of lists.
MAX_ROWS_PER_CALL = 1 << 20
# One call's checked arguments, as DistilBertTokenizer._plan works them out (core_args: the
# core's encode_batch arguments after the texts)
_Plan = NamedTuple("_Plan", [("core_args", tuple), ("is_split_into_words", bool),
                             ("return_overflowing_tokens", bool), ("return_tensors", object), ("cap", int),
                             ("max_length", object), ("stride", int), ("plain_up_to", int),
                             ("split_special_tokens", bool)])
# the tokenizer's settings a plan depends on; setting one forgets the cached plans
_PLAN_INPUTS = frozenset({"model_max_length", "truncation_side", "padding_side", "pad_token_type_id",
                          "num_threads", "max_rows_per_call", "model_input_names", "split_special_tokens"})
# keywords that need _call's own handling
_UNPLANNED = frozenset({"text_target", "text_pair_target", "tokenizer_kwargs", "max_target_length"})
_MAX_PLANS = 64  # distinct argument sets remembered per tokenizer
_AS_BUFFERS = 13  # where a plan's core_args say "return tensors" (then the outputs asked for)

_TRUNCATION = {True: "longest_first", "longest_first": "longest_first", "only_first": "only_first",
               "only_second": "only_second", False: "none", "do_not_truncate": "none", None: "none"}


class CharSpan(NamedTuple):
    """A span of characters in the original text: [start, end)."""

    start: int
    end: int


class TokenSpan(NamedTuple):
    """A span of tokens in an encoded row: [start, end)."""

    start: int
    end: int


class BatchEncoding(dict):
    """The outputs of a tokenizer call, as transformers' BatchEncoding: a dict (``enc["input_ids"]``)
    with attribute access (``enc.input_ids``), ``.to(device)``, ``convert_to_tensors``, and the
    per-row maps ``tokens``, ``word_ids``, ``sequence_ids``, ``char_to_token``, ``token_to_chars``,
    ``token_to_word``, ``word_to_tokens``, ``word_to_chars``, ``char_to_word``,
    ``token_to_sequence`` (row 0 when the batch index is left out). ``enc[i]`` is row i's
    encoding (ids, tokens, offsets, word ids, ...).

    Built without per-row state by ``pad`` or by hand (``BatchEncoding(data, tensor_type="pt")``),
    the maps raise ValueError, as transformers' do for a slow tokenizer's output.
    """

    # Per-row state, as class attributes so that the C++ fast path can create an instance without
    # running __init__: _rows answers the per-row maps (the core's BatchResult, or _MaterializedRows
    # after unpickling); _source = (tokenizer, text) re-encodes on first use instead.
    _rows = None
    _source = None
    _n_sequences = None

    def __init__(self, data=None, encoding=None, tensor_type=None, prepend_batch_axis=False, n_sequences=None):
        super().__init__(data or {})
        if encoding is not None:
            self._rows = encoding
        if n_sequences is not None:
            self._n_sequences = n_sequences
        self.convert_to_tensors(tensor_type, prepend_batch_axis)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key):
        # enc[a:b] as transformers': the rows' encodings of a tokenizer call, else every value sliced
        # (a slice is not a dict key before Python 3.12, so it never reaches __missing__)
        if type(key) is slice:
            if self.is_fast:
                return self.encodings[key]
            return {name: value[key] for name, value in self.items()}
        return dict.__getitem__(self, key)

    def __missing__(self, key):
        # enc[i]: row i's encoding, as transformers' enc[i] gives its tokenizers.Encoding
        if isinstance(key, int) and not isinstance(key, bool):
            rows = self._row_data()
            n = len(rows)
            if not -n <= key < n:
                raise IndexError(f"batch index must be in [0, {n}), got {key}")
            return RowEncoding(rows, key % n)
        raise KeyError(key)

    @property
    def data(self):
        """The dict itself (transformers' BatchEncoding is a UserDict and keeps its items in .data)."""
        return self

    def copy(self):
        """A shallow copy that is still a BatchEncoding with the same per-row maps (dict.copy
        would give a plain dict), as transformers' ``enc.copy()``."""
        new = BatchEncoding(dict(self))
        new._rows, new._source, new._n_sequences = self._rows, self._source, self._n_sequences
        return new

    def __reduce__(self):
        rows = None
        if self._rows is not None or self._source is not None:
            rows = _MaterializedRows.of(self._row_data())
        return _rebuild_batch_encoding, (dict(self), rows, self._n_sequences)

    # -- per-row maps --------------------------------------------------------------------------------

    def _row_data(self):
        if self._rows is None:
            if self._source is None:
                raise ValueError("per-row maps (word_ids, char_to_token, ...) need a BatchEncoding made by a "
                                 "tokenizer call, not by pad() or by hand")
            tokenizer, text = self._source
            self._rows = tokenizer._rows_of(text)
        return self._rows

    def _row(self, batch_index):
        rows = self._row_data()
        n = len(rows)
        if not -n <= batch_index < n:
            raise IndexError(f"batch_index must be in [0, {n}), got {batch_index}")
        return batch_index % n

    @staticmethod
    def _split_index(batch_or_index, index):
        # transformers' convention: f(i) is row 0's index i, f(b, i) is row b's
        return (0, batch_or_index) if index is None else (batch_or_index, index)

    @property
    def n_sequences(self):
        """1 for single texts, 2 for pairs (None if unknown)."""
        if self._n_sequences is None and (self._rows is not None or self._source is not None):
            rows = self._row_data()
            if len(rows):
                self._n_sequences = rows.n_sequences(0)
        return self._n_sequences

    @property
    def is_fast(self):
        """True when the per-row maps are available (made by a tokenizer call)."""
        return self._rows is not None or self._source is not None

    @property
    def encodings(self):
        """Each row's encoding (RowEncoding), or None for a BatchEncoding made by pad() or by hand."""
        if not self.is_fast:
            return None
        rows = self._row_data()
        return [RowEncoding(rows, i) for i in range(len(rows))]

    def tokens(self, batch_index: int = 0):
        """The tokens of row ``batch_index``."""
        return self._row_data().tokens(self._row(batch_index))

    def word_ids(self, batch_index: int = 0):
        """Word index of each token of row ``batch_index`` (None for special and padding tokens)."""
        return self._row_data().word_ids(self._row(batch_index))

    def sequence_ids(self, batch_index: int = 0):
        """0 / 1 for tokens of the first / second text of row ``batch_index``, None for the rest."""
        return self._row_data().sequence_ids(self._row(batch_index))

    def token_to_sequence(self, batch_or_token_index: int, token_index=None):
        """Which text (0 or 1) a token comes from; None for special and padding tokens (and, as
        transformers, for an index past the row)."""
        b, t = self._split_index(batch_or_token_index, token_index)
        return _at(self.sequence_ids(b), t)

    def token_to_word(self, batch_or_token_index: int, token_index=None):
        """The word a token belongs to (in its own text); None for special and padding tokens."""
        b, t = self._split_index(batch_or_token_index, token_index)
        return _at(self.word_ids(b), t)

    def _sequence_range(self, rows, b, sequence_index):
        """Tokens [start, end) of text ``sequence_index`` in row b, as the Rust Encoding keeps them:
        a text the row does not have (the second of a single text) spans the whole row."""
        seqs = rows.sequence_ids(b)
        if not 0 <= sequence_index < rows.n_sequences(b):
            return 0, len(seqs)
        hits = [i for i, s in enumerate(seqs) if s == sequence_index]
        return (hits[0], hits[-1] + 1) if hits else (0, 0)

    def word_to_tokens(self, batch_or_word_index: int, word_index=None, sequence_index: int = 0):
        """TokenSpan of the tokens of a word of text ``sequence_index``, or None if none is left."""
        b, w = self._split_index(batch_or_word_index, word_index)
        rows = self._row_data()
        b = self._row(b)
        start, end = self._sequence_range(rows, b, sequence_index)
        first = last = None
        for i, word in enumerate(rows.word_ids(b)[start:end], start):
            if word is not None and word > w:
                break  # words come in order within a text
            if word == w:
                first = i if first is None else first
                last = i
        return None if first is None else TokenSpan(first, last + 1)

    def token_to_chars(self, batch_or_token_index: int, token_index=None):
        """CharSpan of a token in its text; None for special and padding tokens."""
        b, t = self._split_index(batch_or_token_index, token_index)
        rows = self._row_data()
        b = self._row(b)
        if _at(rows.sequence_ids(b), t) is None:
            return None
        return CharSpan(*rows.offsets(b)[t])

    def char_to_token(self, batch_or_char_index: int, char_index=None, sequence_index: int = 0):
        """Index of the token of text ``sequence_index`` that covers a character, or None
        (white space, a removed character, or a character cut off by truncation)."""
        b, c = self._split_index(batch_or_char_index, char_index)
        rows = self._row_data()
        b = self._row(b)
        start, end = self._sequence_range(rows, b, sequence_index)
        for i, (lo, hi) in enumerate(rows.offsets(b)[start:end], start):
            if lo <= c < hi:
                return i
        return None

    def word_to_chars(self, batch_or_word_index: int, word_index=None, sequence_index: int = 0):
        """CharSpan of a word of text ``sequence_index``, or None if none of its tokens is left."""
        b, w = self._split_index(batch_or_word_index, word_index)
        span = self.word_to_tokens(b, w, sequence_index)
        if span is None:
            return None
        offsets = self._row_data().offsets(self._row(b))
        return CharSpan(offsets[span.start][0], offsets[span.end - 1][1])

    def char_to_word(self, batch_or_char_index: int, char_index=None, sequence_index: int = 0):
        """The word of text ``sequence_index`` that covers a character, or None."""
        b, c = self._split_index(batch_or_char_index, char_index)
        token = self.char_to_token(b, c, sequence_index)
        return None if token is None else self.word_ids(b)[token]

    # -- tensors -------------------------------------------------------------------------------------

    def convert_to_tensors(self, tensor_type=None, prepend_batch_axis=False):
        """Turns every value into a torch tensor ('pt') or numpy array ('np'); returns self."""
        if tensor_type is None:
            return self
        tensor_type = getattr(tensor_type, "value", tensor_type)  # transformers' TensorType
        if tensor_type not in ("pt", "np"):
            raise ValueError(f"tensor_type must be 'pt', 'np' or None, got {tensor_type!r}")
        import numpy as np

        if tensor_type == "pt":
            import torch

            is_tensor = torch.is_tensor

            def as_tensor(value):
                if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
                    return torch.from_numpy(np.array(value))
                return torch.tensor(value, dtype=torch.int64 if _is_empty(value) else None)
        else:
            def is_tensor(value):
                return isinstance(value, np.ndarray)

            def as_tensor(value, dtype=None):
                if (isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, np.ndarray))
                        and len({len(v) for v in value}) > 1 and dtype is None):
                    # ragged rows: an object array of arrays, as transformers makes
                    value = as_tensor([np.asarray(v) for v in value], dtype=object)
                return np.asarray(value, dtype=np.int64 if dtype is None and _is_empty(value) else dtype)

        for key, value in self.items():
            if prepend_batch_axis:
                value = [value]
            if is_tensor(value):
                continue
            try:
                self[key] = as_tensor(value)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise ValueError(
                    "Unable to create tensor, you should probably activate truncation and/or padding with "
                    "'padding=True' 'truncation=True' to have batched tensors with the same length. Perhaps your "
                    f"features (`{key}` in this case) have excessive nesting (inputs type `list` where type `int` "
                    "is expected).") from exc
        return self

    def to(self, device, *, non_blocking=False):
        """Moves every tensor to ``device`` (a str, torch.device or int); returns self. Anything else
        (a dtype, say) is ignored with a warning, as transformers does, so that the ids are never cast."""
        import torch

        if isinstance(device, (str, int, torch.device)) and not isinstance(device, bool):
            for key, value in self.items():
                # as transformers: whatever has a .to (a tensor, a nested BatchEncoding) moves, the rest stays
                if callable(getattr(value, "to", None)):
                    self[key] = value.to(device=device, non_blocking=non_blocking)
        else:
            import warnings

            warnings.warn(f"BatchEncoding.to({device!r}): only a device moves a BatchEncoding; nothing was done")
        return self


def _rebuild_batch_encoding(data, rows, n_sequences):
    enc = BatchEncoding(data)
    enc._rows = rows
    enc._n_sequences = n_sequences
    return enc


class _MaterializedRows:
    """Per-row data as plain lists: what a BatchEncoding keeps when it is pickled (the core's rows
    stay in C++ memory and do not pickle)."""

    _FIELDS = ("ids", "type_ids", "attention_mask", "special_tokens_mask", "offsets", "word_ids", "sequence_ids",
               "tokens", "n_sequences")

    def __init__(self, rows):
        self._data = rows  # list of dicts, one per row

    @classmethod
    def of(cls, rows):
        if isinstance(rows, cls):
            return rows
        return cls([{name: getattr(rows, name)(i) for name in cls._FIELDS} for i in range(len(rows))])

    def __len__(self):
        return len(self._data)

    def __getattr__(self, name):
        if name in self._FIELDS:
            return lambda i: self._data[i][name]
        raise AttributeError(name)


class RowEncoding:
    """One row of a BatchEncoding, with the attributes of a ``tokenizers.Encoding`` (ids, type_ids,
    tokens, offsets, attention_mask, special_tokens_mask, word_ids, sequence_ids, n_sequences)."""

    def __init__(self, rows, index):
        self._rows, self._index = rows, index

    def __len__(self):
        return len(self._rows.ids(self._index))

    def __repr__(self):
        return f"RowEncoding(num_tokens={len(self)})"

    ids = property(lambda self: self._rows.ids(self._index))
    type_ids = property(lambda self: self._rows.type_ids(self._index))
    tokens = property(lambda self: self._rows.tokens(self._index))
    offsets = property(lambda self: [tuple(o) for o in self._rows.offsets(self._index)])
    attention_mask = property(lambda self: self._rows.attention_mask(self._index))
    special_tokens_mask = property(lambda self: self._rows.special_tokens_mask(self._index))
    word_ids = property(lambda self: self._rows.word_ids(self._index))
    words = word_ids
    sequence_ids = property(lambda self: self._rows.sequence_ids(self._index))
    n_sequences = property(lambda self: self._rows.n_sequences(self._index))

    # the maps of tokenizers' Encoding: BatchEncoding's, for this row
    def _batch(self):
        batch = BatchEncoding()
        batch._rows = self._rows
        return batch

    def char_to_token(self, char_pos, sequence_index=0):
        return self._batch().char_to_token(self._index, char_pos, sequence_index)

    def char_to_word(self, char_pos, sequence_index=0):
        return self._batch().char_to_word(self._index, char_pos, sequence_index)

    def token_to_chars(self, token_index):
        span = self._batch().token_to_chars(self._index, token_index)
        return None if span is None else tuple(span)

    def token_to_sequence(self, token_index):
        return self._batch().token_to_sequence(self._index, token_index)

    def token_to_word(self, token_index):
        return self._batch().token_to_word(self._index, token_index)

    def word_to_chars(self, word_index, sequence_index=0):
        span = self._batch().word_to_chars(self._index, word_index, sequence_index)
        return None if span is None else tuple(span)

    def word_to_tokens(self, word_index, sequence_index=0):
        span = self._batch().word_to_tokens(self._index, word_index, sequence_index)
        return None if span is None else tuple(span)


class _BackendView:
    """The part of a ``tokenizers.Tokenizer`` that transformers' pipelines read."""

    class _Model:
        type = "WordPiece"

        def __init__(self, prefix):
            self.continuing_subword_prefix = prefix

    def __init__(self, prefix):
        self.model = self._Model(prefix)


class BackendTokenizer:
    """What ``tokenizer.backend_tokenizer`` returns: a ``tokenizers.Tokenizer`` built from this
    tokenizer's ``to_tokenizer_json()`` (rebuilt when the tokenizer changes: added tokens, a new
    pad token, a setting applied through it), behind a guard that keeps it and the tokenizer in
    step. Everything a ``tokenizers.Tokenizer`` has is there (``encode``, ``get_vocab``,
    ``token_to_id``, ``truncation``, ``normalizer``, ...), with these rules:

    - ``normalizer``, ``pre_tokenizer``, ``post_processor``, ``decoder`` and ``model`` read as
      copies (changing one in place changes neither); assign one to change it. An assignment is
      applied to the tokenizer when it is one the tokenizer can run (a ``BertNormalizer``, or
      ``Sequence([Lowercase(), BertNormalizer(...)])`` as sentence-transformers' ``do_lower_case``
      sets, changes ``do_lower_case`` / ``strip_accents`` / ``tokenize_chinese_chars``; BERT's
      pre-tokenizer, template and decoder are kept as they are) and refused with a ValueError
      otherwise, so the two never tokenize differently.
    - ``add_tokens`` / ``add_special_tokens`` add to the tokenizer (``tokenizer.add_tokens``);
      ``encode_special_tokens = True`` is ``tokenizer.split_special_tokens = True``.
    - ``enable_truncation`` / ``no_truncation`` / ``enable_padding`` / ``no_padding`` set the
      backend's own settings: ``backend_tokenizer.encode`` applies them and ``save_pretrained``
      writes them into tokenizer.json, but the tokenizer's ``__call__`` does not, as in
      transformers (whose ``__call__`` replaces them with the call's arguments): there truncation
      and padding are per call arguments.
    - ``train`` / ``train_from_iterator`` are refused (make a new vocab, then a new tokenizer).
    - A copy (``copy.deepcopy``, pickling) is a plain ``tokenizers.Tokenizer`` of its own, no
      longer tied to the tokenizer (what ``PreTrainedTokenizerFast(tokenizer_object=...)`` takes).

    Needs the ``tokenizers`` package (installed with transformers); without it, reading
    ``backend_tokenizer`` is an ImportError that says so.
    """

    __slots__ = ("_owner",)
    _COMPONENTS = ("normalizer", "pre_tokenizer", "post_processor", "decoder", "model")

    def __init__(self, owner):
        object.__setattr__(self, "_owner", owner)

    def _backend(self):
        return self._owner._backend()

    def __getattr__(self, name):
        if name.startswith("__") or name == "_owner":  # (copy and pickle probe an empty instance)
            raise AttributeError(name)
        if name in BackendTokenizer._COMPONENTS:
            component = getattr(self._backend(), name)
            return None if component is None else _copy_component(component)
        if name in ("train", "train_from_iterator"):
            raise ValueError(f"backend_tokenizer.{name} is not supported: it would change the vocab under the "
                             "tokenizer; train a tokenizers.Tokenizer of your own and build a DistilBertTokenizer from "
                             "its vocab")
        return getattr(self._backend(), name)

    def __setattr__(self, name, value):
        owner = self._owner
        if name == "normalizer":
            owner._apply_normalizer(value)
        elif name in ("pre_tokenizer", "post_processor", "decoder", "model"):
            ours = getattr(self._backend(), name)
            if value is None or _component_state(value) != _component_state(ours):
                raise ValueError(
                    f"backend_tokenizer.{name} can not be changed: the tokenizer runs BERT's {name.replace('_', '-')} "
                    f"({_component_state(ours)[:200]}), and a different one would make backend_tokenizer and the "
                    f"tokenizer tokenize differently; got {value!r}")
        elif name == "encode_special_tokens":
            owner.split_special_tokens = bool(value)
        else:
            raise AttributeError(f"backend_tokenizer has no settable attribute {name!r}")

    def add_tokens(self, tokens):
        return self._owner.add_tokens(list(tokens))

    def add_special_tokens(self, tokens):
        return self._owner.add_tokens(list(tokens), special_tokens=True)

    def enable_truncation(self, max_length, stride=0, strategy="longest_first", direction="right"):
        backend = self._backend()
        backend.enable_truncation(max_length, stride=stride, strategy=strategy, direction=direction)
        self._owner._backend_truncation = _truncation_json(backend.truncation)

    def no_truncation(self):
        self._backend().no_truncation()
        self._owner._backend_truncation = None

    def enable_padding(self, **kwargs):
        backend = self._backend()
        backend.enable_padding(**kwargs)
        self._owner._backend_padding = _padding_json(backend.padding)

    def no_padding(self):
        self._backend().no_padding()
        self._owner._backend_padding = None

    def __repr__(self):
        return f"BackendTokenizer(vocab_size={self._owner.vocab_size}, of {self._owner!r})"

    def __dir__(self):
        return sorted(set(dir(self._backend())) | set(object.__dir__(self)))

    # a copy or a pickle is a plain tokenizers.Tokenizer of its own, no longer tied to the tokenizer
    # (what transformers' PreTrainedTokenizerFast(tokenizer_object=...) deep-copies)
    def __deepcopy__(self, memo):
        import copy

        return copy.deepcopy(self._backend(), memo)

    __copy__ = lambda self: self.__deepcopy__({})  # noqa: E731

    def __reduce__(self):
        return _tokenizers_from_str, (self._backend().to_str(),)


class PackedEncoding:
    """Rows back to back with no padding, as ``DistilBertTokenizer.encode_packed`` returns them:

    - ``input_ids``: int64 (total,), row r is ``input_ids[cu_seqlens[r]:cu_seqlens[r + 1]]``
    - ``cu_seqlens``: int32 (rows + 1,), starting at 0
    - ``max_seqlen``: int, the longest row (known on the host: no device sync to find it)
    - ``overflow_to_sample_mapping``: int64 (rows,), the text each row comes from
    - ``offset_mapping``: int64 (total, 2) code point spans, (0, 0) for special tokens; or None
    - ``word_ids``: int64 (total,), -1 for special tokens; or None
    - ``sequence_ids``: int8 (total,), 0 / 1 = first / second text, -1 for special tokens; or None

    Unpacks as ``ids, cu_seqlens, max_seqlen = tokenizer.encode_packed(texts)``.
    """

    __slots__ = ("input_ids", "cu_seqlens", "max_seqlen", "overflow_to_sample_mapping", "offset_mapping", "word_ids",
                 "sequence_ids")

    def __init__(self, input_ids, cu_seqlens, max_seqlen, overflow_to_sample_mapping, offset_mapping=None,
                 word_ids=None, sequence_ids=None):
        self.input_ids, self.cu_seqlens, self.max_seqlen = input_ids, cu_seqlens, max_seqlen
        self.overflow_to_sample_mapping = overflow_to_sample_mapping
        self.offset_mapping, self.word_ids, self.sequence_ids = offset_mapping, word_ids, sequence_ids

    def __iter__(self):
        return iter((self.input_ids, self.cu_seqlens, self.max_seqlen))

    @property
    def num_rows(self):
        return len(self.cu_seqlens) - 1

    def __repr__(self):
        return f"PackedEncoding(rows={self.num_rows}, tokens={len(self.input_ids)}, max_seqlen={self.max_seqlen})"


class DistilBertTokenizer:
    """DistilBERT's (BERT's) WordPiece tokenizer: basic tokenization (clean-up, CJK split,
    lower-casing, accent stripping, punctuation split) then greedy longest-match WordPiece.

    Arguments as HuggingFace's BertTokenizer: ``vocab_file`` (vocab.txt), ``do_lower_case``,
    ``do_basic_tokenize``, ``never_split``, the special tokens, ``tokenize_chinese_chars``,
    ``strip_accents`` (None: follow ``do_lower_case``), ``split_special_tokens`` (True: special
    tokens in the text are tokenized as plain text; each call may say otherwise). Also ``vocab`` (dict token -> id or list of
    tokens) or ``tokenizer_file`` (a tokenizer.json with a WordPiece model) instead of
    ``vocab_file``, ``model_max_length``, ``padding_side``, ``truncation_side``, ``num_threads``
    (threads for batches; 0 or None: all cores) and ``max_rows_per_call`` (the cap on overflow rows).

    Where transformers is loaded, an instance is also a ``transformers.PreTrainedTokenizerBase``
    (a subclass made on first use, as the model outputs do), so that clients that check with
    isinstance (sentence-transformers, Trainer) take it; transformers is never imported here.
    """

    # The C++ cores and the caches live in slots, outside the instance's __dict__: datasets
    # fingerprints a transformers tokenizer (Dataset.map's cache key) by pickling its __dict__,
    # which must then pickle (the cores do not) and depend only on the settings, not on the calls
    # made so far; _vocab_digest stands in there for the core's vocab.
    __slots__ = ("_core", "_split_core", "_plans", "_backend_cache", "__dict__", "__weakref__")

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = list(_INPUT_NAMES)
    pad_token_type_id = 0
    # special tokens BERT does not have (transformers' clients read them and get None)
    bos_token = eos_token = bos_token_id = eos_token_id = None
    _transformers_twin = False  # True on the transformers-compatible subclass
    # the backend's truncation / padding, as tokenizer.json holds them (see to_tokenizer_json)
    _backend_truncation = _backend_padding = None
    _no_pad_token = False  # True after tokenizer.pad_token = None: padding is then an error, as in HF
    # what transformers' clients read of a tokenizer that adds no BOS / EOS and no prefix space
    add_bos_token = add_eos_token = add_prefix_space = False

    def __new__(cls, *args, **kwargs):
        if not cls._transformers_twin and "transformers" in sys.modules:
            cls = _transformers_twin(cls)
        return super().__new__(cls)

    def __init__(self, vocab_file=None, do_lower_case=None, do_basic_tokenize=True, never_split=None,
                 unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                 tokenize_chinese_chars=None, strip_accents=None, *, vocab=None, tokenizer_file=None,
                 model_max_length=None, padding_side="right", truncation_side="right",
                 clean_up_tokenization_spaces=False, num_threads=None, max_rows_per_call=MAX_ROWS_PER_CALL,
                 continuing_subword_prefix=None, max_input_chars_per_word=None, added_tokens_decoder=None,
                 extra_special_tokens=None, additional_special_tokens=None, split_special_tokens=False, **kwargs):
        core = _core_module()
        specials = dict(unk_token=unk_token, sep_token=sep_token, pad_token=pad_token, cls_token=cls_token,
                        mask_token=mask_token)
        for name, value in specials.items():
            specials[name] = _token_text(value, name)
        prefix, max_chars = "##", 100
        if vocab is not None:
            if isinstance(vocab, dict):
                tokens = [None] * len(vocab)
                for token, index in vocab.items():
                    if not isinstance(index, int) or not 0 <= index < len(vocab) or tokens[index] is not None:
                        raise ValueError(f"vocab ids must be the integers 0..{len(vocab) - 1} once each; "
                                         f"got {index!r} for {token!r}")
                    tokens[index] = token
            else:
                tokens = list(vocab)
        elif tokenizer_file is not None:
            model = core.read_tokenizer_json(os.fspath(tokenizer_file))
            tokens = model["vocab"]
            prefix, max_chars = model["continuing_subword_prefix"], model["max_input_chars_per_word"]
            # the file's added tokens, as HF's fast tokenizer takes them from it; those given win
            added_tokens_decoder = {**{t.pop("id"): t for t in model["added_tokens"]},
                                    **{int(i): t for i, t in (added_tokens_decoder or {}).items()}}
            with open(tokenizer_file, encoding="utf-8") as f:
                saved = json.load(f)  # the backend's truncation / padding (see to_tokenizer_json)
            self._backend_truncation, self._backend_padding = saved.get("truncation"), saved.get("padding")
            if "lowercase" in model:  # the file's normalizer, where the arguments leave it (as HF's)
                do_lower_case = model["lowercase"] if do_lower_case is None else do_lower_case
                strip_accents = model["strip_accents"] if strip_accents is None else strip_accents
                if tokenize_chinese_chars is None:
                    tokenize_chinese_chars = model["handle_chinese_chars"]
        elif vocab_file is not None:
            if not os.path.isfile(vocab_file):
                raise ValueError(f"vocab_file '{vocab_file}' does not exist: expected a vocab.txt with one token per line")
            tokens = core.read_vocab_file(os.fspath(vocab_file))
        else:
            raise ValueError("DistilBertTokenizer needs a vocab: pass vocab_file (vocab.txt), tokenizer_file "
                             "(tokenizer.json) or vocab (dict or list)")
        prefix = prefix if continuing_subword_prefix is None else continuing_subword_prefix
        max_chars = max_chars if max_input_chars_per_word is None else max_input_chars_per_word
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if truncation_side not in ("right", "left"):
            raise ValueError(f"truncation_side must be 'right' or 'left', got {truncation_side!r}")
        if strip_accents is not None and not isinstance(strip_accents, bool):
            raise TypeError(f"strip_accents must be None, True or False, got {strip_accents!r}")
        self.vocab_file = vocab_file
        self.do_lower_case = True if do_lower_case is None else bool(do_lower_case)
        tokenize_chinese_chars = True if tokenize_chinese_chars is None else tokenize_chinese_chars
        self.do_basic_tokenize = bool(do_basic_tokenize)
        self.never_split = list(never_split or [])
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        self.strip_accents = strip_accents
        for name, value in specials.items():
            setattr(self, name, value)
        self._wordpiece = (prefix, int(max_chars))
        # the tokens the WordPiece model and the [CLS] ... [SEP] template use: HF keeps them when
        # add_special_tokens renames cls_token & co (only pad_token's change reaches the padding)
        self._template_tokens = dict(specials)
        self._init_added_tokens(tokens, specials, added_tokens_decoder,
                                extra_special_tokens if extra_special_tokens is not None else additional_special_tokens)
        self._build_core(tokens)
        if model_max_length is not None and (not _is_int(model_max_length) or model_max_length < 0):
            raise ValueError(f"model_max_length must be a non-negative int or None, got {model_max_length!r}")
        # HF: no model_max_length means "unlimited" (int(1e30)): truncation=True without max_length
        # then truncates nothing, and padding='max_length' without max_length pads nothing
        self.model_max_length = VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.num_threads = int(num_threads or 0)
        if max_rows_per_call is not None and (not _is_int(max_rows_per_call) or max_rows_per_call < 1):
            raise ValueError(f"max_rows_per_call must be a positive int or None, got {max_rows_per_call!r}")
        self.max_rows_per_call = max_rows_per_call
        self.split_special_tokens = bool(split_special_tokens)
        for name in _SPECIAL_NAMES:
            setattr(self, name + "_id", self._core.token_to_id(getattr(self, name)))
        self.name_or_path = kwargs.get("name_or_path", "")
        # a BERT model's tokenizer also returns token_type_ids by default (HF's model_input_names)
        self.model_input_names = list(kwargs.get("model_input_names", type(self).model_input_names))
        self.init_kwargs = {"do_lower_case": self.do_lower_case, "strip_accents": strip_accents,
                            "tokenize_chinese_chars": self.tokenize_chinese_chars,
                            "model_max_length": self.model_max_length, **specials}

    def _build_core(self, tokens):
        if "_vocab_digest" not in self.__dict__:  # (the vocab never changes; added tokens are in _added)
            self._vocab_digest = hashlib.sha256("\n".join(tokens).encode("utf-8", "surrogatepass")).hexdigest()
        self._core = self._make_core(tokens, split_special_tokens=False)
        self._split_core = None  # made on first use by a call with split_special_tokens=True
        self._backend_cache = None  # (core, tokenizers.Tokenizer) behind backend_tokenizer
        vocab_size = self._core.vocab_size()
        # HF's len(): the vocab's tokens and the added tokens' contents, each once
        self._num_tokens = vocab_size + sum(
            1 for index, t in self._added.items() if index >= vocab_size or tokens[index] != t.content)

    def _make_core(self, tokens, split_special_tokens):
        core = _core_module()
        prefix, max_chars = self._wordpiece
        template = self._template_tokens
        # the core matches each added token once, in HF's order of precedence (special tokens
        # first, then the others, each in the order added), with the flags its id has now;
        # with split_special_tokens (HF's encode_special_tokens) the special ones not at all
        added, seen = [], set()
        for token in self._added_order + self._added_plain:
            index = self._added_ids[token.content]
            if index not in seen:
                seen.add(index)
                t = self._added[index]
                added.append((t.content, index, t.special, t.normalized, t.lstrip, t.rstrip, t.single_word))
        pad = self.pad_token
        if pad is None or (pad not in self._added_ids and pad not in set(tokens)):
            pad = template["unk_token"]  # a pad token the vocab lacks pads with [UNK]'s id, as in HF
        made = core.Tokenizer(
            tokens, self.do_lower_case, self.strip_accents, self.tokenize_chinese_chars, self.do_basic_tokenize,
            self.never_split, template["unk_token"], template["sep_token"], pad, template["cls_token"],
            template["mask_token"], [], prefix, max_chars, added, not split_special_tokens)
        made.set_batch_encoding_class(BatchEncoding)
        return made

    def _encoding_core(self, split_special_tokens):
        """The core that encodes: the tokenizer's own, or (split_special_tokens=True) its twin that
        does not match the special tokens in the text."""
        if not split_special_tokens:
            return self._core
        if self._split_core is None:
            self._split_core = self._make_core(self._core.vocab(), split_special_tokens=True)
        return self._split_core

    # -- added tokens (HF's AddedVocabulary: the same bookkeeping, so the same ids and matches) --

    def _init_added_tokens(self, tokens, specials, added_tokens_decoder, extra_special_tokens):
        """The added tokens a new tokenizer starts with: those saved with it (ids kept), then the
        special tokens and the extra special tokens it does not have yet."""
        self._added = {}        # id -> _AddedToken (its current flags)
        self._added_ids = {}    # content -> id
        self._added_order = []  # special tokens in the order added (HF's special_tokens)
        self._added_plain = []  # the others in the order added (HF's added_tokens)
        self._special_contents = set()
        self._extra_special_tokens = []
        for index, token in sorted((int(i), t) for i, t in (added_tokens_decoder or {}).items()):
            token = _as_added_token(token, None, "added_tokens_decoder")
            if index < 0:
                raise ValueError(f"added_tokens_decoder: id {index} of {token.content!r} must be >= 0")
            self._insert_added(index, token)
        model_ids = {}  # the special tokens' vocab ids (found once; the vocab is a list)
        missing = [v for v in specials.values() if v not in self._added_ids]
        if missing:
            wanted = set(missing)
            model_ids = {t: i for i, t in enumerate(tokens) if t in wanted}
        for value in specials.values():
            if value not in self._added_ids:
                if value not in model_ids:
                    continue  # the core reports a special token the vocab lacks
                self._insert_added(model_ids[value], _AddedToken(value, normalized=False, special=True))
        for token in self._register_extra_special_tokens(list(extra_special_tokens or []), replace=True):
            if token.content not in self._added_ids:
                index = next((i for i, t in enumerate(tokens) if t == token.content), None)
                self._insert_added(self._next_id(len(tokens)) if index is None else index, token)

    def _insert_added(self, index, token):
        self._added_ids[token.content] = index
        self._added[index] = token
        if token.special and token.content not in self._special_contents:
            self._added_order.append(token)
            self._special_contents.add(token.content)
        elif token.content not in self._special_contents:
            self._added_plain.append(token)

    def _register_extra_special_tokens(self, values, replace):
        news = [_as_added_token(v, True, "extra_special_tokens") for v in values]
        news = [t for t in news if replace or t.content not in self._extra_special_tokens]
        if replace and news:
            self._extra_special_tokens = [t.content for t in news]
        else:
            self._extra_special_tokens.extend(t.content for t in news)
        return news

    def _next_id(self, vocab_size):
        top = max(self._added, default=-1)
        return top + 1 if top >= vocab_size else vocab_size

    def _add_tokens(self, new_tokens, special_tokens=False):
        tokens = [_as_added_token(t, True if special_tokens else None, "new_tokens") for t in new_tokens]
        vocab_size = self._core.vocab_size()
        for token in tokens:
            if token.special and token.content and token.content not in self._special_contents:
                self._added_order.append(token)
                self._special_contents.add(token.content)
        ignored = 0
        existing = set(self._added.values())
        next_id = self._next_id(vocab_size)
        for token in tokens:
            if not token.content or token in existing:
                ignored += 1
                continue
            index = self._added_ids.get(token.content)  # this call's earlier tokens are not in the core yet
            if index is None:
                index = self._core.token_to_id(token.content)
            if index is None:
                index, next_id = next_id, next_id + 1
            self._added_ids[token.content] = index
            self._added[index] = token
            existing.add(token)
            if token.content not in self._special_contents:
                self._added_plain.append(token)
        self._build_core(self._core.vocab())
        return len(tokens) - ignored

    def add_tokens(self, new_tokens, special_tokens=False):
        """Adds tokens (str, or tokenizers' AddedToken for its lstrip / rstrip / single_word /
        normalized flags)
        on top of the vocab, as HF's fast tokenizer does: each is then matched whole in the text
        (a str: in the normalized, lower-cased text; with ``special_tokens=True``: as it is, in the
        raw text, and skipped by ``decode(skip_special_tokens=True)``). A token new to the
        vocabulary gets the next id (len(tokenizer) before the call); one the vocab has keeps its
        id. Returns how many tokens were added (HF's count: those not added before with the same
        flags). Then ``model.resize_token_embeddings(len(tokenizer))``."""
        if not new_tokens:
            return 0
        if not isinstance(new_tokens, (list, tuple)):
            new_tokens = [new_tokens]
        return self._add_tokens(new_tokens, special_tokens=special_tokens)

    def add_special_tokens(self, special_tokens_dict, replace_extra_special_tokens=True):
        """Adds special tokens and names them, as HF's ``add_special_tokens``: keys
        bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token (the
        attribute is set to the token) and extra_special_tokens / additional_special_tokens (a
        list; replaces the previous list unless ``replace_extra_special_tokens=False``). Each is
        matched whole in the raw text. Returns the number of tokens added."""
        if not special_tokens_dict:
            return 0
        tokens_dict = dict(special_tokens_dict)
        if "additional_special_tokens" in tokens_dict and not tokens_dict.get("extra_special_tokens"):
            tokens_dict["extra_special_tokens"] = tokens_dict.pop("additional_special_tokens")
        allowed = _NAMED_SPECIALS + ("extra_special_tokens",)
        to_add = []
        for key, value in tokens_dict.items():
            if key not in allowed:
                raise ValueError(f"Key {key} is not a valid special token. Valid keys are: {sorted(allowed)}")
            if key == "extra_special_tokens":
                if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) or hasattr(t, "content")
                                                                   for t in value):
                    raise ValueError(f"Tokens {value} for key {key} should all be str or AddedToken instances")
                to_add.extend(self._register_extra_special_tokens(value, replace_extra_special_tokens))
            else:
                if not (isinstance(value, str) or hasattr(value, "content")):
                    raise ValueError(f"Token {value} for key {key} should be a str or an AddedToken instance")
                token = _as_added_token(value, True, key)
                to_add.append(token)
                self._set_named_special(key, token.content, None)
        added = self.add_tokens(to_add, special_tokens=True)
        for key in tokens_dict:  # their ids, now that the tokens exist
            if key in _NAMED_SPECIALS:
                self._set_named_special(key, getattr(self, key), self.convert_tokens_to_ids(getattr(self, key)))
        return added

    def _set_named_special(self, name, content, index):
        setattr(self, name, content)  # on the transformers-compatible subclass: into transformers' map
        # read from the instance: the class-level defaults (bos_token = None) would shadow that map
        self.__dict__[name], self.__dict__[name + "_id"] = content, index

    @property
    def extra_special_tokens(self):
        return list(self._extra_special_tokens)

    additional_special_tokens = extra_special_tokens

    @property
    def added_tokens_decoder(self):
        """id -> AddedToken (tokenizers' class where installed) of every added token, special
        tokens included, sorted by id: HF's ``added_tokens_decoder``."""
        make = _added_token_class()
        return {index: make(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                            normalized=t.normalized, special=t.special)
                for index, t in sorted(self._added.items())}

    @property
    def added_tokens_encoder(self):
        return {t.content: index for index, t in sorted(self._added.items())}

    def get_added_vocab(self):
        """content -> id of the added tokens (special tokens included), as HF's get_added_vocab."""
        return self.added_tokens_encoder

    # pickling and copying (DataLoader workers, multiprocessing, copy.deepcopy): rebuilt by the
    # constructor from the vocab and the settings, so the transformers-compatible subclass and the
    # plain class pickle alike
    def __reduce__(self):
        settings = {name: getattr(self, name) for name in _SETTINGS}
        settings["continuing_subword_prefix"], settings["max_input_chars_per_word"] = self._wordpiece
        settings.update(self._template_tokens)
        settings["added_tokens_decoder"] = {index: t._asdict() for index, t in self._added.items()}
        settings["extra_special_tokens"] = list(self._extra_special_tokens)
        settings["backend"] = (self._backend_truncation, self._backend_padding)
        renamed = {name: getattr(self, name) for name in _NAMED_SPECIALS
                   if getattr(self, name) != self._template_tokens.get(name)}
        return _rebuild_tokenizer, (_plain_class(type(self)), self._core.vocab(), settings, renamed)

    # -- loading and saving -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Loads from a local directory holding vocab.txt or tokenizer.json, plus optionally
        tokenizer_config.json and special_tokens_map.json (no network: hub names are refused)."""
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            raise ValueError(f"from_pretrained takes a local directory; '{path}' is not one (there is no download)")
        config = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                with open(file, encoding="utf-8") as f:
                    config.update(json.load(f))
        init = {k: v for k, v in config.items()
                if k in ("do_lower_case", "do_basic_tokenize", "never_split", "tokenize_chinese_chars",
                         "strip_accents", "model_max_length", "padding_side", "truncation_side",
                         "clean_up_tokenization_spaces", "model_input_names", "extra_special_tokens",
                         "additional_special_tokens", "split_special_tokens") + _SPECIAL_NAMES}
        json_file = os.path.join(path, "tokenizer.json")
        vocab_file = os.path.join(path, "vocab.txt")
        # added tokens, by id: tokenizer.json's added_tokens (what HF's fast tokenizer saves),
        # tokenizer_config.json's added_tokens_decoder, added_tokens.json (content -> id)
        added = {}
        added_file = os.path.join(path, "added_tokens.json")
        if os.path.isfile(added_file):
            with open(added_file, encoding="utf-8") as f:
                added.update({int(index): content for content, index in json.load(f).items()})
        added.update({int(index): token for index, token in (config.get("added_tokens_decoder") or {}).items()})
        if os.path.isfile(json_file):
            model = _core_module().read_tokenizer_json(json_file)
            added.update({token.pop("id"): token for token in model["added_tokens"]})
            # the normalizer settings of tokenizer.json are what HF's fast tokenizer runs
            if "lowercase" in model:
                init.setdefault("do_lower_case", model["lowercase"])
                init.setdefault("strip_accents", model["strip_accents"])
                init.setdefault("tokenize_chinese_chars", model["handle_chinese_chars"])
            init["tokenizer_file"] = json_file
        elif not os.path.isfile(vocab_file):
            prefixed = sorted(name for name in os.listdir(path) if name.endswith(("-tokenizer.json", "-vocab.txt")))
            hint = (f"; it holds {', '.join(prefixed)}, written by save_pretrained(filename_prefix=...): load "
                    f"those with {cls.__name__}(tokenizer_file=...) or vocab_file=..." if prefixed else "")
            raise ValueError(f"'{path}' holds neither vocab.txt nor tokenizer.json{hint}")
        if added:
            init["added_tokens_decoder"] = added
        init.update(kwargs)
        if isinstance(init.get("model_max_length"), float):  # json's 1e+30
            init["model_max_length"] = int(init["model_max_length"])
        return cls(vocab_file=vocab_file if os.path.isfile(vocab_file) else None, name_or_path=path, **init)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        """Writes the vocab, one token per line, to ``save_directory/[prefix-]vocab.txt``, as
        BertTokenizer does; returns (path,)."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_vocabulary needs an existing directory, got '{save_directory}'")
        path = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "") + "vocab.txt")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for token in self._core.vocab():
                f.write(token + "\n")
        return (path,)

    def to_tokenizer_json(self):
        """This tokenizer as a ``tokenizers`` serialization (the dict of a tokenizer.json): BERT's
        normalizer with our settings, BERT's pre-tokenizer (white space only with
        ``do_basic_tokenize=False``), the WordPiece model and vocab, the [CLS] ... [SEP] template,
        the WordPiece decoder and the added tokens with their flags. ``truncation`` / ``padding``
        are the backend's settings (those of the tokenizer.json it was loaded from, or set through
        ``backend_tokenizer``), which only ``backend_tokenizer.encode`` applies, as in transformers.
        ``tokenizers.Tokenizer.from_str(json.dumps(...))`` then encodes as this tokenizer does
        (``never_split`` has no equivalent there; HF's fast tokenizer ignores it too)."""
        prefix, max_chars = self._wordpiece
        template = self._template_tokens
        cls_token, sep_token = template["cls_token"], template["sep_token"]
        cls_id, sep_id = self._core.token_to_id(cls_token), self._core.token_to_id(sep_token)
        if self.do_basic_tokenize:
            normalizer = {"type": "BertNormalizer", "clean_text": True,
                          "handle_chinese_chars": self.tokenize_chinese_chars, "strip_accents": self.strip_accents,
                          "lowercase": self.do_lower_case}
            pre_tokenizer = {"type": "BertPreTokenizer"}
        else:  # HF's Python tokenizer's whitespace_tokenize: no clean-up, casing or punctuation split
            normalizer, pre_tokenizer = None, {"type": "WhitespaceSplit"}

        def special(token, type_id):
            return {"SpecialToken": {"id": token, "type_id": type_id}}

        def sequence(name, type_id):
            return {"Sequence": {"id": name, "type_id": type_id}}

        return {
            "version": "1.0",
            "truncation": self._backend_truncation,
            "padding": self._backend_padding,
            "added_tokens": [{"id": index, **t._asdict()} for index, t in sorted(self._added.items())],
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [special(cls_token, 0), sequence("A", 0), special(sep_token, 0)],
                "pair": [special(cls_token, 0), sequence("A", 0), special(sep_token, 0), sequence("B", 1),
                         special(sep_token, 1)],
                "special_tokens": {cls_token: {"id": cls_token, "ids": [cls_id], "tokens": [cls_token]},
                                   sep_token: {"id": sep_token, "ids": [sep_id], "tokens": [sep_token]}},
            },
            "decoder": {"type": "WordPiece", "prefix": prefix, "cleanup": True},
            "model": {"type": "WordPiece", "unk_token": template["unk_token"], "continuing_subword_prefix": prefix,
                      "max_input_chars_per_word": max_chars,
                      "vocab": {token: i for i, token in enumerate(self._core.vocab())}},
        }

    def save_pretrained(self, save_directory, legacy_format=None, filename_prefix=None, push_to_hub=False, **kwargs):
        """Writes tokenizer.json (``to_tokenizer_json``: what transformers' fast tokenizers and
        ``tokenizers.Tokenizer.from_file`` load), vocab.txt, tokenizer_config.json (with the added
        tokens in its added_tokens_decoder, as HF writes them), special_tokens_map.json and, when
        tokens were added beyond the vocab, added_tokens.json (content -> id); returns their paths.

        ``filename_prefix`` names every file ``PREFIX-<name>``, as transformers does (so several
        tokenizers can share a folder); ``from_pretrained`` (ours and transformers') reads the
        unprefixed names only: load such a save with ``tokenizer_file=".../PREFIX-tokenizer.json"``.
        ``legacy_format`` and the hub's other keywords change nothing; ``push_to_hub`` must be
        False (there is no network)."""
        if push_to_hub:
            raise ValueError("push_to_hub=True is not supported: distilbert_fast never uploads; save to a "
                             "directory and upload it with huggingface_hub")
        if filename_prefix is not None and not isinstance(filename_prefix, str):
            raise TypeError(f"filename_prefix must be a str or None, got {type(filename_prefix).__name__}")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained needs a directory, but {os.fspath(save_directory)!s} is a file")
        os.makedirs(save_directory, exist_ok=True)
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        (vocab_path,) = self.save_vocabulary(save_directory, filename_prefix)
        json_path = os.path.join(save_directory, prefix + "tokenizer.json")
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(self.to_tokenizer_json(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        specials = {name: getattr(self, name) for name in _SPECIAL_NAMES}
        config = {
            "tokenizer_class": "DistilBertTokenizer",
            "do_lower_case": self.do_lower_case,
            "do_basic_tokenize": self.do_basic_tokenize,
            "never_split": self.never_split or None,
            "tokenize_chinese_chars": self.tokenize_chinese_chars,
            "strip_accents": self.strip_accents,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "split_special_tokens": self.split_special_tokens,
            **specials,
        }
        if self.model_input_names != type(self).model_input_names:
            config["model_input_names"] = list(self.model_input_names)
        config["added_tokens_decoder"] = {str(index): t._asdict() for index, t in sorted(self._added.items())}
        if self._extra_special_tokens:
            config["extra_special_tokens"] = list(self._extra_special_tokens)
            specials["additional_special_tokens"] = list(self._extra_special_tokens)
        config_path = os.path.join(save_directory, prefix + "tokenizer_config.json")
        map_path = os.path.join(save_directory, prefix + "special_tokens_map.json")
        files = [(config_path, config), (map_path, specials)]
        vocab_size = self._core.vocab_size()
        new_tokens = {t.content: index for index, t in sorted(self._added.items()) if index >= vocab_size}
        added_path = os.path.join(save_directory, prefix + "added_tokens.json")
        if new_tokens:
            files.append((added_path, new_tokens))
        elif os.path.isfile(added_path):
            os.remove(added_path)  # a stale one from an earlier save would add tokens on load
        for file, data in files:
            with open(file, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
                f.write("\n")
        return (config_path, map_path, json_path, vocab_path) + ((added_path,) if new_tokens else ())

    # -- vocabulary ---------------------------------------------------------------------------------

    @property
    def vocab_size(self):
        return self._core.vocab_size()

    def __len__(self):
        """The vocab's size plus the added tokens new to it (what resize_token_embeddings takes)."""
        return self._num_tokens

    @property
    def vocab(self):
        """token -> id of the vocab and the added tokens (HF's BertTokenizerFast.vocab)."""
        return self.get_vocab()

    def get_vocab(self):
        """token -> id of the vocab and the added tokens."""
        vocab = {token: i for i, token in enumerate(self._core.vocab())}
        vocab.update(self.added_tokens_encoder)
        return vocab

    @property
    def all_special_tokens(self):
        """The named special tokens (bos, eos, unk, sep, pad, cls, mask: those set) and the
        extra special tokens, each once, as HF lists them."""
        tokens = [getattr(self, name) for name in _NAMED_SPECIALS]
        tokens = [t for t in tokens if t is not None] + self._extra_special_tokens
        return list(dict.fromkeys(tokens))

    @property
    def special_tokens_map(self):
        return {name: getattr(self, name) for name in _NAMED_SPECIALS if getattr(self, name) is not None}

    @property
    def all_special_ids(self):
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def convert_tokens_to_ids(self, tokens):
        """Id of a token (or ids of a list of tokens); unknown tokens get the [UNK] id."""
        if isinstance(tokens, str):
            found = self._core.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        """Token of an id (or tokens of a sequence of ids)."""
        if _is_int(ids):
            return self._id_to_token(int(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._id_to_token(int(i)) for i in _as_id_list(ids) if int(i) not in skip]

    def _id_to_token(self, index):
        token = self._core.id_to_token(index)
        if token is None:
            raise IndexError(f"token id {index} is out of range: expected 0 <= id < {self._core.num_ids()}")
        return token

    @property
    def backend_tokenizer(self):
        """A ``tokenizers.Tokenizer`` equal to this tokenizer, kept in step with it (see
        BackendTokenizer for what may be changed through it)."""
        return BackendTokenizer(self)

    def _backend(self):
        """The ``tokenizers.Tokenizer`` behind backend_tokenizer, made again when the core changed."""
        cache = self._backend_cache
        if cache is None or cache[0] is not self._core:
            try:
                from tokenizers import Tokenizer
            except ImportError as exc:
                raise ImportError("backend_tokenizer needs the `tokenizers` package (pip install tokenizers; it "
                                  "comes with transformers); the tokenizer itself does not") from exc
            backend = Tokenizer.from_str(json.dumps(self.to_tokenizer_json(), ensure_ascii=False))
            backend.encode_special_tokens = self.split_special_tokens
            cache = (self._core, backend)
            object.__setattr__(self, "_backend_cache", cache)
        backend = cache[1]
        if backend.encode_special_tokens != self.split_special_tokens:
            backend.encode_special_tokens = self.split_special_tokens
        return backend

    def _apply_normalizer(self, normalizer):
        """backend_tokenizer.normalizer = ...: BERT's normalizer with other settings (alone, or
        after a Lowercase as sentence-transformers puts it) changes ours; anything else is refused."""
        state = json.loads(_component_state(normalizer)) if normalizer is not None else None
        parts = state.get("normalizers", []) if state and state.get("type") == "Sequence" else [state]
        lowercase_first = len(parts) == 2 and parts[0] == {"type": "Lowercase"}
        bert = parts[-1] if parts and (len(parts) == 1 or lowercase_first) else None
        if (not self.do_basic_tokenize or not isinstance(bert, dict) or bert.get("type") != "BertNormalizer"
                or not bert.get("clean_text", True)):
            raise ValueError("backend_tokenizer.normalizer must be a tokenizers BertNormalizer (clean_text=True), "
                             "alone or as Sequence([Lowercase(), BertNormalizer(...)]): the tokenizer runs BERT's "
                             f"normalizer and could not run {normalizer!r}")
        lowercase = bool(bert.get("lowercase", True))
        strip = bert.get("strip_accents")
        strip = lowercase if strip is None else bool(strip)  # BertNormalizer: None follows lowercase
        self.do_lower_case = lowercase or lowercase_first
        self.strip_accents = None if strip == self.do_lower_case else strip
        self.tokenize_chinese_chars = bool(bert.get("handle_chinese_chars", True))
        self.init_kwargs.update(do_lower_case=self.do_lower_case, strip_accents=self.strip_accents,
                                tokenize_chinese_chars=self.tokenize_chinese_chars)
        self._build_core(self._core.vocab())

    @property
    def _tokenizer(self):
        # A fast tokenizer's Rust object, as far as transformers' token-classification pipeline
        # reads it (model.continuing_subword_prefix tells it the tokenizer marks subwords, so that
        # aggregation_strategy='first' / 'average' / 'max' finds words as with HF's tokenizer).
        return _BackendView(self._wordpiece[0])

    # -- encoding -----------------------------------------------------------------------------------

    is_fast = True  # offsets, word ids and overflow windows, as HF's Rust-backed tokenizers give

    def tokenize(self, text, pair=None, add_special_tokens=False, split_special_tokens=None, **kwargs):
        """WordPiece tokens of ``text`` (special tokens in the text stay whole unless
        ``split_special_tokens``, default the tokenizer's); ``is_split_into_words=True`` takes
        lists of words. Other keywords (truncation, max_length, ...) change nothing, as in
        transformers, whose tokenize passes them where they are not read."""
        if kwargs.get("is_split_into_words"):
            return self(text, pair, add_special_tokens=add_special_tokens, split_special_tokens=split_special_tokens,
                        is_split_into_words=True).tokens()
        core = self._encoding_core(self.split_special_tokens if split_special_tokens is None else split_special_tokens)
        tokens = core.tokenize(text)
        if pair is not None:
            pair_tokens = core.tokenize(pair)
            if add_special_tokens:
                return [self.cls_token, *tokens, self.sep_token, *pair_tokens, self.sep_token]
            return tokens + pair_tokens
        if add_special_tokens:
            return [self.cls_token, *tokens, self.sep_token]
        return tokens

    def encode(self, text, text_pair=None, add_special_tokens=True, **kwargs):
        """input_ids of one text (or pair) as a list, or a tensor with return_tensors."""
        return self(text, text_pair, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def encode_plus(self, text, text_pair=None, **kwargs):
        """One text (or pair, or list of words with is_split_into_words=True) encoded: transformers
        4's encode_plus, the same as ``tokenizer(text, text_pair, ...)``."""
        if _is_batched(text, kwargs.get("is_split_into_words", False), "text"):
            raise ValueError("encode_plus takes one text (a str, or a list of words with is_split_into_words=True); "
                             "use batch_encode_plus or __call__ for a batch")
        return self(text, text_pair, **kwargs)

    def batch_encode_plus(self, batch_text_or_text_pairs, **kwargs):
        """A batch of texts, or of (text, text_pair) pairs, encoded: transformers 4's
        batch_encode_plus, the same as ``tokenizer(texts, text_pairs, ...)``."""
        if not isinstance(batch_text_or_text_pairs, (list, tuple)):
            raise ValueError("batch_text_or_text_pairs must be a list of texts or of (text, text_pair) pairs, got "
                             f"{type(batch_text_or_text_pairs).__name__}")
        split = kwargs.get("is_split_into_words", False)
        items = list(batch_text_or_text_pairs)
        # a pair is a 2-tuple/list of texts (of lists of words, pre-split)
        is_pair = bool(items) and isinstance(items[0], (list, tuple)) and (
            not split or (len(items[0]) == 2 and isinstance(items[0][0], (list, tuple))))
        if not is_pair:
            return self(items, **kwargs) if items else self._empty_batch(**kwargs)
        for i, item in enumerate(items):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ValueError(f"batch_text_or_text_pairs[{i}] must be a (text, text_pair) pair, got {item!r}")
        return self([a for a, _ in items], [b for _, b in items], **kwargs)

    def _empty_batch(self, **kwargs):
        return self([], **kwargs)

    chat_template = None  # BERT has none (transformers' base class sets its own on the twin)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """transformers' chat templates, where transformers is loaded (the twin runs its
        PreTrainedTokenizerBase.apply_chat_template); BERT's tokenizer has no template of its own,
        so without one given this is transformers' ValueError."""
        if self._transformers_twin:
            from transformers import PreTrainedTokenizerBase

            return PreTrainedTokenizerBase.apply_chat_template(self, conversation, chat_template=chat_template, **kwargs)
        if chat_template is None and self.chat_template is None:
            raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set and no "
                             "template argument was passed! For information about writing templates and setting the "
                             "tokenizer.chat_template attribute, please see the documentation at "
                             "https://huggingface.co/docs/transformers/main/en/chat_templating")
        raise ImportError("apply_chat_template renders templates with transformers: import transformers before "
                          "making the tokenizer")

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        if token_ids_1 is None:
            return [self.cls_token_id, *token_ids_0, self.sep_token_id]
        return [self.cls_token_id, *token_ids_0, self.sep_token_id, *token_ids_1, self.sep_token_id]

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        if token_ids_1 is None:
            return [0] * (len(token_ids_0) + 2)
        return [0] * (len(token_ids_0) + 2) + [1] * (len(token_ids_1) + 1)

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        """1 for special tokens, 0 for the rest: of ids that already hold them
        (``already_has_special_tokens=True``, as the data collators ask), or of the row that
        build_inputs_with_special_tokens would make."""
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("token_ids_1 must be None with already_has_special_tokens=True: the ids given "
                                 "already hold both sequences")
            special = set(self.all_special_ids)
            return [1 if int(t) in special else 0 for t in _as_id_list(token_ids_0)]
        if token_ids_1 is None:
            return [1] + [0] * len(token_ids_0) + [1]
        return [1] + [0] * len(token_ids_0) + [1] + [0] * len(token_ids_1) + [1]

    def num_special_tokens_to_add(self, pair=False):
        return 3 if pair else 2

    @property
    def max_len_single_sentence(self):
        return self.model_max_length - 2

    @property
    def max_len_sentences_pair(self):
        return self.model_max_length - 3

    def __call__(self, text=None, text_pair=None, **kwargs):
        """Encodes a text, a batch of texts, pairs, or pre-split words, as HuggingFace's tokenizer
        ``__call__`` does (same arguments, same outputs); see ``_call`` for the arguments."""
        if text_pair is None and type(text) is str and self.model_input_names == _INPUT_NAMES:
            if not kwargs and not self.split_special_tokens:
                # the common call, one str with every default: built in C++ (per-row maps on demand)
                return self._core.encode_text(text, self)
            # one str with arguments: their checks and strategies are worked out once per distinct
            # set of arguments (see _plan) and reused; that, not the C++, was most of such a call
            key = tuple(kwargs.items())
            try:
                plan = self._plans.get(key)
            except TypeError:  # an unhashable argument value: no reuse
                key, plan = None, None
            if plan is None and key is not None and not _UNPLANNED.intersection(kwargs):
                plan = self._plan(**kwargs)
                if plan.is_split_into_words or plan.return_overflowing_tokens:
                    plan = None  # _call reports a str with is_split_into_words; overflow keeps its axis
                elif len(self._plans) < _MAX_PLANS:
                    self._plans[key] = plan
            if plan is not None:
                if plan.plain_up_to:
                    enc = self._core.encode_text(text, self)
                    if len(enc["input_ids"]) <= plan.plain_up_to:
                        return enc
                return self._encode(text, None, False, plan)
        return self._call(text, text_pair, **kwargs)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in _PLAN_INPUTS:  # a setting a cached plan was worked out from: forget the plans
            super().__setattr__("_plans", {})
        elif name in ("pad_token", "pad_token_id") and _is_set(self, "_core"):
            self._pad_token_changed(name, value)

    def _pad_token_changed(self, name, value):
        """``tokenizer.pad_token = ...`` (or ``pad_token_id``): padding uses the new token from
        now on, as in transformers (whose padding reads the attribute)."""
        self.__dict__["_no_pad_token"] = value is None
        if not self._transformers_twin:  # the plain class keeps the pair in step itself
            if name == "pad_token_id":
                self.__dict__["pad_token"] = None if value is None else self._id_to_token(int(value))
            else:
                self.__dict__["pad_token_id"] = None if value is None else self.convert_tokens_to_ids(
                    _token_text(value, "pad_token"))
        self._build_core(self._core.vocab())

    def _call(self, text=None, text_pair=None, text_target=None, text_pair_target=None, tokenizer_kwargs=None,
              max_target_length=None, **options):
        if tokenizer_kwargs:  # HF: keywords as a dict, which win over the ones given by name
            return self._call(text, text_pair, text_target, text_pair_target, max_target_length=max_target_length,
                              **{**options, **tokenizer_kwargs})
        if text_target is not None or text is None:
            # HF: the targets' input_ids become the labels of the inputs (or, alone, the result)
            if text is None and text_target is None:
                raise ValueError("text or text_target is required: a str, a list of str, or "
                                 "(is_split_into_words=True) lists of words")
            target_options = options
            if max_target_length is not None:
                # HF: the strategies the inputs' arguments choose, with max_target_length as the length
                padding, truncation, _ = self._strategies(
                    options.get("padding", False), options.get("truncation"), options.get("max_length"),
                    options.get("pad_to_multiple_of"), False)
                target_options = {**options, "max_length": max_target_length,
                                  "padding": "do_not_pad" if padding == "none" else padding,
                                  "truncation": "do_not_truncate" if truncation == "none" else truncation}
            targets = self._call(text_target, text_pair_target, **target_options)
            if text is None:
                return targets
            encodings = self._call(text, text_pair, **options)
            encodings["labels"] = targets["input_ids"]
            return encodings

        plan = self._plan(**options)
        batched = _is_batched(text, plan.is_split_into_words, "text")
        if batched and text_pair is None and not plan.is_split_into_words:
            text, text_pair = _split_pairs(text)
        if not batched and text_pair is not None and len(text_pair) == 0:
            text_pair = None  # HF: an empty pair for a single text means no pair
        if text_pair is not None and _is_batched(text_pair, plan.is_split_into_words, "text_pair") != batched:
            raise ValueError("text and text_pair must both be single inputs or both be batches")
        return self._encode(text, text_pair, batched, plan)

    def _plan(self, add_special_tokens=True, padding=False, truncation=None, max_length=None, stride=0,
              is_split_into_words=False, pad_to_multiple_of=None, padding_side=None, return_tensors=None,
              return_token_type_ids=None, return_attention_mask=None, return_overflowing_tokens=False,
              return_special_tokens_mask=False, return_offsets_mapping=False, return_length=False, verbose=True,
              split_special_tokens=None, sanitize_control_tokens=False, **kwargs):
        """The checked arguments of an encoding call, as the core takes them: everything but the
        texts. Depends only on the arguments and this tokenizer's settings (_PLAN_INPUTS)."""
        if kwargs:
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
        if sanitize_control_tokens:  # (transformers' apply_chat_template passes False on every call)
            raise NotImplementedError("sanitize_control_tokens=True (apply_chat_template's marked control tokens) is "
                                      "not supported by this tokenizer")
        padding_mode, truncation_mode, max_length = self._strategies(padding, truncation, max_length,
                                                                     pad_to_multiple_of, verbose)
        stride = stride or 0
        if stride and (not _is_int(stride) or stride < 0):
            raise ValueError(f"stride must be a non-negative int, got {stride!r}")
        if truncation_mode != "none" and max_length is not None and max_length >= 2 and stride > max_length - 2:
            # HF's check when it sets up truncation (with a single text's 2 special tokens, pair or not)
            raise ValueError(f"stride={stride} is greater than max_length - 2 = {max_length - 2} (max_length={max_length} "
                             "minus the special tokens [CLS] and [SEP])")
        if return_tensors is not None:
            return_tensors = getattr(return_tensors, "value", return_tensors)  # transformers' TensorType
            if return_tensors not in ("pt", "np"):
                raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        names = self.model_input_names
        overflow = bool(return_overflowing_tokens)
        cap = self.max_rows_per_call if overflow and self.max_rows_per_call else 0
        core_args = (
            bool(is_split_into_words), bool(add_special_tokens), truncation_mode,
            -1 if max_length is None else max_length, stride, self.truncation_side,
            overflow, padding_mode, pad_to_multiple_of or 0,
            self.padding_side if padding_side is None else padding_side, self.pad_token_type_id, self.num_threads,
            cap, return_tensors is not None,
            "token_type_ids" in names if return_token_type_ids is None else bool(return_token_type_ids),
            "attention_mask" in names if return_attention_mask is None else bool(return_attention_mask),
            bool(return_special_tokens_mask), bool(return_offsets_mapping), bool(return_length))
        # A single text under these arguments gives the plain call's result (encode_text) whenever
        # that result is at most this many tokens: no padding to add, the default outputs, and a
        # truncation limit the text does not reach. 0: never.
        outputs = core_args[_AS_BUFFERS:]  # (as buffers, token_type_ids, attention_mask, special mask, offsets, length)
        plain = (not is_split_into_words and add_special_tokens and not overflow and not pad_to_multiple_of
                 and padding_mode in ("none", "longest") and outputs == (False, False, True, False, False, False))
        split = self.split_special_tokens if split_special_tokens is None else bool(split_special_tokens)
        plain_up_to = 0
        if plain and not split:
            plain_up_to = sys.maxsize if truncation_mode == "none" else max_length
        return _Plan(core_args, bool(is_split_into_words), overflow, return_tensors, cap, max_length, stride,
                     plain_up_to, split)

    def _encode(self, text, text_pair, batched, plan):
        # the core takes the batch as a list: a tuple of texts is a batch too, as for HF
        texts = list(text) if batched else [text]
        pairs = None if text_pair is None else list(text_pair) if batched else [text_pair]
        core = self._encoding_core(plan.split_special_tokens)
        try:
            enc, n_rows = core.encode_batch(texts, pairs, *plan.core_args)
        except ValueError as exc:
            if plan.cap and "max_rows=" in str(exc):
                raise ValueError(_rows_cap_message(exc, plan.cap, plan.max_length, plan.stride,
                                                   text_pair is not None)) from None
            if plan.return_tensors != "np" or "different lengths" not in str(exc):
                raise
            # HF: rows of different lengths as numpy are an object array of 1-D arrays
            as_lists = plan.core_args[:_AS_BUFFERS] + (False,) + plan.core_args[_AS_BUFFERS + 1:]
            enc, n_rows = core.encode_batch(texts, pairs, *as_lists)
            return enc.convert_to_tensors("np")
        if plan.return_tensors is not None:
            _to_tensors(enc, n_rows, plan.return_tensors)
        elif not batched and not plan.return_overflowing_tokens:
            for key, value in enc.items():  # a single input: drop the batch axis (HF keeps length's)
                if key != "length":
                    enc[key] = value[0]
        return enc

    def _strategies(self, padding, truncation, max_length, pad_to_multiple_of, verbose):
        """(padding mode, truncation mode, max_length) as HF's _get_padding_truncation_strategies
        decides them, model_max_length included."""
        padding = getattr(padding, "value", padding)  # transformers' PaddingStrategy / TruncationStrategy
        truncation = getattr(truncation, "value", truncation)
        # HF: max_length alone (padding exactly False, no truncation given) turns truncation on
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        try:
            padding_mode = _PADDING[padding]
        except (KeyError, TypeError):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}") from None
        try:
            truncation_mode = _TRUNCATION[truncation]
        except (KeyError, TypeError):
            raise ValueError("truncation must be True, False, 'longest_first', 'only_first', 'only_second' or "
                             f"'do_not_truncate', got {truncation!r}") from None
        if padding is True and verbose and max_length is not None and truncation_mode == "none":
            warnings.warn("`max_length` is ignored when `padding`=`True` and there is no truncation strategy. "
                          "To pad to max length, use `padding='max_length'`.", stacklevel=4)
        if max_length is None:
            unlimited = self.model_max_length > LARGE_INTEGER
            if padding_mode == "max_length":
                if unlimited:
                    padding_mode = "none"
                else:
                    max_length = self.model_max_length
            if truncation_mode != "none":
                if unlimited:
                    truncation_mode = "none"
                else:
                    max_length = self.model_max_length
        if max_length is not None and (not _is_int(max_length) or max_length < 0):
            raise ValueError(f"max_length must be a non-negative int, got {max_length!r}")
        if pad_to_multiple_of is not None and (not _is_int(pad_to_multiple_of) or pad_to_multiple_of <= 0):
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
        if (truncation_mode != "none" and padding_mode != "none" and pad_to_multiple_of and max_length is not None
                and max_length % pad_to_multiple_of):
            raise ValueError(f"truncation and padding are both on but max_length ({max_length}) is not a multiple of "
                             f"pad_to_multiple_of ({pad_to_multiple_of})")
        if padding_mode != "none" and self._no_pad_token:
            raise ValueError("Asking to pad but the tokenizer does not have a padding token (pad_token is None): set "
                             "one, e.g. tokenizer.pad_token = tokenizer.unk_token, or add one with "
                             "tokenizer.add_special_tokens({'pad_token': '[PAD]'})")
        return padding_mode, truncation_mode, max_length

    def _rows_of(self, text):
        """The per-row view of one text encoded with the defaults (the fast path's, on demand)."""
        return self._core.encode_batch([text], None, False, True, "none", -1, 0, self.truncation_side, False,
                                       "none", 0, "right", 0, 1, 0, False, False, False, False, False, False)[0]._rows

    def encode_packed(self, text, text_pair=None, *, add_special_tokens=True, truncation=True, max_length=None,
                      stride=0, return_overflowing_tokens=False, is_split_into_words=False,
                      return_offsets_mapping=False, return_word_ids=False, return_sequence_ids=False,
                      return_tensors="pt", ids_out=None, cu_seqlens_out=None):
        """Encodes a batch into rows laid back to back with no padding, the packed model's input:

            ids, cu_seqlens, max_seqlen = tokenizer.encode_packed(texts, max_length=512)
            model(input_ids=ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

        Returns a PackedEncoding (its first three fields unpack as above; also
        overflow_to_sample_mapping, and on request offset_mapping, word_ids, sequence_ids). The
        ids are the rows ``__call__`` gives for the same arguments, padding left out. Tokenization
        and the writes run on the tokenizer's C++ threads with the GIL released.

        ``text`` / ``text_pair``: lists of str (or a single str), or lists of words with
        ``is_split_into_words=True``. ``truncation`` (default True) and ``max_length`` as in
        ``__call__`` (None: model_max_length, if it has one); ``stride`` and
        ``return_overflowing_tokens`` split long texts into windows (several rows per text, as
        HF's overflow; the cap ``max_rows_per_call`` applies). ``return_tensors``: 'pt' (default)
        or 'np'. ``ids_out`` / ``cu_seqlens_out``: optional 1-D int64 / int32 CPU tensors or
        arrays (pinned memory, say) written in place; the result's input_ids and cu_seqlens are
        then their leading slices. They must hold the batch (ValueError otherwise: size them
        for the token budget, e.g. rows x max_length).
        """
        batched = _is_batched(text, is_split_into_words, "text")
        if text_pair is not None and _is_batched(text_pair, is_split_into_words, "text_pair") != batched:
            raise ValueError("text and text_pair must both be single inputs or both be batches")
        first = list(text) if batched else [text]
        second = None if text_pair is None else (list(text_pair) if batched else [text_pair])
        _, truncation_mode, max_length = self._strategies(False, truncation, max_length, None, False)
        if not _is_int(stride) or stride < 0:
            raise ValueError(f"stride must be a non-negative int, got {stride!r}")
        if truncation_mode != "none" and max_length is not None and max_length >= 2 and stride > max_length - 2:
            raise ValueError(f"stride={stride} is greater than max_length - 2 = {max_length - 2}")
        return_tensors = getattr(return_tensors, "value", return_tensors)
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        ids_buffer = None if ids_out is None else _out_buffer(ids_out, "ids_out", "int64")
        cu_buffer = None if cu_seqlens_out is None else _out_buffer(cu_seqlens_out, "cu_seqlens_out", "int32")
        cap = self.max_rows_per_call if return_overflowing_tokens and self.max_rows_per_call else 0
        try:
            out = self._core.encode_packed(
                first, second, bool(is_split_into_words), bool(add_special_tokens), truncation_mode,
                -1 if max_length is None else int(max_length), int(stride), self.truncation_side,
                bool(return_overflowing_tokens), self.num_threads, cap, bool(return_offsets_mapping),
                bool(return_word_ids), bool(return_sequence_ids), ids_buffer, cu_buffer)
        except ValueError as exc:
            if cap and "max_rows=" in str(exc):
                raise ValueError(_rows_cap_message(exc, cap, max_length, stride, second is not None)) from None
            raise
        total, rows = out["total"], out["rows"]
        make = _buffer_maker(return_tensors)
        ids = make(out["input_ids"], "int64", (total,)) if ids_out is None else ids_out[:total]
        cu = make(out["cu_seqlens"], "int32", (rows + 1,)) if cu_seqlens_out is None else cu_seqlens_out[:rows + 1]
        return PackedEncoding(
            ids, cu, out["max_seqlen"], make(out["overflow_to_sample_mapping"], "int64", (rows,)),
            make(out["offset_mapping"], "int64", (total, 2)) if return_offsets_mapping else None,
            make(out["word_ids"], "int64", (total,)) if return_word_ids else None,
            make(out["sequence_ids"], "int8", (total,)) if return_sequence_ids else None)

    # -- padding ------------------------------------------------------------------------------------

    def pad(self, encoded_inputs, padding=True, max_length=None, pad_to_multiple_of=None, padding_side=None,
            return_attention_mask=None, return_tensors=None, verbose=True):
        """Pads encoded inputs, as HF's ``tokenizer.pad`` (what the data collators call): one
        encoding or a batch, as a dict of lists or a list of dicts, of lists, tensors or arrays.
        input_ids, attention_mask, token_type_ids and special_tokens_mask are padded; other keys
        (labels, ...) are kept as they are. Tensors in give tensors out of the same kind unless
        ``return_tensors`` says otherwise."""
        if isinstance(encoded_inputs, (list, tuple)) and encoded_inputs and isinstance(encoded_inputs[0], Mapping):
            encoded_inputs = {key: [example[key] for example in encoded_inputs] for key in encoded_inputs[0].keys()}
        main = self.model_input_names[0]
        if not isinstance(encoded_inputs, Mapping) or main not in encoded_inputs:
            keys = list(encoded_inputs.keys()) if isinstance(encoded_inputs, Mapping) else type(encoded_inputs).__name__
            raise ValueError(f"pad needs an encoding or a list of encodings that includes {main}, but got {keys}")
        required = encoded_inputs[main]
        if required is None or (hasattr(required, "__len__") and len(required) == 0):
            if return_attention_mask:
                encoded_inputs["attention_mask"] = []
            return encoded_inputs
        first = required[0]
        if isinstance(first, (list, tuple)):
            first = next((item[0] for item in required if len(item)), first)
        if not isinstance(first, (int, list, tuple)):
            kind = _tensor_kind(first)
            if kind is None:
                raise ValueError(f"pad: type of {first!r} unknown: {type(first).__name__}. Expected python, numpy or "
                                 "torch values")
            return_tensors = kind if return_tensors is None else return_tensors
            encoded_inputs = {key: _to_py(value) for key, value in encoded_inputs.items()}
        else:
            encoded_inputs = dict(encoded_inputs)
        padding_mode, _, max_length = self._strategies(padding, False, max_length, pad_to_multiple_of, verbose)
        required = encoded_inputs[main]
        if required and not isinstance(required[0], (list, tuple)):
            padded = self._pad(encoded_inputs, max_length, padding_mode, pad_to_multiple_of, padding_side,
                               return_attention_mask)
            return BatchEncoding(padded, tensor_type=return_tensors)
        batch_size = len(required)
        for key, value in encoded_inputs.items():
            if len(value) != batch_size:
                raise ValueError(f"pad: {key} has {len(value)} items but {main} has {batch_size}: every key needs one "
                                 "value per example")
        if padding_mode == "longest":
            max_length = max(len(row) for row in required)
            padding_mode = "max_length"
        batch = {}
        for i in range(batch_size):
            padded = self._pad({key: value[i] for key, value in encoded_inputs.items()}, max_length, padding_mode,
                               pad_to_multiple_of, padding_side, return_attention_mask)
            for key, value in padded.items():
                batch.setdefault(key, []).append(value)
        return BatchEncoding(batch, tensor_type=return_tensors)

    def _pad(self, encoded_inputs, max_length=None, padding_strategy="do_not_pad", pad_to_multiple_of=None,
             padding_side=None, return_attention_mask=None):
        """Pads one encoding (a dict of lists), as HF's ``_pad`` with the same arguments."""
        strategy = _PADDING.get(getattr(padding_strategy, "value", padding_strategy), padding_strategy)
        if strategy not in ("none", "longest", "max_length"):
            raise ValueError(f"padding_strategy must be 'longest', 'max_length' or 'do_not_pad', got {padding_strategy!r}")
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        required = encoded_inputs[self.model_input_names[0]]
        if strategy == "longest":
            max_length = len(required)
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        if return_attention_mask and "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * len(required)
        if strategy == "none" or max_length is None or len(required) >= max_length:
            return encoded_inputs
        n = max_length - len(required)
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {side!r}")
        pads = {"attention_mask": 0, "token_type_ids": self.pad_token_type_id, "special_tokens_mask": 1,
                self.model_input_names[0]: self.pad_token_id}
        for key, value in pads.items():
            if key not in encoded_inputs or (key == "attention_mask" and not return_attention_mask):
                continue
            row = list(encoded_inputs[key])
            encoded_inputs[key] = row + [value] * n if side == "right" else [value] * n + row
        return encoded_inputs

    # -- decoding -----------------------------------------------------------------------------------

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        """Text of ``token_ids`` (an int, a list, a 1-D tensor or array): '##' pieces joined to the
        piece before, the rest separated by spaces. A batch (list of lists, 2-D tensor) gives a
        list of texts, as in transformers 5."""
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], (list, tuple)):
            return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in token_ids]
        ids = [int(token_ids)] if _is_int(token_ids) else [int(i) for i in _as_id_list(token_ids)]
        text = self._core.decode(ids, bool(skip_special_tokens))
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in sequences]

    def convert_tokens_to_string(self, tokens):
        """Tokens joined as HF's WordPiece decoder joins them ('##' pieces glued, cleaned up)."""
        prefix = self._wordpiece[0]
        pieces = []
        for i, token in enumerate(tokens):
            if i:
                token = token[len(prefix):] if token.startswith(prefix) else " " + token
            pieces.append(_wordpiece_cleanup(token))
        return "".join(pieces)

    def clean_up_tokenization(self, text):
        return _clean_up_tokenization(text)

    def __repr__(self):
        return (f"{type(self).__name__}(name_or_path='{self.name_or_path}', vocab_size={self.vocab_size}, "
                f"do_lower_case={self.do_lower_case}, strip_accents={self.strip_accents}, "
                f"tokenize_chinese_chars={self.tokenize_chinese_chars}, model_max_length={self.model_max_length})")


class DistilBertTokenizerFast(DistilBertTokenizer):
    """The same tokenizer under HuggingFace's other name: in transformers 5 both names are the fast
    (Rust-backed) tokenizer, and here both are the C++ one."""


# -- helpers ----------------------------------------------------------------------------------------

# what a pickled tokenizer keeps besides its vocab (constructor arguments, and attributes users set)
_SETTINGS = ("do_lower_case", "do_basic_tokenize", "never_split", "tokenize_chinese_chars", "strip_accents",
             *_SPECIAL_NAMES, "model_max_length", "padding_side", "truncation_side", "clean_up_tokenization_spaces",
             "num_threads", "max_rows_per_call", "name_or_path", "model_input_names", "vocab_file",
             "split_special_tokens")


def _tokenizers_from_str(serialized):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(serialized)


def _component_state(component):
    """A tokenizers component's (normalizer, model, ...) serialization, as str."""
    state = component.__getstate__()
    return state.decode("utf-8") if isinstance(state, bytes) else str(state)


def _copy_component(component):
    import pickle

    return pickle.loads(pickle.dumps(component))


_STRATEGIES = {"longest_first": "LongestFirst", "only_first": "OnlyFirst", "only_second": "OnlySecond"}


def _truncation_json(settings):
    """tokenizers' Tokenizer.truncation dict as tokenizer.json writes it."""
    if settings is None:
        return None
    return {"direction": settings["direction"].capitalize(), "max_length": settings["max_length"],
            "strategy": _STRATEGIES[settings["strategy"]], "stride": settings["stride"]}


def _padding_json(settings):
    """tokenizers' Tokenizer.padding dict as tokenizer.json writes it."""
    if settings is None:
        return None
    length = settings["length"]
    return {"strategy": "BatchLongest" if length is None else {"Fixed": length},
            "direction": settings["direction"].capitalize(), "pad_to_multiple_of": settings["pad_to_multiple_of"],
            "pad_id": settings["pad_id"], "pad_type_id": settings["pad_type_id"], "pad_token": settings["pad_token"]}


def _rebuild_tokenizer(cls, tokens, settings, renamed=None):
    settings = dict(settings)
    vocab_file = settings.pop("vocab_file")
    backend = settings.pop("backend", (None, None))
    tok = cls(vocab=tokens, **settings)
    tok.vocab_file = vocab_file
    tok._backend_truncation, tok._backend_padding = backend
    for name, content in (renamed or {}).items():  # named special tokens add_special_tokens renamed
        tok._set_named_special(name, content, None if content is None else tok.convert_tokens_to_ids(content))
    if (renamed or {}).get("pad_token") is not None:
        tok._build_core(tokens)
    return tok


class _AddedToken(NamedTuple):
    """An added token's content and flags, as tokenizers' AddedToken holds them."""

    content: str
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = True
    special: bool = False


def _as_added_token(value, special, name):
    """value (a str, an AddedToken, or one as saved in json) as an _AddedToken, by HF's rules: a
    str is special when added as special and then not normalized; special=True (HF's
    add_special_tokens path) makes an AddedToken special, and HF marks the caller's object so."""
    if isinstance(value, str):
        return _AddedToken(value, normalized=not special, special=bool(special))
    if isinstance(value, Mapping):
        content = value.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{name}: an added token needs a str 'content', got {value!r}")
        is_special = bool(special) or bool(value.get("special", False))
        normalized = value.get("normalized")
        return _AddedToken(content, bool(value.get("single_word", False)), bool(value.get("lstrip", False)),
                           bool(value.get("rstrip", False)), not is_special if normalized is None else bool(normalized),
                           is_special)
    if isinstance(value, _AddedToken):
        return value._replace(special=True) if special else value
    content = getattr(value, "content", None)
    if not isinstance(content, str):
        raise TypeError(f"{name} must hold str or AddedToken items, got {type(value).__name__}")
    if special and not value.special:
        try:
            value.special = True  # tokenizers then derives normalized=False unless it was given
        except (AttributeError, TypeError):
            pass
    return _AddedToken(content, bool(value.single_word), bool(value.lstrip), bool(value.rstrip),
                       bool(value.normalized), bool(special) or bool(value.special))


def _added_token_class():
    try:
        from tokenizers import AddedToken
    except ImportError:
        return _AddedToken
    return AddedToken


_TWINS = {}


def _transformers_twin(cls):
    """The subclass of ``cls`` and transformers' PreTrainedTokenizerBase (transformers is already
    loaded when this runs), made once per class, under the same name. Our methods come first;
    the base adds its bookkeeping (special-token map, init_kwargs, ...) and whatever we lack."""
    twin = _TWINS.get(cls)
    if twin is None:
        from transformers import PreTrainedTokenizerBase

        def __init__(self, *args, **kwargs):
            PreTrainedTokenizerBase.__init__(self)
            cls.__init__(self, *args, **kwargs)

        body = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
                "__init__": __init__, "_transformers_twin": True}
        twin = _TWINS[cls] = type(cls.__name__, (cls, PreTrainedTokenizerBase), body)
    return twin


def _is_set(tokenizer, slot):
    """Whether a slot of ``tokenizer`` holds a value (not through transformers' __getattr__ on
    the twin, which answers for names it does not know)."""
    try:
        object.__getattribute__(tokenizer, slot)
    except AttributeError:
        return False
    return True


def _plain_class(cls):
    return next(c for c in cls.__mro__ if not c.__dict__.get("_transformers_twin"))


def _token_text(value, name):
    if isinstance(value, dict) and "content" in value:  # AddedToken as serialized in tokenizer_config.json
        value = value["content"]
    content = getattr(value, "content", value)  # an AddedToken object
    if not isinstance(content, str) or not content:
        raise ValueError(f"{name} must be a non-empty str, got {value!r}")
    return content


def _at(values, index):
    """values[index], or None past the end (transformers' maps answer None there)."""
    return values[index] if index < len(values) else None


def _is_int(x):
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return True
    shape = getattr(x, "shape", None)
    return shape is not None and len(shape) == 0 and "int" in str(getattr(x, "dtype", ""))


def _as_id_list(ids):
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"token ids must be an int or a sequence of ints, got {type(ids).__name__}")
    if ids and isinstance(ids[0], (list, tuple)):
        raise ValueError("decode takes one sequence of ids; use batch_decode for a batch")
    return ids


def _is_batched(text, is_split_into_words, name):
    if isinstance(text, str):
        if is_split_into_words:
            raise ValueError(f"{name} must be a list of words (or of lists of words) with is_split_into_words=True")
        return False
    if isinstance(text, (list, tuple)):
        if not is_split_into_words:
            return True
        return len(text) > 0 and isinstance(text[0], (list, tuple))
    raise ValueError(f"{name} must be a str, a list of str or a list of lists of str, got {type(text).__name__}")


def _split_pairs(batch):
    """A batch whose items are texts or (text, text_pair) pairs, as HF's fast tokenizers take
    them (the zero-shot pipeline sends [premise, hypothesis] lists): (texts, pairs), pairs None
    where no item is a pair and None for the items that are not."""
    if not any(isinstance(item, (list, tuple)) for item in batch):
        return batch, None
    texts, pairs = [], []
    for item in batch:
        if isinstance(item, (list, tuple)):
            if len(item) != 2:
                raise TypeError("a batch item must be a str or a (text, text_pair) pair of str, got a "
                                f"{type(item).__name__} of {len(item)} items (lists of words need "
                                "is_split_into_words=True)")
            texts.append(item[0])
            pairs.append(item[1])
        else:
            texts.append(item)
            pairs.append(None)
    return texts, pairs


def _to_tensors(out, n_rows, return_tensors):
    """The core's int64 bytearrays (and plain lists) as (rows, length[, 2]) tensors or arrays."""
    make = _buffer_maker(return_tensors)
    for key, value in out.items():
        if isinstance(value, bytearray):
            width = len(value) // 8 // max(n_rows, 1)
            shape = (n_rows, width // 2, 2) if key == "offset_mapping" else (n_rows, width)
            out[key] = make(value, "int64", shape)
        else:
            out[key] = make(bytearray(_int64_bytes(value)), "int64", (len(value),))


def _buffer_maker(return_tensors):
    """make(bytearray, dtype name, shape) -> a tensor or array viewing the bytes (no copy)."""
    make = _BUFFER_MAKERS.get(return_tensors)
    if make is not None:
        return make
    if return_tensors == "pt":
        import torch

        def make(buffer, dtype, shape):
            dtype = getattr(torch, dtype)
            return torch.frombuffer(buffer, dtype=dtype).view(shape) if len(buffer) else torch.zeros(shape, dtype=dtype)
    else:
        import numpy as np

        def make(buffer, dtype, shape):
            return np.frombuffer(buffer, dtype=dtype).reshape(shape) if len(buffer) else np.zeros(shape, dtype=dtype)
    _BUFFER_MAKERS[return_tensors] = make
    return make


_BUFFER_MAKERS = {}  # return_tensors -> make (made once: each imports its library)


def _out_buffer(out, name, dtype):
    """The writable buffer of a caller's CPU tensor or numpy array (the binding checks its item
    size, contiguity and length)."""
    if hasattr(out, "numpy") and hasattr(out, "device"):  # a torch tensor
        if out.device.type != "cpu" or str(out.dtype) != f"torch.{dtype}":
            raise ValueError(f"{name} must be a contiguous 1-D {dtype} CPU tensor or array, got {out.dtype} on {out.device}")
        return out.numpy()
    if str(getattr(out, "dtype", "")) != dtype:
        raise ValueError(f"{name} must be a contiguous 1-D {dtype} CPU tensor or array, got {type(out).__name__} "
                         f"of {getattr(out, 'dtype', '?')}")
    return out


def _rows_cap_message(exc, cap, max_length, stride, pair):
    return (f"return_overflowing_tokens=True: {exc}. The overflow windows (max_length={max_length}, stride={stride}"
            f"{', a text pair: the windows of text x those of text_pair' if pair else ''}) exceed the cap on rows "
            f"per call, max_rows_per_call={cap}. Raise max_length or stride, split the batch, or raise the "
            "tokenizer's max_rows_per_call (None: no cap).")


def _tensor_kind(value):
    """'pt' for a torch tensor, 'np' for a numpy array or scalar, else None."""
    module = type(value).__module__
    if module.startswith("torch"):
        return "pt"
    if module.startswith("numpy"):
        return "np"
    return None


def _to_py(value):
    """Tensors and arrays (and lists of them) as python lists of ints."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_to_py(v) for v in value]
    return value


def _is_empty(value):
    return isinstance(value, (list, tuple)) and (len(value) == 0 or all(_is_empty(v) for v in value))


def _wordpiece_cleanup(text):
    # HF's WordPiece decoder cleanup (tokenizers' decoders::wordpiece::cleanup), applied per token
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _int64_bytes(values):
    import array

    return array.array("q", values).tobytes()


def _clean_up_tokenization(text):
    # transformers' clean_up_tokenization, applied when clean_up_tokenization_spaces=True
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
