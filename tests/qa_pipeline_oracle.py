"""transformers 4's question-answering pipeline (transformers 5 has none), run in the oracle
virtualenv (.venv-adapters, transformers 4.57; see scripts/setup_adapters_oracle.sh) for
test_engine.py: ``python qa_pipeline_oracle.py CHECKPOINT REQUEST.json`` prints, for each options
dict of the request, the pipeline's answers (a list per question) as JSON."""

import json
import sys

import transformers

path, request_file = sys.argv[1], sys.argv[2]
with open(request_file, encoding="utf-8") as f:
    request = json.load(f)
# (DistilBERT's tokenizer class: the checkpoint's BERT tokenizer config would hand the model token_type_ids)
qa = transformers.pipeline("question-answering", model=path,
                           tokenizer=transformers.DistilBertTokenizerFast.from_pretrained(path), device=-1)
results = []
for options in request["options"]:
    answers = [qa(question=q, context=c, **options) for q, c in zip(request["questions"], request["contexts"])]
    results.append([a if isinstance(a, list) else [a] for a in answers])
json.dump({"transformers": transformers.__version__, "answers": results}, sys.stdout)
