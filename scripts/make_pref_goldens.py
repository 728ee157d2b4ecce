#!/usr/bin/env python3
"""Golden fixtures for qscript's preference objectives: TRL's loss, metrics and gradients on one
batch (CPU, float32, eager attention), for the tiny checkpoints of make_model_goldens.py.

  python3 -m venv /tmp/trl && /tmp/trl/bin/pip install torch transformers peft trl  # CPU is enough
  /tmp/trl/bin/python scripts/make_pref_goldens.py              # writes tests/fixtures/pref/
  (QSCRIPT_FIXTURES, default ../shared/fixtures: Qwen2.5's tokenizer and the LLaMA-Factory demos)

Cases (OUTDIR/<case>/golden.safetensors + meta.json):
- LoRA on tiny-qwen2 with the PEFT adapter of tests/fixtures/lora/qwen2-qkvo-r4. TRL keeps a
  copy of an existing adapter as the reference; the policy is then moved by noise (saved in
  <case>/policy) so the rewards are not zero:
  DPOTrainer with loss_type sigmoid, ipo, hinge, robust (label_smoothing 0.1) and sigmoid + sft
  (old TRL's rpo_alpha); ORPOTrainer's and CPOTrainer's (loss_type simpo) batch losses; KTOTrainer.
- Full fine-tuning of tiny-llama3 with DPOTrainer (sigmoid), the reference a frozen copy, the
  policy moved by noise (saved in <case>/policy).

tokenized_demo.json: TRL's tokenization of dpo_en_demo's and kto_en_demo's first records with
Qwen2.5's tokenizer.

The batch of each case is pre-tokenized (prompt_ids / chosen_ids / rejected_ids, or KTO's completion_ids and
label), so the comparison is of the objectives, not of tokenizers. meta.json holds the batch,
the loss, TRL's logged metrics and the options; golden.safetensors holds grad.<PEFT or HF name>.
"""
import contextlib, copy, json, os, shutil, sys, types
import torch
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

import trl
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures")
VOCAB = 128


def tokenizer():
    # TRL needs a processing class (pad token, saving); the batch is already ids.
    vocab = {f"<{i}>": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<0>", eos_token="<2>")


def text(ids):
    return "".join(f" <{i}>" for i in ids)


def as_text(rows):
    """The ids as the text the WordLevel tokenizer reads back into them (answers end in eos)."""
    return [{k.replace("_ids", ""): text(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]


def pairs():
    g = torch.Generator().manual_seed(7)
    # Answers end with eos (2), as TRL appends it to plain-text answers.
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()
    ans = lambda n: ids(n - 1) + [2]
    return [
        {"prompt_ids": ids(5), "chosen_ids": ans(4), "rejected_ids": ans(6)},
        {"prompt_ids": ids(3), "chosen_ids": ans(7), "rejected_ids": ans(2)},
        {"prompt_ids": ids(8), "chosen_ids": ans(3), "rejected_ids": ans(3)},
    ]


def kto_rows():
    p = pairs()
    return [
        {"prompt_ids": p[0]["prompt_ids"], "completion_ids": p[0]["chosen_ids"], "label": True},
        {"prompt_ids": p[1]["prompt_ids"], "completion_ids": p[1]["rejected_ids"], "label": False},
        {"prompt_ids": p[2]["prompt_ids"], "completion_ids": p[2]["chosen_ids"], "label": True},
        {"prompt_ids": p[0]["prompt_ids"], "completion_ids": p[0]["rejected_ids"], "label": False},
    ]


def lora_policy():
    base = AutoModelForCausalLM.from_pretrained(os.path.join(FIX, "models", "tiny-qwen2"),
                                                dtype=torch.float32, attn_implementation="eager")
    return PeftModel.from_pretrained(base, os.path.join(FIX, "lora", "qwen2-qkvo-r4"), is_trainable=True)


def grads(model):
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            out["grad." + n.replace(".default", "")] = p.grad.detach().clone()
    return out


def args(cls, **kw):
    return cls(output_dir="/tmp/pref-goldens", report_to=[], per_device_train_batch_size=8,
               use_cpu=True, bf16=False, disable_dropout=True, **kw)


def perturb(t, out, case, lora):
    """Moves the policy away from the reference TRL made at init (a copy of the adapter, or the
    frozen model), so rewards and the loss's weights are not at their starting values; saves the
    policy where the test loads it (the PEFT adapter, or the whole model)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in t.model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    d = os.path.join(out, case)
    os.makedirs(d, exist_ok=True)
    t.model.save_pretrained(os.path.join(d, "policy"))
    # Only the policy: PEFT also writes the "ref" adapter and a model card.
    shutil.rmtree(os.path.join(d, "policy", "ref"), ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(d, "policy", "README.md"))


def write(out, case, meta, tensors):
    d = os.path.join(out, case)
    os.makedirs(d, exist_ok=True)
    meta["trl"] = trl.__version__
    meta["torch"] = torch.__version__
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"), indent=1)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "golden.safetensors"))
    print(case, "loss", meta["loss"], {k: round(v, 5) for k, v in meta["metrics"].items()})


def dpo_case(out, case, model, ref, opts, model_name, lora):
    data = pairs()
    t = DPOTrainer(model=model, ref_model=ref, args=args(DPOConfig, max_length=None, **opts),
                   train_dataset=Dataset.from_list(as_text(data)), processing_class=tokenizer())
    rows = [t.train_dataset[i] for i in range(len(data))]
    for r, p in zip(rows, data):
        assert all(r[k] == p[k] for k in p), (r, p)
    perturb(t, out, case, lora)
    batch = t.data_collator(rows)
    t.model.train()
    loss = t.compute_loss(t.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in t._metrics["train"].items()
               if k.startswith(("rewards/", "logps/"))}
    meta = {"kind": "dpo", "model": model_name, "lora": lora, "options": opts, "pairs": data,
            "loss": loss.item(), "metrics": metrics}
    write(out, case, meta, grads(t.model))


def old_style_case(out, case, cls, opts, metric_keys):
    """ORPO's and CPO's batch loss through the trainers' own methods on a fake trainer (their
    constructors tokenize text; the maths is in these methods)."""
    model = lora_policy()
    data = pairs()
    conf = cls[1](output_dir="/tmp/pref-goldens", use_cpu=True, bf16=False, **opts)
    fake = types.SimpleNamespace(
        beta=conf.beta, is_encoder_decoder=False, padding_value=0, pad_token_id=0, label_pad_token_id=-100,
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, loss_type=getattr(conf, "loss_type", None),
        label_smoothing=getattr(conf, "label_smoothing", 0.0), simpo_gamma=getattr(conf, "simpo_gamma", None),
        cpo_alpha=getattr(conf, "cpo_alpha", None), alpha=getattr(conf, "alpha", 0.0))
    for name in ("concatenated_inputs", "get_batch_logps", "concatenated_forward", "odds_ratio_loss",
                 "cpo_loss", "get_batch_loss_metrics"):
        if hasattr(cls[0], name):
            f = getattr(cls[0], name)
            setattr(fake, name, types.MethodType(f, fake) if not isinstance(cls[0].__dict__.get(name), staticmethod) else f)
    def side(key):
        rows = [p["prompt_ids"] + p[key] for p in data]
        labs = [[-100] * len(p["prompt_ids"]) + p[key] for p in data]
        n = max(map(len, rows))
        return (torch.tensor([r + [0] * (n - len(r)) for r in rows]),
                torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows]),
                torch.tensor([l + [-100] * (n - len(l)) for l in labs]))
    batch = {}
    for key, name in (("chosen_ids", "chosen"), ("rejected_ids", "rejected")):
        ids, mask, labels = side(key)
        batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"], batch[f"{name}_labels"] = ids, mask, labels
    model.train()
    loss, metrics = fake.get_batch_loss_metrics(model, batch)
    loss.backward()
    metrics = {k: float(v) for k, v in metrics.items() if k in metric_keys}
    meta = {"kind": "dpo", "model": "tiny-qwen2", "lora": True, "options": opts, "pairs": data,
            "loss": loss.item(), "metrics": metrics}
    write(out, case, meta, grads(model))


def kto_case(out):
    model = lora_policy()
    data = kto_rows()
    t = KTOTrainer(model=model, ref_model=None, args=args(KTOConfig, max_length=None, beta=0.1,
                   desirable_weight=1.0, undesirable_weight=1.5),
                   train_dataset=Dataset.from_list(as_text(data)), processing_class=tokenizer())
    rows = [t.train_dataset[i] for i in range(len(data))]
    for r, p in zip(rows, data):
        assert r["prompt_ids"] == p["prompt_ids"] and r["completion_ids"] == p["completion_ids"], (r, p)
    perturb(t, out, "kto", True)
    batch = t.data_collator(rows)
    t.model.train()
    loss = t.compute_loss(t.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in t._metrics["train"].items()
               if k.startswith(("rewards/", "logps/")) or k == "kl"}
    meta = {"kind": "kto", "model": "tiny-qwen2", "lora": True,
            "options": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.5},
            "rows": [{k: r[k] for k in ("prompt_ids", "completion_ids", "KL_completion_ids", "label")} for r in rows],
            "loss": loss.item(), "metrics": metrics}
    write(out, "kto", meta, grads(t.model))


def tokenization(out, shared):
    """TRL's tokenization of LLaMA-Factory's demo preference data with Qwen2.5's real tokenizer:
    DPOTrainer's prompt_ids / chosen_ids / rejected_ids of dpo_en_demo's first records (in TRL's
    conversational form: the ShareGPT turns as the prompt, each answer one assistant message),
    and KTOTrainer's prompt_ids / completion_ids of kto_en_demo's (the last message the answer)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(shared, "tokenizers", "qwen2.5"))
    lf = os.path.join(shared, "datasets", "llamafactory")
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    msg = lambda m: {"role": roles[m["from"]], "content": m["value"]}
    raw = json.load(open(os.path.join(lf, "dpo_en_demo.json")))[:6]
    data = [{"prompt": [msg(m) for m in r["conversations"]], "chosen": [msg(r["chosen"])],
             "rejected": [msg(r["rejected"])]} for r in raw]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(FIX, "models", "tiny-qwen2"), dtype=torch.float32)
    t = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args(DPOConfig, max_length=None),
                   train_dataset=Dataset.from_list(data), processing_class=tok)
    dpo = [{k: t.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(data))]
    raw = json.load(open(os.path.join(lf, "kto_en_demo.json")))[:6]
    data = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:], "label": r["label"]} for r in raw]
    t = KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args(KTOConfig, max_length=None),
                   train_dataset=Dataset.from_list(data), processing_class=tok)
    kto = [{k: t.train_dataset[i][k] for k in ("prompt_ids", "completion_ids", "label")} for i in range(len(data))]
    json.dump({"trl": trl.__version__, "tokenizer": "qwen2.5", "dpo_en_demo": dpo, "kto_en_demo": kto},
              open(os.path.join(out, "tokenized_demo.json"), "w"))
    print("tokenization", len(dpo), len(kto))


def main(out):
    for case, opts in [
        ("dpo-sigmoid", {"loss_type": ["sigmoid"], "beta": 0.1}),
        ("dpo-ipo", {"loss_type": ["ipo"], "beta": 0.1}),
        ("dpo-hinge", {"loss_type": ["hinge"], "beta": 2.0}),
        ("dpo-robust", {"loss_type": ["robust"], "beta": 0.1, "label_smoothing": 0.1}),
        ("dpo-rpo", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.1}),
    ]:
        dpo_case(out, case, lora_policy(), None, opts, "tiny-qwen2", True)
    full = AutoModelForCausalLM.from_pretrained(os.path.join(FIX, "models", "tiny-llama3"),
                                                dtype=torch.float32, attn_implementation="eager")
    dpo_case(out, "dpo-full", full, copy.deepcopy(full), {"loss_type": ["sigmoid"], "beta": 0.1},
             "tiny-llama3", False)
    old_style_case(out, "orpo", (ORPOTrainer, ORPOConfig), {"beta": 0.1},
                   {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"})
    old_style_case(out, "simpo", (CPOTrainer, CPOConfig),
                   {"beta": 2.0, "loss_type": "simpo", "simpo_gamma": 0.5, "cpo_alpha": 0.0},
                   {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected"})
    kto_case(out)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(FIX, "pref")
    main(out)
    tokenization(out, os.environ.get("QSCRIPT_FIXTURES", os.path.join(HERE, "..", "..", "shared", "fixtures")))
