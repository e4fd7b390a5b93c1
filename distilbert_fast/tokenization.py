"""DistilBERT's WordPiece tokenizer on the C++ core (``distilbert_fast._tokenizer``).

    from distilbert_fast import DistilBertTokenizer
    tok = DistilBertTokenizer.from_pretrained("path/to/local/checkpoint")   # vocab.txt or tokenizer.json
    batch = tok(["Hello world!", "Ünïcödé"], padding=True, return_tensors="pt")

The ids, tokens, offsets, masks and overflow windows are those of HuggingFace's
BertTokenizerFast / DistilBertTokenizerFast (the Rust ``tokenizers`` library); the constructor and
``__call__`` take HuggingFace's arguments. Batches are encoded on a C++ thread pool with the GIL
released; the result does not depend on the number of threads.
"""

import json
import os

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


VOCAB_FILES_NAMES = {"vocab_file": "vocab.txt", "tokenizer_file": "tokenizer.json"}
_SPECIAL_NAMES = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_PADDING = {True: "longest", "longest": "longest", "max_length": "max_length", False: "none", "do_not_pad": "none",
            None: "none"}
_TRUNCATION = {True: "longest_first", "longest_first": "longest_first", "only_first": "only_first",
               "only_second": "only_second", False: "none", "do_not_truncate": "none"}


class BatchEncoding(dict):
    """The outputs of a tokenizer call: a dict (``enc["input_ids"]``) with attribute access
    (``enc.input_ids``), ``word_ids(i)`` / ``sequence_ids(i)`` per row and ``.to(device)``."""

    def __init__(self, data=None, rows=None, tensor_type=None, id_to_token=None):
        super().__init__(data or {})
        self._rows = rows
        self._tensor_type = tensor_type
        self._id_to_token = id_to_token

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _row(self, batch_index):
        if self._rows is None:
            raise ValueError("per-row views need a BatchEncoding made by a tokenizer call")
        if not 0 <= batch_index < len(self._rows):
            raise IndexError(f"batch_index must be in [0, {len(self._rows)}), got {batch_index}")
        return batch_index

    def word_ids(self, batch_index: int = 0):
        """Word index of each token of row ``batch_index`` (None for special and padding tokens)."""
        return self._rows.word_ids(self._row(batch_index))

    def sequence_ids(self, batch_index: int = 0):
        """0 / 1 for tokens of the first / second text of row ``batch_index``, None for the rest."""
        return self._rows.sequence_ids(self._row(batch_index))

    def tokens(self, batch_index: int = 0):
        """The tokens of row ``batch_index``."""
        return [self._id_to_token(i) for i in self._rows.ids(self._row(batch_index))]

    def to(self, device):
        """Moves every tensor to ``device`` (return_tensors='pt' only); returns self."""
        import torch

        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


class DistilBertTokenizer:
    """DistilBERT's (BERT's) WordPiece tokenizer: basic tokenization (clean-up, CJK split,
    lower-casing, accent stripping, punctuation split) then greedy longest-match WordPiece.

    Arguments as HuggingFace's BertTokenizer: ``vocab_file`` (vocab.txt), ``do_lower_case``,
    ``do_basic_tokenize``, ``never_split``, the special tokens, ``tokenize_chinese_chars``,
    ``strip_accents`` (None: follow ``do_lower_case``). Also ``vocab`` (dict token -> id or list of
    tokens) or ``tokenizer_file`` (a tokenizer.json with a WordPiece model) instead of
    ``vocab_file``, ``model_max_length``, ``padding_side``, ``truncation_side`` and ``num_threads``
    (threads for batches; 0 or None: all cores).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, do_lower_case=True, do_basic_tokenize=True, never_split=None,
                 unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                 tokenize_chinese_chars=True, strip_accents=None, *, vocab=None, tokenizer_file=None,
                 model_max_length=512, padding_side="right", truncation_side="right",
                 clean_up_tokenization_spaces=False, num_threads=None, **kwargs):
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
        elif vocab_file is not None:
            if not os.path.isfile(vocab_file):
                raise ValueError(f"vocab_file '{vocab_file}' does not exist: expected a vocab.txt with one token per line")
            tokens = core.read_vocab_file(os.fspath(vocab_file))
        else:
            raise ValueError("DistilBertTokenizer needs a vocab: pass vocab_file (vocab.txt), tokenizer_file "
                             "(tokenizer.json) or vocab (dict or list)")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if truncation_side not in ("right", "left"):
            raise ValueError(f"truncation_side must be 'right' or 'left', got {truncation_side!r}")
        if strip_accents is not None and not isinstance(strip_accents, bool):
            raise TypeError(f"strip_accents must be None, True or False, got {strip_accents!r}")
        self._core = core.Tokenizer(
            tokens, bool(do_lower_case), strip_accents, bool(tokenize_chinese_chars), bool(do_basic_tokenize),
            list(never_split or []), specials["unk_token"], specials["sep_token"], specials["pad_token"],
            specials["cls_token"], specials["mask_token"], [], prefix, int(max_chars))
        self.vocab_file = vocab_file
        self.do_lower_case = bool(do_lower_case)
        self.do_basic_tokenize = bool(do_basic_tokenize)
        self.never_split = list(never_split or [])
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        self.strip_accents = strip_accents
        for name, value in specials.items():
            setattr(self, name, value)
        self.model_max_length = int(model_max_length) if model_max_length is not None else 512
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.num_threads = int(num_threads or 0)
        self._special_ids = set(self._core.special_ids())
        self.unk_token_id = self._core.token_to_id(self.unk_token)
        self.sep_token_id = self._core.token_to_id(self.sep_token)
        self.pad_token_id = self._core.token_to_id(self.pad_token)
        self.cls_token_id = self._core.token_to_id(self.cls_token)
        self.mask_token_id = self._core.token_to_id(self.mask_token)
        self.pad_token_type_id = 0
        self.name_or_path = kwargs.get("name_or_path", "")

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
                         "clean_up_tokenization_spaces") + _SPECIAL_NAMES}
        json_file = os.path.join(path, "tokenizer.json")
        vocab_file = os.path.join(path, "vocab.txt")
        if os.path.isfile(json_file):
            model = _core_module().read_tokenizer_json(json_file)
            # the normalizer settings of tokenizer.json are what HF's fast tokenizer runs
            if "lowercase" in model:
                init.setdefault("do_lower_case", model["lowercase"])
                init.setdefault("strip_accents", model["strip_accents"])
                init.setdefault("tokenize_chinese_chars", model["handle_chinese_chars"])
            init["tokenizer_file"] = json_file
        elif not os.path.isfile(vocab_file):
            raise ValueError(f"'{path}' holds neither vocab.txt nor tokenizer.json")
        init.update(kwargs)
        if init.get("model_max_length") is not None and init["model_max_length"] > 1e29:
            init["model_max_length"] = 512  # HF's "very large integer" placeholder
        return cls(vocab_file=vocab_file if os.path.isfile(vocab_file) else None, name_or_path=path, **init)

    def save_pretrained(self, save_directory, **kwargs):
        """Writes vocab.txt, tokenizer_config.json and special_tokens_map.json; returns their paths."""
        os.makedirs(save_directory, exist_ok=True)
        vocab_path = os.path.join(save_directory, "vocab.txt")
        with open(vocab_path, "w", encoding="utf-8", newline="\n") as f:
            for token in self._core.vocab():
                f.write(token + "\n")
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
            **specials,
        }
        config_path = os.path.join(save_directory, "tokenizer_config.json")
        map_path = os.path.join(save_directory, "special_tokens_map.json")
        for file, data in ((config_path, config), (map_path, specials)):
            with open(file, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
                f.write("\n")
        return (config_path, map_path, vocab_path)

    # -- vocabulary ---------------------------------------------------------------------------------

    @property
    def vocab_size(self):
        return self._core.vocab_size()

    def __len__(self):
        return self._core.vocab_size()

    def get_vocab(self):
        return {token: i for i, token in enumerate(self._core.vocab())}

    @property
    def all_special_tokens(self):
        return [getattr(self, name) for name in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")]

    @property
    def all_special_ids(self):
        return [self._core.token_to_id(t) for t in self.all_special_tokens]

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
        return [self._id_to_token(int(i)) for i in _as_id_list(ids)
                if not (skip_special_tokens and int(i) in self._special_ids)]

    def _id_to_token(self, index):
        token = self._core.id_to_token(index)
        if token is None:
            raise IndexError(f"token id {index} is out of range: expected 0 <= id < {self.vocab_size}")
        return token

    # -- encoding -----------------------------------------------------------------------------------

    def tokenize(self, text, pair=None, add_special_tokens=False, **kwargs):
        """WordPiece tokens of ``text`` (special tokens in the text stay whole)."""
        tokens = self._core.tokenize(text)
        if pair is not None:
            pair_tokens = self._core.tokenize(pair)
            if add_special_tokens:
                return [self.cls_token, *tokens, self.sep_token, *pair_tokens, self.sep_token]
            return tokens + pair_tokens
        if add_special_tokens:
            return [self.cls_token, *tokens, self.sep_token]
        return tokens

    def encode(self, text, text_pair=None, add_special_tokens=True, **kwargs):
        """input_ids of one text (or pair) as a list, or a tensor with return_tensors."""
        return self(text, text_pair, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        if token_ids_1 is None:
            return [self.cls_token_id, *token_ids_0, self.sep_token_id]
        return [self.cls_token_id, *token_ids_0, self.sep_token_id, *token_ids_1, self.sep_token_id]

    def __call__(self, text=None, text_pair=None, add_special_tokens=True, padding=False, truncation=None,
                 max_length=None, stride=0, is_split_into_words=False, pad_to_multiple_of=None, padding_side=None,
                 return_tensors=None, return_token_type_ids=None, return_attention_mask=None,
                 return_overflowing_tokens=False, return_special_tokens_mask=False, return_offsets_mapping=False,
                 return_length=False, verbose=True, **kwargs):
        """Encodes a text, a batch of texts, pairs, or pre-split words, as HuggingFace's tokenizer
        ``__call__`` does (same arguments, same outputs)."""
        if kwargs:
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
        if text is None:
            raise ValueError("text is required: a str, a list of str, or (is_split_into_words=True) lists of words")
        batched = _is_batched(text, is_split_into_words, "text")
        if not batched and text_pair is not None and len(text_pair) == 0:
            text_pair = None  # HF: an empty pair for a single text means no pair
        if text_pair is not None and _is_batched(text_pair, is_split_into_words, "text_pair") != batched:
            raise ValueError("text and text_pair must both be single inputs or both be batches")
        first = list(text) if batched else [text]
        second = None if text_pair is None else (list(text_pair) if batched else [text_pair])

        try:
            padding_mode = _PADDING[padding]
        except (KeyError, TypeError):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}") from None
        if truncation is None:
            # HF: max_length without an explicit truncation strategy means longest_first
            truncation_mode = "longest_first" if max_length is not None and padding_mode != "max_length" else "none"
        else:
            try:
                truncation_mode = _TRUNCATION[truncation]
            except (KeyError, TypeError):
                raise ValueError("truncation must be True, False, 'longest_first', 'only_first', 'only_second' or "
                                 f"'do_not_truncate', got {truncation!r}") from None
        if max_length is None and (truncation_mode != "none" or padding_mode == "max_length"):
            max_length = self.model_max_length
        if max_length is not None and (not _is_int(max_length) or max_length < 0):
            raise ValueError(f"max_length must be a non-negative int, got {max_length!r}")
        if not _is_int(stride) or stride < 0:
            raise ValueError(f"stride must be a non-negative int, got {stride!r}")
        if truncation_mode != "none" and max_length is not None and max_length >= 2 and stride > max_length - 2:
            # HF's check when it sets up truncation (with a single text's 2 special tokens, pair or not)
            raise ValueError(f"stride={stride} is greater than max_length - 2 = {max_length - 2} (max_length={max_length} "
                             "minus the special tokens [CLS] and [SEP])")
        if pad_to_multiple_of is not None and (not _is_int(pad_to_multiple_of) or pad_to_multiple_of <= 0):
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
        if (truncation_mode != "none" and padding_mode != "none" and pad_to_multiple_of and max_length is not None
                and max_length % pad_to_multiple_of):
            raise ValueError(f"truncation and padding are both on but max_length ({max_length}) is not a multiple of "
                             f"pad_to_multiple_of ({pad_to_multiple_of})")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        if padding_side is None:
            padding_side = self.padding_side
        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names

        out, rows = self._core.encode_batch(
            first, second, bool(is_split_into_words), bool(add_special_tokens), truncation_mode,
            -1 if max_length is None else int(max_length), int(stride), self.truncation_side,
            bool(return_overflowing_tokens), padding_mode, int(pad_to_multiple_of or 0), padding_side,
            self.pad_token_type_id, self.num_threads, return_tensors is not None, bool(return_token_type_ids),
            bool(return_attention_mask), bool(return_special_tokens_mask), bool(return_offsets_mapping),
            bool(return_length))
        n_rows = out.pop("__rows__")
        if return_tensors is not None:
            _to_tensors(out, n_rows, return_tensors)
        elif not batched and not return_overflowing_tokens:
            for key, value in out.items():  # a single input: drop the batch axis (HF keeps length's)
                if key != "length":
                    out[key] = value[0]
        return BatchEncoding(out, rows, return_tensors, self._core.id_to_token)

    # -- decoding -----------------------------------------------------------------------------------

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        """Text of ``token_ids`` (an int, a list, a 1-D tensor or array): '##' pieces joined to the
        piece before, the rest separated by spaces."""
        ids = [int(token_ids)] if _is_int(token_ids) else [int(i) for i in _as_id_list(token_ids)]
        text = self._core.decode(ids, bool(skip_special_tokens))
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in sequences]

    def __repr__(self):
        return (f"{type(self).__name__}(name_or_path='{self.name_or_path}', vocab_size={self.vocab_size}, "
                f"do_lower_case={self.do_lower_case}, strip_accents={self.strip_accents}, "
                f"tokenize_chinese_chars={self.tokenize_chinese_chars}, model_max_length={self.model_max_length})")


class DistilBertTokenizerFast(DistilBertTokenizer):
    """The same tokenizer under HuggingFace's other name: in transformers 5 both names are the fast
    (Rust-backed) tokenizer, and here both are the C++ one."""


# -- helpers ----------------------------------------------------------------------------------------


def _token_text(value, name):
    if isinstance(value, dict) and "content" in value:  # AddedToken as serialized in tokenizer_config.json
        value = value["content"]
    content = getattr(value, "content", value)  # an AddedToken object
    if not isinstance(content, str) or not content:
        raise ValueError(f"{name} must be a non-empty str, got {value!r}")
    return content


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


def _to_tensors(out, n_rows, return_tensors):
    """The core's int64 bytearrays (and plain lists) as (rows, length[, 2]) tensors or arrays."""
    if return_tensors == "pt":
        import torch

        def make(buffer, shape):
            return torch.frombuffer(buffer, dtype=torch.int64).view(shape) if len(buffer) else torch.zeros(shape, dtype=torch.int64)
    else:
        import numpy as np

        def make(buffer, shape):
            return np.frombuffer(buffer, dtype=np.int64).reshape(shape) if len(buffer) else np.zeros(shape, dtype=np.int64)

    for key, value in out.items():
        if isinstance(value, bytearray):
            width = len(value) // 8 // max(n_rows, 1)
            shape = (n_rows, width // 2, 2) if key == "offset_mapping" else (n_rows, width)
            out[key] = make(value, shape)
        else:
            out[key] = make(bytearray(_int64_bytes(value)), (len(value),))


def _int64_bytes(values):
    import array

    return array.array("q", values).tobytes()


def _clean_up_tokenization(text):
    # transformers' clean_up_tokenization, applied when clean_up_tokenization_spaces=True
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
