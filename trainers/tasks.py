"""Tasks: what model to build, which data, what loss, how to evaluate.

``BertTask``: ``BertForPreTraining`` (masked LM + next-sentence) or ``BertForMaskedLM`` from a config (no hub).
``ResNetTask``: a ``transformers`` ResNet (ResNet-18/34/50 presets or any ``ResNetConfig``), label smoothing,
top-1/top-5. Losses are means over samples, so a global batch split into any micro-batches averages to the
same gradient (up to rounding).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

BERT_PRESETS = {
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
RESNET_PRESETS = {
    "resnet18": dict(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic"),
    "resnet34": dict(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512], layer_type="basic"),
    "resnet50": dict(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck"),
}


def _make_config(cls, preset: dict, overrides: dict, where: str):
    known = set(cls().to_dict()) | {"num_labels", "id2label", "label2id"}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"model.config: unknown {cls.__name__} field(s) {', '.join(bad)} ({where})")
    return cls(**{**preset, **overrides})


class BertTask:
    name = "bert"
    default_param_groups = "bert"

    def __init__(self, recipe):
        self.r = recipe
        self.nsp = recipe["model"]["type"] == "bert_pretraining"
        self.tok = self.train_ds = self.eval_ds = None

    def build_data(self, cache_root: Path, is_builder: bool, barrier):
        from .data_text import MaskedLMDataset, prepare_corpus

        d = self.r["data"]
        self.tok, train, ev = prepare_corpus(d, cache_root, self.nsp, is_builder, barrier)
        seed = self.r["train"]["seed"]
        self.train_ds = MaskedLMDataset(train, self.tok, d, self.nsp, seed)
        self.eval_ds = MaskedLMDataset(ev, self.tok, d, self.nsp, seed) if len(ev) else None
        if self.eval_ds is not None and d["eval_samples"]:
            self.eval_ds = torch.utils.data.Subset(self.eval_ds, range(min(d["eval_samples"], len(self.eval_ds))))

    def build_model(self):
        from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

        m = self.r["model"]
        cfg = dict(m["config"])
        cfg.setdefault("vocab_size", self.tok.get_vocab_size() if self.tok else 30522)
        cfg.setdefault("max_position_embeddings", max(512, self.r["data"]["seq_len"]))
        config = _make_config(BertConfig, BERT_PRESETS.get(m["preset"], {}), cfg, self.r.path)
        if config.vocab_size < (self.tok.get_vocab_size() if self.tok else 0):
            raise ValueError(f"model.config.vocab_size {config.vocab_size} is smaller than the tokenizer's "
                             f"{self.tok.get_vocab_size()} ({self.r.path})")
        return (BertForPreTraining if self.nsp else BertForMaskedLM)(config)

    def forward(self, model, batch):
        """Return (loss, number of samples); the loss is the mean over samples of the per-sample mean
        masked-LM loss (+ the next-sentence loss)."""
        out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    attention_mask=batch["attention_mask"])
        logits = out.prediction_logits if self.nsp else out.logits
        labels = batch["labels"]
        tok_loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                   reduction="none").view(labels.shape)
        n = (labels != -100).sum(1).clamp(min=1)
        loss = (tok_loss.sum(1) / n).mean()
        if self.nsp:
            loss = loss + F.cross_entropy(out.seq_relationship_logits.float(), batch["next_sentence_label"])
        return loss

    @torch.no_grad()
    def eval_sums(self, model, batch) -> dict:
        out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    attention_mask=batch["attention_mask"])
        logits = (out.prediction_logits if self.nsp else out.logits).float()
        labels = batch["labels"]
        m = labels != -100
        loss = F.cross_entropy(logits[m], labels[m], reduction="sum")
        correct = (logits[m].argmax(-1) == labels[m]).sum()
        sums = {"mlm_loss": loss.item(), "mlm_correct": correct.item(), "mlm_tokens": int(m.sum())}
        if self.nsp:
            s = out.seq_relationship_logits.float()
            sums["nsp_correct"] = (s.argmax(-1) == batch["next_sentence_label"]).sum().item()
            sums["samples"] = len(s)
        return sums

    @staticmethod
    def summarize(s: dict) -> dict:
        out = {"eval/mlm_loss": s["mlm_loss"] / max(1, s["mlm_tokens"]),
               "eval/mlm_accuracy": s["mlm_correct"] / max(1, s["mlm_tokens"])}
        if "samples" in s:
            out["eval/nsp_accuracy"] = s["nsp_correct"] / max(1, s["samples"])
        return out


class ResNetTask:
    name = "resnet"
    default_param_groups = "mlperf"

    def __init__(self, recipe):
        self.r = recipe
        self.train_ds = self.eval_ds = None

    def build_data(self, cache_root: Path, is_builder: bool, barrier):
        from .data_image import ImageDataset, load_sources

        d, seed = self.r["data"], self.r["train"]["seed"]
        train, ev = load_sources(d)
        self.train_ds = ImageDataset(train, d, seed, train=True, limit=d["max_train_samples"])
        self.eval_ds = ImageDataset(ev, d, seed, train=False, limit=d["eval_samples"]) if ev is not None else None

    def build_model(self):
        from transformers import ResNetConfig, ResNetForImageClassification

        m, d = self.r["model"], self.r["data"]
        cfg = dict(m["config"])
        cfg.setdefault("num_channels", d["channels"])
        cfg.setdefault("num_labels", d["num_classes"])
        config = _make_config(ResNetConfig, RESNET_PRESETS.get(m["preset"], {}), cfg, self.r.path)
        return ResNetForImageClassification(config)

    def forward(self, model, batch):
        logits = model(pixel_values=batch["pixel_values"]).logits.float()
        return F.cross_entropy(logits, batch["labels"], label_smoothing=self.r["train"]["label_smoothing"])

    @torch.no_grad()
    def eval_sums(self, model, batch) -> dict:
        logits = model(pixel_values=batch["pixel_values"]).logits.float()
        y = batch["labels"]
        top5 = logits.topk(min(5, logits.shape[-1]), -1).indices
        return {"loss": F.cross_entropy(logits, y, reduction="sum").item(),
                "top1": (top5[:, 0] == y).sum().item(), "top5": (top5 == y[:, None]).any(-1).sum().item(),
                "samples": len(y)}

    @staticmethod
    def summarize(s: dict) -> dict:
        n = max(1, s["samples"])
        return {"eval/loss": s["loss"] / n, "eval/top1": s["top1"] / n, "eval/top5": s["top5"] / n}


def make_task(recipe):
    return ResNetTask(recipe) if recipe["model"]["type"] == "resnet" else BertTask(recipe)
