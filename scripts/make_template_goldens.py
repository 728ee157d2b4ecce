#!/usr/bin/env python3
"""Golden SFT tokenization of multi-turn conversations with Qwen3's real tokenizer, as TRL's
SFTTrainer makes it with `assistant_only_loss=True`: TRL 1.16 swaps Qwen3's template for its
training variant (every assistant turn keeps its <think> block; `{% generation %}` marks what is
learned) and transformers' `return_assistant_tokens_mask` gives the learned tokens.

  /tmp/trl/bin/python scripts/make_template_goldens.py > tests/fixtures/templates/qwen3_multiturn.json
  (QSCRIPT_FIXTURES, default ../shared/fixtures: Qwen3's tokenizer and EmoLLM's conversations)
"""
import json, os, sys

import trl
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FX = os.environ.get("QSCRIPT_FIXTURES", os.path.join(HERE, "..", "..", "shared", "fixtures"))
tok = AutoTokenizer.from_pretrained(os.path.join(FX, "tokenizers", "qwen3"))
template = open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen3_training.jinja")).read()
records = [json.loads(l) for l in open(os.path.join(FX, "datasets", "emollm", "emollm_messages.jsonl"))][:3]
convs = [r["messages"] for r in records]
# A conversation whose first answer holds reasoning.
convs.append([
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6"},
])
out = []
for msgs in convs:
    r = tok.apply_chat_template(msgs, chat_template=template, tokenize=True, return_dict=True,
                                return_assistant_tokens_mask=True)
    out.append({"messages": msgs, "input_ids": r["input_ids"], "assistant_masks": r["assistant_masks"]})
json.dump({"trl": trl.__version__, "tokenizer": "qwen3", "conversations": out}, sys.stdout, ensure_ascii=False)
