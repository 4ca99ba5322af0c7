"""Frozen PLM backbones behind one small interface: masked LM, seq2seq and decoder-only.

A soft prompt of shape [n_tokens, d_model] goes in front of the token embeddings; label words are scored
by the PLM's own head at one position per example: the `<mask>` slot (masked LM), the first decoder step
(seq2seq) or the next token after the template (decoder-only). Only the label-word rows of the output
embedding are multiplied, and only at that position.
"""

import logging
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from ptx.errors import PtxError

log = logging.getLogger(__name__)


class BackboneKind(str, Enum):
    MASKED_LM = "masked_lm"
    SEQ2SEQ = "seq2seq"
    CAUSAL_LM = "causal_lm"

    @property
    def active_rule(self) -> str:
        """Which FFN value makes a neuron active on this kind (`Backbone.ffn_modules`), as activations.json records it."""
        return _ACTIVE_RULE[self]


# An FFN neuron is active when the value at its hook point is > 0; per kind, that value is:
_ACTIVE_RULE = {BackboneKind.MASKED_LM: "intermediate output (after GELU) > 0",
                BackboneKind.SEQ2SEQ: "wi / wi_0 output (before ReLU/GELU) > 0",
                BackboneKind.CAUSAL_LM: "gate_proj output (before SiLU) > 0; GPT-2: c_fc output (before GELU) > 0"}


class Position(str, Enum):  # where FFN activations are read (Backbone.read_index)
    SCORE = "score"  # the kind's reading slot: <mask> (masked LM), decoder step 0 / last encoder token (seq2seq),
    #                 the last position (decoder-only)
    LAST = "last"  # the last non-padding position of the hooked sequence
    MEAN = "mean"  # the mean over every non-padding position of the hooked sequence (prompt included)


class Insertion(str, Enum):
    PREPEND = "prepend"  # prompt before the whole input (PEFT's layout)
    PAPER = "paper"  # Su et al.'s RoBERTa layout: slot 0 is <mask>, prompt positions get zero position embeddings


MASKED_TYPES = {"bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra", "deberta", "deberta-v2", "camembert"}
TAIL_KEEP = 8  # tokens kept at the end of an over-long text: the template's tail ("It was") must survive


@dataclass
class Backbone:
    """A frozen PLM with its tokenizer; see docs/design.md for the contract."""

    name: str
    revision: str | None
    kind: BackboneKind
    insertion: Insertion
    model: nn.Module
    tokenizer: object
    d_model: int
    n_layers: int
    d_ff: int
    _specials: tuple = field(default=((), ()), repr=False)

    # ---- tokenisation -------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pid if pid is not None else 0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def encode(self, before: str, after: str, max_length: int) -> tuple[list[int], int]:
        """Token ids of one example (no prompt) and the index of its scoring position within them."""
        prefix, suffix = self._specials
        pre, post = self._ids(before), self._ids(after)
        mask_slot = self.kind is BackboneKind.MASKED_LM and self.insertion is Insertion.PREPEND
        if self.kind is BackboneKind.CAUSAL_LM:
            post, suffix = [], ()  # the next token after `before` is the label word: nothing may follow
        room = max_length - len(prefix) - len(suffix) - int(mask_slot)  # for the text before and after the mask
        if room < 1:
            raise PtxError(f"max_length {max_length} leaves no room for text on backbone '{self.name}'; "
                           f"expected more than {max_length - room}")
        # over-long text after the mask gives way first, so the text before it keeps TAIL_KEEP + 1 tokens
        post = post[: max(0, room - min(len(pre), TAIL_KEEP + 1))]
        budget = room - len(post)
        if len(pre) > budget:  # cut the middle of the text, keep the template's tail before the mask
            tail = min(TAIL_KEEP, budget)
            pre = pre[: budget - tail] + pre[len(pre) - tail:]
        if mask_slot:
            ids = [*prefix, *pre, self.tokenizer.mask_token_id, *post, *suffix]
            return ids, len(prefix) + len(pre)
        if self.kind is BackboneKind.CAUSAL_LM:
            ids = [*prefix, *pre]
            return ids, len(ids) - 1
        return [*prefix, *pre, *post, *suffix], 0  # seq2seq and the paper layout score outside the text

    def label_ids(self, words) -> torch.LongTensor:
        """Token id of each label word [n_labels]; a word that is not one token is an error."""
        out = []
        for word in words:
            found = None
            for variant in (f" {word}", word):  # BPE/sentencepiece vocabularies mark a leading space
                ids = self._ids(variant)
                ids = [i for i in ids if i not in self._space_ids()]
                if len(ids) == 1 and ids[0] != self.tokenizer.unk_token_id:  # <unk> is one token but no word
                    found = ids[0]
                    break
            if found is None:
                pieces = self.tokenizer.convert_ids_to_tokens(self._ids(f" {word}"))
                raise PtxError(f"verbalizer word '{word}' is not one known token of backbone '{self.name}' "
                               f"(it splits into {pieces}); choose a single-token word")
            out.append(found)
        if len(set(out)) != len(out):
            raise PtxError(f"verbalizer {list(words)} maps two labels to one token on backbone '{self.name}'")
        return torch.tensor(out, dtype=torch.long)

    def _space_ids(self) -> set:
        # sentencepiece may emit a bare "▁" before a word it cannot merge with the space
        return {i for i in self._ids(" ") if self.tokenizer.convert_ids_to_tokens(i) in ("▁", "Ġ")}

    # ---- forward ------------------------------------------------------------------------------------
    def input_embeddings(self) -> torch.Tensor:
        """The frozen token embedding matrix [vocab, d_model]."""
        return self.model.get_input_embeddings().weight

    def _inputs(self, prompts: torch.Tensor, batch: dict):
        """Prompt-prefixed input embeddings [P*B, n+T, d] and attention mask [P*B, n+T]."""
        ids, attn = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        n_prompts, n_tok, _ = prompts.shape
        bsz, seq = ids.shape
        self._check_positions(n_tok, seq)
        tok = self.model.get_input_embeddings()(ids)
        prompts = prompts.to(tok.dtype)
        if self.insertion is Insertion.PAPER:
            mask_row = self.input_embeddings()[self.tokenizer.mask_token_id].to(tok.dtype)
            prompts = torch.cat([mask_row.expand(n_prompts, 1, -1), prompts[:, 1:]], dim=1)
        x = torch.cat([prompts[:, None].expand(-1, bsz, -1, -1), tok[None].expand(n_prompts, -1, -1, -1)], dim=2)
        x = x.reshape(n_prompts * bsz, n_tok + seq, -1)
        mask = torch.cat([attn.new_ones(bsz, n_tok), attn], dim=1).repeat(n_prompts, 1)
        return x, mask

    def _check_positions(self, n_tok: int, seq: int) -> None:
        """A masked LM's learned position table must cover prompt + text (prepend) or the text (paper layout)."""
        emb = getattr(getattr(self.model.base_model, "embeddings", None), "position_embeddings", None)
        if self.kind is not BackboneKind.MASKED_LM or not isinstance(emb, nn.Embedding):
            return
        offset = emb.padding_idx + 1 if emb.padding_idx is not None else 0  # RoBERTa counts from padding_idx + 1
        room, need = emb.num_embeddings - offset, seq + (n_tok if self.insertion is Insertion.PREPEND else 0)
        if need > room:
            raise PtxError(f"backbone '{self.name}' has {room} positions; a {n_tok}-token prompt "
                           f"({self.insertion.value}) with {seq} text tokens needs {need}: shorten the prompt or "
                           f"the task's max_length (data.max_length) to at most {max(0, room - (need - seq))}")

    def _positions(self, n_tok: int, seq: int, rows: int) -> torch.Tensor | None:
        """Position ids for the paper layout: prompt slots at the padding index (a zero embedding)."""
        if self.insertion is not Insertion.PAPER:
            return None
        pad = _zero_position(self.model)  # load_backbone checked it exists; text counts from pad + 1 (RoBERTa)
        pos = torch.cat([torch.full((n_tok,), pad), torch.arange(pad + 1, pad + 1 + seq)])
        return pos.to(self.device).expand(rows, -1)

    def hidden_at_score(self, prompts: torch.Tensor, batch: dict) -> torch.Tensor:
        """Final hidden state at each example's scoring position [P*B, d] (after any decoder step)."""
        x, mask = self._inputs(prompts, batch)
        return self._hidden(x, mask, prompts.shape[1], batch["score_index"].to(self.device).repeat(prompts.shape[0]))

    def _hidden(self, x: torch.Tensor, mask: torch.Tensor, n_tok: int, score: torch.Tensor) -> torch.Tensor:
        """One backbone pass over prompt-prefixed rows x [R, n+T, d]: the hidden state at each row's score index [R, d]."""
        rows = x.shape[0]
        body = self.model.base_model if self.kind is not BackboneKind.SEQ2SEQ else None
        if self.kind is BackboneKind.SEQ2SEQ:
            enc = self.model.get_encoder()(inputs_embeds=x, attention_mask=mask).last_hidden_state
            start = torch.full((rows, 1), self.model.config.decoder_start_token_id, device=self.device)
            dec = self.model.get_decoder()(input_ids=start, encoder_hidden_states=enc, encoder_attention_mask=mask)
            return dec.last_hidden_state[:, 0]
        pos = self._positions(n_tok, x.shape[1] - n_tok, rows)
        kwargs = {"position_ids": pos} if pos is not None else {}
        hidden = body(inputs_embeds=x, attention_mask=mask, **kwargs).last_hidden_state
        if self.kind is BackboneKind.MASKED_LM and self.insertion is Insertion.PAPER:
            return hidden[:, 0]
        return hidden[torch.arange(rows, device=self.device), n_tok + score]

    def _prompt_once(self) -> bool:
        """Decoder-only with the prompt in front (and no sliding window): the prompt's states need no per-example run.

        CPU only. On CPU, where time follows FLOPs, running the prompt once per batch is 1.7-2.8x faster; on an
        H200 it was 0.59x of one pass (Llama-1B shape, batch 8, prompt 100, text 256; benchmarks/RESULTS.md): the
        text attending to a key/value cache takes a masked attention kernel instead of the fused causal one.
        """
        cfg = self.model.config
        sliding = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
        return (self.kind is BackboneKind.CAUSAL_LM and self.insertion is Insertion.PREPEND and not sliding
                and self.device.type == "cpu")

    def _hidden_prompt_once(self, prompts: torch.Tensor, batch: dict) -> torch.Tensor:
        """hidden_at_score for decoder-only models, prompt run once per prompt instead of once per example [P*B, d].

        Causal attention keeps the prompt's states independent of the text after it, so each prompt runs alone
        and every example's text runs on top of its key/value cache: the same values and gradients as one pass
        over [prompt; text], with the prompt's share of the compute divided by the batch size (benchmarks/RESULTS.md).
        Label scoring only: FFN hooks (activations.py) see one-pass calls through hidden_at_score.
        """
        return self._hidden_prompt_once_stacked([(prompts, batch)])

    def _hidden_prompt_once_stacked(self, segments: list) -> torch.Tensor:
        """The prompt-once pass over several (prompts [P, n, d], batch) segments of equal width: rows [sum P*B, d]."""
        import inspect

        from transformers import DynamicCache

        body = self.model.base_model
        key = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
        n_tok, seq = segments[0][0].shape[1], segments[0][1]["input_ids"].shape[1]
        toks, masks, scores, rows, first = [], [], [], [], 0
        for prompts, batch in segments:
            ids, attn = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            n_prompts, bsz = prompts.shape[0], ids.shape[0]
            toks.append(self.model.get_input_embeddings()(ids).repeat(n_prompts, 1, 1))
            masks.append(torch.cat([attn.new_ones(bsz, n_tok), attn], dim=1).repeat(n_prompts, 1))
            scores.append(batch["score_index"].to(self.device).repeat(n_prompts))
            # each prompt's cache row repeated once per example: rows prompt-major, as _inputs lays them out
            rows.append(torch.arange(first, first + n_prompts, device=self.device).repeat_interleave(bsz))
            first += n_prompts
        tok = torch.cat(toks)
        cache = DynamicCache(config=self.model.config)
        body(inputs_embeds=torch.cat([p for p, _ in segments]).to(tok.dtype), use_cache=True, **{key: cache})
        cache.reorder_cache(torch.cat(rows))
        hidden = body(inputs_embeds=tok, attention_mask=torch.cat(masks), use_cache=True,
                      **{key: cache}).last_hidden_state
        assert cache.get_seq_length() == n_tok + seq, "the backbone did not attend to the prompt's key/value cache"
        return hidden[torch.arange(hidden.shape[0], device=self.device), torch.cat(scores)]

    def _head(self, hidden: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        """The PLM's own output head restricted to label rows: [N, d] -> [N, n_labels]."""
        model, label_ids = self.model, label_ids.to(self.device)
        if self.kind is BackboneKind.MASKED_LM:
            if hasattr(model, "cls"):  # BERT
                hidden = model.cls.predictions.transform(hidden)
            elif hasattr(model, "lm_head") and hasattr(model.lm_head, "dense"):  # RoBERTa, MPNet
                head = model.lm_head
                hidden = head.layer_norm(F.gelu(head.dense(hidden)))
            else:  # an unknown masked-LM head: run it whole, still only at the scoring position
                head = getattr(model, "lm_head", None) or getattr(model, "cls", None)
                if head is None:
                    raise PtxError(f"unknown masked-LM head on backbone '{self.name}' ({model.config.model_type})")
                return head(hidden)[:, label_ids]
        elif self.kind is BackboneKind.SEQ2SEQ and getattr(model.config, "scale_decoder_outputs",
                                                           model.config.tie_word_embeddings):
            hidden = hidden * (self.d_model ** -0.5)
        out = model.get_output_embeddings()
        logits = hidden @ out.weight[label_ids].T
        bias = out.bias if getattr(out, "bias", None) is not None else getattr(getattr(model, "lm_head", None), "bias", None)
        return logits + bias[label_ids] if isinstance(bias, torch.Tensor) else logits

    def label_logits(self, prompts: torch.Tensor, batch: dict, label_ids: torch.Tensor) -> torch.Tensor:
        """Label-word logits: prompts [P, n, d] -> [P, B, n_labels]; a 2-D prompt [n, d] -> [B, n_labels]."""
        squeeze = prompts.dim() == 2
        prompts = prompts[None] if squeeze else prompts
        hidden = self._hidden_prompt_once(prompts, batch) if self._prompt_once() else self.hidden_at_score(prompts, batch)
        logits = self._head(hidden, label_ids)
        logits = logits.float().view(prompts.shape[0], batch["input_ids"].shape[0], -1)
        return logits[0] if squeeze else logits

    def stacked_label_logits(self, segments: list, label_ids: list) -> list[torch.Tensor]:
        """Several (prompts [P, n, d], batch) segments, each with its own batch and label words, in one backbone pass.

        Returns per segment what label_logits returns for it, [P, B, n_labels]. The batches are right-padded to the
        widest one; the padding is masked out, so a row's logits do not depend on what it is stacked with.
        """
        segments = [(p[None] if p.dim() == 2 else p, b) for p, b in segments]
        n_tok = {p.shape[1] for p, _ in segments}
        if len(n_tok) != 1:
            raise PtxError(f"stacked prompts must have one length; found lengths {sorted(n_tok)}")
        width = max(b["input_ids"].shape[1] for _, b in segments)
        segments = [(p, _pad_batch(b, width, self.pad_id)) for p, b in segments]
        if self._prompt_once():
            hidden = self._hidden_prompt_once_stacked(segments)
        else:
            parts = [self._inputs(p, b) for p, b in segments]
            score = torch.cat([b["score_index"].to(self.device).repeat(p.shape[0]) for p, b in segments])
            hidden = self._hidden(torch.cat([x for x, _ in parts]), torch.cat([m for _, m in parts]), n_tok.pop(), score)
        out, start = [], 0
        for (prompts, batch), ids in zip(segments, label_ids, strict=True):
            n_rows = prompts.shape[0] * batch["input_ids"].shape[0]
            logits = self._head(hidden[start:start + n_rows], ids).float()
            out.append(logits.view(prompts.shape[0], batch["input_ids"].shape[0], -1))
            start += n_rows
        return out

    def seq2seq_loss(self, prompt: torch.Tensor, batch: dict) -> torch.Tensor:
        """Teacher-forced token cross-entropy of the target text (generation tasks, seq2seq only)."""
        self._require_seq2seq()
        x, mask = self._inputs(prompt[None], batch)
        labels = batch["target_ids"].to(self.device).masked_fill(batch["target_ids"].to(self.device) == self.pad_id, -100)
        return self.model(inputs_embeds=x, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, batch: dict, max_new_tokens: int = 32) -> list[str]:
        """Greedy generation of text answers (seq2seq only)."""
        self._require_seq2seq()
        x, mask = self._inputs(prompt[None].to(self.device), batch)
        out = self.model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def _require_seq2seq(self):
        if self.kind is not BackboneKind.SEQ2SEQ:
            raise PtxError(f"generation tasks need a seq2seq backbone; '{self.name}' is {self.kind.value}")

    # ---- FFN hook points ----------------------------------------------------------------------------
    @property
    def active_rule(self) -> str:
        """Which FFN value makes a neuron active on this backbone (its kind's rule)."""
        return self.kind.active_rule

    @staticmethod
    def active_neurons(values: torch.Tensor) -> torch.Tensor:
        """Active-neuron mask of hooked FFN values [..., d_ff] -> bool, the same shape: value > 0 on every kind
        (for each hook point > 0 before or after the activation function is the same test)."""
        return values > 0

    def read_index(self, batch: dict, n_tok: int, where: str = "decoder",
                   position: Position = Position.SCORE) -> torch.Tensor | None:
        """Per example, the index into the hooked sequence (n_tok prompt tokens, then the batch's tokens) where
        FFN activations are read [B]; None for Position.MEAN (mean over positions)."""
        if position is Position.MEAN:
            return None
        if self.kind is BackboneKind.SEQ2SEQ and where == "decoder":
            return torch.zeros(len(batch["input_ids"]), dtype=torch.long)  # one decoder step: the start token
        last = n_tok + batch["attention_mask"].sum(1) - 1
        if position is Position.LAST or self.kind is BackboneKind.SEQ2SEQ:
            return last
        if self.kind is BackboneKind.MASKED_LM and self.insertion is Insertion.PAPER:
            return torch.zeros_like(last)  # the paper's layout: prompt slot 0 holds <mask>
        return n_tok + batch["score_index"]

    def ffn_modules(self, where: str = "decoder") -> list[nn.Module]:
        """Per layer, the module whose output is the FFN's intermediate activation (active when > 0).

        BERT/RoBERTa/MPNet: the intermediate block, after GELU. T5: `wi` of the encoder or decoder
        (`where`). Llama/Qwen2 (gated): the gate projection, before SiLU. GPT-2: `c_fc`, before GELU.
        For every one of these, "> 0" before or after the activation is the same test.
        """
        model = self.model
        if self.kind is BackboneKind.SEQ2SEQ:
            if where not in ("encoder", "decoder"):
                raise PtxError(f"hook point '{where}' does not exist on seq2seq backbone '{self.name}'; "
                               "expected 'encoder' or 'decoder'")
            stack = model.get_encoder() if where == "encoder" else model.get_decoder()
            return [blk.layer[-1].DenseReluDense.wi if hasattr(blk.layer[-1].DenseReluDense, "wi")
                    else blk.layer[-1].DenseReluDense.wi_0 for blk in stack.block]
        base = model.base_model
        if hasattr(base, "encoder") and hasattr(base.encoder, "layer"):
            return [layer.intermediate for layer in base.encoder.layer]
        if hasattr(base, "layers"):
            return [layer.mlp.gate_proj for layer in base.layers]
        if hasattr(base, "h"):
            return [blk.mlp.c_fc for blk in base.h]
        raise PtxError(f"no known FFN hook point on backbone '{self.name}' ({model.config.model_type})")


def _pad_batch(batch: dict, width: int, pad_id: int) -> dict:
    """A collated batch right-padded to `width` tokens (input_ids with pad_id, attention_mask with 0)."""
    extra = width - batch["input_ids"].shape[1]
    if extra == 0:
        return batch
    return {**batch, "input_ids": F.pad(batch["input_ids"], (0, extra), value=pad_id),
            "attention_mask": F.pad(batch["attention_mask"], (0, extra), value=0)}


def detect_kind(config) -> BackboneKind:
    """The backbone kind from a transformers config."""
    if getattr(config, "is_encoder_decoder", False):
        return BackboneKind.SEQ2SEQ
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "MaskedLM" in archs or config.model_type in MASKED_TYPES:
        return BackboneKind.MASKED_LM
    return BackboneKind.CAUSAL_LM


def describe(name: str, insertion: str = "prepend") -> dict:
    """{name, revision, kind, d_model, insertion} of a backbone from its config alone (no weights loaded)."""
    import transformers

    from ptx.assets import resolve_model

    src = resolve_model(name)
    try:
        cfg = transformers.AutoConfig.from_pretrained(src.path)
    except OSError as exc:
        raise PtxError(f"backbone '{name}': cannot read its config ({str(exc).splitlines()[0]})") from None
    d_model = getattr(cfg, "d_model", None) or cfg.hidden_size
    return {"name": name, "revision": src.revision, "kind": detect_kind(cfg).value, "d_model": int(d_model),
            "insertion": insertion}


def kind_of(name: str) -> BackboneKind:
    """The kind of a backbone from its local or shipped config.json, without resolving or loading the model (an
    import of a prompt names a backbone that may not be in the cache); else guessed from its name."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from ptx.assets import paper_config

    local = Path(name).expanduser() / "config.json"
    try:
        config = json.loads(local.read_text()) if local.is_file() else paper_config(name)
    except PtxError:
        config = None
    if config:
        return detect_kind(SimpleNamespace(**{"is_encoder_decoder": False, "architectures": None, **config}))
    n = name.lower()
    return BackboneKind.SEQ2SEQ if "t5" in n else BackboneKind.MASKED_LM if any(
        k in n for k in ("bert", "roberta", "minilm")) else BackboneKind.CAUSAL_LM


def _zero_position(model) -> int | None:
    """The position id whose embedding is all zeros (RoBERTa's padding index), or None when there is none."""
    emb = getattr(getattr(model.base_model, "embeddings", None), "position_embeddings", None)
    if not isinstance(emb, nn.Embedding) or emb.padding_idx is None:
        return None
    return int(emb.padding_idx) if not emb.weight[emb.padding_idx].any() else None


def _special_layout(tokenizer) -> tuple[tuple, tuple]:
    """The special tokens the tokenizer puts before and after a text, found by tokenising one word."""
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return tuple(full[:i]), tuple(full[i + len(bare):])
    return (), ()


def _hub_fix() -> str:
    from ptx.assets import ALIASES

    return (f"use a ptx alias ({', '.join(ALIASES)}), a local directory written by save_pretrained, or run with "
            "network access to the Hugging Face hub")


def _from_pretrained(src, dtype):
    """(config, model, tokenizer) of a resolved source; a hub id not in the local cache fails fast when the hub
    cannot be reached, instead of after huggingface_hub's retries."""
    import logging as _logging
    import os

    import transformers

    if not _logging.getLogger().isEnabledFor(_logging.INFO):  # hub retry warnings: one line is enough (-v shows them)
        _logging.getLogger("huggingface_hub").setLevel(_logging.ERROR)
    rev = None if src.offline else src.revision
    local_only = src.offline or bool(os.environ.get("HF_HUB_OFFLINE"))
    if not local_only:
        try:
            transformers.AutoConfig.from_pretrained(src.path, revision=rev, local_files_only=True)
            local_only = True  # in the local cache: no request needed
        except OSError:
            _check_hub_reachable(src.path)
    config = transformers.AutoConfig.from_pretrained(src.path, revision=rev, local_files_only=local_only)
    auto = {BackboneKind.MASKED_LM: transformers.AutoModelForMaskedLM,
            BackboneKind.SEQ2SEQ: transformers.AutoModelForSeq2SeqLM,
            BackboneKind.CAUSAL_LM: transformers.AutoModelForCausalLM}[detect_kind(config)]
    model = auto.from_pretrained(src.path, revision=rev, dtype=dtype, attn_implementation="sdpa",
                                 local_files_only=local_only)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src.path, revision=rev, local_files_only=local_only)
    return config, model, tokenizer


def _check_hub_reachable(hub_id: str, timeout: float = 3.0) -> None:
    """A TCP connect to the hub endpoint; raises the one-line error when it fails."""
    import os
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise PtxError(f"cannot load backbone '{hub_id}': tried the ptx aliases, a local directory and the Hugging "
                       f"Face cache (not there), then the hub at {host} (unreachable: {exc.strerror or exc}); "
                       f"{_hub_fix()}") from None


def _load_failure(name: str, src, exc: Exception) -> str:
    """One line: the backbone, what was tried, the cause's first line, the fix."""
    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    import os

    hub = "the Hugging Face cache (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else \
        "the Hugging Face cache and hub"
    tried = (f"the ptx alias '{src.alias}' ({src.path})" if src.alias else f"the local directory {src.path}"
             if src.offline else f"the ptx aliases, a local directory, {hub}")
    return f"cannot load backbone '{name}': tried {tried}: {cause}; {_hub_fix()}"


def load_backbone(name: str, insertion: str = "prepend", device: str | None = None,
                  dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a frozen backbone by alias, local path or Hugging Face id."""
    import transformers

    from ptx.assets import resolve_model
    from ptx.progress import silence_third_party_bars

    silence_third_party_bars()  # "Loading weights": ptx's stage bar is the one a person watches
    transformers.utils.logging.set_verbosity_error()

    try:
        insertion = Insertion(insertion)
    except ValueError:
        raise PtxError(f"unknown insertion '{insertion}'; expected one of "
                       f"{[i.value for i in Insertion]}") from None
    src = resolve_model(name)
    try:
        config, model, tokenizer = _from_pretrained(src, dtype)
    except PtxError:
        raise
    except Exception as exc:  # transformers / huggingface_hub raise many types; the user needs one line
        log.info("loading backbone %r from %s failed", name, src.path, exc_info=True)  # the full cause under -v
        raise PtxError(_load_failure(name, src, exc)) from None
    kind = detect_kind(config)
    if insertion is Insertion.PAPER and (kind is not BackboneKind.MASKED_LM or tokenizer.mask_token_id is None):
        raise PtxError(f"insertion 'paper' is the masked-LM <mask>-slot layout; backbone '{name}' is {kind.value}")
    if insertion is Insertion.PAPER and _zero_position(model) is None:  # e.g. BERT: every position id is learned
        raise PtxError(f"insertion 'paper' gives prompt slots a zero position embedding (RoBERTa's padding index); "
                       f"backbone '{name}' ({model.config.model_type}) has no zero position row; use 'prepend'")
    model.requires_grad_(False)
    model.eval()
    if device:
        model.to(device)
    cfg = model.config
    d_model = getattr(cfg, "d_model", None) or cfg.hidden_size
    n_layers = getattr(cfg, "num_layers", None) or cfg.num_hidden_layers
    d_ff = getattr(cfg, "d_ff", None) or getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d_model
    return Backbone(name=name, revision=src.revision, kind=kind, insertion=insertion, model=model,
                    tokenizer=tokenizer, d_model=int(d_model), n_layers=int(n_layers), d_ff=int(d_ff),
                    _specials=_special_layout(tokenizer))
