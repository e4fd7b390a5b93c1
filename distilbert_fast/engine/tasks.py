"""What each task tokenizes, runs and returns.

A task turns a window of inputs into packed rows (``encode``), a packed batch into device tensors
(``forward``: model + pooling / heads, still on the device), those tensors, once on the host, into
one value per row (``split``), and an item's rows into its result (``combine``). Rows of one item
are consecutive (an item longer than the model's limit gives several overflow windows).
"""

import numpy as np
import torch
import torch.nn.functional as F

from .. import modeling
from ..ops import bias_activation, linear, residual_layernorm
from ._forward import run_packed
from .batching import Encoded, encode_packed

POOLINGS = ("cls", "mean", "max")
OVERFLOW = ("truncate", "split")
AGGREGATIONS = ("first", "average", "max", "simple")  # (HF pipeline's aggregation_strategy names)
FUNCTIONS = ("softmax", "sigmoid", "none")  # classify's scores (HF pipeline's function_to_apply)
QA_DECODINGS = ("best-span", "pipeline")  # qa's scoring: each span at its best window, or HF pipeline's


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _flag(name, value, allow_none=True) -> bool:
    """A True / False option as a bool (None: False, where allowed); anything else, a string such
    as 'no' that bool() would make True, is a ValueError."""
    if not isinstance(value, (bool, np.bool_)) and not (value is None and allow_none):
        raise ValueError(f"{name} must be True{', False or None' if allow_none else ' or False'}, got {value!r}")
    return bool(value)


def _check_positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


class Task:
    name = ""
    model_class = modeling.DistilBertModel
    needs_pairs = False  # qa: (question, context)
    takes_pairs = True  # (text, pair) items: classify / embed / fill-mask encode both, as HF's tokenizer
    default_max_length = None  # None: the model's max_position_embeddings
    overflow = "truncate"
    stride = 0

    def __init__(self, config, tokenizer, max_length=None, overflow=None, stride=None):
        limit = config.max_position_embeddings
        if max_length is None:
            max_length = min(self.default_max_length or limit, limit, tokenizer.model_max_length)
        self.max_length = max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 < max_length <= limit:
            raise ValueError(f"max_length must be in [3, {limit}] (max_position_embeddings), got {self.max_length}")
        if overflow is not None:
            _check_choice("overflow", overflow, OVERFLOW)
            self.overflow = overflow
        if stride is not None:
            if isinstance(stride, bool) or not isinstance(stride, int):
                raise ValueError(f"stride must be an int, got {stride!r}")
            self.stride = stride
        else:  # the class default, kept below half a window for short models (as HF's pipeline does)
            self.stride = min(self.stride, (self.max_length - 4) // 2)
        if self.overflow == "split" and not 0 <= self.stride < self.max_length - 3:
            raise ValueError(f"stride must be in [0, {self.max_length - 4}] for max_length={self.max_length}, "
                             f"got {self.stride}")
        self.config = config

    # -- host: tokens in ----------------------------------------------------------------------------
    def check_pair_stride(self, pairs):
        """(text, pair) items split into windows: where both texts are long, a window keeps only
        (max_length - 3) // 2 tokens of the second, and a stride not below that fails the window
        ('stride must be less than the tokens kept'): at the first long pair, at any batch. Refused
        at the first window holding pairs instead, whatever their lengths."""
        most = (self.max_length - 3) // 2 - 1
        if pairs is not None and self.overflow == "split" and self.stride > most:
            raise ValueError(f"stride={self.stride} is too large for (text, pair) items with overflow='split' and "
                             f"max_length={self.max_length}: a window keeps {most + 1} tokens of each of two long "
                             f"texts, so stride must be at most {most}")

    def encode(self, tokenizer, texts, pairs) -> Encoded:
        self.check_pair_stride(pairs)
        split = self.overflow == "split"
        return encode_packed(tokenizer, texts, pairs, max_length=self.max_length, stride=self.stride if split else 0,
                             overflow=split)

    # -- device: batch -> tensors ---------------------------------------------------------------------
    def forward(self, model, inputs) -> dict:
        raise NotImplementedError

    # -- host: tensors -> rows -> items ---------------------------------------------------------------
    def split(self, host: dict, batch) -> list:
        raise NotImplementedError

    def combine(self, item: int, rows: np.ndarray, values: list, enc: Encoded, text, pair):
        raise NotImplementedError


def pool(hidden: torch.Tensor, inputs, pooling: str) -> torch.Tensor:
    """(batch, dim) pooled from packed (total, dim) hidden states, every real token included (as
    sentence-transformers pools: [CLS] and [SEP] count, padding does not)."""
    if pooling == "cls":
        return hidden[inputs.cu_seqlens[:-1].long()]
    batch = inputs.cu_seqlens.shape[0] - 1
    index = inputs.row_of_token
    index = index[:, None].expand_as(hidden)  # scatter, not index_add_: its CPU kernel loops per row
    if pooling == "mean":
        sums = hidden.new_zeros(batch, hidden.shape[1]).scatter_add_(0, index, hidden)
        return sums / inputs.lengths[:, None].to(hidden.dtype)
    return hidden.new_full((batch, hidden.shape[1]), float("-inf")).scatter_reduce_(0, index, hidden, "amax")


class Embed(Task):
    """A vector per text: pooled last hidden states, optionally L2-normalised. With
    overflow='split' a long text's windows are averaged before normalisation. ``prompt``: a
    text put before every input (sentence-transformers' ``encode(prompt=...)``)."""

    name = "embed"
    model_class = modeling.DistilBertModel

    def __init__(self, config, tokenizer, pooling=None, normalize=None, prompt=None, **kw):
        super().__init__(config, tokenizer, **kw)
        pooling = "mean" if pooling is None else pooling
        _check_choice("pooling", pooling, POOLINGS)
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str or None, got {type(prompt).__name__}")
        self.pooling, self.normalize, self.prompt = pooling, _flag("normalize", normalize), prompt or None

    def encode(self, tokenizer, texts, pairs):
        if self.prompt:  # sentence-transformers' prompt: text before every input, pooled with it
            texts = [self.prompt + text for text in texts]
        return super().encode(tokenizer, texts, pairs)

    def forward(self, model, inputs):
        hidden = run_packed(model, inputs.ids, inputs.cu_seqlens, inputs.max_seqlen).last_hidden_state
        pooled = pool(hidden.float(), inputs, self.pooling)  # (batch, dim) in float32
        if self.normalize and self.overflow != "split":  # (split: a text's windows are averaged first)
            pooled = F.normalize(pooled, p=2, dim=1)
        return {"embedding": pooled}

    def split(self, host, batch):
        return list(host["embedding"])

    def combine(self, item, rows, values, enc, text, pair):
        # split windows: the average of their pooled vectors, then normalised (the average of
        # normalised windows, normalised again, weighed every window alike whatever its norm)
        vector = values[0] if len(values) == 1 else np.mean(values, axis=0, dtype=np.float32)
        if self.normalize and self.overflow == "split":
            vector = vector / np.float32(max(float(np.linalg.norm(vector)), 1e-12))
        return vector


class Classify(Task):
    """Labels and scores per text (or pair). The scores are HF's text-classification pipeline's:
    softmax over the labels; sigmoid for multi-label models and for one-logit models (cross-encoder
    rerankers, binary heads); the raw logits for config.problem_type 'regression';
    ``function_to_apply`` ('softmax', 'sigmoid', 'none') chooses, as in the pipeline. Single-label
    output: the top_k best labels (top_k=1: one {label, score} dict; None: all labels).
    Multi-label (config.problem_type 'multi_label_classification', or multi_label=True): every
    label scoring at least ``threshold``, best first, at most top_k (a list, maybe empty; top_k
    'auto', the default: 1 for single-label, no limit for multi-label).
    overflow='split' averages a long text's logits over its windows."""

    name = "classify"
    model_class = modeling.DistilBertForSequenceClassification

    def __init__(self, config, tokenizer, top_k="auto", multi_label=None, threshold=0.5, function_to_apply=None,
                 **kw):
        super().__init__(config, tokenizer, **kw)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        if multi_label is None:
            multi_label = config.problem_type == "multi_label_classification"
        if top_k == "auto":  # a multi-label model's labels over the threshold were cut to the best one
            top_k = None if multi_label else 1
        _check_positive_int("top_k", top_k, allow_none=True)
        self.top_k, self.multi_label, self.threshold = top_k, bool(multi_label), float(threshold)
        if function_to_apply is not None:  # HF's pipeline option, overriding the model's default
            _check_choice("function_to_apply", function_to_apply, FUNCTIONS)
            self.function = function_to_apply
        elif config.problem_type == "regression" and not self.multi_label:
            self.function = "none"
        else:
            self.function = "sigmoid" if self.multi_label or config.num_labels == 1 else "softmax"
        self.labels = [config.id2label.get(i, config.id2label.get(str(i), f"LABEL_{i}"))
                       for i in range(config.num_labels)]

    def forward(self, model, inputs):
        logits = run_packed(model, inputs.ids, inputs.cu_seqlens, inputs.max_seqlen).logits
        return {"logits": logits.float()}  # (batch, num_labels)

    def split(self, host, batch):
        return list(host["logits"])

    def combine(self, item, rows, values, enc, text, pair):
        logits = torch.from_numpy(np.mean(values, axis=0, dtype=np.float32) if len(values) > 1 else values[0])
        scores = {"sigmoid": torch.sigmoid, "softmax": lambda x: torch.softmax(x, dim=0),
                  "none": lambda x: x}[self.function](logits)
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        if self.multi_label:
            order = [i for i in order if scores[i] >= self.threshold]
            order = order[: self.top_k] if self.top_k else order
            return [{"label": self.labels[i], "score": float(scores[i])} for i in order]
        found = [{"label": self.labels[i], "score": float(scores[i])} for i in order[: self.top_k or len(order)]]
        return found[0] if self.top_k == 1 else found


class Tag(Task):
    """Token classification aggregated to words: a list of {word, start, end, label, score}, start
    and end code point offsets into the text. ``aggregation``: 'first' (the word's first sub-token
    decides), 'average' (sub-token probabilities averaged), 'max' (the most confident sub-token),
    or 'simple' (no aggregation: one entry per token). Long texts are split into windows
    overlapping by ``stride`` tokens; a word is read from the window that holds its first
    sub-token and most of the others, its first token farthest from the window's edges; its
    offsets span it whole even where no window holds all of it.

    ``entities=True``: HF token-classification pipeline's output with the same
    ``aggregation_strategy`` instead: adjacent words (tokens for 'simple') of one entity type
    (B-X then I-X..., or the same plain label) grouped into {entity_group, score (their scores'
    mean), word, start, end}, groups of type 'O' left out. ``word`` is the text's own span
    (the pipeline's is its tokens decoded: lower-cased by an uncased model)."""

    name = "tag"
    model_class = modeling.DistilBertForTokenClassification
    takes_pairs = False  # the words of one text (a pair was dropped without a word)
    overflow = "split"
    stride = 32

    def __init__(self, config, tokenizer, aggregation="first", entities=False, **kw):
        super().__init__(config, tokenizer, **kw)
        _check_choice("aggregation", aggregation, AGGREGATIONS)
        self.aggregation, self.entities = aggregation, _flag("entities", entities)
        self.labels = [config.id2label.get(i, config.id2label.get(str(i), f"LABEL_{i}"))
                       for i in range(config.num_labels)]

    def encode(self, tokenizer, texts, pairs):
        split = self.overflow == "split"
        return encode_packed(tokenizer, texts, None, max_length=self.max_length, stride=self.stride if split else 0,
                             overflow=split, offsets=True, word_ids=True)

    def forward(self, model, inputs):
        logits = run_packed(model, inputs.ids, inputs.cu_seqlens, inputs.max_seqlen).logits
        return {"probs": torch.softmax(logits.float(), dim=-1)}  # (total, num_labels)

    def split(self, host, batch):
        return np.split(host["probs"], batch.cu_seqlens[1:-1])

    def combine(self, item, rows, values, enc, text, pair):
        # A word can straddle two windows (a long word, a small stride): its offsets span every
        # window's part of it, and its probabilities come from the window holding its first
        # sub-token and most of its sub-tokens (the whole word where one does), farthest from
        # the window's edges.
        best, spans = {}, {}  # word -> (rank, row position, token indices within the row); word -> [start, end]
        for k, row in enumerate(rows):
            lo, hi = enc.cu[row], enc.cu[row + 1]
            tokens_of = {}
            for t, w in enumerate(enc.word_ids[lo:hi].tolist()):
                if w >= 0:  # 'simple': each token is a word of its own, known by its offsets
                    key = w if self.aggregation != "simple" else tuple(enc.offsets[lo + t].tolist())
                    tokens_of.setdefault(key, []).append(t)
            for w, tokens in tokens_of.items():
                start, end = int(enc.offsets[lo + tokens[0]][0]), int(enc.offsets[lo + tokens[-1]][1])
                span = spans.setdefault(w, [start, end])
                span[0], span[1] = min(span[0], start), max(span[1], end)
                rank = (start, -len(tokens), -min(tokens[0], hi - lo - 1 - tokens[0]))  # smallest wins
                if w not in best or rank < best[w][0]:
                    best[w] = (rank, k, tokens)
        out = []
        for w in sorted(best):
            _, k, tokens = best[w]
            probs = values[k][tokens]  # (sub-tokens, num_labels)
            if self.aggregation == "first":
                p = probs[0]
            elif self.aggregation == "average":
                p = probs.mean(0)
            else:
                p = probs[int(probs.max(1).argmax())]
            label = int(p.argmax())
            start, end = spans[w]
            out.append({"word": text[start:end], "start": start, "end": end, "label": self.labels[label],
                        "score": float(p[label])})
        return group_entities(out, text) if self.entities else out


def group_entities(words: list, text: str) -> list:
    """HF token-classification pipeline's ``group_entities`` on tagged words (or tokens), then its
    default ``ignore_labels=['O']``: a word joins the group before it when its type (the label
    without 'B-' / 'I-') is the group's and its label does not start with 'B-'."""
    def kind(label):
        return label[2:] if label.startswith(("B-", "I-")) else label

    groups = []
    for word in words:
        if groups and kind(word["label"]) == kind(groups[-1][-1]["label"]) and not word["label"].startswith("B-"):
            groups[-1].append(word)
        else:
            groups.append([word])
    out = []
    for group in groups:
        entity = group[0]["label"].split("-", 1)[-1]  # (as the pipeline names a group)
        if entity == "O":
            continue
        start, end = group[0]["start"], group[-1]["end"]
        out.append({"entity_group": entity, "score": float(np.mean([w["score"] for w in group])),
                    "word": text[start:end], "start": start, "end": end})
    return out


class FillMask(Task):
    """For each [MASK] of a text, the top_k tokens: a list (one per mask, in text order) of lists
    of {token, token_str, score}. The vocabulary head runs on the masked positions only."""

    name = "fill-mask"
    model_class = modeling.DistilBertForMaskedLM

    def __init__(self, config, tokenizer, top_k=5, **kw):
        super().__init__(config, tokenizer, **kw)
        _check_positive_int("top_k", top_k)
        self.top_k = min(top_k, config.vocab_size)
        self.mask_id = tokenizer.mask_token_id
        # a model's vocab may be padded beyond the tokenizer's (to a multiple of 8, 64...): those
        # ids have no token, '' as HF's pipeline decodes them (an IndexError ended the run)
        known = min(len(tokenizer), config.vocab_size)
        self.tokens = tokenizer.convert_ids_to_tokens(list(range(known))) + [""] * (config.vocab_size - known)

    def forward(self, model, inputs):
        hidden = run_packed(model.distilbert, inputs.ids, inputs.cu_seqlens, inputs.max_seqlen).last_hidden_state
        logits = masked_lm_logits(model, hidden[inputs.mask_positions])  # (masks, vocab_size)
        scores, ids = torch.softmax(logits.float(), dim=-1).topk(self.top_k, dim=-1)
        return {"scores": scores, "ids": ids}

    def encode(self, tokenizer, texts, pairs):
        self.check_pair_stride(pairs)
        split = self.overflow == "split"  # offsets tell a mask seen by two overlapping windows
        return encode_packed(tokenizer, texts, pairs, max_length=self.max_length, stride=self.stride if split else 0,
                             overflow=split, offsets=split, sequence_ids=split and pairs is not None)

    def split(self, host, batch):
        """Per row: [(the mask's position in the row, its top_k)], in row order."""
        positions = np.nonzero(batch.ids == self.mask_id)[0]
        row_of_mask = batch.row_of_token()[positions]
        per_row = [[] for _ in batch.rows]
        for m, r in enumerate(row_of_mask.tolist()):
            per_row[r].append((int(positions[m] - batch.cu_seqlens[r]),
                               [{"token": int(i), "token_str": self.tokens[i], "score": float(s)}
                                for i, s in zip(host["ids"][m].tolist(), host["scores"][m].tolist())]))
        return per_row

    def combine(self, item, rows, values, enc, text, pair):
        if len(rows) == 1:
            return [found for _, found in values[0]]
        # overflow windows overlap: a mask in two of them is read from the one where it lies
        # farthest from the edges (it was reported twice)
        best = {}  # the mask's (sequence, start offset) in the text -> (margin, its top_k)
        for row, masks in zip(rows, values):
            lo, length = enc.cu[row], enc.cu[row + 1] - enc.cu[row]
            for position, found in masks:
                key = (int(enc.sequence_ids[lo + position]) if enc.sequence_ids is not None else 0,
                       int(enc.offsets[lo + position][0]))
                margin = min(position, length - 1 - position)
                if key not in best or margin > best[key][0]:
                    best[key] = (margin, found)
        return [best[key][1] for key in sorted(best)]


def masked_lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """DistilBertForMaskedLM's head on some rows of hidden states (rows, dim) -> (rows, vocab),
    with the ops its forward uses."""
    backend = model.config.backend
    h = bias_activation(linear(hidden, model.vocab_transform.weight, backend=backend), model.vocab_transform.bias,
                        model.activation.name, backend=backend)
    norm = model.vocab_layer_norm
    h = residual_layernorm(h, None, norm.weight, norm.bias, norm.eps, backend=backend)
    return modeling._project(model.vocab_projector, h, backend)


class QuestionAnswering(Task):
    """Answer spans for (question, context) pairs: top_k (default 1: one dict) of {answer, start,
    end, score}, start and end code point offsets into the context. Contexts longer than
    ``max_length`` are split into windows overlapping by ``stride`` tokens; score = p(start) *
    p(end), each a softmax over the window's context tokens; the best span over all windows wins,
    at most ``max_answer_len`` tokens long; a span two overlapping windows hold is one answer, at
    the better window's score. ``handle_impossible_answer`` (HF pipeline's): the softmaxes take in
    [CLS] too, and the empty answer ('', 0, 0), scored p_start([CLS]) * p_end([CLS]) (the least
    over the windows), is a candidate beside the spans. ``align_to_words`` (HF pipeline's, on by
    default as there): a span starting or ending inside a word is widened to the whole word (as
    much of it as the window holds), so 'Lovelace' is answered rather than 'love'; spans that
    widen to the same one are one answer, at the best score.

    ``decoding='pipeline'``: transformers 4's QuestionAnsweringPipeline.postprocess as it is (for
    answers equal to the pipeline's): each window's softmaxes take in [CLS] (its probability then
    zeroed), the window's best top_k spans (2 * top_k + 10 with align_to_words) are kept, and
    answers of the same text (case-insensitive) are one, their scores summed, at the offsets where
    the first window found it. The default 'best-span' scores each span once, at its best window."""

    name = "qa"
    model_class = modeling.DistilBertForQuestionAnswering
    needs_pairs = True
    default_max_length = 384
    overflow = "split"
    stride = 128

    def __init__(self, config, tokenizer, top_k=1, max_answer_len=15, handle_impossible_answer=False,
                 align_to_words=True, decoding="best-span", **kw):
        super().__init__(config, tokenizer, **kw)
        if self.overflow != "split":
            raise ValueError("qa always splits long contexts into windows: overflow must be 'split'")
        _check_positive_int("top_k", top_k)
        _check_positive_int("max_answer_len", max_answer_len)
        self.top_k, self.max_answer_len = top_k, max_answer_len
        self.handle_impossible_answer = _flag("handle_impossible_answer", handle_impossible_answer)
        self.align_to_words = _flag("align_to_words", align_to_words, allow_none=False)
        _check_choice("decoding", decoding, QA_DECODINGS)
        self.decoding = decoding

    def encode(self, tokenizer, texts, pairs):
        return encode_packed(tokenizer, self.fit_questions(tokenizer, texts), pairs, max_length=self.max_length,
                             truncation="only_second", stride=self.stride, overflow=True, offsets=True,
                             sequence_ids=True, word_ids=self.align_to_words)

    def fit_questions(self, tokenizer, questions: list) -> list:
        """Questions longer than max_length - stride - 4 tokens cut to that many (as SQuAD's
        max_query_length): every window must keep more than ``stride`` context tokens, and one
        question that leaves none would fail its whole window (the tokenizer refuses it)."""
        limit = self.max_length - self.stride - 4  # [CLS] question [SEP] context (> stride tokens) [SEP]
        if limit < 1:
            return questions
        enc = tokenizer.encode_packed(list(questions), add_special_tokens=False, truncation=True,
                                      max_length=limit + 1, return_offsets_mapping=True, return_tensors="np")
        too_long = np.nonzero(np.diff(enc.cu_seqlens) > limit)[0]
        if not len(too_long):
            return questions
        questions = list(questions)
        for i in too_long.tolist():  # cut after the limit-th token (a token boundary: the same tokens)
            questions[i] = questions[i][: int(enc.offset_mapping[enc.cu_seqlens[i] + limit - 1][1])]
        return questions

    def forward(self, model, inputs):
        out = run_packed(model, inputs.ids, inputs.cu_seqlens, inputs.max_seqlen)
        return {"start": out.start_logits.float(), "end": out.end_logits.float()}  # (total,) each

    def split(self, host, batch):
        cuts = batch.cu_seqlens[1:-1]
        return list(zip(np.split(host["start"], cuts), np.split(host["end"], cuts)))

    def combine(self, item, rows, values, enc, text, pair):
        if self.decoding == "pipeline":
            return self.combine_as_pipeline(rows, values, enc, pair)
        # overlapping windows score a span of their overlap twice: it is one answer, kept at its
        # best window's score (top_k > 1 listed the same span twice, like HF's pipeline merges it)
        best = {}  # (start char, end char) -> score
        null = None  # handle_impossible_answer: the no-answer score, the least over the windows
        for row, (start_logits, end_logits) in zip(rows, values):
            lo, hi = enc.cu[row], enc.cu[row + 1]
            context = enc.sequence_ids[lo:hi] == 1
            if not context.any():
                continue
            spans, row_null = best_spans(start_logits, end_logits, context, self.max_answer_len,
                                         with_null=self.handle_impossible_answer)
            first_char, end_char = self.char_bounds(enc, lo, hi)
            seen = set()  # this window's best top_k answers (token spans widened to one word span are one)
            for score, s, e in spans:
                span = (int(first_char[s]), int(end_char[e]))
                if span in seen:
                    continue
                seen.add(span)
                if score > best.get(span, -1.0):
                    best[span] = score
                if len(seen) == self.top_k:
                    break
            if row_null is not None:
                null = row_null if null is None else min(null, row_null)
        if null is not None:  # the empty answer competes with the spans (HF pipeline's handle_impossible_answer)
            best[(0, 0)] = max(null, best.get((0, 0), -1.0))
        candidates = sorted(best.items(), key=lambda c: -c[1])[: self.top_k]
        found = [{"answer": pair[s:e], "start": s, "end": e, "score": score} for (s, e), score in candidates]
        if self.top_k == 1:
            return found[0] if found else {"answer": "", "start": 0, "end": 0, "score": 0.0}
        return found


    def combine_as_pipeline(self, rows, values, enc, pair):
        """transformers 4.57's QuestionAnsweringPipeline.postprocess (select_starts_ends,
        decode_spans, get_indices, get_answer), step for step, on the item's windows in order."""
        min_null, answers = 1000000.0, {}  # lower-cased text -> answer, in the order found
        keep = self.top_k * 2 + 10 if self.align_to_words else self.top_k
        for row, (start_logits, end_logits) in zip(rows, values):
            lo, hi = enc.cu[row], enc.cu[row + 1]
            allowed = enc.sequence_ids[lo:hi] == 1
            allowed[0] = True  # [CLS]
            start = _softmax(np.where(allowed, start_logits, np.float32(-10000.0)))
            end = _softmax(np.where(allowed, end_logits, np.float32(-10000.0)))
            if self.handle_impossible_answer:
                min_null = min(min_null, float(start[0] * end[0]))
            start[0] = end[0] = 0.0
            candidates = np.tril(np.triu(start[:, None] * end[None, :]), self.max_answer_len - 1)
            flat = candidates.ravel()
            if keep == 1:
                order = np.array([np.argmax(flat)])
            elif len(flat) < keep:
                order = np.argsort(-flat)
            else:
                order = np.argpartition(-flat, keep)[:keep]
                order = order[np.argsort(-flat[order])]
            starts, ends = np.unravel_index(order, candidates.shape)
            wanted = allowed[starts] & allowed[ends]
            first_char, end_char = self.char_bounds(enc, lo, hi)
            for s, e in zip(starts[wanted].tolist(), ends[wanted].tolist()):
                a, b = int(first_char[s]), int(end_char[e])
                answer = answers.setdefault(pair[a:b].lower(), {"answer": pair[a:b], "start": a, "end": b, "score": 0.0})
                answer["score"] += float(candidates[s, e])
        found = list(answers.values())
        if self.handle_impossible_answer:
            found.append({"answer": "", "start": 0, "end": 0, "score": min_null})
        found = sorted(found, key=lambda x: x["score"], reverse=True)[: self.top_k]
        if self.top_k == 1:
            return found[0] if found else {"answer": "", "start": 0, "end": 0, "score": 0.0}
        return found

    def char_bounds(self, enc: Encoded, lo: int, hi: int):
        """(first char, end char) a span starting / ending at each token of row enc[lo:hi] answers
        with: the token's own offsets, or with align_to_words its word's (HF pipeline's
        word_to_chars on the window's encoding: the word's tokens this window holds)."""
        offsets = enc.offsets[lo:hi]
        if not self.align_to_words:
            return offsets[:, 0], offsets[:, 1]
        words, sequences, n = enc.word_ids[lo:hi], enc.sequence_ids[lo:hi], hi - lo
        starts = np.ones(n, dtype=bool)  # a token that starts a word (its tokens are consecutive)
        starts[1:] = (words[1:] != words[:-1]) | (sequences[1:] != sequences[:-1])
        ends = np.ones(n, dtype=bool)
        ends[:-1] = starts[1:]
        positions = np.arange(n)
        first = np.maximum.accumulate(np.where(starts, positions, 0))
        last = np.minimum.accumulate(np.where(ends, positions, n - 1)[::-1])[::-1]
        return offsets[first, 0], offsets[last, 1]


def best_spans(start_logits, end_logits, context: np.ndarray, max_answer_len: int, with_null=False):
    """(the (score, start, end) token spans with start <= end < start + max_answer_len, both in
    ``context``, best first, lazily; score = softmax(start)[s] * softmax(end)[e] over the context
    tokens, and None).
    ``with_null``: the softmax also takes in [CLS] (position 0), and its p(start) * p(end) is
    returned as the no-answer score instead of None, as HF's pipeline does. Only the band of
    spans up to max_answer_len long is scored (a (context, max_answer_len) array): the whole
    (context, context) product, sorted, took 20 ms a 384-token window on the host."""
    idx = np.nonzero(context)[0]
    scored = np.concatenate([[0], idx]) if with_null else idx
    p_start = _softmax(np.asarray(start_logits, dtype=np.float64)[scored])
    p_end = _softmax(np.asarray(end_logits, dtype=np.float64)[scored])
    null = None
    if with_null:
        null, p_start, p_end = float(p_start[0] * p_end[0]), p_start[1:], p_end[1:]
    n, width = len(idx), min(max_answer_len, len(idx))
    ends = np.arange(n)[:, None] + np.arange(width)[None, :]  # [a, d]: span idx[a]..idx[a + d]
    inside = ends < n
    ends = np.minimum(ends, n - 1)
    inside &= idx[ends] - idx[:, None] < max_answer_len  # (context tokens need not be contiguous)
    scores = np.where(inside, p_start[:, None] * p_end[ends], -1.0)
    # a stable sort of the band in (start, end) order: ties broken as over the whole product
    flat = np.argsort(-scores, axis=None, kind="stable")[: int(inside.sum())]  # (the spans outside score -1: last)
    return ((float(scores.flat[f]), int(idx[f // width]), int(idx[ends.flat[f]])) for f in flat), null


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


TASKS = {task.name: task for task in (Embed, Classify, Tag, FillMask, QuestionAnswering)}
